"""The market data worker: every configured feed into one ``MarketDataPipeline``, plus housekeeping.

Runs until ``stop`` is set:

- feeds: the engine's own trades, read exactly once from the ``trades`` table after a cursor stored with the
  ticks (``adapters.feeds.engine_trades``; woken by Redis ``tp:trades:*``), then external publishers on the
  bus (``md.ticks.>``, a redelivered message stored once on NATS) and, when ``simulate_rate`` is given, a
  simulated random walk over the listed instruments at that many ticks per second. The other feeds start once
  the engine trades have caught up (or after ``CATCH_UP_WAIT_S``), so trades made while the worker was down
  are not refused as out of order behind fresher external ticks of the same symbol. The bus feed's trades are
  external venues' prints: once stored they are also announced on ``tp:trades:<symbol>`` (``services.ingest``);
  the engine announces its own trades, and simulated trades are not announced;
- quotes from the engine's books: every ``tp:book:<symbol>`` increment (and every ``book_refresh_s``) the
  top of ``tp:book:<symbol>:snapshot`` quotes symbols that no external feed quotes
  (``MarketDataPipeline.note_engine_book``), and their Redis quotes are refreshed before the 5 s TTL ends;
- L2 depth snapshots: every ``depth_interval_s`` the engine's ``tp:book:<symbol>:snapshot`` of each symbol
  whose book changed (its ``seq`` moved) is stored in ``depth_snapshots``;
- partitions ahead (today and tomorrow) and retention (``md_retention_days``, archive to
  ``md_archive_dir``) at start and then hourly;
- with the InfluxDB sink configured: committed ticks go to ``market_data`` and the engine's trades to
  ``trades`` (both after their commit), and every ``influx_interval_s`` this process writes ``performance``
  (ingest rates, order placement latency) and ``system_metrics`` (CPU, RSS, the sink's own buffer) points.
  This process rather than the api: there is one market data worker per deployment (api replicas would each
  write the same figures), it owns the ingest figures and the sink's market data, and under ``tradeplane up``
  it shares the process, so the order path's Prometheus figures, with the api and engines. Run alone, the
  order placement fields are absent (that histogram lives in the api's process).

Memory is bounded: the pipeline's queue is bounded, feeds fetch bounded batches, candle and quote state is
per instrument and pruned past the out-of-order tolerance. A feed that fails (its server down) is restarted
after a pause; the pipeline itself retries commits and only gives up after its retry window.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import resource
import socket
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import orjson
from prometheus_client import REGISTRY

from tradeplane.adapters.cache import REDIS_ERRORS
from tradeplane.adapters.db import marketdata as sql
from tradeplane.adapters.db.marketdata import ListedInstrument
from tradeplane.adapters.db.timeseries import ensure_daily_partitions_async
from tradeplane.adapters.feeds.bus import BusTickFeed, FeedPosition
from tradeplane.adapters.feeds.engine_trades import EngineTradesFeed, TradeCursor
from tradeplane.adapters.feeds.simulated import SimulatedFeed, SimulatedInstrument
from tradeplane.adapters.influxdb import FieldValue, InfluxSink
from tradeplane.bootstrap import Platform
from tradeplane.domain.ticks import InstrumentGrid
from tradeplane.errors import TradeplaneError
from tradeplane.services.ingest import MarketDataPipeline, apply_retention
from tradeplane.services.stopping import pause

log = logging.getLogger("tradeplane.marketdata")

FEED_RESTART_DELAY_S = 2.0
HOUSEKEEPING_INTERVAL_S = 3600.0
#: How long the other feeds wait for the engine trades to catch up before starting anyway.
CATCH_UP_WAIT_S = 30.0
BOOK_CHANNEL_PREFIX = "tp:book:"
#: How often performance and system_metrics points go to InfluxDB.
INFLUX_REPORT_INTERVAL_S = 10.0


def book_snapshot_key(symbol: str) -> str:
    return f"tp:book:{symbol}:snapshot"


BookLevel = tuple[Decimal, Decimal]


def book_top(raw: bytes | str) -> tuple[int, BookLevel | None, BookLevel | None]:
    """(seq, best bid, best ask) of an engine book snapshot, each side (price, size) or None when empty.
    Raises ValueError (or KeyError/TypeError) on an unreadable snapshot."""
    snapshot: dict[str, Any] = orjson.loads(raw)
    bids = [(Decimal(str(p)), Decimal(str(q))) for p, q in snapshot["bids"]]
    asks = [(Decimal(str(p)), Decimal(str(q))) for p, q in snapshot["asks"]]
    bid = max(bids, key=lambda level: level[0]) if bids else None
    ask = min(asks, key=lambda level: level[0]) if asks else None
    return int(snapshot["seq"]), bid, ask


async def quote_engine_books(
    platform: Platform,
    pipeline: MarketDataPipeline,
    instruments: list[ListedInstrument],
    stop: asyncio.Event,
    *,
    refresh_s: float = 1.0,
    ready: asyncio.Event | None = None,
) -> None:
    """Feed the engine's top of book to ``pipeline`` until ``stop``: a ``tp:book:<symbol>`` increment marks
    its symbol, whose snapshot is then read (conflated: one MGET for all marked symbols); every
    ``refresh_s`` every snapshot is read again (a missed increment) and the book quotes' TTLs refreshed."""
    symbols = {i.symbol for i in instruments}
    marked: set[str] = set(symbols)
    wake = asyncio.Event()
    client = platform.cache.client

    async def listen() -> None:
        pubsub = client.pubsub()
        try:
            await pubsub.psubscribe(f"{BOOK_CHANNEL_PREFIX}*")
            while True:
                message = await pubsub.get_message(timeout=1.0)
                if message is None:
                    continue
                if message.get("type") == "psubscribe":
                    marked.update(symbols)  # increments before this were not seen
                    wake.set()
                    if ready is not None:
                        ready.set()
                elif message.get("type") == "pmessage":
                    channel = message["channel"]
                    symbol = (channel.decode() if isinstance(channel, bytes) else str(channel))[
                        len(BOOK_CHANNEL_PREFIX) :
                    ]
                    if symbol in symbols:
                        marked.add(symbol)
                        wake.set()
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    listener = asyncio.create_task(listen(), name="marketdata-book-listener")
    loop = asyncio.get_running_loop()
    next_refresh = loop.time()
    try:
        while not stop.is_set():
            if listener.done():
                listener.result()  # raise what stopped it: the supervisor restarts us
            if loop.time() >= next_refresh:
                marked.update(symbols)
                pipeline.refresh_book_quotes()
                next_refresh = loop.time() + refresh_s
            wanted = sorted(marked)
            marked.clear()
            wake.clear()
            if wanted:
                values = await client.mget([book_snapshot_key(symbol) for symbol in wanted])
                for symbol, raw in zip(wanted, values, strict=True):
                    if raw is None:
                        continue
                    try:
                        seq, bid, ask = book_top(raw)
                        pipeline.note_engine_book(symbol, seq, bid, ask)
                    except (ValueError, KeyError, TypeError, ArithmeticError) as exc:
                        log.warning("unreadable book snapshot of %s: %s", symbol, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), max(0.0, next_refresh - loop.time()))
    finally:
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await listener


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
    engine_books: bool = True,
    depth_interval_s: float = 5.0,
    book_refresh_s: float = 1.0,
    influx_interval_s: float = INFLUX_REPORT_INTERVAL_S,
) -> MarketDataPipeline:
    """Run the market data process on a started ``platform`` until ``stop`` is set; returns the pipeline
    (closed, its ``stats`` final)."""
    settings = platform.settings
    async with platform.db.connection("marketdata.instruments") as conn:
        instruments = await sql.load_instruments(conn)
    if not instruments:
        raise TradeplaneError("no instruments are listed: load reference data first (tradeplane up loads a demo)")
    lot_sizes = {i.symbol: i.lot_size for i in instruments}
    pipeline = MarketDataPipeline(platform.db, instruments, cache=platform.cache, influx=platform.influx)
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
                    await pause(stop, FEED_RESTART_DELAY_S)

        tasks.append(asyncio.create_task(forever(), name=f"marketdata-{name}"))

    caught_up = asyncio.Event()
    if engine_trades:
        cursor = TradeCursor()  # outlives each restarted feed, like the pipeline holding its ticks

        supervise(
            "engine trades",
            lambda: pipeline.run_feed(
                EngineTradesFeed(
                    platform.db,
                    platform.cache.client,
                    pipeline.validator,
                    instruments,
                    cursor=cursor,
                    caught_up=caught_up,
                    influx=platform.influx,
                ),
                validated=True,
            ),
        )
    else:
        caught_up.set()

    async def after_catch_up() -> None:
        """Hold an external feed until the engine trades caught up (or a while), see the module docstring."""
        if not await _first_of(caught_up, stop, within_s=CATCH_UP_WAIT_S):
            log.warning("engine trades still catching up after %.0f s: starting anyway", CATCH_UP_WAIT_S)

    if bus_feed:
        # JetStream's stream sequences let the feed skip redelivered messages whose ticks are already stored
        # (adapters.feeds.bus); RabbitMQ's do not, so there redelivery stays at least once.
        exactly_once = platform.bus.kind == "nats"
        position = FeedPosition()  # outlives each restarted feed, like the pipeline holding its ticks

        async def bus() -> None:
            await after_catch_up()
            await pipeline.run_feed(
                BusTickFeed(
                    platform.bus,
                    pipeline.validator,
                    lot_sizes,
                    committed_offset=pipeline.committed_offset if exactly_once else None,
                    position=position,
                ),
                validated=True,
            )

        supervise("bus feed", bus)
    if engine_books:
        supervise(
            "engine book quotes",
            lambda: quote_engine_books(platform, pipeline, instruments, stop, refresh_s=book_refresh_s),
        )
    if simulate_rate is not None:
        simulation = await load_simulation(platform)

        async def simulate() -> None:
            await after_catch_up()
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
            await pause(stop, depth_interval_s)

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
            if result.pending:
                log.warning(
                    "market data retention kept %s detached: not archived yet (see the error above; the next run"
                    " tries again)",
                    ", ".join(result.pending),
                )
            await pause(stop, HOUSEKEEPING_INTERVAL_S)

    supervise("housekeeping", housekeeping)
    influx = platform.influx
    if influx is not None:
        supervise("influxdb figures", lambda: report_figures(influx, pipeline, stop, interval_s=influx_interval_s))
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


class ProcessFigures:
    """Samples this process's figures for InfluxDB: totals, and rates over the time since the last sample."""

    def __init__(self, pipeline: MarketDataPipeline, influx: InfluxSink, *, service: str = "marketdata") -> None:
        self.pipeline = pipeline
        self.influx = influx
        self.tags = {"service": service, "host": socket.gethostname()}
        self._last: tuple[float, int, float, float, float] | None = None

    def write(self, ts_ns: int | None = None) -> None:
        """One ``performance`` and one ``system_metrics`` point (rates only from the second call on)."""
        ts_ns = time.time_ns() if ts_ns is None else ts_ns
        now = time.monotonic()
        stats = self.pipeline.stats
        cpu = _sample("process_cpu_seconds_total")
        if cpu is None:  # no /proc: the process collector exports nothing
            usage = resource.getrusage(resource.RUSAGE_SELF)
            cpu = usage.ru_utime + usage.ru_stime
        orders = _sample("order_placement_duration_seconds_count") or 0.0
        order_seconds = _sample("order_placement_duration_seconds_sum") or 0.0
        performance: dict[str, FieldValue] = {
            "ticks_read": stats.rows_read,
            "ticks_stored": stats.stored,
            "ticks_dropped": stats.dropped_total,
            "commits": stats.commits,
            "orders_placed": int(orders),
        }
        system: dict[str, FieldValue] = {
            "cpu_seconds": cpu,
            "influxdb_buffered_points": self.influx.pending,
            "influxdb_points_dropped": self.influx.stats.dropped_total,
        }
        rss = _sample("process_resident_memory_bytes")
        if rss is not None:
            system["rss_bytes"] = int(rss)
        if self._last is not None:
            then, stored, cpu_then, orders_then, order_seconds_then = self._last
            elapsed = max(now - then, 1e-9)
            performance["ticks_stored_per_s"] = (stats.stored - stored) / elapsed
            system["cpu_percent"] = 100.0 * (cpu - cpu_then) / elapsed
            if orders > orders_then:
                mean_s = (order_seconds - order_seconds_then) / (orders - orders_then)
                performance["order_placement_mean_ms"] = 1000.0 * mean_s
        self._last = (now, stats.stored, cpu, orders, order_seconds)
        self.influx.write_performance(self.tags, performance, ts_ns)
        self.influx.write_system_metric(self.tags, system, ts_ns)


def _sample(name: str) -> float | None:
    value: float | None = REGISTRY.get_sample_value(name)
    return value


async def report_figures(
    influx: InfluxSink, pipeline: MarketDataPipeline, stop: asyncio.Event, *, interval_s: float
) -> None:
    """Write this process's figures to InfluxDB every ``interval_s`` until ``stop`` (into the sink's buffer:
    never waits for InfluxDB)."""
    figures = ProcessFigures(pipeline, influx)
    while not stop.is_set():
        figures.write()
        await pause(stop, interval_s)


async def _first_of(*events: asyncio.Event, within_s: float) -> bool:
    """Wait until one of ``events`` is set; False if none was within ``within_s`` seconds."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        done, _ = await asyncio.wait(waiters, timeout=within_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
    return bool(done)
