"""POST /api/v1/orders answers the same through the api's fast path (``app.OrderPlacementFastPath``, taken for an
``application/json`` body, in front of FastAPI's own layers) as through the FastAPI route (taken here for an
``application/vnd.tradeplane+json`` body, which FastAPI parses as JSON too): same status, same headers, same
body, the same metrics label, counted once."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.integration.conftest import Actor
from tests.integration.test_api_health import sample
from tests.integration.test_orders_api import body, new_actor
from tradeplane.bootstrap import Platform
from tradeplane.entrypoints.api.app import create_app
from tradeplane.services.identity import ApiKeyAuthenticator, Principal, Role

FAST = "application/json"
ROUTE = "application/vnd.tradeplane+json"
# fields that differ between two placements of the same order
PER_ORDER = ("id", "client_order_id", "created_at", "updated_at")


async def send(
    client: httpx.AsyncClient, content_type: str, payload: bytes, headers: dict[str, str] | None = None
) -> httpx.Response:
    return await client.post(
        "/api/v1/orders", content=payload, headers={**(headers or {}), "content-type": content_type}
    )


def without_ids(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: without_ids(v) for k, v in value.items() if k not in PER_ORDER}
    return value


@pytest.fixture
async def alice(platform: Platform) -> Actor:
    return await new_actor(platform)


async def test_errors_are_answered_as_the_route_answers_them(
    client: httpx.AsyncClient, platform: Platform, alice: Actor
) -> None:
    reader = await new_actor(platform, Role.READONLY)
    other = await new_actor(platform)
    good = json.dumps(body(alice)).encode()
    cases: list[tuple[bytes, dict[str, str]]] = [
        (good, {}),  # no key
        (good, {"Authorization": "Bearer tp_nope_nope"}),  # unknown key
        (good, {"Authorization": "Basic abc"}),
        (good, reader.headers),  # readonly
        (good, other.headers),  # someone else's account
        (b"{", alice.headers),  # not JSON
        (b"", alice.headers),
        (b"[1]", alice.headers),
        (json.dumps(body(alice, quantity="abc")).encode(), alice.headers),
        (json.dumps({**body(alice), "extra": 1}).encode(), alice.headers),
        (json.dumps(body(alice, account_id=2**63)).encode(), alice.headers),
        (json.dumps(body(alice, quantity="-1")).encode(), alice.headers),  # a shape error found by the service
    ]
    for payload, headers in cases:
        fast = await send(client, FAST, payload, headers)
        route = await send(client, ROUTE, payload, headers)
        assert fast.status_code >= 400, (payload, fast.text)
        assert (fast.status_code, fast.content) == (route.status_code, route.content), payload
        assert fast.headers.multi_items() == route.headers.multi_items(), payload


async def test_placements_and_rejections_are_answered_as_the_route_answers_them(
    client: httpx.AsyncClient, alice: Actor
) -> None:
    for overrides, status in (({}, 201), ({"quantity": "1000000"}, 422)):  # accepted; insufficient funds
        fast = await send(
            client, FAST, json.dumps(body(alice, client_order_id=f"f{status}", **overrides)).encode(), alice.headers
        )
        route = await send(
            client, ROUTE, json.dumps(body(alice, client_order_id=f"r{status}", **overrides)).encode(), alice.headers
        )
        assert fast.status_code == route.status_code == status, fast.text
        assert without_ids(fast.json()) == without_ids(route.json())
        assert [name for name, _ in fast.headers.multi_items()] == [name for name, _ in route.headers.multi_items()]
        assert fast.headers["content-type"] == route.headers["content-type"]
        assert list(fast.json()) == list(route.json())  # same keys in the same order
    # a retry of the fast path's order, with the same client_order_id, is the original (200), either way
    first = await send(client, FAST, json.dumps(body(alice, client_order_id="again")).encode(), alice.headers)
    for content_type in (FAST, ROUTE):
        retry = await send(
            client, content_type, json.dumps(body(alice, client_order_id="again")).encode(), alice.headers
        )
        assert (retry.status_code, retry.content) == (200, first.content)


async def test_fast_path_requests_are_measured_under_the_route(client: httpx.AsyncClient, alice: Actor) -> None:
    before = (await client.get("/metrics")).text
    for _ in range(2):
        assert (await send(client, FAST, json.dumps(body(alice)).encode(), alice.headers)).status_code == 201
    assert (await send(client, FAST, b"{}", {})).status_code == 401
    # handed on to the route (the body fails validation), and still counted once
    assert (await send(client, FAST, b"{}", alice.headers)).status_code == 422
    after = (await client.get("/metrics")).text
    for status, n in (("201", 2), ("401", 1), ("422", 1)):
        route = {"method": "POST", "route": "/api/v1/orders", "status": status}
        assert sample(after, "http_requests_total", **route) - sample(before, "http_requests_total", **route) == n
        assert (
            sample(after, "http_request_duration_seconds_count", **route)
            - sample(before, "http_request_duration_seconds_count", **route)
            == n
        )


class BrokenAuthenticator(ApiKeyAuthenticator):
    """A fault in the request's own code (not an outage): what no error renderer knows."""

    async def authenticate(self, conn_source: object, key: str) -> Principal:
        raise RuntimeError("a bug in authentication")


async def test_an_unexpected_error_is_answered_as_the_route_answers_it(
    platform: Platform, alice: Actor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(platform, "authenticator", BrokenAuthenticator("not-used"))
    transport = httpx.ASGITransport(app=create_app(platform), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://tradeplane") as client:
        before = (await client.get("/metrics")).text
        payload = json.dumps(body(alice)).encode()
        fast = await send(client, FAST, payload, alice.headers)
        route = await send(client, ROUTE, payload, alice.headers)
        after = (await client.get("/metrics")).text
    assert (fast.status_code, fast.content) == (route.status_code, route.content) == (500, b"Internal Server Error")
    assert fast.headers.multi_items() == route.headers.multi_items()
    labels = {"method": "POST", "route": "/api/v1/orders", "status": "500"}
    assert sample(after, "http_requests_total", **labels) - sample(before, "http_requests_total", **labels) == 2
