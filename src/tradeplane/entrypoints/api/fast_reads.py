"""``GET /api/v1/accounts/{id}``, the hot read, without the layers of FastAPI.

Those layers cost the api process more CPU per read than the read itself (a profile of sequential reads: 60 % of the
samples were under FastAPI's router, of which a third in the route's own code and its query), and so do the ones in
front of the user middleware (see ``app.OrderPlacementFastPath``; answering before them took about a sixth off the
api's CPU per read), so ``app.TradeplaneAPI`` calls this before FastAPI sees the request. It does what the route
does for a request it can answer (same authentication, ``orders.read_account``, the same error renderers, and
ServerErrorMiddleware's plain 500 for anything else) and hands anything else to the whole application untouched:
another method, a path that is not a plain row id (the route answers 422 or 404 for it), a root path, a request that
comes with a body (``app.BodyLimit`` may refuse it). The route stays declared for the OpenAPI schema and those
requests.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from fastapi import Request
from fastapi.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from tradeplane.bootstrap import Platform
from tradeplane.entrypoints.api import orders as orders_api
from tradeplane.entrypoints.api.deps import principal_of
from tradeplane.services.queries import MAX_ROW_ID

ErrorRenderers = Mapping[type[Exception], Callable[[Request, Any], Awaitable[Response]]]

ACCOUNT_PATH = "/api/v1/accounts/"
_MAX_ID_DIGITS = len(str(MAX_ROW_ID))


def row_id(text: str) -> int | None:
    """The id a path segment names when it is written plainly (ASCII digits, no sign, no leading zero) and in
    range; None for anything else, which the route validates itself."""
    if not (0 < len(text) <= _MAX_ID_DIGITS and text.isascii() and text.isdigit()) or text[0] == "0":
        return None
    value = int(text)
    return value if value <= MAX_ROW_ID else None


class AccountReadFastPath:
    """Answers ``GET /api/v1/accounts/{id}`` as the route ``orders.get_account`` would, byte for byte."""

    def __init__(self, app: ASGIApp, platform: Platform, renderers: ErrorRenderers) -> None:
        self.app = app
        self.platform = platform
        self.renderers = renderers
        self.route = next(r for r in orders_api.router.routes if getattr(r, "endpoint", None) is orders_api.get_account)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        account_id = (
            row_id(path[len(ACCOUNT_PATH) :])
            if scope["type"] == "http"
            and scope["method"] == "GET"
            and path.startswith(ACCOUNT_PATH)
            and not scope.get("root_path")
            else None
        )
        authorization: bytes | None = None
        if account_id is not None:
            for name, value in scope["headers"]:
                if name == b"authorization":
                    authorization = value if authorization is None else authorization
                elif (name == b"content-length" and value != b"0") or name == b"transfer-encoding":
                    account_id = None  # a GET with a body: the application's own layers judge it
                    break
        if account_id is None:
            await self.app(scope, receive, send)
            return
        scope["route"] = self.route  # the metrics label, as routing would have set it
        try:
            principal = await principal_of(self.platform, (authorization or b"").decode("latin-1"))
            summary = await orders_api.read_account(account_id, principal, self.platform)
            response = orders_api.json_response(summary.to_json())
        except Exception as exc:
            renderer = next((self.renderers[c] for c in type(exc).__mro__ if c in self.renderers), None)
            if renderer is None:
                # what ServerErrorMiddleware (not in debug) answers, before uvicorn logs the exception
                await PlainTextResponse("Internal Server Error", status_code=500)(scope, receive, send)
                raise
            response = await renderer(Request(scope), exc)
        await response(scope, receive, send)
