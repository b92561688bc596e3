"""Request bodies the api must refuse with a 4xx before doing work: too large, nested too deep; and a forged
pagination cursor that names a time UTC cannot express."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator

import httpx
import pytest

from tests.integration.conftest import Actor
from tests.integration.test_orders_api import new_actor
from tradeplane.bootstrap import Platform
from tradeplane.entrypoints.api.app import MAX_BODY_BYTES


@pytest.fixture
async def alice(platform: Platform) -> Actor:
    return await new_actor(platform)


def json_headers(actor: Actor) -> dict[str, str]:
    return {**actor.headers, "content-type": "application/json"}


@pytest.mark.parametrize("path", ["/api/v1/orders", "/api/v1/orders/batch"])
async def test_a_body_declared_too_large_is_413(client: httpx.AsyncClient, alice: Actor, path: str) -> None:
    response = await client.post(path, content=b" " * (MAX_BODY_BYTES + 1), headers=json_headers(alice))
    assert response.status_code == 413
    assert response.json()["error"] == "body_too_large"


async def test_a_chunked_body_is_cut_off_once_it_passes_the_limit(client: httpx.AsyncClient, alice: Actor) -> None:
    sent = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal sent
        yield b'{"orders": ['
        for _ in range(2 * MAX_BODY_BYTES // 65536):
            sent += 65536
            yield b" " * 65536

    response = await client.post("/api/v1/orders/batch", content=chunks(), headers=json_headers(alice))
    assert "content-length" not in response.request.headers  # sent chunked: only the running count can stop it
    assert response.status_code == 413
    assert response.json()["error"] == "body_too_large"


async def test_a_deeply_nested_body_is_a_client_error(client: httpx.AsyncClient, alice: Actor) -> None:
    # small enough for the POST /orders fast path, deep enough to exhaust json's recursion limit
    response = await client.post("/api/v1/orders", content=b"[" * 10_000, headers=json_headers(alice))
    assert 400 <= response.status_code < 500, response.text


@pytest.mark.parametrize("when", ["0001-01-01T00:00:00+14:00", "9999-12-31T23:00:00-14:00"])
@pytest.mark.parametrize("path", ["/api/v1/orders", "/api/v1/fills"])
async def test_a_forged_cursor_outside_utc_is_422(
    client: httpx.AsyncClient, alice: Actor, path: str, when: str
) -> None:
    cursor = base64.urlsafe_b64encode(f"{when}|1".encode()).decode().rstrip("=")
    response = await client.get(path, params={"cursor": cursor}, headers=alice.headers)
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "validation_error"
