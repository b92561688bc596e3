"""The created_at range of GET /orders and GET /fills takes instants: a time without a UTC offset is refused
(as the market data routes do), rather than read in whatever zone the api process runs in."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from tests.integration import test_orders_api
from tests.integration.conftest import Actor
from tests.integration.test_orders_api import post, sql
from tradeplane.bootstrap import Platform

alice = test_orders_api.alice  # a funded trader with a random high id


@pytest.mark.parametrize("path", ["/api/v1/orders", "/api/v1/fills"])
@pytest.mark.parametrize("bound", ["start", "end"])
async def test_a_time_without_an_offset_is_refused(
    client: httpx.AsyncClient, alice: Actor, path: str, bound: str
) -> None:
    response = await client.get(path, params={bound: "2026-01-01T00:00:00"}, headers=alice.headers)
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "validation_error"


async def test_the_range_does_not_depend_on_the_servers_time_zone(
    client: httpx.AsyncClient, platform: Platform, alice: Actor, monkeypatch: pytest.MonkeyPatch
) -> None:
    order_id = (await post(client, alice)).json()["id"]
    placed = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    await sql(platform, "UPDATE orders SET created_at = $2 WHERE id = $1", order_id, placed)
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        window = {"start": (placed - timedelta(hours=1)).isoformat(), "end": (placed + timedelta(hours=1)).isoformat()}
        inside = await client.get("/api/v1/orders", params=window, headers=alice.headers)
        naive = await client.get(
            "/api/v1/orders",
            params={"start": "2026-01-01T11:00:00", "end": "2026-01-01T13:00:00"},
            headers=alice.headers,
        )
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    assert [o["id"] for o in inside.json()["items"]] == [order_id]
    # 11:00 to 13:00 with no offset is no instant at all: refused, not read as New York time (16:00 to 18:00 UTC)
    assert naive.status_code == 422, naive.text
