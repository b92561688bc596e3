"""A connected Platform and an HTTP client on a fresh migrated database."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest

from tradeplane.bootstrap import Platform, build_platform
from tradeplane.config import Settings
from tradeplane.entrypoints.api.app import create_app
from tradeplane.services import accounts, demo, identity
from tradeplane.services.identity import Role

TEST_SECRET = "test-secret-key-not-for-production"


@pytest.fixture
def settings(database_url: str, redis_url: str, nats_url: str) -> Settings:
    return Settings(
        database_url=database_url,
        redis_url=redis_url,
        bus_url=nats_url,
        secret_key=TEST_SECRET,
        db_pool_min=1,
    )


@pytest.fixture
async def platform(settings: Settings) -> AsyncIterator[Platform]:
    platform = build_platform(settings)
    await platform.start()
    await platform.bus.setup(settings.engine_shards)
    yield platform
    await platform.stop()


@pytest.fixture
async def client(platform: Platform) -> AsyncIterator[httpx.AsyncClient]:
    # In-process ASGI without the lifespan (the platform fixture connects); the lifespan's background work is
    # covered by the tests that run the API as a real server process (tests/e2e).
    transport = httpx.ASGITransport(app=create_app(platform))
    async with httpx.AsyncClient(transport=transport, base_url="http://tradeplane") as http:
        yield http


@dataclass(frozen=True)
class Actor:
    user_id: int
    key: str
    account_id: int | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


async def make_actor(platform: Platform, username: str, role: Role, *, with_account: bool = False) -> Actor:
    async with platform.db.transaction("test.actor") as conn:
        await demo.load_reference_data(conn)
        user_id = await identity.create_user(conn, username, role)
        key = (await identity.issue_api_key(conn, TEST_SECRET, user_id, "test")).key
        account_id = await accounts.create_account(conn, user_id, "main") if with_account else None
    return Actor(user_id, key, account_id)


@pytest.fixture
async def trader(platform: Platform) -> Actor:
    return await make_actor(platform, "alice", Role.TRADER, with_account=True)


@pytest.fixture
async def admin(platform: Platform) -> Actor:
    return await make_actor(platform, "root", Role.ADMIN)
