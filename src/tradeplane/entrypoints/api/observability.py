"""Request metrics and access logs as a plain ASGI middleware (cheaper than BaseHTTPMiddleware)."""

from __future__ import annotations

import logging
import time
from typing import Any

from prometheus_client import Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tradeplane.metrics import HTTP_REQUEST_DURATION, HTTP_REQUESTS

access_log = logging.getLogger("tradeplane.api.access")


class RequestMetrics:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        # the labelled children by (method, route template, status): ``labels()`` costs a lock and a tuple of
        # strings on every call. As bounded as the labels themselves, which prometheus_client keeps anyway.
        self._children: dict[tuple[str, str, int], tuple[Histogram, Counter]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            elapsed = time.perf_counter() - started
            route: Any = scope.get("route")
            # the route template, not the raw path, so label cardinality stays bounded
            template = getattr(route, "path", "unmatched")
            key = (scope["method"], template, status)
            children = self._children.get(key)
            if children is None:
                labels = (scope["method"], template, str(status))
                children = self._children[key] = (HTTP_REQUEST_DURATION.labels(*labels), HTTP_REQUESTS.labels(*labels))
            duration, requests = children
            duration.observe(elapsed)
            requests.inc()
            if status >= 500 or access_log.isEnabledFor(logging.DEBUG):
                access_log.log(
                    logging.WARNING if status >= 500 else logging.DEBUG,
                    "%s %s -> %s",
                    scope["method"],
                    scope["path"],
                    status,
                    extra={"path": scope["path"], "status": status, "latency_ms": round(elapsed * 1000, 3)},
                )
