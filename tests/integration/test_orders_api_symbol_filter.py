"""GET /orders?symbol= finds every order the client placed under that symbol, including the rejected orders for
a symbol no instrument has (stored with reason unknown_instrument and shown with the symbol asked for)."""

from __future__ import annotations

import httpx

from tests.integration import test_orders_api
from tests.integration.conftest import Actor
from tests.integration.test_orders_api import post
from tradeplane.bootstrap import Platform

alice = test_orders_api.alice  # a funded trader with a random high id


async def test_orders_for_an_unlisted_symbol_can_be_listed_by_that_symbol(
    client: httpx.AsyncClient, platform: Platform, alice: Actor
) -> None:
    await post(client, alice)  # a BTC-USD order, which the filter must leave out
    typo = await post(client, alice, symbol="BTCUSD")
    assert (typo.status_code, typo.json()["reason"]) == (422, "unknown_instrument")
    rejected = typo.json()["order"]

    listed = await client.get("/api/v1/orders", params={"symbol": "BTCUSD"}, headers=alice.headers)
    assert listed.status_code == 200, listed.text
    assert [(o["id"], o["symbol"], o["status"]) for o in listed.json()["items"]] == [
        (rejected["id"], "BTCUSD", "rejected")
    ]
    nothing = await client.get("/api/v1/orders", params={"symbol": "NEVER-PLACED"}, headers=alice.headers)
    assert nothing.json() == {"items": [], "next_cursor": None}
