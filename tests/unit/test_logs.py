"""Log lines are single JSON objects with the seed 000 fields."""

from __future__ import annotations

import json
import logging

import pytest

from tradeplane.logs import JsonFormatter, configure_logging


def test_log_line_has_seed_fields() -> None:
    record = logging.LogRecord("tradeplane.api", logging.INFO, __file__, 1, "Order %s placed", ("42",), None)
    record.order_id = "42"
    record.user_id = 7
    record.latency_ms = 1.25
    line = JsonFormatter("order-service").format(record)
    assert "\n" not in line
    data = json.loads(line)
    assert data["level"] == "INFO"
    assert data["service"] == "order-service"
    assert data["message"] == "Order 42 placed"
    assert data["order_id"] == "42" and data["user_id"] == 7 and data["latency_ms"] == 1.25
    assert data["timestamp"].endswith("+00:00")
    assert "broker_id" not in data  # absent context fields are omitted, not null


def test_exceptions_stay_on_one_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = JsonFormatter("api").format(record)
    assert "\n" not in line
    assert "ValueError: boom" in json.loads(line)["exception"]


def test_per_request_client_chatter_stays_out_of_the_log(capsys: pytest.CaptureFixture[str]) -> None:
    """`tradeplane up`'s demo traders talk to the API over httpx, which logs every request at INFO: dozens of
    lines a second that bury the platform's own. Only their warnings get through; ours still do at INFO."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("tradeplane")
        logging.getLogger("httpx").info("HTTP Request: POST http://127.0.0.1:8000/api/v1/orders")
        logging.getLogger("httpx").warning("connection pool is full")
        logging.getLogger("tradeplane.demo").info("demo market maker started")
        lines = [json.loads(line)["message"] for line in capsys.readouterr().err.splitlines()]
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    assert lines == ["connection pool is full", "demo market maker started"]
