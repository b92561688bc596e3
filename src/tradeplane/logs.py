"""JSON log lines with the seed 000 fields: timestamp, level, service, message, and order_id, user_id,
broker_id, latency_ms where they apply (pass them with `extra={...}`)."""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any

import orjson

CONTEXT_FIELDS = ("order_id", "user_id", "broker_id", "latency_ms", "account_id", "symbol", "path", "status")


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "service": getattr(record, "service", self.service),
            "message": record.getMessage(),
            "logger": record.name,
        }
        for field in CONTEXT_FIELDS:
            value = getattr(record, field, None)
            if value is not None:
                line[field] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


def configure_logging(service: str, level: str = "INFO") -> None:
    """One JSON object per line on stderr for every logger, ours and the libraries'."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Per-request and per-step chatter: the demo traders' HTTP client alone logs dozens of lines a second.
    noisy_loggers = ("uvicorn.access", "httpx", "httpcore", "aio_pika", "aiormq", "nats", "alembic.runtime")
    for noisy in noisy_loggers:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
