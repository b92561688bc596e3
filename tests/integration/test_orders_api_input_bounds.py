"""Inputs the order routes cannot store or compute with are refused with a 422 validation_error, not a 500:
times that UTC cannot express, numbers past what Decimal's context holds, and text PostgreSQL refuses (NUL).

POST /orders goes through the api's fast path for an ``application/json`` body of at most 16 KiB and through
the FastAPI route otherwise; both must give the same answer, so each body is sent both ways."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.integration import test_orders_api
from tests.integration.conftest import Actor
from tests.integration.live_server import serving
from tests.integration.test_orders_api import body, counts, post
from tests.integration.test_orders_api_fast_path import FAST, ROUTE, send
from tradeplane.bootstrap import Platform

alice = test_orders_api.alice  # a funded trader with a random high id

TOO_EARLY = "0001-01-01T00:00:00+14:00"  # year 0 in UTC
TOO_LATE = "9999-12-31T23:00:00-14:00"  # year 10000 in UTC
HUGE = "1e1000000"  # a valid Decimal whose abs() overflows the default context

REFUSED_ORDERS: list[dict[str, Any]] = [
    {"time_in_force": "gtd", "expire_at": TOO_LATE},
    {"time_in_force": "gtd", "expire_at": TOO_EARLY},
    {"time_in_force": "gtd", "expire_at": "9999-12-31T23:59:59.999999Z"},  # PostgreSQL 'infinity'
    {"quantity": HUGE},
    {"quantity": "1e999999999"},
    {"price": HUGE},
    {"type": "stop_limit", "stop_price": HUGE},
    {"type": "stop", "price": None, "stop_price": HUGE},
    {"symbol": "BTC-USD\x00"},
    {"symbol": "BTC\u2011USD"},  # a non-breaking hyphen
    {"client_order_id": "c\x00-1"},
    {"client_order_id": "c\n1"},
    {"client_order_id": "\u00e9t\u00e9"},
]
REFUSED_IDS = [json.dumps(o)[:60] for o in REFUSED_ORDERS]


def assert_validation_error(response: httpx.Response) -> None:
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "validation_error", response.text


@pytest.mark.parametrize("overrides", REFUSED_ORDERS, ids=REFUSED_IDS)
async def test_an_order_that_cannot_be_stored_is_a_validation_error(
    client: httpx.AsyncClient, platform: Platform, alice: Actor, overrides: dict[str, Any]
) -> None:
    payload = json.dumps(body(alice, **overrides)).encode()
    fast = await send(client, FAST, payload, alice.headers)
    assert_validation_error(fast)
    route = await send(client, ROUTE, payload, alice.headers)
    assert (route.status_code, route.content) == (fast.status_code, fast.content)
    assert await counts(platform) == (0, 0, 0)  # no order, hold or outbox row


async def test_the_orders_are_refused_over_real_http_too(platform: Platform, alice: Actor) -> None:
    async with serving(platform) as url, httpx.AsyncClient(base_url=url) as http:
        for overrides in REFUSED_ORDERS:
            response = await http.post("/api/v1/orders", json=body(alice, **overrides), headers=alice.headers)
            assert_validation_error(response)


async def test_a_time_is_kept_as_the_same_instant_in_utc(client: httpx.AsyncClient, alice: Actor) -> None:
    placed = await post(client, alice, time_in_force="gtd", expire_at="9999-12-31T09:00:00+09:00")
    assert placed.status_code == 201, placed.text
    assert placed.json()["expire_at"] == "9999-12-31T00:00:00+00:00"


async def test_zeros_beyond_18_decimals_do_not_change_the_price(
    client: httpx.AsyncClient, platform: Platform, alice: Actor
) -> None:
    # more than asyncpg can send as a NUMERIC (its exponent is below -16383), though the value is 65000
    placed = await post(client, alice, price="65000." + "0" * 20_000, quantity="0.5" + "0" * 20_000)
    assert placed.status_code == 201, placed.text
    assert (placed.json()["price"], placed.json()["quantity"]) == ("65000", "0.5")
    again = await post(client, alice, price="65000.000000000000000000001")
    assert_validation_error(again)
    assert (await counts(platform))[0] == 1


@pytest.mark.parametrize("overrides", [{"quantity": HUGE}, {"price": HUGE}, {"price": "-" + HUGE}])
async def test_a_modify_past_the_decimal_context_is_a_validation_error(
    client: httpx.AsyncClient, alice: Actor, overrides: dict[str, str]
) -> None:
    order_id = (await post(client, alice)).json()["id"]
    response = await client.patch(f"/api/v1/orders/{order_id}", json=overrides, headers=alice.headers)
    assert_validation_error(response)


async def test_a_batch_answers_an_unstorable_order_by_itself(client: httpx.AsyncClient, alice: Actor) -> None:
    orders = [body(alice), body(alice, quantity=HUGE), body(alice, price=HUGE)]
    response = await client.post("/api/v1/orders/batch", json={"orders": orders}, headers=alice.headers)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [(r["status"], r.get("error")) for r in results] == [
        (201, None),
        (422, "validation_error"),
        (422, "validation_error"),
    ]


@pytest.mark.parametrize(
    "overrides", [{"symbol": "A\x00"}, {"client_order_id": "\x00"}, {"expire_at": TOO_LATE, "time_in_force": "gtd"}]
)
async def test_a_batch_with_untypable_text_or_times_is_refused_whole(
    client: httpx.AsyncClient, platform: Platform, alice: Actor, overrides: dict[str, str]
) -> None:
    orders = [body(alice), body(alice, **overrides)]
    response = await client.post("/api/v1/orders/batch", json={"orders": orders}, headers=alice.headers)
    assert_validation_error(response)
    assert await counts(platform) == (0, 0, 0)


@pytest.mark.parametrize("path", ["/api/v1/orders", "/api/v1/fills"])
@pytest.mark.parametrize("bound", ["start", "end"])
@pytest.mark.parametrize("moment", [TOO_EARLY, TOO_LATE])
async def test_a_time_filter_that_utc_cannot_express_is_refused(
    client: httpx.AsyncClient, alice: Actor, path: str, bound: str, moment: str
) -> None:
    response = await client.get(path, params={bound: moment}, headers=alice.headers)
    assert_validation_error(response)
    assert response.json()["detail"][0]["field"] == f"query.{bound}"


async def test_time_filters_at_the_ends_of_utc_still_select(client: httpx.AsyncClient, alice: Actor) -> None:
    order_id = (await post(client, alice)).json()["id"]
    edges = {"start": "0001-01-01T00:00:00Z", "end": "9999-12-31T23:59:59.999999Z"}
    listed = await client.get("/api/v1/orders", params=edges, headers=alice.headers)
    assert [o["id"] for o in listed.json()["items"]] == [order_id]
    # the same instants with offsets that keep them inside years 1 to 9999 in UTC
    shifted = {"start": "0001-01-01T00:00:00-01:00", "end": "9999-12-31T23:00:00+14:00"}
    listed = await client.get("/api/v1/orders", params=shifted, headers=alice.headers)
    assert [o["id"] for o in listed.json()["items"]] == [order_id]


@pytest.mark.parametrize(
    ("method", "path", "params"),
    [
        ("GET", "/api/v1/orders", {}),
        ("GET", "/api/v1/fills", {}),
        ("GET", "/api/v1/positions", {}),
        ("DELETE", "/api/v1/orders", {"account_id": "ACCOUNT"}),
    ],
)
@pytest.mark.parametrize("symbol", ["BTC-USD\x00", "btc\u2011usd", "X" * 33])
async def test_a_symbol_filter_that_names_no_possible_instrument_is_refused(
    client: httpx.AsyncClient, alice: Actor, method: str, path: str, params: dict[str, str], symbol: str
) -> None:
    query = {k: str(alice.account_id) if v == "ACCOUNT" else v for k, v in params.items()}
    response = await client.request(method, path, params={**query, "symbol": symbol}, headers=alice.headers)
    assert_validation_error(response)
    assert response.json()["detail"][0]["field"] == "query.symbol"
