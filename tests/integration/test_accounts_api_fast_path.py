"""GET /api/v1/accounts/{id} answers the same through the api's fast path (``fast_reads.AccountReadFastPath``, in
front of FastAPI's own layers) as through the FastAPI route (the same application served by FastAPI alone): same
status, same headers, same bytes, errors included, and the same metrics label, counted once."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from tests.integration.conftest import Actor
from tests.integration.test_api_health import sample
from tests.integration.test_orders_api import new_actor, post, sql
from tradeplane.bootstrap import Platform
from tradeplane.entrypoints.api.app import ERROR_RENDERERS, create_app
from tradeplane.entrypoints.api.fast_reads import AccountReadFastPath, row_id
from tradeplane.services.identity import ApiKeyAuthenticator, Principal, Role
from tradeplane.services.queries import MAX_ROW_ID


def route_only_app(platform: Platform) -> ASGIApp:
    """The api as create_app builds it, served by FastAPI alone: every request goes through FastAPI's route."""
    app = create_app(platform)

    async def routed(scope: Scope, receive: Receive, send: Send) -> None:
        await FastAPI.__call__(app, scope, receive, send)

    return routed


def client_of(app: object) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # type: ignore[arg-type]
    return httpx.AsyncClient(transport=transport, base_url="http://tradeplane")


@pytest.fixture
async def route(platform: Platform) -> AsyncIterator[httpx.AsyncClient]:
    async with client_of(route_only_app(platform)) as http:
        yield http


class HandedOn:
    """The application behind a bare fast path: records the paths handed to it, answers 418."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.paths.append(scope["path"])
        await send({"type": "http.response.start", "status": 418, "headers": []})
        await send({"type": "http.response.body", "body": b""})


@pytest.fixture
async def desk(platform: Platform) -> dict[str, Actor]:
    """A cash trader with positions, P&L and a hold, a margin trader, a readonly user and an admin."""
    cash = await new_actor(platform, cash="100000.00")
    margin = await new_actor(platform, cash="5000.00", kind="margin")
    # JSON escaping: a quote, a backslash, a control character, non-ASCII letters and a line separator
    await sql(platform, "UPDATE accounts SET name = $2 WHERE id = $1", cash.account_id, 'Ü "main" \\ \x01 \u2028 日本')
    for account_id in (cash.account_id, margin.account_id):
        await sql(
            platform,
            "INSERT INTO positions (account_id, instrument_id, net_quantity, average_price, realized_pnl)"
            " SELECT $1::bigint, id, 2, 60000.123456789012345678, 150.25 FROM instruments WHERE symbol = 'BTC-USD'"
            " UNION ALL SELECT $1::bigint, id, -10, 200, -20 FROM instruments WHERE symbol = 'AAPL'",
            account_id,
        )
    await sql(platform, "UPDATE instruments SET last_price = 65000.50 WHERE symbol = 'BTC-USD'")
    client = client_of(create_app(platform))
    async with client:
        placed = await post(client, cash, symbol="AAPL", quantity="10", price="190.00")
    assert placed.status_code == 201, placed.text
    return {
        "cash": cash,
        "margin": margin,
        "reader": await new_actor(platform, Role.READONLY),
        "admin": await new_actor(platform, Role.ADMIN),
    }


async def requests(platform: Platform, desk: dict[str, Actor]) -> list[tuple[str, dict[str, str]]]:
    cash, margin, reader, admin = desk["cash"], desk["margin"], desk["reader"], desk["admin"]
    house = (await sql(platform, "SELECT min(id) AS id FROM accounts WHERE kind = 'house'"))[0]["id"]
    own = f"/api/v1/accounts/{cash.account_id}"
    return [
        (own, cash.headers),
        (f"/api/v1/accounts/{margin.account_id}", margin.headers),
        (own, admin.headers),  # admin sees every account
        (own, margin.headers),  # another trader's: 404
        (own, reader.headers),  # a readonly user owning no account: 404
        (f"/api/v1/accounts/{house}", admin.headers),  # the house account is nobody's: 404
        (f"/api/v1/accounts/{MAX_ROW_ID}", admin.headers),  # no such account
        (own, {}),  # no key
        (own, {"Authorization": "Bearer tp_nope_nope"}),  # unknown key
        (own, {"Authorization": "Basic abc"}),
        (f"{own}?verbose=1", cash.headers),  # a query string changes nothing
    ]


# paths the fast path hands to the route: ids the route refuses (422) or routes that are not this one
HANDED_ON = [
    "/api/v1/accounts/0",
    "/api/v1/accounts/-1",
    "/api/v1/accounts/abc",
    f"/api/v1/accounts/{MAX_ROW_ID + 1}",
    "/api/v1/accounts/1.0",
    "/api/v1/accounts/%E2%91%A0",  # a Unicode digit
    "/api/v1/accounts/",
]


async def test_answers_are_the_routes_byte_for_byte(
    platform: Platform, desk: dict[str, Actor], client: httpx.AsyncClient, route: httpx.AsyncClient
) -> None:
    cases = await requests(platform, desk)
    statuses = []
    for path, headers in cases:
        fast = await client.get(path, headers=headers)
        routed = await route.get(path, headers=headers)
        assert (fast.status_code, fast.content) == (routed.status_code, routed.content), path
        assert fast.headers.multi_items() == routed.headers.multi_items(), path
        statuses.append(fast.status_code)
    assert statuses == [200, 200, 200, 404, 404, 404, 404, 401, 401, 401, 200]
    for path in HANDED_ON:
        fast = await client.get(path, headers=desk["cash"].headers)
        routed = await route.get(path, headers=desk["cash"].headers)
        assert (fast.status_code, fast.content) == (routed.status_code, routed.content), path
    padded = f"/api/v1/accounts/0{desk['cash'].account_id}"  # the route reads a leading zero as the same id
    fast = await client.get(padded, headers=desk["cash"].headers)
    assert (fast.status_code, fast.content) == (200, (await route.get(padded, headers=desk["cash"].headers)).content)


async def test_the_fast_path_answers_its_requests_itself(platform: Platform, desk: dict[str, Actor]) -> None:
    """Without the application behind it: what it answers (matching the route) it answers alone, and it hands on
    exactly the requests it should."""
    handed_on = HandedOn()
    bare = AccountReadFastPath(handed_on, platform, ERROR_RENDERERS)
    async with client_of(bare) as fast, client_of(route_only_app(platform)) as route:
        for path, headers in await requests(platform, desk):
            answered = await fast.get(path, headers=headers)
            routed = await route.get(path, headers=headers)
            assert (answered.status_code, answered.content) == (routed.status_code, routed.content), path
        assert handed_on.paths == []
        for path in HANDED_ON:
            assert (await fast.get(path, headers=desk["cash"].headers)).status_code == 418
        own = f"/api/v1/accounts/{desk['cash'].account_id}"
        for method in ("HEAD", "POST", "PATCH", "DELETE"):
            assert (await fast.request(method, own, headers=desk["cash"].headers)).status_code == 418
        assert (await fast.get(f"{own}/", headers=desk["cash"].headers)).status_code == 418
        # a GET that comes with a body is the application's to judge (BodyLimit refuses one over its limit)
        with_body = await fast.request("GET", own, headers=desk["cash"].headers, content=b"{}")
        assert with_body.status_code == 418
        assert (await fast.get(own, headers={**desk["cash"].headers, "content-length": "0"})).status_code == 200
    assert len(handed_on.paths) == len(HANDED_ON) + 6


async def test_reads_are_answered_in_front_of_fastapis_layers(platform: Platform, desk: dict[str, Actor]) -> None:
    """FastAPI's layers (its middleware stack, routing, dependencies) cost more CPU than the read itself: a read the
    fast path can answer never reaches them, anything else does."""
    app = create_app(platform)
    reached: list[str] = []

    class Recorder:
        def __init__(self, inner: ASGIApp) -> None:
            self.inner = inner

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            reached.append(scope.get("path", ""))
            await self.inner(scope, receive, send)

    app.add_middleware(Recorder)  # the outermost of FastAPI's user middleware
    own = f"/api/v1/accounts/{desk['cash'].account_id}"
    async with client_of(app) as client:
        assert (await client.get(own, headers=desk["cash"].headers)).status_code == 200
        assert (await client.get(own)).status_code == 401
        assert reached == []
        assert (await client.get("/api/v1/accounts/0", headers=desk["cash"].headers)).status_code == 422
        assert (await client.get("/health")).status_code == 200
    assert reached == ["/api/v1/accounts/0", "/health"]


async def test_money_figures_follow_a_change_at_once(
    platform: Platform, desk: dict[str, Actor], client: httpx.AsyncClient
) -> None:
    """Nothing is cached: a new trade price or a settled hold shows in the next read."""
    cash = desk["cash"]
    path = f"/api/v1/accounts/{cash.account_id}"
    before = (await client.get(path, headers=cash.headers)).json()
    await sql(platform, "UPDATE instruments SET last_price = 64000 WHERE symbol = 'BTC-USD'")
    await sql(platform, "UPDATE holds SET released_at = now() WHERE account_id = $1", cash.account_id)
    after = (await client.get(path, headers=cash.headers)).json()
    assert (before["holds"], after["holds"]) == ("1900.57", "0")
    assert after["positions_value"] == "126100"  # 2 * 64000 - 10 * 190
    assert before["positions_value"] == "128101"


async def test_fast_path_reads_are_measured_under_the_route(client: httpx.AsyncClient, desk: dict[str, Actor]) -> None:
    cash = desk["cash"]
    path = f"/api/v1/accounts/{cash.account_id}"
    template = {"method": "GET", "route": "/api/v1/accounts/{account_id}"}
    before = (await client.get("/metrics")).text
    for _ in range(2):
        assert (await client.get(path, headers=cash.headers)).status_code == 200
    assert (await client.get(path)).status_code == 401
    assert (await client.get(path, headers=desk["margin"].headers)).status_code == 404
    assert (await client.get("/api/v1/accounts/0", headers=cash.headers)).status_code == 422  # the route's
    after = (await client.get("/metrics")).text
    for status, n in (("200", 2), ("401", 1), ("404", 1), ("422", 1)):
        labels = {**template, "status": status}
        assert sample(after, "http_requests_total", **labels) - sample(before, "http_requests_total", **labels) == n
        assert (
            sample(after, "http_request_duration_seconds_count", **labels)
            - sample(before, "http_request_duration_seconds_count", **labels)
            == n
        )


class BrokenAuthenticator(ApiKeyAuthenticator):
    """A fault in the request's own code (not an outage): what no error renderer knows."""

    async def authenticate(self, conn_source: object, key: str) -> Principal:
        raise RuntimeError("a bug in authentication")


async def test_an_unexpected_error_is_answered_as_the_route_answers_it(
    platform: Platform, desk: dict[str, Actor], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(platform, "authenticator", BrokenAuthenticator("not-used"))
    path = f"/api/v1/accounts/{desk['cash'].account_id}"
    async with client_of(create_app(platform)) as fast, client_of(route_only_app(platform)) as route:
        answered = await fast.get(path, headers=desk["cash"].headers)
        routed = await route.get(path, headers=desk["cash"].headers)
    assert (answered.status_code, answered.content) == (routed.status_code, routed.content)
    assert (answered.status_code, answered.content) == (500, b"Internal Server Error")
    assert answered.headers.multi_items() == routed.headers.multi_items()


def test_only_plainly_written_ids_in_range_are_read() -> None:
    assert [row_id(t) for t in ("1", "42", str(MAX_ROW_ID))] == [1, 42, MAX_ROW_ID]
    for text in (
        "",
        "0",
        "007",
        "-1",
        "+1",
        " 1",
        "1 ",
        "1.0",
        "1e3",
        "abc",
        "①",
        "\u0661",
        str(MAX_ROW_ID + 1),
        "9" * 40,
    ):
        assert row_id(text) is None, text
