"""A market data worker started before an instrument was listed stores that instrument's data once it is listed:
external ticks from the bus and the engine's trades, each exactly once, with candles. Real PostgreSQL, Redis and
NATS (its own bus namespace, so no other test's ticks are in the stream)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Coroutine
from datetime import timedelta
from decimal import Decimal
from typing import Any

import orjson
import pytest

from tests.integration.conftest import TEST_SECRET
from tests.integration.test_engine_marketdata import EPOCH, Trade, engine_batch, tick_count
from tests.integration.test_ingest import list_instrument, until
from tradeplane.adapters.bus.base import md_ticks_stream
from tradeplane.adapters.db.marketdata import ListedInstrument
from tradeplane.adapters.db.timeseries import ensure_daily_partitions_async
from tradeplane.bootstrap import Platform, build_platform
from tradeplane.config import Settings
from tradeplane.entrypoints.workers import marketdata as marketdata_worker
from tradeplane.entrypoints.workers.marketdata import run_marketdata
from tradeplane.errors import InfrastructureUnavailable
from tradeplane.services.ingest import MarketDataPipeline
from tradeplane.services.instruments import InstrumentTerms
from tradeplane.services.instruments import list_instrument as list_new_instrument


@pytest.fixture
async def md_platform(database_url: str, redis_url: str, nats_url: str) -> AsyncIterator[Platform]:
    settings = Settings(
        database_url=database_url,
        redis_url=redis_url,
        bus_url=nats_url,
        secret_key=TEST_SECRET,
        db_pool_min=1,
        bus_namespace=f"md{uuid.uuid4().hex[:8]}",
    )
    platform = build_platform(settings)
    await platform.start()
    await platform.bus.setup(settings.engine_shards)
    yield platform
    await platform.stop()


async def list_fresh_instrument(platform: Platform, prefix: str) -> ListedInstrument:
    """List a new instrument (tick 0.5, lot 0.1, reference price 50) under a unique symbol starting with ``prefix``."""
    terms = InstrumentTerms(
        symbol=f"{prefix}{uuid.uuid4().hex[:8].upper()}-USD",
        base_asset=f"{prefix}{uuid.uuid4().hex[:6].upper()}",
        quote_asset="USD",
        tick_size=Decimal("0.5"),
        lot_size=Decimal("0.1"),
        min_qty=Decimal("0.1"),
        max_qty=Decimal("1000"),
        price_band_pct=Decimal("10"),
        reference_price=Decimal("50"),
    )
    async with platform.db.transaction("test.list") as conn:
        instrument_id = await list_new_instrument(conn, terms)
    return ListedInstrument(instrument_id, terms.symbol, terms.tick_size, terms.lot_size)


async def publish_tick(platform: Platform, symbol: str, ts_ns: int, bid: str, ask: str) -> None:
    tick = {"ts": ts_ns, "symbol": symbol, "bid": bid, "ask": ask, "bid_size": "1", "ask_size": "2"}
    await platform.bus.publish(md_ticks_stream(symbol), orjson.dumps(tick), f"{symbol}-{ts_ns}")


async def exactly(platform: Platform, n: int, instrument: ListedInstrument) -> bool:
    count = await tick_count(platform, instrument)
    assert count <= n, f"{count} ticks stored, only {n} sent"  # a duplicate fails at once
    return count == n


def simulating_worker(platform: Platform, stop: asyncio.Event) -> Coroutine[Any, Any, MarketDataPipeline]:
    """The market data worker with only its simulated feed (200 ticks/s), until ``stop``."""
    return run_marketdata(
        platform,
        stop,
        simulate_rate=200,
        bus_feed=False,
        engine_trades=False,
        engine_books=False,
        depth_interval_s=60,
    )


async def test_ticks_and_trades_of_an_instrument_listed_after_the_worker_started_are_stored_once(
    md_platform: Platform,
) -> None:
    platform = md_platform
    known = await list_instrument(platform)
    now_ns = time.time_ns()
    async with platform.db.connection("test.partitions") as conn:
        await ensure_daily_partitions_async(conn, "trades", (EPOCH + timedelta(microseconds=now_ns // 1000)).date(), 2)
    stop = asyncio.Event()
    task = asyncio.create_task(
        run_marketdata(platform, stop, simulate_rate=None, engine_books=False, depth_interval_s=60)
    )
    try:
        # The worker runs and stores what it knows.
        await publish_tick(platform, known.symbol, time.time_ns(), "100.00", "100.02")
        await until(lambda: exactly(platform, 1, known))

        new = await list_fresh_instrument(platform, "N")
        symbol, instrument_id = new.symbol, new.instrument_id

        # At once, before any periodic reload: two external ticks, and an engine trade in one batch.
        first = time.time_ns()
        await publish_tick(platform, symbol, first, "50.0", "50.5")
        await publish_tick(platform, symbol, first + 1_000, "50.5", "51.0")
        await engine_batch(platform, [Trade(new, 1, 1, "50.5", "0.3", first + 2_000)])
        await until(lambda: exactly(platform, 3, new))
        # And later ones too; the instrument known before is unaffected.
        await publish_tick(platform, symbol, time.time_ns(), "51.0", "51.5")
        await publish_tick(platform, known.symbol, time.time_ns(), "100.02", "100.04")
        await until(lambda: exactly(platform, 4, new))
        await until(lambda: exactly(platform, 2, known))
    finally:
        stop.set()
        pipeline = await task

    assert not pipeline.stats.dropped, pipeline.stats.dropped
    async with platform.db.connection("test.read") as conn:
        rows = await conn.fetch(
            "SELECT bid, ask, bid_size, last, volume FROM ticks WHERE instrument_id = $1 ORDER BY ts", instrument_id
        )
        candles = await conn.fetch(
            "SELECT open, close, volume, tick_count FROM candles WHERE instrument_id = $1 AND timeframe = 'M1'",
            instrument_id,
        )
    assert [(r["bid"], r["ask"], r["bid_size"]) for r in rows[:2]] == [
        (Decimal("50.0"), Decimal("50.5"), Decimal("1")),
        (Decimal("50.5"), Decimal("51.0"), Decimal("1")),
    ]
    assert (rows[2]["last"], rows[2]["volume"]) == (Decimal("50.5"), Decimal("0.3"))
    # the trade made its candle, counted once
    assert sum(c["volume"] for c in candles) == Decimal("0.3")


async def test_the_simulated_feed_walks_an_instrument_listed_after_the_worker_started(md_platform: Platform) -> None:
    platform = md_platform
    known = await list_instrument(platform)
    stop = asyncio.Event()
    task = asyncio.create_task(simulating_worker(platform, stop))
    try:
        await until(lambda: tick_count(platform, known))  # the simulation runs

        new = await list_fresh_instrument(platform, "S")
        await until(lambda: tick_count(platform, new))
    finally:
        stop.set()
        pipeline = await task

    assert not pipeline.stats.dropped, pipeline.stats.dropped
    async with platform.db.connection("test.read") as conn:
        first_bid: Decimal = await conn.fetchval(
            "SELECT bid FROM ticks WHERE instrument_id = $1 ORDER BY ts LIMIT 1", new.instrument_id
        )
    # Its walk starts at its reference price (50), on its tick grid: the first step is at most 2 ticks.
    assert first_bid % new.tick_size == 0
    assert abs(first_bid - Decimal("50")) <= 2 * new.tick_size


async def test_a_feed_whose_instrument_reload_fails_restarts_rather_than_stopping_for_good(
    md_platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    platform = md_platform
    await list_instrument(platform)
    stop = asyncio.Event()
    task = asyncio.create_task(
        run_marketdata(platform, stop, simulate_rate=None, engine_books=False, depth_interval_s=60)
    )
    real_load = marketdata_worker.sql.load_instruments
    failed: list[str] = []

    async def load_while_postgres_is_away(conn: Any) -> list[ListedInstrument]:
        failed.append("reload")
        raise InfrastructureUnavailable("PostgreSQL unavailable: injected")

    try:
        await asyncio.sleep(0.5)  # the worker has loaded its instruments and runs its feeds
        new = await list_fresh_instrument(platform, "R")

        # The bus feed meets the new symbol while reloading the instrument list fails.
        monkeypatch.setattr(marketdata_worker.sql, "load_instruments", load_while_postgres_is_away)
        await publish_tick(platform, new.symbol, time.time_ns(), "50.0", "50.5")
        await until(lambda: len(failed) >= 2)
        monkeypatch.setattr(marketdata_worker.sql, "load_instruments", real_load)

        # Back: the feed (restarted, not gone) delivers the tick once the instrument is adopted.
        await until(lambda: exactly(platform, 1, new))
    finally:
        stop.set()
        await task
