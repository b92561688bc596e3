"""The FastAPI application: routers, the error renderer, /metrics and background gauges."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tradeplane import __version__
from tradeplane.adapters.bus import order_stream
from tradeplane.bootstrap import Platform
from tradeplane.entrypoints.api import health, identity
from tradeplane.entrypoints.api import marketdata as marketdata_api
from tradeplane.entrypoints.api import orders as orders_api
from tradeplane.entrypoints.api import websocket as websocket_hub
from tradeplane.entrypoints.api.deps import principal_of
from tradeplane.entrypoints.api.fast_reads import ACCOUNT_PATH, AccountReadFastPath
from tradeplane.entrypoints.api.observability import RequestMetrics
from tradeplane.entrypoints.api.schemas import OrderCreate
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


async def render_error(request: Request, exc: TradeplaneError) -> JSONResponse:
    if exc.status_code >= 500:
        log.warning("%s %s failed: %s", request.method, request.url.path, exc.detail)
    return JSONResponse(error_body(exc.code, exc.detail), status_code=exc.status_code)


async def render_contention(request: Request, exc: Exception) -> JSONResponse:
    # the transaction was rolled back whole, so nothing was stored: the client may simply retry
    log.warning("%s %s lost a lock race: %s", request.method, request.url.path, exc)
    return JSONResponse(
        error_body("retry", "the request lost a race with a concurrent update and changed nothing; retry it"),
        status_code=503,
        headers={"Retry-After": "0"},
    )


async def render_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    detail = [
        {"field": ".".join(str(p) for p in err.get("loc", ())), "message": err.get("msg")} for err in exc.errors()
    ]
    return JSONResponse(error_body("validation_error", detail), status_code=422)


async def render_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(exc.status_code, "http_error")
    return JSONResponse(error_body(code, exc.detail), status_code=exc.status_code)


ERROR_RENDERERS: dict[type[Exception], Callable[[Request, Any], Awaitable[Response]]] = {
    TradeplaneError: render_error,
    asyncpg.exceptions.DeadlockDetectedError: render_contention,
    asyncpg.exceptions.SerializationError: render_contention,
    RequestValidationError: render_validation,
    StarletteHTTPException: render_http,
}

MAX_BODY_BYTES = 1 << 20  # a full batch (500 orders) is about 200 KiB


class _BodyTooLarge(StarletteHTTPException):
    def __init__(self) -> None:
        super().__init__(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")


class BodyLimit:
    """Refuses a request body over MAX_BODY_BYTES with 413 ``body_too_large``: at once when Content-Length says so,
    else as soon as the chunks read pass it, so no route buffers an unbounded body in memory."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((value for name, value in scope["headers"] if name == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            await _too_large(scope, receive, send)
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > MAX_BODY_BYTES:
                    raise _BodyTooLarge()  # FastAPI's routes render it (render_http); the fast path lands below
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except _BodyTooLarge:
            if started:
                raise
            await _too_large(scope, receive, send)


async def _too_large(scope: Scope, receive: Receive, send: Send) -> None:
    response = await render_http(Request(scope), _BodyTooLarge())
    await response(scope, receive, send)


_ORDERS_PATH = "/api/v1/orders"
_FAST_BODY_LIMIT = 16 * 1024  # an order is a few hundred bytes; anything larger takes the ordinary path


class OrderPlacementFastPath:
    """``POST /api/v1/orders``, the hot path, without the layers of FastAPI.

    Those layers cost more CPU per order than the placement itself (a profile at 500 orders/s: half of the api
    process's samples were in routing, dependencies and body parsing), and the ones in front of the user
    middleware still cost about as much as the placement's validation and response (FastAPI's telemetry check,
    which reads the environment on every request, ServerErrorMiddleware, fastapi's exception telemetry and
    body-limit layers). So ``TradeplaneAPI`` calls this before FastAPI sees the request.

    It does what the route does for a well-formed request (same authentication, the same ``OrderCreate``
    validation of the same parsed JSON, ``orders.place_one``, the same error renderers, and ServerErrorMiddleware's
    plain 500 for anything else) and hands anything else to ``app``, the whole FastAPI application, untouched,
    with the body it read: a body that is not JSON, fails validation, is larger than a few KiB or comes with
    another content type gets the route's own answer. The route stays declared for the OpenAPI schema and for
    those requests.
    """

    def __init__(self, app: ASGIApp, platform: Platform) -> None:
        self.app = app
        self.platform = platform
        self.route = next(r for r in orders_api.router.routes if getattr(r, "endpoint", None) is orders_api.place_order)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        authorization = content_type = content_length = None
        for name, value in scope["headers"]:
            if name == b"authorization" and authorization is None:
                authorization = value.decode("latin-1")
            elif name == b"content-type" and content_type is None:
                content_type = value
            elif name == b"content-length" and content_length is None:
                content_length = value
        if (
            scope.get("root_path")
            or content_type is None
            or content_type.partition(b";")[0].strip().lower() != b"application/json"
            or content_length is None
            or not content_length.isdigit()
            or int(content_length) > _FAST_BODY_LIMIT
        ):
            await self.app(scope, receive, send)
            return
        messages: list[Message] = []
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":  # a disconnect: the route reports it as it would
                await self.app(scope, _replay(messages, receive), send)
                return
            chunk = message.get("body", b"")
            chunks.append(chunk)
            size += len(chunk)
            if size > _FAST_BODY_LIMIT:  # more than Content-Length said: BodyLimit, in the app, decides
                await self.app(scope, _replay(messages, receive), send)
                return
            if not message.get("more_body", False):
                break
        try:
            data = json.loads(b"".join(chunks))
        except (ValueError, RecursionError):  # RecursionError: a body nested thousands of levels deep
            await self.app(scope, _replay(messages, receive), send)
            return
        scope["route"] = self.route  # the metrics label, as routing would have set it
        response: Response | None = None
        try:
            principal = await principal_of(self.platform, authorization or "")
            try:
                body: OrderCreate | None = OrderCreate.model_validate(data, from_attributes=True)
            except ValidationError:
                body = None
            if body is not None:
                response = await orders_api.place_one(body, principal, self.platform)
        except Exception as exc:
            renderer = next((ERROR_RENDERERS[c] for c in type(exc).__mro__ if c in ERROR_RENDERERS), None)
            if renderer is None:
                # what ServerErrorMiddleware (not in debug) answers, before uvicorn logs the exception
                await PlainTextResponse("Internal Server Error", status_code=500)(scope, receive, send)
                raise
            response = await renderer(Request(scope), exc)
        if response is None:  # not a valid order: the route's own validation answers
            await self.app(scope, _replay(messages, receive), send)
            return
        await response(scope, receive, send)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """``receive`` that first gives back the messages already read."""
    pending = list(messages)

    async def replayed() -> Message:
        return pending.pop(0) if pending else await receive()

    return replayed


class TradeplaneAPI(FastAPI):
    """The FastAPI application, with request metrics, ``POST /api/v1/orders`` and ``GET /api/v1/accounts/{id}`` in
    front of FastAPI's own layers.

    uvicorn calls the application itself for every request, so this is the one place to answer a request before
    ``FastAPI.__call__`` (see ``OrderPlacementFastPath`` and ``fast_reads.AccountReadFastPath``). ``RequestMetrics``
    times every HTTP request here, the fast paths' and FastAPI's alike, once each; a request a fast path hands back
    is measured once too.
    """

    def __init__(self, platform: Platform, **settings: Any) -> None:
        super().__init__(**settings)
        self.state.platform = platform
        framework: ASGIApp = super().__call__
        self._orders = OrderPlacementFastPath(framework, platform)
        self._accounts = AccountReadFastPath(framework, platform, ERROR_RENDERERS)
        self._framework = framework
        self._measured = RequestMetrics(self._dispatch)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._measured(scope, receive, send)
        else:  # lifespan and WebSocket
            await self._framework(scope, receive, send)

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        method, path = scope["method"], scope["path"]
        if method == "POST" and path == _ORDERS_PATH:
            await self._orders(scope, receive, send)
        elif method == "GET" and path.startswith(ACCOUNT_PATH):
            await self._accounts(scope, receive, send)
        else:
            await self._framework(scope, receive, send)


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

    app = TradeplaneAPI(
        platform,
        title="tradeplane",
        version=__version__,
        description="Self-hosted trading platform core. Authenticate with `Authorization: Bearer <API key>`.",
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimit)
    for exc_class, renderer in ERROR_RENDERERS.items():
        app.add_exception_handler(exc_class, renderer)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    app.include_router(health.router)
    app.include_router(identity.router)
    app.include_router(marketdata_api.router)  # /api/v1/marketdata quotes, ticks, candles, spreads
    app.include_router(orders_api.router)  # /api/v1 orders, fills, positions, accounts, instruments, book
    app.include_router(websocket_hub.router)  # /ws
    return app
