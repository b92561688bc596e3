"""``Database.connection`` reports PostgreSQL as unavailable (503) only when it is: a caller's own file error
inside the connection scope (a full disk, a missing folder) stays that error, while a connection the server
ends under a running query is still an outage."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import asyncpg
import pytest

from tradeplane.adapters.postgres import Database
from tradeplane.errors import InfrastructureUnavailable


@pytest.mark.parametrize(
    ("target", "expected_errno"),
    [
        (Path("/dev/full"), errno.ENOSPC),  # every write to it fails as a full disk does
        (None, errno.ENOENT),  # a folder that does not exist
        (Path("."), errno.EISDIR),
    ],
    ids=["disk-full", "missing-folder", "a-directory"],
)
async def test_a_file_error_inside_the_scope_is_not_reported_as_postgres_unavailable(
    database_url: str, tmp_path: Path, target: Path | None, expected_errno: int
) -> None:
    path = target if target is not None else tmp_path / "missing" / "archive.parquet"
    db = Database(database_url, min_size=1, max_size=1)
    await db.connect()
    try:
        with pytest.raises(OSError) as raised:
            async with db.connection("test.archive") as conn:
                assert await conn.fetchval("SELECT 1") == 1
                path.write_bytes(b"ticks")  # as the retention archive writes inside its connection scope
        assert raised.value.errno == expected_errno
        async with db.connection("test.after") as conn:  # the pooled connection was fine all along
            assert await conn.fetchval("SELECT 2") == 2
    finally:
        await db.close()


async def test_a_connection_the_server_ends_mid_query_is_unavailable(database_url: str) -> None:
    db = Database(database_url, min_size=1, max_size=1)
    await db.connect()
    admin = await asyncpg.connect(database_url)
    try:
        with pytest.raises(InfrastructureUnavailable) as raised:
            async with db.connection("test.terminated") as conn:
                pid = await conn.fetchval("SELECT pg_backend_pid()")
                query = asyncio.ensure_future(conn.fetchval("SELECT pg_sleep(60)"))
                for _ in range(1000):  # until the server runs the query (bounded: 10 s)
                    if await admin.fetchval("SELECT wait_event = 'PgSleep' FROM pg_stat_activity WHERE pid = $1", pid):
                        break
                    await asyncio.sleep(0.01)
                assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
                await query
        assert raised.value.status_code == 503
        async with db.connection("test.after") as conn:  # the pool replaced the broken connection
            assert await conn.fetchval("SELECT 1") == 1
    finally:
        await admin.close()
        await db.close()


@pytest.mark.parametrize(
    "error",
    [ConnectionResetError(errno.ECONNRESET, "reset by peer"), OSError(errno.EHOSTUNREACH, "no route to host")],
    ids=["reset", "no-route"],
)
async def test_a_network_error_inside_the_scope_is_unavailable(database_url: str, error: OSError) -> None:
    db = Database(database_url, min_size=1, max_size=1)
    await db.connect()
    try:
        with pytest.raises(InfrastructureUnavailable):
            async with db.connection("test.network"):
                raise error
    finally:
        await db.close()


@pytest.mark.parametrize(
    ("query", "args"),
    [
        ("SELECT $1::int + $2::int", (1,)),  # one argument short
        ("SELECT 1", tuple(range(32_768))),  # more arguments than the protocol carries
    ],
    ids=["argument-count", "too-many-arguments"],
)
async def test_a_query_asyncpg_refuses_on_a_healthy_connection_is_not_unavailable(
    database_url: str, query: str, args: tuple[int, ...]
) -> None:
    # asyncpg raises InterfaceError, as it does for a closed connection, but nothing is wrong with PostgreSQL: a
    # 503 would send clients retrying a request that can never succeed.
    db = Database(database_url, min_size=1, max_size=1)
    await db.connect()
    try:
        with pytest.raises(asyncpg.InterfaceError) as raised:
            async with db.connection("test.refused") as conn:
                await conn.fetchval(query, *args)
        assert not isinstance(raised.value, InfrastructureUnavailable)
        async with db.connection("test.after") as conn:  # the same pooled connection, still fine
            assert await conn.fetchval("SELECT 2") == 2
    finally:
        await db.close()


async def test_a_parameter_asyncpg_cannot_encode_is_not_unavailable(database_url: str) -> None:
    db = Database(database_url, min_size=1, max_size=1)
    await db.connect()
    try:
        with pytest.raises(asyncpg.DataError, match="invalid input for query argument") as raised:
            async with db.connection("test.data") as conn:
                await conn.fetchval("SELECT $1::bigint", 2**63)  # refused by asyncpg before it is sent
        assert not isinstance(raised.value, InfrastructureUnavailable)
        # asyncpg documents this DataError as an InterfaceError; that class is never an outage either.
        with pytest.raises(asyncpg.exceptions._base.DataError):
            async with db.connection("test.data"):
                raise asyncpg.exceptions._base.DataError("invalid input for query argument $1")
    finally:
        await db.close()


async def test_a_query_on_a_connection_the_server_closed_is_unavailable(database_url: str) -> None:
    db = Database(database_url, min_size=1, max_size=1)
    await db.connect()
    admin = await asyncpg.connect(database_url)
    try:
        with pytest.raises(InfrastructureUnavailable) as raised:
            async with db.connection("test.closed") as conn:
                assert await admin.fetchval(
                    "SELECT pg_terminate_backend($1)", await conn.fetchval("SELECT pg_backend_pid()")
                )
                for _ in range(1000):  # until asyncpg has seen the connection end (bounded: 10 s)
                    if conn.is_closed():
                        break
                    await asyncio.sleep(0.01)
                await conn.fetchval("SELECT 1")  # asyncpg: InterfaceError, connection is closed
        assert isinstance(raised.value.__cause__, asyncpg.InterfaceError)
        async with db.connection("test.after") as conn:
            assert await conn.fetchval("SELECT 1") == 1
    finally:
        await admin.close()
        await db.close()
