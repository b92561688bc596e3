"""Audit of GET /orders and GET /fills pagination (issue 3: "GET /orders (filters ...; paginated)"): rows that
share one timestamp (one transaction's orders, one engine batch's fills) are paged without gaps or repeats, and
a cursor keeps working while newer rows arrive.
"""

from __future__ import annotations

from typing import Any

import httpx

from tests.integration import test_orders_api
from tests.integration.conftest import Actor
from tests.integration.test_orders_api import post, sql
from tradeplane.bootstrap import Platform

alice = test_orders_api.alice  # a funded trader with a random high id


async def _walk(client: httpx.AsyncClient, actor: Actor, path: str, key: str, **params: Any) -> list[Any]:
    seen: list[Any] = []
    cursor: str | None = None
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        response = await client.get(path, params=query, headers=actor.headers)
        assert response.status_code == 200, response.text
        page = response.json()
        seen += [item[key] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            return seen


async def test_orders_with_one_timestamp_page_by_id_without_gaps_or_repeats(
    client: httpx.AsyncClient, platform: Platform, alice: Actor
) -> None:
    ids = [(await post(client, alice, price=f"6500{n}.00")).json()["id"] for n in range(7)]
    await sql(platform, "UPDATE orders SET created_at = '2026-01-01T00:00:00.123456Z' WHERE id = ANY($1)", ids)
    assert await _walk(client, alice, "/api/v1/orders", "id", limit=3) == sorted(ids, reverse=True)
    assert await _walk(client, alice, "/api/v1/orders", "id", limit=2, status="open") == sorted(ids, reverse=True)


async def test_a_cursor_is_not_disturbed_by_orders_placed_after_it(
    client: httpx.AsyncClient, platform: Platform, alice: Actor
) -> None:
    ids = [(await post(client, alice)).json()["id"] for _ in range(4)]
    first = (await client.get("/api/v1/orders", params={"limit": 2}, headers=alice.headers)).json()
    newer = (await post(client, alice)).json()["id"]
    rest = (
        await client.get("/api/v1/orders", params={"limit": 2, "cursor": first["next_cursor"]}, headers=alice.headers)
    ).json()
    assert [o["id"] for o in first["items"] + rest["items"]] == sorted(ids, reverse=True)
    assert newer not in [o["id"] for o in rest["items"]]


async def test_fills_of_one_batch_page_by_id_without_gaps_or_repeats(
    client: httpx.AsyncClient, platform: Platform, alice: Actor
) -> None:
    order_id = (await post(client, alice)).json()["id"]
    await sql(
        platform,
        "INSERT INTO fills (fill_id, order_id, account_id, instrument_id, side, quantity, price, fee, fee_asset,"
        " liquidity, trade_id, created_at)"
        " SELECT 'f' || n, $2::bigint, $1::bigint, i.id, 'buy', 0.1, 65000, 3.25, 'USD', 'taker', 't' || n,"
        " '2026-01-01T00:00:00.5Z'::timestamptz FROM instruments i, generate_series(0, 6) n"
        " WHERE i.symbol = 'BTC-USD'",
        alice.account_id,
        order_id,
    )
    expected = [r["fill_id"] for r in await sql(platform, "SELECT fill_id FROM fills ORDER BY id DESC")]
    assert len(expected) == 7
    assert await _walk(client, alice, "/api/v1/fills", "fill_id", limit=3) == expected
    assert await _walk(client, alice, "/api/v1/fills", "fill_id", limit=2, symbol="BTC-USD") == expected
