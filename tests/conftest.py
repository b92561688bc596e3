"""Test servers: the ones named by TRADEPLANE_TEST_* URLs, else embedded ones this session starts itself.

TRADEPLANE_TEST_DATABASE_URL  a PostgreSQL server URL (any database; tests create their own databases)
TRADEPLANE_TEST_REDIS_URL     a Redis URL (tests use db 0 with unique key prefixes and flush nothing)
TRADEPLANE_TEST_NATS_URL      a NATS server with JetStream
TRADEPLANE_TEST_AMQP_URL      a RabbitMQ server; RabbitMQ cannot be embedded, so without it the RabbitMQ
                              tests skip, except under CI (CI=1), where a missing server is a failure.

Each test that asks for `database_url` gets a fresh database cloned from a template built once per session
by the real Alembic migrations.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

UNDER_CI = os.environ.get("CI", "") not in ("", "0", "false")


def with_database(server_url: str, name: str) -> str:
    parts = urlsplit(server_url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


@pytest.fixture(scope="session")
def embedded_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="tradeplane-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def embedded_stack(embedded_dir: Path) -> Iterator[object]:
    """Started lazily: only when some TRADEPLANE_TEST_* URL is missing and a test needs that server."""
    from tradeplane.adapters.embedded import EmbeddedStack

    stack = EmbeddedStack(embedded_dir)
    yield stack
    stack.stop()


def _url_or_embedded(request: pytest.FixtureRequest, env: str, kind: str) -> str:
    url = os.environ.get(env)
    if url:
        return url
    if UNDER_CI:
        pytest.fail(f"{env} must be set under CI")
    stack = request.getfixturevalue("embedded_stack")
    return str(stack.start(kind))  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def pg_server_url(request: pytest.FixtureRequest) -> str:
    return _url_or_embedded(request, "TRADEPLANE_TEST_DATABASE_URL", "postgres")


@pytest.fixture(scope="session")
def redis_url(request: pytest.FixtureRequest) -> str:
    return _url_or_embedded(request, "TRADEPLANE_TEST_REDIS_URL", "redis")


@pytest.fixture(scope="session")
def nats_url(request: pytest.FixtureRequest) -> str:
    return _url_or_embedded(request, "TRADEPLANE_TEST_NATS_URL", "nats")


@pytest.fixture(scope="session")
def embedded_nats_url(embedded_stack: object) -> str:
    """Always the embedded NATS, so the adapter is tested against the pip-packaged server too."""
    return str(embedded_stack.start("nats"))  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def amqp_url() -> str:
    url = os.environ.get("TRADEPLANE_TEST_AMQP_URL")
    if url:
        return url
    if UNDER_CI:
        pytest.fail("TRADEPLANE_TEST_AMQP_URL must be set under CI")
    pytest.skip("RabbitMQ cannot be embedded; set TRADEPLANE_TEST_AMQP_URL to test the RabbitMQ adapter")


@pytest.fixture(params=["nats", "amqp"])
def bus_url(request: pytest.FixtureRequest) -> str:
    """Every bus-facing test runs against both adapters."""
    return str(request.getfixturevalue(f"{request.param}_url"))


async def _admin(server_url: str) -> asyncpg.Connection:
    return await asyncpg.connect(with_database(server_url, "postgres"))


async def create_database(server_url: str, template: str | None = None) -> str:
    name = f"tp_test_{uuid.uuid4().hex[:12]}"
    conn = await _admin(server_url)
    try:
        template_sql = f' TEMPLATE "{template}"' if template else ""
        await conn.execute(f'CREATE DATABASE "{name}"{template_sql}')
    finally:
        await conn.close()
    return name


async def drop_database(server_url: str, name: str) -> None:
    conn = await _admin(server_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def migrated_template(pg_server_url: str) -> Iterator[str]:
    """A database built by the real migrations, cloned for each test."""
    from tradeplane.adapters.db.migrate import upgrade

    name = asyncio.run(create_database(pg_server_url))
    upgrade(with_database(pg_server_url, name))
    yield name
    asyncio.run(drop_database(pg_server_url, name))


@pytest.fixture
async def empty_database_url(pg_server_url: str) -> AsyncIterator[str]:
    name = await create_database(pg_server_url)
    yield with_database(pg_server_url, name)
    await drop_database(pg_server_url, name)


@pytest.fixture
async def database_url(pg_server_url: str, migrated_template: str) -> AsyncIterator[str]:
    name = await create_database(pg_server_url, template=migrated_template)
    yield with_database(pg_server_url, name)
    await drop_database(pg_server_url, name)
