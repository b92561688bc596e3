"""Audit of the numbers an order request may carry (issue 3: "price on the tick size, quantity on the lot size
and within min/max"; a denial is a 422, never a server error). Prices and quantities are stored in
``NUMERIC(38, 18)`` columns: a value that column cannot hold exactly (20 integer digits, 18 decimals) is a
malformed request, refused as ``validation_error`` before anything is stored, and never a 500 or a silently
rounded order row.
"""

from __future__ import annotations

import httpx
import pytest

from tests.integration import test_orders_api
from tests.integration.conftest import Actor
from tests.integration.test_orders_api import counts, post
from tradeplane.bootstrap import Platform

alice = test_orders_api.alice  # a funded trader with a random high id

OUT_OF_RANGE = [
    pytest.param({"quantity": "1e40"}, id="quantity-overflows"),
    pytest.param({"price": "1e30"}, id="price-overflows"),
    pytest.param({"type": "stop_limit", "stop_price": "1e25"}, id="stop-price-overflows"),
    pytest.param({"quantity": "0.50000000000000000001"}, id="quantity-beyond-18-decimals"),
    pytest.param({"price": "65000.0000000000000000001"}, id="price-beyond-18-decimals"),
]


@pytest.mark.parametrize("fields", OUT_OF_RANGE)
async def test_a_number_the_database_cannot_hold_is_a_validation_error(
    client: httpx.AsyncClient, platform: Platform, alice: Actor, fields: dict[str, str]
) -> None:
    before = await counts(platform)
    response = await post(client, alice, **fields)
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "validation_error"
    assert await counts(platform) == before  # no order, hold or outbox row (not even a rounded rejected order)


async def test_trailing_zeros_beyond_18_decimals_are_still_the_same_number(
    client: httpx.AsyncClient, platform: Platform, alice: Actor
) -> None:
    response = await post(client, alice, quantity="0.500000000000000000000000")
    assert response.status_code == 201, response.text
    assert response.json()["quantity"] == "0.5"


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"quantity": "1e40"}, id="quantity-overflows"),
        pytest.param({"price": "1e30"}, id="price-overflows"),
        pytest.param({"quantity": "0.60000000000000000001"}, id="quantity-beyond-18-decimals"),
    ],
)
async def test_a_modify_to_a_number_the_database_cannot_hold_is_a_validation_error(
    client: httpx.AsyncClient, platform: Platform, alice: Actor, change: dict[str, str]
) -> None:
    order_id = (await post(client, alice)).json()["id"]
    before = await counts(platform)
    response = await client.patch(f"/api/v1/orders/{order_id}", json=change, headers=alice.headers)
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "validation_error"
    assert await counts(platform) == before
