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
  order placement fields are absent (that histogram lives in the api's process). For the same reason this
  process publishes its sink's status (``InfluxSink.status()``, with its host and pid) to Redis under
  ``system:influxdb:<database>`` every ``SINK_STATUS_INTERVAL_S``, living ``SINK_STATUS_TTL_S``: an api
  process's own sink writes nothing, so ``/health/influxdb`` of any api reports this one.

Instruments listed after the start are adopted without a restart (``InstrumentDirectory``): every
``INSTRUMENT_RELOAD_S``, and at once when a feed meets one it does not know. The engine trades feed then stops
before that page (its cursor unmoved) and starts again with the instrument known, so the trade is stored once;
the bus feed on NATS does the same before the message is acked (its stream sequences skip what was handed over
already). On RabbitMQ, whose redeliveries are not deduplicated, the bus feed is not restarted for it: ticks of a
symbol the worker has not seen listed yet are dropped as ``unknown_symbol`` until the reload, at most
``INSTRUMENT_RELOAD_S`` after the listing. The simulated feed walks an adopted instrument from the reload that
adopted it on, while it is open: a reload that finds it halted or closed pauses its walk, one that finds it open
again resumes it. A changed tick or lot size needs a restart (``MarketDataPipeline.adopt``).

Memory is bounded: the pipeline's queue is bounded, feeds fetch bounded batches, candle and quote state is
per instrument and pruned past the out-of-order tolerance. A feed that fails (its server down) is restarted
after a pause; the pipeline itself retries commits and only gives up after its retry window.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import resource
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
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
from tradeplane.adapters.feeds.engine_trades import EngineTradesFeed, TradeCursor, TradePrint
from tradeplane.adapters.feeds.simulated import SimulatedFeed, SimulatedInstrument
from tradeplane.adapters.influxdb import FieldValue, InfluxSink, status_key
from tradeplane.bootstrap import Platform
from tradeplane.domain.ticks import InstrumentGrid, Tick
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
#: How often the sink's status is published for /health/influxdb, and how long a report lives: a few periods,
#: so a worker that stopped or cannot reach Redis reads as not reporting within seconds.
SINK_STATUS_INTERVAL_S = 2.0
SINK_STATUS_TTL_S = 10
#: How often the instruments table is read again for instruments listed since (see the module docstring).
INSTRUMENT_RELOAD_S = 2.0
#: A symbol found unlisted by a reload is not looked up again for this long (a feed of garbage symbols must not
#: restart the feeds on every tick).
UNLISTED_RECHECK_S = 1.0
#: How many unlisted symbols are remembered.
MAX_UNLISTED = 10_000


class UnlistedInstrument(Exception):
    """A feed met an instrument this worker has not adopted: reload the instruments, then restart the feed."""

    def __init__(self, key: str | int) -> None:
        super().__init__(f"instrument {key!r} is not adopted yet")
        self.key = key


class InstrumentDirectory:
    """The instruments this worker knows, shared by its feeds and tasks, growing as instruments are listed.

    ``instruments``, ``by_id`` and ``lot_sizes`` are mutated in place, so every holder sees an adopted
    instrument. ``must_check(key)``: should a feed that does not know ``key`` (a symbol or an instrument id) stop
    for a reload (True), or drop what it holds (False: a reload found it unlisted within ``UNLISTED_RECHECK_S``)?
    """

    def __init__(self, platform: Platform, pipeline: MarketDataPipeline, instruments: list[ListedInstrument]) -> None:
        self.platform = platform
        self.pipeline = pipeline
        self.instruments = instruments
        self.by_id = {i.instrument_id: i for i in instruments}
        self.lot_sizes = _LotSizes(self, {i.symbol: i.lot_size for i in instruments})
        self.reload_wanted = asyncio.Event()
        #: Runs after every reload, once the instruments it adopted are known here and to the pipeline.
        self.on_reload: Callable[[], Awaitable[None]] | None = None
        self._unlisted: dict[str | int, float] = {}
        self._lock = asyncio.Lock()

    @property
    def symbols(self) -> set[str]:
        return set(self.lot_sizes)

    def must_check(self, key: str | int) -> bool:
        checked = self._unlisted.get(key)
        return checked is None or time.monotonic() - checked >= UNLISTED_RECHECK_S

    async def reload(self, missing: str | int | None = None) -> list[ListedInstrument]:
        """Adopt every instrument listed since; ``missing``: the key a feed stopped for. Returns those adopted."""
        async with self._lock:
            started = time.monotonic()
            async with self.platform.db.connection("marketdata.instruments") as conn:
                listed = await sql.load_instruments(conn)
            added = await self.pipeline.adopt(listed)
            for instrument in added:
                self.instruments.append(instrument)
                self.by_id[instrument.instrument_id] = instrument
                dict.__setitem__(self.lot_sizes, instrument.symbol, instrument.lot_size)
            for instrument in added:
                self._unlisted.pop(instrument.symbol, None)
                self._unlisted.pop(instrument.instrument_id, None)
            if missing is not None and missing not in self.by_id and missing not in self.lot_sizes:
                if len(self._unlisted) >= MAX_UNLISTED:
                    self._unlisted.clear()
                self._unlisted[missing] = started
            if self.on_reload is not None:
                await self.on_reload()
            return added

    async def run(self, stop: asyncio.Event, interval_s: float = INSTRUMENT_RELOAD_S) -> None:
        """Reload every ``interval_s``, or sooner when a feed asks (``reload_wanted``)."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.reload_wanted.wait(), interval_s)
            self.reload_wanted.clear()
            if not stop.is_set():
                await self.reload()


class _LotSizes(dict[str, Decimal]):
    """The bus feed's symbol -> lot size: a miss on a symbol not checked lately stops the feed for a reload
    (``raise_unlisted``, NATS) or asks the directory for one and drops the tick (RabbitMQ)."""

    def __init__(self, directory: InstrumentDirectory, lots: dict[str, Decimal]) -> None:
        super().__init__(lots)
        self.directory = directory
        self.raise_unlisted = False

    def get(self, symbol: str, default: Decimal | None = None) -> Decimal | None:  # type: ignore[override]
        lot = super().get(symbol)
        if lot is not None:
            return lot
        if isinstance(symbol, str) and self.directory.must_check(symbol):
            if self.raise_unlisted:
                raise UnlistedInstrument(symbol)
            self.directory.reload_wanted.set()
        return default


class AdoptingEngineTradesFeed(EngineTradesFeed):
    """The engine trades feed over the directory's instruments: a page with a trade of an instrument not adopted
    yet stops the feed before anything of it is handed over (the cursor stays before the page)."""

    def __init__(self, directory: InstrumentDirectory, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.directory = directory
        self.instruments = directory.by_id

    def _ticks(self, rows: Sequence[asyncpg.Record], prints: list[TradePrint] | None = None) -> list[Tick]:
        for row in rows:
            instrument_id: int = row["instrument_id"]
            if instrument_id not in self.instruments and self.directory.must_check(instrument_id):
                raise UnlistedInstrument(instrument_id)
        return super()._ticks(rows, prints)


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
    instruments: Sequence[ListedInstrument],
    stop: asyncio.Event,
    *,
    refresh_s: float = 1.0,
    ready: asyncio.Event | None = None,
) -> None:
    """Feed the engine's top of book to ``pipeline`` until ``stop``: a ``tp:book:<symbol>`` increment marks
    its symbol, whose snapshot is then read (conflated: one MGET for all marked symbols); every
    ``refresh_s`` every snapshot is read again (a missed increment) and the book quotes' TTLs refreshed."""
    symbols = {i.symbol for i in instruments}  # grows with ``instruments`` (adopted ones), see the refresh
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
                if len(symbols) != len(instruments):
                    symbols.update(i.symbol for i in instruments)
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


class SimulatedMarket:
    """The simulated feed's walks: one per instrument the worker has adopted, including those adopted while the
    feed runs, each walking while its instrument is open: a halted or closed one pauses and, reopened, goes on
    from where it stopped (``adopt``, after every reload of the ``InstrumentDirectory``)."""

    def __init__(self, platform: Platform, instruments: list[ListedInstrument], rate: int) -> None:
        self.platform = platform
        self.instruments = instruments  # the directory's: grows as instruments are adopted
        self.rate = rate
        self.walks: list[SimulatedInstrument] = []
        self.feed: SimulatedFeed | None = None
        self.halted: frozenset[str] = frozenset()  # symbols of instruments not open when last read
        self._seen: set[str] = set()

    async def adopt(self) -> None:
        """Walk the adopted instruments not seen yet, whatever their status, in the running feed and the next
        ones; pause the walks of the instruments now halted or closed and resume those reopened."""
        unseen = [i.symbol for i in self.instruments if i.symbol not in self._seen]
        try:
            async with self.platform.db.connection("marketdata.instruments") as conn:
                walks = await load_simulation_from(conn, unseen, halted_too=True) if unseen else []
                rows = await conn.fetch("SELECT symbol FROM instruments WHERE status <> 'open'")
            halted = frozenset(row["symbol"] for row in rows)
        except Exception as exc:  # a reload must not fail for it: tried again after the next one
            log.warning("reading the instruments to simulate (%d new) failed: %s", len(unseen), exc)
            return
        self._seen.update(unseen)
        self.walks.extend(walks)
        if halted != self.halted:
            log.info(
                "simulated feed: paused %s, resumed %s",
                sorted(halted - self.halted) or "none",
                sorted(self.halted - halted) or "none",
            )
            self.halted = halted
        if self.feed is not None:
            self.feed.set_halted(halted)
            if walks:
                self.feed.add(walks)

    def start(self) -> SimulatedFeed:
        """A new feed over every walk, each from its start price (a restarted feed too), with a new seed."""
        seed = random.SystemRandom().randrange(2**32)
        self.feed = SimulatedFeed(self.walks, seed=seed, rate=self.rate, halted=self.halted)
        return self.feed


async def load_simulation_from(
    conn: asyncpg.Connection, symbols: Sequence[str] | None = None, *, halted_too: bool = False
) -> list[SimulatedInstrument]:
    """A random walk per open instrument (of ``symbols`` if given; halted and closed ones too if ``halted_too``),
    starting at its last trade price or its reference price."""
    rows = await conn.fetch(
        "SELECT symbol, tick_size, coalesce(last_price, reference_price) AS start FROM instruments"
        " WHERE ($2 OR status = 'open') AND ($1::text[] IS NULL OR symbol = ANY($1::text[])) ORDER BY id",
        symbols,
        halted_too,
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
    """Store the engine's current book snapshot of every symbol whose sequence moved; returns rows stored.

    ``last_seq`` (symbol -> sequence stored) moves only once the rows are committed, so a snapshot whose insert
    failed (PostgreSQL down) is stored by the next call."""
    keys = [book_snapshot_key(i.symbol) for i in instruments]
    try:
        values = await platform.cache.client.mget(keys)
    except REDIS_ERRORS as exc:
        log.warning("reading book snapshots failed: %s", exc)
        return 0
    now = datetime.now(UTC)
    rows: list[tuple[datetime, int, str, str, int | None]] = []
    stored: dict[str, int] = {}
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
        stored[instrument.symbol] = seq
        rows.append((now, instrument.instrument_id, orjson.dumps(bids).decode(), orjson.dumps(asks).decode(), seq))
    if rows:
        async with platform.db.transaction("marketdata.depth") as conn:
            await sql.insert_depth_snapshots(conn, rows)
        last_seq.update(stored)
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
    sink_status_interval_s: float = SINK_STATUS_INTERVAL_S,
) -> MarketDataPipeline:
    """Run the market data process on a started ``platform`` until ``stop`` is set; returns the pipeline
    (closed, its ``stats`` final)."""
    settings = platform.settings
    async with platform.db.connection("marketdata.instruments") as conn:
        instruments = await sql.load_instruments(conn)
    if not instruments:
        raise TradeplaneError("no instruments are listed: load reference data first (tradeplane up loads a demo)")
    pipeline = MarketDataPipeline(platform.db, instruments, cache=platform.cache, influx=platform.influx)
    await pipeline.start()
    directory = InstrumentDirectory(platform, pipeline, instruments)
    tasks: list[asyncio.Task[None]] = []

    def supervise(name: str, run: Callable[[], Awaitable[None]]) -> None:
        async def forever() -> None:
            while not stop.is_set():
                try:
                    await run()
                    return
                except asyncio.CancelledError:
                    raise
                except UnlistedInstrument as exc:
                    # Stopped before handing anything of it over: adopt, then go on where it stopped.
                    try:
                        added = await directory.reload(exc.key)
                    except Exception as reload_error:  # PostgreSQL down: the feed meets the symbol again later
                        log.warning(
                            "market data %s met %r but reloading instruments failed (%s); restarting in %.0f s",
                            name,
                            exc.key,
                            reload_error,
                            FEED_RESTART_DELAY_S,
                        )
                        await pause(stop, FEED_RESTART_DELAY_S)
                        continue
                    log.info("market data %s met %r; adopted %d instruments", name, exc.key, len(added))
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
                AdoptingEngineTradesFeed(
                    directory,
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
        directory.lot_sizes.raise_unlisted = exactly_once  # see the module docstring
        position = FeedPosition()  # outlives each restarted feed, like the pipeline holding its ticks

        async def bus() -> None:
            await after_catch_up()
            feed = BusTickFeed(
                platform.bus,
                pipeline.validator,
                directory.lot_sizes,
                committed_offset=pipeline.committed_offset if exactly_once else None,
                position=position,
            )
            feed.lot_sizes = directory.lot_sizes  # shared, not the feed's copy: it sees adopted instruments
            await pipeline.run_feed(feed, validated=True)

        supervise("bus feed", bus)
    if engine_books:
        supervise(
            "engine book quotes",
            lambda: quote_engine_books(platform, pipeline, instruments, stop, refresh_s=book_refresh_s),
        )
    if simulate_rate is not None:
        market = SimulatedMarket(platform, directory.instruments, simulate_rate)
        await market.adopt()
        directory.on_reload = market.adopt

        async def simulate() -> None:
            await after_catch_up()
            await pipeline.run_feed(market.start())

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
    supervise("instrument reload", lambda: directory.run(stop))
    influx = platform.influx
    if influx is not None:
        supervise("influxdb figures", lambda: report_figures(influx, pipeline, stop, interval_s=influx_interval_s))
        supervise(
            "influxdb status", lambda: publish_sink_status(platform, influx, stop, interval_s=sink_status_interval_s)
        )
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


async def publish_sink_status(
    platform: Platform, influx: InfluxSink, stop: asyncio.Event, *, interval_s: float = SINK_STATUS_INTERVAL_S
) -> None:
    """Publish ``influx``'s status with who reports it under ``status_key`` every ``interval_s`` until ``stop``,
    then delete it: a worker that stopped reads as not reporting at once, one that died once the TTL ends."""
    key = status_key(influx.database)
    client = platform.cache.client
    writer = {"service": "marketdata", "host": socket.gethostname(), "pid": os.getpid()}
    try:
        while not stop.is_set():
            report = {**writer, "reported_at": datetime.now(UTC).isoformat(), "sink": influx.status()}
            await client.set(key, orjson.dumps(report), ex=SINK_STATUS_TTL_S)
            await pause(stop, interval_s)
    finally:
        if stop.is_set():
            with contextlib.suppress(*REDIS_ERRORS):
                await client.delete(key)


async def _first_of(*events: asyncio.Event, within_s: float) -> bool:
    """Wait until one of ``events`` is set; False if none was within ``within_s`` seconds."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        done, _ = await asyncio.wait(waiters, timeout=within_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
    return bool(done)
