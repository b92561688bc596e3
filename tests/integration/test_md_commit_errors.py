"""The market data writer retries a commit only through an outage of PostgreSQL: an error of the pipeline's own on a
healthy connection (a call asyncpg refuses, a file's OSError) stops it at once with that error as the cause,
while a connection the server ends in the middle of a streamed COPY is retried and every tick is stored once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest

from tests.integration.test_ingest import T0, WAIT_S, list_instrument, pandas_candles, stored_ticks, until
from tradeplane.adapters.db import marketdata as sql
from tradeplane.adapters.postgres import Database
from tradeplane.bootstrap import Platform
from tradeplane.domain.candles import Timeframe
from tradeplane.domain.ticks import NS_PER_SECOND, Tick
from tradeplane.services.ingest import MarketDataPipeline, PipelineFailed

SECOND = NS_PER_SECOND

Fault = Callable[[asyncpg.Connection], Awaitable[None]]


class FirstCommitFault(Database):
    """The real pool; the market data writer's first commit transaction runs ``fault`` on its connection first.
    Later attempts run clean, so a writer that retried what it should not would go on to succeed."""

    def __init__(self, url: str, fault: Fault) -> None:
        super().__init__(url, min_size=1, max_size=4)
        self.fault = fault
        self.attempts = 0

    @asynccontextmanager
    async def transaction(self, operation: str) -> AsyncIterator[asyncpg.Connection]:
        async with super().transaction(operation) as conn:
            if operation == "marketdata.ingest":
                self.attempts += 1
                if self.attempts == 1:
                    await self.fault(conn)
            yield conn


async def _argument_count(conn: asyncpg.Connection) -> None:
    await conn.fetchval("SELECT $1::int + $2::int", 1)  # asyncpg: InterfaceError, the connection is fine


def _write_to_a_full_disk() -> None:
    Path("/dev/full").write_bytes(b"ticks")  # OSError ENOSPC, as a full disk


async def _full_disk(conn: asyncpg.Connection) -> None:
    _write_to_a_full_disk()


@pytest.mark.parametrize(
    ("fault", "error"),
    [(_argument_count, asyncpg.InterfaceError), (_full_disk, OSError)],
    ids=["interface-error-on-a-healthy-connection", "file-oserror"],
)
async def test_an_error_that_is_not_an_outage_stops_the_writer_at_once(
    platform: Platform, database_url: str, fault: Fault, error: type[BaseException]
) -> None:
    listed = await list_instrument(platform)
    db = FirstCommitFault(database_url, fault)
    await db.connect()
    try:
        ticks = [Tick(T0 + i * SECOND, listed.symbol, None, None, 0, 0, 10_000 + i, 1_000) for i in range(3)]
        # An hour of retries: a writer that retried this error would commit on its second attempt instead.
        async with MarketDataPipeline(db, [listed], commit_interval_s=0.02, retry_for_s=3600) as pipeline:
            await pipeline.submit(ticks)
            with pytest.raises(PipelineFailed) as raised:
                async with asyncio.timeout(WAIT_S):
                    await pipeline.flush()
            assert isinstance(raised.value.__cause__, error)
            with pytest.raises(PipelineFailed):
                await pipeline.submit(ticks)
        assert db.attempts == 1
        assert await stored_ticks(platform, listed) == []
    finally:
        await db.close()


async def test_a_commit_whose_connection_the_server_ends_mid_copy_is_retried_and_stores_every_tick_once(
    platform: Platform, caplog: pytest.LogCaptureFixture
) -> None:
    listed = await list_instrument(platform)
    chunks = [
        [
            Tick(T0 + (10 * c + i) * SECOND, listed.symbol, None, None, 0, 0, 10_000 + 10 * c + i, 1_000)
            for i in range(10)
        ]
        for c in range(3)
    ]
    # One commit of three chunks: the COPY streams the first and waits for the others (no commit deadline).
    pipeline = MarketDataPipeline(
        platform.db, [listed], chunk_rows=10, max_rows_per_commit=30, commit_interval_s=3600, retry_for_s=30
    )
    caplog.set_level(logging.WARNING, logger="tradeplane.marketdata")
    admin = await asyncpg.connect(platform.settings.database_url)
    try:
        async with pipeline:
            await pipeline.submit(chunks[0])
            copying: list[int] = []

            async def copy_running() -> bool:
                copying[:] = await admin.fetch(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'COPY%ticks%'"
                    " AND state = 'active'"
                )
                return bool(copying)

            await until(copy_running)
            (pid,) = [row["pid"] for row in copying]
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
            await pipeline.submit(chunks[1])
            await pipeline.submit(chunks[2])
            async with asyncio.timeout(WAIT_S):
                await pipeline.flush()
    finally:
        await admin.close()

    retries = [r for r in caplog.records if r.getMessage().startswith("market data commit failed")]
    assert len(retries) == 1, [r.getMessage() for r in caplog.records]
    ticks = [tick for chunk in chunks for tick in chunk]
    stored = await stored_ticks(platform, listed)
    assert [row["last"] for row in stored] == [listed.price(tick.last or 0) for tick in ticks]
    async with platform.db.connection("test.candles") as conn:
        rows = await sql.fetch_candles(
            conn, listed.instrument_id, Timeframe.M1, sql.ns_to_datetime(T0), sql.ns_to_datetime(T0 + 60 * SECOND), 10
        )
    (expected,) = pandas_candles(ticks, listed, Timeframe.M1)
    (row,) = rows
    assert (Decimal(row["volume"]), row["tick_count"], Decimal(row["close"])) == (
        expected["volume"],
        expected["tick_count"],
        expected["close"],
    )
