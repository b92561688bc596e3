"""Ids the database cannot hold (beyond PostgreSQL bigint) are bad input: a 4xx with the machine-readable
``{"error", "detail"}`` body on every order-path route, never a 500 from the driver."""

from __future__ import annotations

import base64
from typing import Any

import httpx
import pytest

from tests.integration import test_orders_api
from tests.integration.conftest import Actor
from tests.integration.test_orders_api import body, post
from tradeplane.bootstrap import Platform

alice = test_orders_api.alice  # a funded trader with a random high id

HUGE = 2**63  # one past the largest bigint
REQUESTS: list[tuple[str, str, dict[str, Any]]] = [
    ("GET", f"/api/v1/orders/{HUGE}", {}),
    ("PATCH", f"/api/v1/orders/{HUGE}", {"json": {"price": "64000.00"}}),
    ("DELETE", f"/api/v1/orders/{HUGE}", {}),
    ("DELETE", "/api/v1/orders", {"params": {"account_id": HUGE}}),
    ("GET", "/api/v1/orders", {"params": {"account_id": HUGE}}),
    ("GET", "/api/v1/fills", {"params": {"account_id": HUGE}}),
    ("GET", "/api/v1/fills", {"params": {"order_id": HUGE}}),
    ("GET", "/api/v1/positions", {"params": {"account_id": HUGE}}),
    ("GET", f"/api/v1/accounts/{HUGE}", {}),
    ("PATCH", f"/api/v1/accounts/{HUGE}", {"json": {"stp": "cancel_oldest"}}),
]


@pytest.mark.parametrize(("method", "path", "extra"), REQUESTS, ids=[f"{m} {p}" for m, p, _ in REQUESTS])
async def test_an_id_beyond_bigint_is_a_client_error(
    client: httpx.AsyncClient, alice: Actor, method: str, path: str, extra: dict[str, Any]
) -> None:
    response = await client.request(method, path, headers=alice.headers, **extra)
    assert 400 <= response.status_code < 500, response.text
    assert set(response.json()) == {"error", "detail"}


async def test_an_order_for_an_account_id_beyond_bigint_is_refused_and_stores_nothing(
    client: httpx.AsyncClient, platform: Platform, alice: Actor
) -> None:
    response = await client.post("/api/v1/orders", json=body(alice, account_id=HUGE), headers=alice.headers)
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "validation_error"
    batch = await client.post(
        "/api/v1/orders/batch", json={"orders": [body(alice, account_id=HUGE)]}, headers=alice.headers
    )
    assert batch.status_code == 422, batch.text
    assert (await post(client, alice)).status_code == 201  # and the next good order goes through


@pytest.mark.parametrize("raw", ["2026-01-01T00:00:00+00:00|9223372036854775808", "2026-01-01T00:00:00|5"])
async def test_a_cursor_this_server_did_not_issue_is_refused(client: httpx.AsyncClient, alice: Actor, raw: str) -> None:
    cursor = base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")
    for path in ("/api/v1/orders", "/api/v1/fills"):
        response = await client.get(path, params={"cursor": cursor}, headers=alice.headers)
        assert response.status_code == 422, response.text
        assert response.json()["error"] == "validation_error"
