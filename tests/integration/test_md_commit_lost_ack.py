"""A market data commit whose acknowledgement is lost (the connection drops after PostgreSQL committed, before
the client heard so) is not written a second time by the retry: every tick is stored once and the candles'
volume and tick count are counted once.

The drop is made by a TCP proxy between the pipeline and the real PostgreSQL server: armed, it lets the next
COMMIT through, waits for the server's answer (so the commit happened) and closes both sides instead of passing
the answer on.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.integration.live_server import free_port
from tests.integration.test_ingest import T0, list_instrument, pandas_candles, stored_ticks
from tradeplane.adapters.db import marketdata as sql
from tradeplane.adapters.postgres import Database
from tradeplane.bootstrap import Platform
from tradeplane.domain.candles import Timeframe
from tradeplane.domain.ticks import NS_PER_SECOND, Tick
from tradeplane.services.ingest import MarketDataPipeline

SECOND = NS_PER_SECOND
COMMIT = b"COMMIT;\x00"  # asyncpg ends a transaction block with this simple query


class CommitAckDropper:
    """Forwards PostgreSQL connections; when ``armed``, the next COMMIT's answer never reaches the client."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.armed = False
        self.dropped = asyncio.Event()
        self.listen_port = free_port()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.listen_port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(self.host, self.port)
        cut = asyncio.Event()

        async def upstream() -> None:
            while data := await client_r.read(65536):
                if self.armed and COMMIT in data:
                    self.armed = False
                    cut.set()
                server_w.write(data)
                await server_w.drain()

        async def downstream() -> None:
            while data := await server_r.read(65536):
                if cut.is_set():  # the COMMIT's answer: the server has committed; the client never hears it
                    break
                client_w.write(data)
                await client_w.drain()

        tasks = [asyncio.create_task(upstream()), asyncio.create_task(downstream())]
        self._tasks.update(tasks)
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            for writer in (client_w, server_w):
                writer.close()
            if cut.is_set():
                self.dropped.set()


@pytest.fixture
async def proxied(platform: Platform) -> AsyncIterator[tuple[Database, CommitAckDropper]]:
    parts = urlsplit(platform.settings.database_url)
    proxy = CommitAckDropper(parts.hostname or "127.0.0.1", parts.port or 5432)
    await proxy.start()
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{proxy.listen_port}"
    url = urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))
    db = Database(url, min_size=1, max_size=4)
    await db.connect()
    yield db, proxy
    await db.close()
    await proxy.close()


async def test_a_commit_whose_acknowledgement_was_lost_is_not_stored_twice(
    platform: Platform, proxied: tuple[Database, CommitAckDropper]
) -> None:
    db, proxy = proxied
    listed = await list_instrument(platform)
    first = [Tick(T0 + i * SECOND, listed.symbol, None, None, 0, 0, 10_000 + i, 1_000) for i in range(3)]
    second = [Tick(T0 + (10 + i) * SECOND, listed.symbol, None, None, 0, 0, 9_000 + i, 2_000) for i in range(3)]
    pipeline = MarketDataPipeline(db, [listed], cache=platform.cache, commit_interval_s=0.02, retry_for_s=30)
    async with pipeline:
        await pipeline.submit(first)
        await pipeline.flush()
        proxy.armed = True
        await pipeline.submit(second)
        await pipeline.flush()
    assert proxy.dropped.is_set(), "the proxy never saw the COMMIT it was to cut"

    assert len(await stored_ticks(platform, listed)) == len(first) + len(second)
    async with platform.db.connection("test.candles") as conn:
        rows = await sql.fetch_candles(
            conn, listed.instrument_id, Timeframe.M1, sql.ns_to_datetime(T0), sql.ns_to_datetime(T0 + 60 * SECOND), 10
        )
    (expected,) = pandas_candles(first + second, listed, Timeframe.M1)
    (row,) = rows
    assert (row["volume"], row["tick_count"], row["close"]) == (
        str(expected["volume"].normalize()),
        expected["tick_count"],
        str(expected["close"].normalize()),
    )
