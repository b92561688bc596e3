"""Prometheus metrics with the seed 000 names. One registry per process (the default one)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

HTTP_REQUEST_DURATION = Histogram(
    "http_request_duration_seconds",
    "HTTP request duration",
    ["method", "route", "status"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
HTTP_REQUESTS = Counter("http_requests_total", "Total HTTP requests", ["method", "route", "status"])
DATABASE_QUERY_DURATION = Histogram(
    "database_query_duration_seconds",
    "Database query duration",
    ["operation"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0),
)
DATABASE_ERRORS = Counter("database_errors_total", "Database errors", ["operation"])
MESSAGE_QUEUE_LENGTH = Gauge("message_queue_length", "Messages waiting on a bus stream", ["stream"])
CACHE_HIT_RATIO = Gauge("cache_hit_ratio", "Cache hit ratio over the process lifetime")
ORDER_PLACEMENT_DURATION = Histogram(
    "order_placement_duration_seconds", "Order placement duration (request to acknowledgement)"
)
WEBSOCKET_CONNECTIONS = Gauge("websocket_connections", "Active WebSocket connections")
WEBSOCKET_MESSAGES_SENT = Counter("websocket_messages_sent", "WebSocket messages sent")
WEBSOCKET_MESSAGES_RECEIVED = Counter("websocket_messages_received", "WebSocket messages received")
DEPENDENCY_UP = Gauge("dependency_up", "1 when the dependency answered its last health check", ["dependency"])
