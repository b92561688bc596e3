"""The market data worker: every configured feed into one ``MarketDataPipeline``, plus housekeeping.

Runs until ``stop`` is set:

- feeds: external publishers on the bus (``md.ticks.>``, a redelivered message stored once on NATS), the
  engine's own trades (Redis ``tp:trades:*``) and, when ``simulate_rate`` is given, a simulated random walk
  over the listed instruments at that many ticks per second;
- L2 depth snapshots: every ``depth_interval_s`` the engine's ``tp:book:<symbol>:snapshot`` of each symbol
  whose book changed (its ``seq`` moved) is stored in ``depth_snapshots``;
- partitions ahead (today and tomorrow) and retention (``md_retention_days``, archive to
  ``md_archive_dir``) at start and then hourly.

Memory is bounded: the pipeline's queue is bounded, feeds fetch bounded batches, candle and quote state is
per instrument and pruned past the out-of-order tolerance. A feed that fails (its server down) is restarted
after a pause; the pipeline itself retries commits and only gives up after its retry window.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import orjson

from tradeplane.adapters.cache import REDIS_ERRORS
from tradeplane.adapters.db import marketdata as sql
from tradeplane.adapters.db.marketdata import ListedInstrument
from tradeplane.adapters.db.timeseries import ensure_daily_partitions_async
from tradeplane.adapters.feeds.bus import BusTickFeed, FeedPosition
from tradeplane.adapters.feeds.engine_trades import EngineTradesFeed
from tradeplane.adapters.feeds.simulated import SimulatedFeed, SimulatedInstrument
from tradeplane.bootstrap import Platform
from tradeplane.domain.ticks import InstrumentGrid
from tradeplane.errors import TradeplaneError
from tradeplane.services.ingest import MarketDataPipeline, apply_retention

log = logging.getLogger("tradeplane.marketdata")

FEED_RESTART_DELAY_S = 2.0
HOUSEKEEPING_INTERVAL_S = 3600.0


def book_snapshot_key(symbol: str) -> str:
    return f"tp:book:{symbol}:snapshot"


async def load_simulation(platform: Platform) -> list[SimulatedInstrument]:
    async with platform.db.connection("marketdata.instruments") as conn:
        return await load_simulation_from(conn)


async def load_simulation_from(conn: asyncpg.Connection) -> list[SimulatedInstrument]:
    """A random walk per open instrument, starting at its last trade price or its reference price."""
    rows = await conn.fetch(
        "SELECT symbol, tick_size, coalesce(last_price, reference_price) AS start FROM instruments"
        " WHERE status = 'open' ORDER BY id"
    )
    out = []
    for row in rows:
        tick: Decimal = row["tick_size"]
        start: Decimal = row["start"] if row["start"] is not None else tick * 10_000
        start = (start // tick) * tick  # on the grid
        if start <= 0:
            start = tick * 10_000
        out.append(SimulatedInstrument(InstrumentGrid(row["symbol"], tick), start, trade_percent=30))
    return out


async def store_depth_snapshots(
    platform: Platform, instruments: list[ListedInstrument], last_seq: dict[str, int]
) -> int:
    """Store the engine's current book snapshot of every symbol whose sequence moved; returns rows stored."""
    keys = [book_snapshot_key(i.symbol) for i in instruments]
    try:
        values = await platform.cache.client.mget(keys)
    except REDIS_ERRORS as exc:
        log.warning("reading book snapshots failed: %s", exc)
        return 0
    now = datetime.now(UTC)
    rows: list[tuple[datetime, int, str, str, int | None]] = []
    for instrument, raw in zip(instruments, values, strict=True):
        if raw is None:
            continue
        try:
            snapshot: dict[str, Any] = orjson.loads(raw)
            seq = int(snapshot["seq"])
            bids, asks = snapshot["bids"], snapshot["asks"]
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("unreadable book snapshot of %s: %s", instrument.symbol, exc)
            continue
        if last_seq.get(instrument.symbol) == seq:
            continue
        last_seq[instrument.symbol] = seq
        rows.append((now, instrument.instrument_id, orjson.dumps(bids).decode(), orjson.dumps(asks).decode(), seq))
    if rows:
        async with platform.db.transaction("marketdata.depth") as conn:
            await sql.insert_depth_snapshots(conn, rows)
    return len(rows)


async def run_marketdata(
    platform: Platform,
    stop: asyncio.Event,
    *,
    simulate_rate: int | None,
    bus_feed: bool = True,
    engine_trades: bool = True,
    depth_interval_s: float = 5.0,
) -> MarketDataPipeline:
    """Run the market data process on a started ``platform`` until ``stop`` is set; returns the pipeline
    (closed, its ``stats`` final)."""
    settings = platform.settings
    async with platform.db.connection("marketdata.instruments") as conn:
        instruments = await sql.load_instruments(conn)
    if not instruments:
        raise TradeplaneError("no instruments are listed: load reference data first (tradeplane up loads a demo)")
    lot_sizes = {i.symbol: i.lot_size for i in instruments}
    pipeline = MarketDataPipeline(platform.db, instruments, cache=platform.cache)
    await pipeline.start()
    tasks: list[asyncio.Task[None]] = []

    def supervise(name: str, run: Callable[[], Awaitable[None]]) -> None:
        async def forever() -> None:
            while not stop.is_set():
                try:
                    await run()
                    return
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("market data %s failed (%s); restarting in %.0f s", name, exc, FEED_RESTART_DELAY_S)
                    await _sleep_or_stop(stop, FEED_RESTART_DELAY_S)

        tasks.append(asyncio.create_task(forever(), name=f"marketdata-{name}"))

    if bus_feed:
        # JetStream's stream sequences let the feed skip redelivered messages whose ticks are already stored
        # (adapters.feeds.bus); RabbitMQ's do not, so there redelivery stays at least once.
        exactly_once = platform.bus.kind == "nats"
        position = FeedPosition()  # outlives each restarted feed, like the pipeline holding its ticks
        supervise(
            "bus feed",
            lambda: pipeline.run_feed(
                BusTickFeed(
                    platform.bus,
                    pipeline.validator,
                    lot_sizes,
                    committed_offset=pipeline.committed_offset if exactly_once else None,
                    position=position,
                ),
                validated=True,
            ),
        )
    if engine_trades:
        supervise(
            "engine trades",
            lambda: pipeline.run_feed(
                EngineTradesFeed(platform.cache.client, pipeline.validator, lot_sizes), validated=True
            ),
        )
    if simulate_rate is not None:
        simulation = await load_simulation(platform)

        async def simulate() -> None:
            feed = SimulatedFeed(simulation, seed=random.SystemRandom().randrange(2**32), rate=simulate_rate)
            await pipeline.run_feed(feed)

        supervise("simulated feed", simulate)

    last_seq: dict[str, int] = {}

    async def depth() -> None:
        ensured: date | None = None
        while not stop.is_set():
            today = datetime.now(UTC).date()
            if ensured != today:
                async with platform.db.connection("marketdata.partitions") as conn:
                    await ensure_daily_partitions_async(conn, "depth_snapshots", today, 2)
                ensured = today
            await store_depth_snapshots(platform, instruments, last_seq)
            await _sleep_or_stop(stop, depth_interval_s)

    supervise("depth snapshots", depth)

    async def housekeeping() -> None:
        while not stop.is_set():
            today = datetime.now(UTC).date()
            await pipeline.ensure_days([today])
            result = await apply_retention(
                platform.db,
                retention_days=settings.md_retention_days,
                instruments=instruments,
                archive_dir=settings.md_archive_dir,
            )
            pipeline.forget_days_before(today - timedelta(days=settings.md_retention_days))
            if result.dropped:
                log.info("market data retention dropped %s", ", ".join(result.dropped))
            await _sleep_or_stop(stop, HOUSEKEEPING_INTERVAL_S)

    supervise("housekeeping", housekeeping)
    try:
        await stop.wait()
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await pipeline.close()
    return pipeline


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
