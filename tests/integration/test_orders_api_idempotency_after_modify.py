"""Idempotency (issue 3): a retry of POST /orders with the same client_order_id and the same parameters returns the
original order. "The same parameters" are the ones the original request sent: a modify the engine has applied
since (new price or quantity on the row) does not make the retry a different request.
"""

from __future__ import annotations

import httpx

from tests.integration import test_orders_api
from tests.integration.conftest import Actor
from tests.integration.test_orders_api import body, post, sql
from tradeplane.bootstrap import Platform

alice = test_orders_api.alice  # a funded trader with a random high id


async def test_a_retry_after_the_order_was_modified_returns_the_original_order(
    client: httpx.AsyncClient, platform: Platform, alice: Actor
) -> None:
    first = await post(client, alice, client_order_id="retry-me")
    assert first.status_code == 201, first.text
    order_id = first.json()["id"]
    amended = await client.patch(f"/api/v1/orders/{order_id}", json={"price": "64000.00"}, headers=alice.headers)
    assert amended.status_code == 200, amended.text
    # the engine applies the modify (it is not running here): the row now carries the new price
    await sql(
        platform,
        "UPDATE orders SET status = 'new', price = 64000, modifies_done = modifies_requested WHERE id = $1",
        order_id,
    )

    retry = await post(client, alice, client_order_id="retry-me")  # the original request, byte for byte
    assert retry.status_code == 200, retry.text
    assert retry.json()["id"] == order_id

    # through the batch endpoint too; and a request with the order's new price is not the original request
    batch = await client.post(
        "/api/v1/orders/batch", json={"orders": [body(alice, client_order_id="retry-me")]}, headers=alice.headers
    )
    assert batch.status_code == 200, batch.text
    assert batch.json()["results"][0]["order"]["id"] == order_id, batch.text
    modified = await post(client, alice, client_order_id="retry-me", price="64000.00")
    assert modified.status_code == 409, modified.text
    assert modified.json()["error"] == "duplicate_client_order_id"
