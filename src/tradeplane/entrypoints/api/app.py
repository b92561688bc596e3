"""The FastAPI application: routers, the error renderer, /metrics and background gauges."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from tradeplane import __version__
from tradeplane.adapters.bus import order_stream
from tradeplane.bootstrap import Platform
from tradeplane.entrypoints.api import health, identity
from tradeplane.entrypoints.api import marketdata as marketdata_api
from tradeplane.entrypoints.api import orders as orders_api
from tradeplane.entrypoints.api import websocket as websocket_hub
from tradeplane.entrypoints.api.observability import RequestMetrics
from tradeplane.errors import TradeplaneError
from tradeplane.metrics import MESSAGE_QUEUE_LENGTH

log = logging.getLogger("tradeplane.api")

QUEUE_POLL_SECONDS = 5.0


def error_body(code: str, detail: object) -> dict[str, object]:
    return {"error": code, "detail": detail}


async def poll_queue_lengths(platform: Platform) -> None:
    """Keep message_queue_length current for each order shard stream."""
    streams = [order_stream(k) for k in range(platform.settings.engine_shards)]
    while True:
        for stream in streams:
            try:
                MESSAGE_QUEUE_LENGTH.labels(stream).set(await platform.bus.queue_length(stream))
            except Exception as exc:  # the bus being down must not kill the poller
                log.debug("queue length of %s unavailable: %s", stream, exc)
        await asyncio.sleep(QUEUE_POLL_SECONDS)


def create_app(platform: Platform) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await platform.start()
        poller = asyncio.create_task(poll_queue_lengths(platform))
        try:
            yield
        finally:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller

    app = FastAPI(
        title="tradeplane",
        version=__version__,
        description="Self-hosted trading platform core. Authenticate with `Authorization: Bearer <API key>`.",
        lifespan=lifespan,
    )
    app.state.platform = platform
    app.add_middleware(RequestMetrics)

    @app.exception_handler(TradeplaneError)
    async def render_error(request: Request, exc: TradeplaneError) -> JSONResponse:
        if exc.status_code >= 500:
            log.warning("%s %s failed: %s", request.method, request.url.path, exc.detail)
        return JSONResponse(error_body(exc.code, exc.detail), status_code=exc.status_code)

    @app.exception_handler(asyncpg.exceptions.DeadlockDetectedError)
    @app.exception_handler(asyncpg.exceptions.SerializationError)
    async def render_contention(request: Request, exc: Exception) -> JSONResponse:
        # the transaction was rolled back whole, so nothing was stored: the client may simply retry
        log.warning("%s %s lost a lock race: %s", request.method, request.url.path, exc)
        return JSONResponse(
            error_body("retry", "the request lost a race with a concurrent update and changed nothing; retry it"),
            status_code=503,
            headers={"Retry-After": "0"},
        )

    @app.exception_handler(RequestValidationError)
    async def render_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = [
            {"field": ".".join(str(p) for p in err.get("loc", ())), "message": err.get("msg")} for err in exc.errors()
        ]
        return JSONResponse(error_body("validation_error", detail), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def render_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(error_body(code, exc.detail), status_code=exc.status_code)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    app.include_router(health.router)
    app.include_router(identity.router)
    app.include_router(marketdata_api.router)  # /api/v1/marketdata quotes, ticks, candles, spreads
    app.include_router(orders_api.router)  # /api/v1 orders, fills, positions, accounts, instruments, book
    app.include_router(websocket_hub.router)  # /ws
    return app
