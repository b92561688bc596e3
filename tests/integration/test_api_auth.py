"""Requests authenticate with `Authorization: Bearer <key>`; errors are JSON {"error", "detail"}."""

from __future__ import annotations

import httpx

from tests.integration.conftest import Actor


async def test_missing_key_is_401(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/v1/me")
    assert response.status_code == 401
    assert response.json()["error"] == "missing_api_key"
    assert "Bearer" in response.json()["detail"]


async def test_unknown_key_is_401(client: httpx.AsyncClient, trader: Actor) -> None:
    forged = trader.key[:-4] + "AAAA"
    response = await client.get("/api/v1/me", headers={"Authorization": f"Bearer {forged}"})
    assert response.status_code == 401
    assert response.json() == {"error": "invalid_api_key", "detail": "unknown or revoked API key"}


async def test_malformed_key_is_401(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/v1/me", headers={"Authorization": "Bearer nonsense"})
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_api_key"


async def test_valid_key_identifies_the_user(client: httpx.AsyncClient, trader: Actor) -> None:
    response = await client.get("/api/v1/me", headers=trader.headers)
    assert response.status_code == 200
    assert response.json() == {"user_id": trader.user_id, "username": "alice", "role": "trader"}


async def test_wrong_role_is_403(client: httpx.AsyncClient, trader: Actor, admin: Actor) -> None:
    denied = await client.get("/api/v1/users", headers=trader.headers)
    assert denied.status_code == 403
    assert denied.json()["error"] == "forbidden"
    allowed = await client.get("/api/v1/users", headers=admin.headers)
    assert allowed.status_code == 200
    assert {u["username"] for u in allowed.json()} == {"alice", "root"}


async def test_revoked_key_is_refused(client: httpx.AsyncClient, platform: object, trader: Actor) -> None:
    from tradeplane.bootstrap import Platform

    assert isinstance(platform, Platform)
    async with platform.db.transaction("test.revoke") as conn:
        await conn.execute("UPDATE api_keys SET revoked_at = now() WHERE user_id = $1", trader.user_id)
    platform.authenticator._cache.clear()  # the 5 s cache is what bounds revocation delay across replicas
    response = await client.get("/api/v1/me", headers=trader.headers)
    assert response.status_code == 401


async def test_unknown_route_is_json_404(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/v1/nowhere")
    assert response.status_code == 404
    assert response.json()["error"] == "not_found"
