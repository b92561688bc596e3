"""An account filter names an account the caller may see, or the answer is 404 account_not_found: the same on
GET /orders, /fills and /positions. An admin sees every account; an account nobody has is 404 for everyone."""

from __future__ import annotations

import httpx
import pytest

from tests.integration.conftest import Actor
from tests.integration.test_orders_api import new_actor, post, sql
from tradeplane.bootstrap import Platform
from tradeplane.services.identity import Role

LISTS = ["/api/v1/orders", "/api/v1/fills", "/api/v1/positions"]


def items(response: httpx.Response) -> list[dict[str, object]]:
    payload = response.json()
    return payload if isinstance(payload, list) else payload["items"]  # positions are a plain list


@pytest.mark.parametrize("path", LISTS)
async def test_another_users_account_is_not_found(client: httpx.AsyncClient, platform: Platform, path: str) -> None:
    alice, bob = await new_actor(platform), await new_actor(platform)
    assert (await post(client, alice)).status_code == 201
    await sql(
        platform,
        "INSERT INTO positions (account_id, instrument_id, net_quantity, average_price)"
        " SELECT $1, id, 0.5, 65000 FROM instruments WHERE symbol = 'BTC-USD'",
        alice.account_id,
    )

    peek = await client.get(path, params={"account_id": alice.account_id}, headers=bob.headers)
    assert (peek.status_code, peek.json().get("error")) == (404, "account_not_found"), peek.text

    own = await client.get(path, params={"account_id": alice.account_id}, headers=alice.headers)
    assert own.status_code == 200, own.text
    if path != "/api/v1/fills":  # no fills yet: the order and the position are there
        assert [item["account_id"] for item in items(own)] == [alice.account_id]


@pytest.mark.parametrize("path", LISTS)
async def test_admin_sees_any_account_and_nobody_sees_a_missing_one(
    client: httpx.AsyncClient, platform: Platform, path: str
) -> None:
    alice = await new_actor(platform)
    admin: Actor = await new_actor(platform, Role.ADMIN)
    assert (await post(client, alice)).status_code == 201

    seen = await client.get(path, params={"account_id": alice.account_id}, headers=admin.headers)
    assert seen.status_code == 200, seen.text
    if path == "/api/v1/orders":
        assert [item["account_id"] for item in items(seen)] == [alice.account_id]

    for actor in (alice, admin):
        missing = await client.get(path, params={"account_id": 1}, headers=actor.headers)
        assert (missing.status_code, missing.json().get("error")) == (404, "account_not_found"), missing.text
