"""Log lines are single JSON objects with the seed 000 fields."""

from __future__ import annotations

import json
import logging

from tradeplane.logs import JsonFormatter


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
