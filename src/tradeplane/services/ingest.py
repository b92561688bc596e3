"""The market data pipeline: feed batches -> validator -> candles -> binary COPY, quotes to Redis.

Data flow and who owns what::

    submit(ticks) ── TickValidator ── numpy columns ── CandleAggregator ── COPY rows ──▶ bounded queue
      (producer: the feed's task, CPU)                                                       │
    writer task: one transaction per commit interval: streaming COPY of queued chunks into ticks,
      candle upsert (merged with stored candles), sampled spreads; commit; then acks, stats, candle events,
      and (when configured) the committed ticks into the InfluxDB sink's bounded buffer (never waited for)
    publisher task: latest quote per symbol -> Redis market_data:{symbol} (TTL 5 s), price:{symbol},
      PUBLISH tp:quotes:<symbol>; committed candles -> PUBLISH tp:candles:<tf>:<symbol> (conflated);
      committed external trade prints -> PUBLISH tp:trades:<symbol>

Candles published. Each commit publishes, per symbol and timeframe, the newest candle its ticks touched, as
stored by that commit: what ``/candles`` returns for the bucket at that moment; and before it every other candle
it touched that was published before and can still change (its bucket ends within the out-of-order tolerance
of the newest one published): the last trades of a minute committed with the first of the next, or a late tick
that is the new low of a candle already sent, reach subscribers as that candle's corrected state. An older
bucket never published (history replayed in one commit) stays conflated into the newest. Natively the candles
are the rows the candle upsert returns. On TimescaleDB the continuous aggregates own candles (the ingester
keeps none), so the commit reads those buckets back through ``tp_candles`` (``sql.touched_candles``) in its own
transaction, after its ticks are written: real-time aggregation already counts them, and the candle is the
aggregate's own, ties at one microsecond included. A bucket below an aggregate's refresh watermark reads as
materialized (as ``/candles`` serves it) until the next refresh.

External trade prints. A batch marked ``external_prints`` (the bus feed: a venue's trades as they happen)
has each committed trade (``last`` and ``volume`` > 0) announced on ``tp:trades:<symbol>`` in the engine's
trade envelope, ``{"channel": "trades", "symbol": s, "data": {"trade_id": null, "price", "qty",
"aggressor_side": null, "ts", "source": "external"}}`` (no venue id or aggressor side travels with a tick),
one message per symbol and publish, the envelope alone or a JSON array of them in arrival order, like the
engine. Other feeds are not announced: replays are history, the simulated market's trades are not real, and
the engine's trades reach ``tp:trades`` from the engine itself (the engine trades feed only stores them).

Quote sides come from external feeds' bid/ask. A symbol that has had none for ``external_quote_s`` (the quote
TTL, 5 s: it trades only on our engine, or its feed stopped) is quoted from the engine's book instead
(``note_engine_book``: best bid/ask and their sizes), with the last trade as usual; ``refresh_book_quotes``
re-writes those keys with their TTL so a quiet book's quote does not expire while it is still true.

Pipelining: the writer streams a chunk to PostgreSQL while the producer validates, aggregates and encodes
the next one, so the server's insert work and our Python work overlap on the two cores. The queue is bounded
(``queue_chunks``): a feed faster than the database waits in ``submit`` instead of growing memory.

Invariants:
- Bad ticks are dropped by the validator (counted in ``market_data_ticks_dropped_total{reason}``, one sample
  per reason logged per ``drop_log_interval_s``) and never reach the aggregator or storage.
- A tick reaches the aggregator only if it is encoded for COPY in the same chunk, so committed candles are the
  aggregate of committed ticks (plus whatever was stored before: the upsert merges, it never overwrites).
- Daily partitions for every day of a chunk (ticks, spreads) exist before the chunk is queued: the native
  path refuses rows without a partition, and replayed history can be any day.
- Candles are committed with their ticks, at most ``commit_interval_s`` after the tick was submitted.
- ``on_stored`` callbacks (bus acks) run after the commit that made their ticks durable, in submit order.
- A batch's ``ConsumerOffset`` (bus feed) is written to ``engine_offsets`` in the transaction that commits its
  ticks, never ahead of them: ``committed_offset`` is how far that consumer's stream is durably stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import orjson
from prometheus_client import Counter as MetricCounter

from tradeplane.adapters.cache import REDIS_ERRORS, TTL_MARKET_DATA, Cache
from tradeplane.adapters.db import marketdata as sql
from tradeplane.adapters.db.marketdata import ListedInstrument, TickColumns, TickCopyEncoder
from tradeplane.adapters.db.tables import TIMESERIES_TABLES
from tradeplane.adapters.db.timeseries import (
    ARCHIVING_SUFFIX,
    detach_partitions_older_than_async,
    detached_partitions_async,
    drop_detached_async,
    drop_partitions_older_than_async,
    ensure_daily_partitions_async,
    storage_kind_async,
)
from tradeplane.adapters.feeds import EXTERNAL_SOURCE, ConsumerOffset, FeedBatch, TickFeed
from tradeplane.adapters.feeds.replay import to_units
from tradeplane.adapters.influxdb import InfluxSink, TickSeries
from tradeplane.adapters.postgres import Database
from tradeplane.domain.candles import Candle, CandleAggregator, Timeframe
from tradeplane.domain.ticks import NS_PER_SECOND, DropReason, PriceScale, Tick, TickValidator
from tradeplane.errors import InfrastructureUnavailable
from tradeplane.services.queries import decimal_text

log = logging.getLogger("tradeplane.marketdata")

TICKS_DROPPED = MetricCounter(
    "market_data_ticks_dropped", "Ticks refused by the validator, by reason", ["reason"]
)  # exported as market_data_ticks_dropped_total
TICKS_STORED = MetricCounter("market_data_ticks_stored", "Ticks committed to the ticks table")

#: Allowed clock skew of tick sources: a tick stamped later than the wall clock plus this is refused.
MAX_FUTURE_NS = 5 * NS_PER_SECOND

#: ``price:{symbol}`` holds the last trade price; seed 002 caches prices for a minute.
TTL_PRICE = 60
#: How long ``close`` lets the publisher send the last quotes and candles when Redis is slow.
CLOSE_PUBLISH_TIMEOUT_S = 5.0
#: External trade prints waiting for the publisher, per symbol: past this (Redis slower than the venue) the
#: oldest are dropped, as pub/sub would drop them for a slow subscriber.
MAX_PENDING_PRINTS = 10_000
#: Chunks at least this large are encoded in a worker thread (smaller ones are not worth the hand-off).
THREAD_MIN_ROWS = 2_000
NS_PER_DAY = 86_400 * NS_PER_SECOND
_M1_NS = Timeframe.M1.width_ns
_HIGHER = tuple(tf for tf in Timeframe if tf is not Timeframe.M1)

OnStored = Callable[[], Awaitable[None]]


def quotes_channel(symbol: str) -> str:
    return f"tp:quotes:{symbol}"


def trades_channel(symbol: str) -> str:
    return f"tp:trades:{symbol}"


def candles_channel(timeframe: Timeframe | str, symbol: str) -> str:
    return f"tp:candles:{Timeframe(timeframe).value}:{symbol}"


def market_data_key(symbol: str) -> str:
    return f"market_data:{symbol}"


def price_key(symbol: str) -> str:
    return f"price:{symbol}"


def _iso(ts: datetime) -> str:
    return ts.isoformat().replace("+00:00", "Z")


def _day(ts_ns: int) -> date:
    return (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(days=ts_ns // NS_PER_DAY)).date()


@dataclass(slots=True)
class IngestStats:
    """What a run did: rows read from feeds, ticks committed, ticks dropped by reason."""

    rows_read: int = 0
    stored: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    candles_written: int = 0
    commits: int = 0

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())


@dataclass(slots=True)
class _Quote:
    """Latest top of book and last trade of one instrument, in ticks/lots, each with its timestamp."""

    ts_ns: int = -1
    bid: int | None = None
    ask: int | None = None
    bid_size: int = 0
    ask_size: int = 0
    quote_ts_ns: int = -1
    last: int | None = None
    last_ts_ns: int = -1
    external_seen: float = -1e18  # time.monotonic() of the last external bid/ask


@dataclass(frozen=True, slots=True)
class _BookTop:
    """Top of the engine's book of one instrument (ticks/lots), its snapshot sequence and when it changed."""

    seq: int
    bid: int | None
    bid_size: int
    ask: int | None
    ask_size: int
    ts_ns: int


@dataclass(slots=True)
class _Chunk:
    data: bytes
    rows: int
    candles: list[Candle]
    spans: dict[tuple[int, Timeframe, int], tuple[int, int]]
    spreads: list[tuple[datetime, int, Decimal]]
    days: frozenset[date]
    newest: dict[int, int] = field(default_factory=dict)  # instrument index -> newest tick ts in the chunk
    ticks: list[Tick] = field(default_factory=list)  # the encoded ticks, for the InfluxDB sink after commit
    on_stored: OnStored | None = None
    offset: ConsumerOffset | None = None
    # TimescaleDB path: instrument index -> (oldest, newest) trade ts in the chunk (the candles to read back)
    trade_range: dict[int, tuple[int, int]] = field(default_factory=dict)
    # external trade prints to announce after commit: (instrument index, ts ns, price ticks, volume lots)
    prints: list[tuple[int, int, int, int]] = field(default_factory=list)


_CLOSE = object()


class PipelineFailed(InfrastructureUnavailable):
    """The writer stopped: the database stayed unreachable past the retry window, or a commit failed for a reason
    no retry mends (its error is the cause); ``submit`` and ``flush`` raise this."""


class MarketDataPipeline:
    """Validates, aggregates and stores ticks; see the module docstring. Use as ``async with``."""

    def __init__(
        self,
        db: Database,
        instruments: Sequence[ListedInstrument],
        *,
        cache: Cache | None = None,
        max_out_of_order_ns: int = 5 * NS_PER_SECOND,
        max_future_ns: int | None = MAX_FUTURE_NS,
        influx: InfluxSink | None = None,
        chunk_rows: int = 5_000,
        commit_interval_s: float = 0.25,
        max_rows_per_commit: int = 250_000,
        queue_chunks: int = 8,
        spread_interval_ns: int = NS_PER_SECOND,
        candles: bool | None = None,
        retry_for_s: float = 60.0,
        drop_log_interval_s: float = 10.0,
        external_quote_s: float = TTL_MARKET_DATA,
    ) -> None:
        """``external_quote_s``: how long after its last external bid/ask a symbol stays quoted by that feed
        rather than by the engine's book. ``max_future_ns``: ticks stamped later than the wall clock plus this
        are dropped as ``timestamp_in_future`` (see ``TickValidator``). ``influx``: committed ticks are also
        written to its ``market_data`` measurement (buffered there: the pipeline never waits for InfluxDB)."""
        if not instruments:
            raise ValueError("the market data pipeline needs at least one instrument")
        self.db = db
        self.cache = cache
        self.instruments = list(instruments)
        self.encoder = TickCopyEncoder(self.instruments)
        self.validator = TickValidator(
            [_Grid(i.symbol, i.tick_size) for i in self.instruments],
            max_out_of_order_ns=max_out_of_order_ns,
            max_future_ns=max_future_ns,
        )
        self.influx = influx
        # A symbol no InfluxDB tag can hold (a trailing backslash, a line break) is left out of the sink only.
        self._influx_series: dict[str, TickSeries] = {}
        self._influx_skips = False
        for i in self.instruments if influx is not None else ():
            try:
                self._influx_series[i.symbol] = TickSeries(i.symbol, i.tick_size, i.lot_size)
            except ValueError as exc:
                self._influx_skips = True
                log.warning("market data of %r is not written to InfluxDB: %s", i.symbol, exc)
        self.aggregator = CandleAggregator(max_out_of_order_ns=max_out_of_order_ns)
        self.stats = IngestStats()
        self.chunk_rows = chunk_rows
        self.commit_interval_s = commit_interval_s
        self.max_rows_per_commit = max_rows_per_commit
        self.spread_interval_ns = spread_interval_ns
        self.retry_for_s = retry_for_s
        self.drop_log_interval_s = drop_log_interval_s
        self.external_quote_s = external_quote_s
        self._tolerance_ns = max_out_of_order_ns
        self._candles_wanted = candles
        self.candles_enabled = candles if candles is not None else True
        self._queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=queue_chunks)
        self._writer: asyncio.Task[None] | None = None
        self._publisher: asyncio.Task[None] | None = None
        self._ensured: set[date] = set()
        self._ensure_lock = asyncio.Lock()
        self._submit_lock = asyncio.Lock()
        # Per candle (instrument index, timeframe, bucket): cumulative (volume lots, count) already upserted,
        # and the (first, last) trade timestamps this process saw: the merge keys of the upsert.
        self._written: dict[tuple[int, Timeframe, int], tuple[int, int]] = {}
        self._spans: dict[tuple[int, Timeframe, int], tuple[int, int]] = {}
        self._pending_written: dict[tuple[int, Timeframe, int], tuple[int, int]] = {}
        # Newest tick timestamp per instrument among *committed* chunks: what pruning may rely on, since
        # chunks still queued can carry updates of buckets the aggregator has already evicted.
        self._committed_newest: dict[int, int] = {}
        self._spread_last = [-1] * len(self.instruments)
        self._quotes = [_Quote() for _ in self.instruments]
        self._dirty_quotes: set[int] = set()
        self._books: list[_BookTop | None] = [None] * len(self.instruments)
        self._refresh_quotes: set[int] = set()
        self._book_quoted: set[int] = set()  # published with the book's sides
        # (timeframe, symbol) -> bucket start ns -> the committed candle to publish (see the module docstring),
        # and the buckets published that can still change (pruned past the out-of-order tolerance).
        self._pending_candles: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
        self._sent_candles: dict[tuple[str, str], set[int]] = {}
        self._pending_prints: dict[int, deque[tuple[int, int, int]]] = {}
        # Print text as the engine writes trades: the grids' own exponents (tick 0.01 -> "100.50").
        self._print_grids = [(PriceScale(i.tick_size.normalize()), i.lot_size.normalize()) for i in self.instruments]
        # TimescaleDB path: candles are read back from the continuous aggregates after each commit (start()).
        self.candles_from_aggregates = False
        self._publish_wanted = asyncio.Event()
        # One publish at a time: flush() waits behind a background publish already writing to Redis, so
        # "flushed" really means the quotes and candles are in Redis.
        self._publish_lock = asyncio.Lock()
        self._drops_reported: Counter[DropReason] = Counter()
        self._last_drop_log = time.monotonic()
        self._failure: BaseException | None = None
        self._closing = False
        self._hypertable = False
        self._stored_days: set[date] = set()

    # ------------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        async with self.db.connection("marketdata.start") as conn:
            kinds = await storage_kind_async(conn)
        if kinds["ticks"] == "missing":
            raise InfrastructureUnavailable("the ticks table does not exist: run `tradeplane db upgrade`")
        self._hypertable = kinds["ticks"] == "hypertable"
        if self._candles_wanted is None:
            # With TimescaleDB, continuous aggregates maintain candles; natively the ingester does.
            self.candles_enabled = not self._hypertable
        self.candles_from_aggregates = self._hypertable and not self.candles_enabled
        today = datetime.now(UTC).date()
        await self.ensure_days([today - timedelta(days=1), today, today + timedelta(days=1)])
        self._writer = asyncio.create_task(self._write_loop(), name="marketdata-writer")
        self._publisher = asyncio.create_task(self._publish_loop(), name="marketdata-publisher")

    async def close(self) -> None:
        """Commit everything submitted, then stop the writer and publisher (publishing what is pending)."""
        if self._writer is not None:
            if not self._writer.done():
                async with self._submit_lock:  # a batch being queued is queued whole first
                    await self._queue.put(_CLOSE)
            with contextlib.suppress(Exception):
                await self._writer
            self._writer = None
        if self._publisher is not None:
            # The publisher makes a last pass with whatever the final commits left, then returns.
            self._closing = True
            self._publish_wanted.set()
            done, _ = await asyncio.wait({self._publisher}, timeout=CLOSE_PUBLISH_TIMEOUT_S)
            if not done:
                self._publisher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._publisher
            self._publisher = None
        self._report_drops(force_log=True)
        await self._refresh_history()

    async def _refresh_history(self) -> None:
        """TimescaleDB: continuous aggregates refresh only a recent window (migration 0003), so candles of
        replayed history are materialized here, once, over the days it touched (``tp_refresh_candles``)."""
        horizon = datetime.now(UTC).date() - timedelta(days=1)
        old = sorted(day for day in self._stored_days if day < horizon)
        self._stored_days.clear()
        if not old:
            return
        start = datetime.combine(old[0], datetime.min.time(), UTC)
        end = datetime.combine(old[-1] + timedelta(days=1), datetime.min.time(), UTC)
        async with self.db.connection("marketdata.refresh") as conn:
            # simple protocol, no transaction block: the procedure commits between timeframes
            await conn.execute(f"CALL tp_refresh_candles('{start.isoformat()}', '{end.isoformat()}')")

    async def adopt(self, instruments: Sequence[ListedInstrument]) -> list[ListedInstrument]:
        """Take on the instruments of ``instruments`` listed since this pipeline was made; returns those added.

        New instruments get the next indexes, so the per-instrument state of the others (quotes, books, spread
        samples, candle keys, chunks already queued) keeps its meaning. Done under the submit lock: no chunk is
        being encoded meanwhile. A known symbol whose grid changed keeps the grid it has (its candles and
        watermarks are in its old ticks): a warning asks for a restart.
        """
        async with self._submit_lock:
            known = {i.symbol: i for i in self.instruments}
            added: list[ListedInstrument] = []
            for instrument in instruments:
                current = known.get(instrument.symbol)
                if current is not None:
                    if (current.tick_size, current.lot_size) != (instrument.tick_size, instrument.lot_size):
                        log.warning(
                            "%s changed its grid to tick %s, lot %s: restart the market data worker to use it",
                            instrument.symbol,
                            instrument.tick_size,
                            instrument.lot_size,
                        )
                    continue
                known[instrument.symbol] = instrument
                added.append(instrument)
            if not added:
                return []
            for instrument in added:
                self.instruments.append(instrument)
                self.validator.add_instrument(_Grid(instrument.symbol, instrument.tick_size))
                self._spread_last.append(-1)
                self._quotes.append(_Quote())
                self._books.append(None)
                self._print_grids.append(
                    (PriceScale(instrument.tick_size.normalize()), instrument.lot_size.normalize())
                )
                if self.influx is not None:
                    try:
                        self._influx_series[instrument.symbol] = TickSeries(
                            instrument.symbol, instrument.tick_size, instrument.lot_size
                        )
                    except ValueError as exc:
                        self._influx_skips = True
                        log.warning("market data of %r is not written to InfluxDB: %s", instrument.symbol, exc)
            self.encoder = TickCopyEncoder(self.instruments)
            log.info("market data adopted %s", ", ".join(i.symbol for i in added))
            return added

    @property
    def lot_sizes(self) -> dict[str, Decimal]:
        """symbol -> lot size of the listed instruments: what feeds need to read quantities in units."""
        return {i.symbol: i.lot_size for i in self.instruments}

    async def __aenter__(self) -> MarketDataPipeline:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------------------------- producer

    async def run_feed(self, feed: TickFeed, *, validated: bool = False) -> None:
        """Drain ``feed`` into the pipeline. ``validated``: the feed already ran its ticks through
        ``self.validator`` (replay, bus, engine trades); otherwise they are validated here."""
        read = 0
        async for batch in feed:
            self.stats.rows_read += batch.rows_read - read
            read = batch.rows_read
            offset = getattr(batch, "offset", None)
            submit = self.submit(
                batch.ticks,
                validated=validated,
                on_stored=getattr(batch, "on_stored", None),
                offset=offset,
                external_prints=batch.external_prints,
            )
            if offset is None:
                await submit
            else:
                # Queued whole even if the feed is cancelled meanwhile (``close`` waits for it): a batch larger
                # than a chunk must not commit its first chunks without the offset its last one carries, or
                # the feed would read them again after a restart.
                await asyncio.shield(submit)

    async def submit(
        self,
        ticks: Sequence[Tick],
        *,
        validated: bool = False,
        on_stored: OnStored | None = None,
        offset: ConsumerOffset | None = None,
        external_prints: bool = False,
    ) -> None:
        """Queue ``ticks`` for storage (waits while the queue is full). ``on_stored`` runs after their commit;
        ``offset`` is recorded in the same transaction as their last chunk; ``external_prints``: announce their
        trades on ``tp:trades:<symbol>`` once committed (see the module docstring)."""
        self._raise_if_failed()
        # Feeds submit concurrently: chunks must reach the queue in the order they were aggregated, because
        # each carries the aggregator's cumulative candles as of that chunk.
        async with self._submit_lock:
            # A validated feed's drops happened before this call, maybe in a batch with nothing accepted.
            self._report_drops()
            for start in range(0, len(ticks), self.chunk_rows):
                part = list(ticks[start : start + self.chunk_rows])
                accepted = part if validated else self.validator.accept_batch(part)
                self._report_drops()
                if not accepted:
                    continue
                chunk = await self._prepare(accepted, external_prints)
                if start + self.chunk_rows >= len(ticks):
                    chunk.on_stored, on_stored = on_stored, None
                    chunk.offset, offset = offset, None
                await self._put(chunk)
            if on_stored is not None or offset is not None:  # nothing to store in the last part
                await self._put(_Chunk(b"", 0, [], {}, [], frozenset(), on_stored=on_stored, offset=offset))

    async def committed_offset(self, consumer: str) -> int:
        """The last bus sequence of ``consumer`` whose ticks are committed (0 if none): see ConsumerOffset."""
        async with self.db.connection("marketdata.offset") as conn:
            return await sql.consumer_offset(conn, consumer)

    async def flush(self) -> None:
        """Wait until every submitted tick is committed (or the writer failed: then raise)."""
        self._raise_if_failed()
        join = asyncio.ensure_future(self._queue.join())
        waiters: set[asyncio.Future[Any]] = {join}
        if self._writer is not None:
            waiters.add(self._writer)
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        join.cancel()
        self._raise_if_failed()
        await self._publish_pending()

    async def _put(self, chunk: _Chunk) -> None:
        if self._writer is None:
            raise RuntimeError("start the pipeline before submitting ticks")
        put = asyncio.ensure_future(self._queue.put(chunk))
        done, _ = await asyncio.wait({put, self._writer}, return_when=asyncio.FIRST_COMPLETED)
        if put not in done:
            put.cancel()
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise PipelineFailed(f"market data writer stopped: {self._failure}") from self._failure

    async def _prepare(self, ticks: list[Tick], external_prints: bool = False) -> _Chunk:
        """Encode a chunk, off the event loop when it is large (so the writer keeps the server fed meanwhile),
        then make sure its days have partitions and fold it into the latest quotes (and, for external prints,
        keep its trades to announce after commit)."""
        if len(ticks) >= THREAD_MIN_ROWS:
            chunk, cols = await asyncio.to_thread(self._encode_chunk, ticks)
        else:
            chunk, cols = self._encode_chunk(ticks)
        self._report_drops()
        if not chunk.days <= self._ensured:
            await self.ensure_days(sorted(chunk.days))
        if len(cols):
            self._note_quotes(cols)
            if external_prints and self.cache is not None:
                chunk.prints = _trade_prints(cols)
        return chunk

    def _encode_chunk(self, ticks: list[Tick]) -> tuple[_Chunk, TickColumns]:
        """The CPU part of a chunk: columns, candles, trade spans, spread samples, COPY bytes.

        Runs in a worker thread; it touches only state no other task uses while the submit lock is held
        (aggregator, encoder, spread sampler), plus ``validator.reject`` for the rare unstorable tick.
        """
        encoder = self.encoder
        try:
            cols = encoder.columns(ticks)
            if not bool(encoder.in_range(cols).all()):
                raise OverflowError
        except OverflowError:
            flags = encoder.storable(ticks)
            for tick, ok in zip(ticks, flags, strict=True):
                if not ok:
                    self.validator.reject(DropReason.MALFORMED_ROW, tick)
            ticks = [tick for tick, ok in zip(ticks, flags, strict=True) if ok]
            cols = encoder.columns(ticks)
        if not len(cols):
            return _Chunk(b"", 0, [], {}, [], frozenset()), cols
        day_numbers = np.unique(cols.ts_ns // NS_PER_DAY).tolist()
        days = frozenset(_day(int(d) * NS_PER_DAY) for d in day_numbers)
        candles: list[Candle] = []
        spans: dict[tuple[int, Timeframe, int], tuple[int, int]] = {}
        if self.candles_enabled:
            self.aggregator.add_batch(ticks)
            candles = self.aggregator.drain_changed()
            spans = self._trade_spans(cols)
        spreads = self._sample_spreads(cols)
        data = encoder.encode(cols)
        newest = np.full(len(self.instruments), -1, dtype=np.int64)
        np.maximum.at(newest, cols.instrument, cols.ts_ns)
        newest_by_index = {i: ts for i, ts in enumerate(newest.tolist()) if ts >= 0}
        kept = ticks if self.influx is not None else []  # held until commit only when the sink wants them
        chunk = _Chunk(data, len(cols), candles, spans, spreads, days, newest_by_index, kept)
        if self.candles_from_aggregates:
            chunk.trade_range = _trade_ranges(cols, len(self.instruments))
        return chunk, cols

    async def ensure_days(self, days: Sequence[date]) -> None:
        """Create the daily partitions of ``ticks`` and ``spreads`` for ``days`` (and the day after each)."""
        async with self._ensure_lock:
            wanted = sorted({d for day in days for d in (day, day + timedelta(days=1))} - self._ensured)
            if not wanted:
                return
            async with self.db.connection("marketdata.partitions") as conn:
                for day in wanted:
                    for table in ("ticks", "spreads"):
                        await ensure_daily_partitions_async(conn, table, day, 1)
            self._ensured.update(wanted)

    def forget_days_before(self, cutoff: date) -> None:
        """Retention dropped these days' partitions: ensure them again if old ticks arrive."""
        self._ensured = {day for day in self._ensured if day >= cutoff}

    def _trade_spans(self, cols: TickColumns) -> dict[tuple[int, Timeframe, int], tuple[int, int]]:
        """(first, last) trade timestamp per (instrument, M1 bucket) of the chunk, and for the higher
        timeframes derived from those: the open/close timestamps the candle upsert merges on."""
        trade = cols.last > 0
        if not bool(trade.any()):
            return {}
        ts = cols.ts_ns[trade]
        minute = ts // _M1_NS
        key = minute * len(self.instruments) + cols.instrument[trade]
        order = np.argsort(key, kind="stable")
        key_sorted = key[order]
        ts_sorted = ts[order]
        starts = np.flatnonzero(np.r_[True, key_sorted[1:] != key_sorted[:-1]])
        first = np.minimum.reduceat(ts_sorted, starts)
        last = np.maximum.reduceat(ts_sorted, starts)
        n = len(self.instruments)
        spans: dict[tuple[int, Timeframe, int], tuple[int, int]] = {}
        for k, lo, hi in zip(key_sorted[starts].tolist(), first.tolist(), last.tolist(), strict=True):
            minute_k, index = divmod(k, n)
            for tf in Timeframe:
                bucket = tf.bucket_start(minute_k * _M1_NS)
                span_key = (index, tf, bucket)
                seen = spans.get(span_key)
                spans[span_key] = (lo, hi) if seen is None else (min(seen[0], lo), max(seen[1], hi))
        return spans

    def _note_quotes(self, cols: TickColumns) -> None:
        """Fold the chunk into the latest quote per instrument as if its ticks came one at a time in arrival
        order: a tick older than the quote (or trade) already held is skipped, so a late tick never replaces a
        newer one, a one-sided update changes only its side, and the result does not depend on batching."""
        quotes = self._quotes
        dirty = self._dirty_quotes
        now = time.monotonic()
        in_order = bool((cols.ts_ns[1:] >= cols.ts_ns[:-1]).all())  # the usual case: no late tick in the chunk
        sided = (cols.bid > 0) | (cols.ask > 0)
        if bool(sided.any()):
            rows, group, first, applied = _applied(cols, sided, quotes, "quote_ts_ns", in_order)
            for index in cols.instrument[rows[first]].tolist():
                quotes[index].external_seen = now  # only external feeds carry sides
            bids = _last_per_group(cols.instrument, rows, group, applied & (cols.bid[rows] > 0))
            asks = _last_per_group(cols.instrument, rows, group, applied & (cols.ask[rows] > 0))
            for index, row in _last_per_group(cols.instrument, rows, group, applied).items():
                q = quotes[index]
                if (bid_row := bids.get(index)) is not None:
                    q.bid, q.bid_size = int(cols.bid[bid_row]), int(cols.bid_size[bid_row])
                if (ask_row := asks.get(index)) is not None:
                    q.ask, q.ask_size = int(cols.ask[ask_row]), int(cols.ask_size[ask_row])
                q.quote_ts_ns = int(cols.ts_ns[row])
                q.ts_ns = max(q.ts_ns, q.quote_ts_ns)
                dirty.add(index)
        traded = cols.last > 0
        if bool(traded.any()):
            rows, group, _, applied = _applied(cols, traded, quotes, "last_ts_ns", in_order)
            for index, row in _last_per_group(cols.instrument, rows, group, applied).items():
                q = quotes[index]
                q.last_ts_ns = int(cols.ts_ns[row])
                q.last = int(cols.last[row])
                q.ts_ns = max(q.ts_ns, q.last_ts_ns)
                dirty.add(index)
        if dirty:
            self._publish_wanted.set()

    def _sample_spreads(self, cols: TickColumns) -> list[tuple[datetime, int, Decimal]]:
        """At most one spread per instrument per ``spread_interval_ns`` of tick time: the first two-sided
        quote to arrive in it (so the sample does not depend on how ticks were batched)."""
        both = (cols.bid > 0) & (cols.ask > 0)
        if not bool(both.any()):
            return []
        interval = cols.ts_ns // self.spread_interval_ns
        n = len(self.instruments)
        key = np.where(both, interval * n + cols.instrument, -1)
        rows = _first_rows(key, both)
        out = []
        for k in sorted(rows):
            slot, index = divmod(k, n)
            if slot <= self._spread_last[index]:
                continue
            self._spread_last[index] = slot
            row = rows[k]
            instrument = self.instruments[index]
            spread = instrument.price(int(cols.ask[row]) - int(cols.bid[row]))
            out.append((sql.ns_to_datetime(int(cols.ts_ns[row])), instrument.instrument_id, spread))
        return out

    def _report_drops(self, *, force_log: bool = False) -> None:
        drops = self.validator.drops
        for reason, count in drops.items():
            delta = count - self._drops_reported[reason]
            if delta:
                TICKS_DROPPED.labels(reason.value).inc(delta)
                self._drops_reported[reason] = count
                self.stats.dropped[reason.value] = count
        now = time.monotonic()
        if force_log or now - self._last_drop_log >= self.drop_log_interval_s:
            self._last_drop_log = now
            for reason, sample in self.validator.drain_samples().items():
                log.warning("dropping bad ticks: %s (%d so far), sample: %s", reason.value, drops[reason], sample)

    # --------------------------------------------------------------------------------------- writer

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                first = await self._queue.get()
                if first is _CLOSE:
                    self._queue.task_done()
                    return
                chunks: list[_Chunk] = [first]
                closing = False
                deadline = loop.time() + self.commit_interval_s

                async def streamed(
                    first: _Chunk = first, chunks: list[_Chunk] = chunks, deadline: float = deadline
                ) -> AsyncIterator[bytes]:
                    nonlocal closing
                    yield sql.COPY_HEADER
                    if first.data:
                        yield first.data
                    rows = first.rows
                    while rows < self.max_rows_per_commit:
                        timeout = deadline - loop.time()
                        if timeout <= 0:
                            break
                        try:
                            item = await asyncio.wait_for(self._queue.get(), timeout)
                        except TimeoutError:
                            break
                        if item is _CLOSE:
                            closing = True
                            break
                        chunks.append(item)
                        rows += item.rows
                        if item.data:
                            yield item.data
                    yield sql.COPY_TRAILER

                await self._commit(chunks, streamed())
                for _ in chunks:
                    self._queue.task_done()
                if closing:
                    self._queue.task_done()
                    return
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError):
                log.error("market data writer stopped: %s", exc)
                self._failure = exc
            self._drain_queue()
            raise

    def _drain_queue(self) -> None:
        while True:
            try:
                self._queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            self._queue.task_done()

    async def _commit(self, chunks: list[_Chunk], source: AsyncIterator[bytes]) -> None:
        """One transaction: COPY (streamed on the first attempt), candles, spreads. Retried while the
        database is unreachable, up to ``retry_for_s``: only ``InfrastructureUnavailable``, which
        ``Database.connection`` raises for a lost connection or a server that cannot be reached. Any other error
        (an asyncpg ``InterfaceError`` on a healthy connection, an ``OSError`` of a file) is the pipeline's own
        or its input's, which the same commit would meet again: it stops the writer at once."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        attempt = 0
        returned: list[asyncpg.Record] = []
        writes: list[sql.CandleWrite] = []
        # The last attempt's transaction (id, backend pid) once it reached its COMMIT: when the connection is lost
        # there, whether it committed is unknown, and a retry of a commit that happened would store its ticks
        # and candle deltas twice. So the next attempt asks the server first (``_committed``).
        reached_commit: tuple[int, int] | None = None
        recreated = 0  # times a day's partitions were made again after retention dropped them under us
        while True:
            attempt += 1
            try:
                if reached_commit is not None:
                    if await self._committed(*reached_commit):
                        log.warning("a market data commit whose acknowledgement was lost had committed: not retried")
                        break
                    reached_commit = None
                async with self.db.transaction("marketdata.ingest") as conn:
                    xact = int(await conn.fetchval("SELECT pg_current_xact_id()::text"))
                    if attempt == 1:
                        rows = await sql.copy_tick_rows(conn, source)
                    else:
                        body = b"".join(chunk.data for chunk in chunks)
                        rows = await sql.copy_tick_rows(conn, sql.COPY_HEADER + body + sql.COPY_TRAILER)
                    writes = self._candle_writes(chunks)
                    returned = await sql.upsert_candles(conn, writes)
                    if self.candles_from_aggregates and self.cache is not None:
                        # after the COPY, in its transaction: real-time aggregation counts these ticks
                        returned = await sql.touched_candles(conn, self._touched_buckets(chunks))
                    spreads = [row for chunk in chunks for row in chunk.spreads]
                    await sql.insert_spreads(conn, spreads)
                    await sql.record_consumer_offsets(conn, _highest_offsets(chunks))
                    reached_commit = (xact, conn.get_server_pid())
                break
            except InfrastructureUnavailable as exc:
                if loop.time() - started > self.retry_for_s:
                    raise
                log.warning("market data commit failed (%s), retrying", exc)
                await asyncio.sleep(min(5.0, 0.2 * 2 ** min(attempt, 5)))
            except asyncpg.CheckViolationError as exc:
                # "no partition of relation found": retention dropped a day under us; ensure and retry. Retention
                # goes through the partitioned tables one after another, so the next one's day may go while the
                # first is made again: once per table, then it is not a race.
                recreated += 1
                if recreated > len(TIMESERIES_TABLES):
                    raise
                log.warning("ticks without a partition (%s): ensuring partitions and retrying", exc)
                days = sorted({day for chunk in chunks for day in chunk.days})
                self._ensured.difference_update(days)
                await self.ensure_days(days)
        expected = sum(chunk.rows for chunk in chunks)
        if rows != expected:
            log.error("COPY stored %d ticks, expected %d", rows, expected)
        for w_key, cumulative in self._pending_written.items():
            self._written[w_key] = cumulative
        self._pending_written = {}
        for chunk in chunks:
            for index, ts in chunk.newest.items():
                if ts > self._committed_newest.get(index, -1):
                    self._committed_newest[index] = ts
        if self._hypertable:
            self._stored_days.update(day for chunk in chunks for day in chunk.days)
        self.stats.stored += rows
        self.stats.commits += 1
        self.stats.candles_written += len(writes)
        TICKS_STORED.inc(rows)
        self._note_candles(returned)
        self._note_prints(chunks)
        self._prune()
        if self.influx is not None:
            self._write_influx(chunks)
        for chunk in chunks:
            if chunk.on_stored is not None:
                try:
                    await chunk.on_stored()
                except Exception as exc:  # an ack failing must not lose the committed ticks' bookkeeping
                    log.warning("after-commit callback failed: %s", exc)

    async def _committed(self, xact: int, pid: int) -> bool:
        """Whether transaction ``xact`` (run by backend ``pid``, whose COMMIT may or may not have arrived)
        committed. While it is still in progress its backend is terminated, so that it cannot commit after a
        retry wrote the same rows (it has not yet noticed the lost connection, or is just committing), and
        this raises for the caller to ask again."""
        async with self.db.connection("marketdata.ingest") as conn:
            status = await conn.fetchval("SELECT pg_xact_status($1::text::xid8)", str(xact))
            if status != "in progress":
                return bool(status == "committed")
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = $1 AND backend_xid::text = $2",
                pid,
                str(xact % 2**32),
            )
        raise InfrastructureUnavailable("a market data commit whose acknowledgement was lost is still in progress")

    def _write_influx(self, chunks: Sequence[_Chunk]) -> None:
        """Committed ticks to the sink's ``market_data`` measurement: appended to its bounded buffer (the
        oldest points beyond it dropped and counted there), never waited for."""
        assert self.influx is not None
        for chunk in chunks:
            ticks = chunk.ticks
            if ticks and self._influx_skips:
                ticks = [tick for tick in ticks if tick.symbol in self._influx_series]
            if ticks:
                self.influx.write_ticks(ticks, self._influx_series)
            chunk.ticks = []

    def _candle_writes(self, chunks: Sequence[_Chunk]) -> list[sql.CandleWrite]:
        """The candle upserts of one commit: the newest state of each changed candle, with the volume and
        count added since the last committed upsert of it."""
        latest: dict[tuple[int, Timeframe, int], Candle] = {}
        spans: dict[tuple[int, Timeframe, int], tuple[int, int]] = {}
        index = self.encoder.index
        for chunk in chunks:
            for candle in chunk.candles:
                latest[(index[candle.instrument], candle.timeframe, candle.bucket_start_ns)] = candle
            for key, (lo, hi) in chunk.spans.items():
                seen = spans.get(key) or self._spans.get(key)
                spans[key] = (lo, hi) if seen is None else (min(seen[0], lo), max(seen[1], hi))
        self._spans.update(spans)
        pending: dict[tuple[int, Timeframe, int], tuple[int, int]] = {}
        writes = []
        for key, candle in latest.items():
            instrument = self.instruments[key[0]]
            volume0, count0 = self._written.get(key, (0, 0))
            span = self._spans[key]
            writes.append(
                sql.CandleWrite(
                    instrument.instrument_id,
                    candle.timeframe.value,
                    sql.ns_to_datetime(candle.bucket_start_ns),
                    instrument.price(candle.open),
                    instrument.price(candle.high),
                    instrument.price(candle.low),
                    instrument.price(candle.close),
                    instrument.quantity(candle.volume - volume0),
                    candle.tick_count - count0,
                    span[0],
                    span[1],
                )
            )
            pending[key] = (candle.volume, candle.tick_count)
        self._pending_written = pending
        return writes

    def _prune(self) -> None:
        """Forget candle bookkeeping for buckets the aggregator can no longer change (bounded memory)."""
        if len(self._written) < 4 * len(self.instruments) * len(Timeframe) + 64:
            return
        horizon: list[int | None] = []
        for index in range(len(self.instruments)):
            newest = self._committed_newest.get(index)
            horizon.append(None if newest is None else newest - self._tolerance_ns)
        for book in (self._written, self._spans):
            stale = [key for key in book if (h := horizon[key[0]]) is not None and key[2] + key[1].width_ns <= h]
            for key in stale:
                del book[key]

    def _note_candles(self, rows: Sequence[asyncpg.Record]) -> None:
        """Keep the committed candles to publish: per (timeframe, symbol) the newest bucket, and the buckets
        already published that these rows changed (see the module docstring)."""
        if self.cache is None or not rows:
            return
        by_id = {i.instrument_id: i for i in self.instruments}
        touched: set[tuple[str, str]] = set()
        for row in rows:
            key = (row["timeframe"], by_id[row["instrument_id"]].symbol)
            touched.add(key)
            self._pending_candles.setdefault(key, {})[sql.datetime_to_ns(row["bucket"])] = {
                "timeframe": row["timeframe"],
                "bucket": _iso(row["bucket"]),
                # as /candles writes them (trim_scale): 100.00 is "100", never "1E+2"
                "open": decimal_text(row["open"]),
                "high": decimal_text(row["high"]),
                "low": decimal_text(row["low"]),
                "close": decimal_text(row["close"]),
                "volume": decimal_text(row["volume"]),
                "tick_count": row["tick_count"],
            }
        for key in touched:
            pending = self._pending_candles[key]
            newest = max(pending)
            sent = self._sent_candles.get(key, set())
            for bucket in [b for b in pending if b != newest and b not in sent]:
                del pending[bucket]  # never published: conflated into the newest
        self._publish_wanted.set()

    def _touched_buckets(self, chunks: Sequence[_Chunk]) -> list[sql.CandleBucket]:
        """TimescaleDB path: per instrument with trades in ``chunks`` and per timeframe, the bucket of its
        newest trade, and the published buckets that can still change within the span of its trades: the
        candles the native path would publish for this commit."""
        spans: dict[int, tuple[int, int]] = {}
        for chunk in chunks:
            for index, (lo, hi) in chunk.trade_range.items():
                seen = spans.get(index)
                spans[index] = (lo, hi) if seen is None else (min(seen[0], lo), max(seen[1], hi))
        buckets = candle_buckets({self.instruments[index].instrument_id: hi for index, (_, hi) in spans.items()})
        for index, (lo, hi) in sorted(spans.items()):
            instrument = self.instruments[index]
            for tf in Timeframe:
                newest = tf.bucket_start(hi)
                for start in sorted(self._sent_candles.get((tf.value, instrument.symbol), ())):
                    if start != newest and start + tf.width_ns > lo and start <= hi:
                        buckets.append(sql.CandleBucket(instrument.instrument_id, tf, start, start + tf.width_ns))
        return buckets

    def _note_prints(self, chunks: Sequence[_Chunk]) -> None:
        """Queue the committed external trade prints of ``chunks`` for the publisher (bounded per symbol)."""
        noted = False
        for chunk in chunks:
            for index, ts_ns, price, lots in chunk.prints:
                pending = self._pending_prints.get(index)
                if pending is None:
                    pending = self._pending_prints[index] = deque(maxlen=MAX_PENDING_PRINTS)
                pending.append((ts_ns, price, lots))
                noted = True
            chunk.prints = []
        if noted:
            self._publish_wanted.set()

    def print_envelope(self, index: int, ts_ns: int, price: int, lots: int) -> dict[str, Any]:
        """The public ``trades`` envelope of one external print: the engine's trade envelope (decimals with
        the grids' exponents, ts as ``isoformat``) without a trade id or aggressor side, marked external."""
        scale, lot_size = self._print_grids[index]
        return {
            "channel": "trades",
            "symbol": self.instruments[index].symbol,
            "data": {
                "trade_id": None,
                "price": format(scale.to_price(price), "f"),
                "qty": format(to_units(lots, lot_size), "f"),
                "aggressor_side": None,
                "ts": sql.ns_to_datetime(ts_ns).isoformat(),
                "source": EXTERNAL_SOURCE,
            },
        }

    # ------------------------------------------------------------------------------------ publisher

    def note_engine_book(
        self,
        symbol: str,
        seq: int,
        bid: tuple[Decimal, Decimal] | None,
        ask: tuple[Decimal, Decimal] | None,
    ) -> bool:
        """The engine's book of ``symbol`` at snapshot ``seq`` has this best bid and ask (price, size); it
        quotes the symbol while no external feed does. Returns whether the quote changed (and is published)."""
        index = self.encoder.index.get(symbol)
        if index is None:
            return False
        current = self._books[index]
        instrument = self.instruments[index]
        scale = instrument.price_scale

        def side(level: tuple[Decimal, Decimal] | None) -> tuple[int | None, int]:
            if level is None:
                return None, 0
            lots, remainder = divmod(level[1], instrument.lot_size)
            if remainder or lots <= 0:
                raise ValueError(f"{symbol}: book size {level[1]} is not a positive number of lots")
            return scale.to_ticks(level[0]), int(lots)

        (bid_ticks, bid_lots), (ask_ticks, ask_lots) = side(bid), side(ask)
        unchanged = current is not None and (current.bid, current.bid_size, current.ask, current.ask_size) == (
            bid_ticks,
            bid_lots,
            ask_ticks,
            ask_lots,
        )
        ts_ns = current.ts_ns if current is not None and unchanged else time.time_ns()
        self._books[index] = _BookTop(seq, bid_ticks, bid_lots, ask_ticks, ask_lots, ts_ns)
        if self._externally_quoted(index):
            self._book_quoted.discard(index)
            return False
        if unchanged and index in self._book_quoted:
            return False  # a deeper level moved
        self._book_quoted.add(index)
        self._dirty_quotes.add(index)
        self._publish_wanted.set()
        return True

    def refresh_book_quotes(self) -> None:
        """Re-write (without publishing) the Redis quote of every symbol quoted from the engine's book, so its
        5 s TTL does not run out while the book stands still; call it more often than the TTL."""
        for index, book in enumerate(self._books):
            if book is None:
                continue
            if self._externally_quoted(index):
                self._book_quoted.discard(index)
            elif index in self._book_quoted:
                self._refresh_quotes.add(index)
            else:  # the external feed went quiet: the book takes over, and subscribers are told
                self._book_quoted.add(index)
                self._dirty_quotes.add(index)
        if self._refresh_quotes or self._dirty_quotes:
            self._publish_wanted.set()

    def _externally_quoted(self, index: int) -> bool:
        return time.monotonic() - self._quotes[index].external_seen < self.external_quote_s

    def quote_payload(self, index: int) -> dict[str, Any]:
        """The public quote of one instrument: decimals as strings, ``null`` for an absent side. Its sides are
        the external feed's, or the engine book's when no external feed quoted it within the quote TTL."""
        q = self._quotes[index]
        instrument = self.instruments[index]
        bid, bid_size, ask, ask_size, ts_ns = q.bid, q.bid_size, q.ask, q.ask_size, q.ts_ns
        book = self._books[index]
        if book is not None and not self._externally_quoted(index):
            bid, bid_size, ask, ask_size = book.bid, book.bid_size, book.ask, book.ask_size
            ts_ns = max(book.ts_ns, q.last_ts_ns)

        def price(ticks: int | None) -> str | None:
            return None if ticks is None else decimal_text(instrument.price(ticks))

        return {
            "symbol": instrument.symbol,
            "ts": _iso(sql.ns_to_datetime(ts_ns)),
            "bid": price(bid),
            "ask": price(ask),
            "bid_size": None if bid is None else decimal_text(instrument.quantity(bid_size)),
            "ask_size": None if ask is None else decimal_text(instrument.quantity(ask_size)),
            "last": price(q.last),
        }

    async def _publish_loop(self) -> None:
        while True:
            await self._publish_wanted.wait()
            closing = self._closing
            try:
                await self._publish_pending()
            except Exception as exc:  # Redis down: quotes are superseded anyway; keep ingesting
                log.warning("publishing market data to Redis failed: %s", exc)
                if not closing:
                    await asyncio.sleep(1.0)
            if closing:
                return

    async def _publish_pending(self) -> None:
        async with self._publish_lock:
            await self._publish_locked()

    async def _publish_locked(self) -> None:
        self._publish_wanted.clear()
        if self.cache is None:
            self._dirty_quotes.clear()
            self._refresh_quotes.clear()
            self._pending_candles.clear()
            self._pending_prints.clear()
            return
        dirty, self._dirty_quotes = self._dirty_quotes, set()
        refresh, self._refresh_quotes = self._refresh_quotes - dirty, set()
        candles, self._pending_candles = self._pending_candles, {}
        prints, self._pending_prints = self._pending_prints, {}
        if not dirty and not candles and not refresh and not prints:
            return
        pipe = self.cache.client.pipeline(transaction=False)
        for index in sorted(refresh):
            data = self.quote_payload(index)
            if data["bid"] is None and data["ask"] is None and data["last"] is None:
                continue
            symbol = self.instruments[index].symbol
            pipe.set(market_data_key(symbol), orjson.dumps(data), ex=TTL_MARKET_DATA)
            if data["last"] is not None:
                pipe.set(price_key(symbol), data["last"], ex=TTL_PRICE)
        for index in sorted(dirty):
            symbol = self.instruments[index].symbol
            data = self.quote_payload(index)
            pipe.set(market_data_key(symbol), orjson.dumps(data), ex=TTL_MARKET_DATA)
            if data["last"] is not None:
                pipe.set(price_key(symbol), data["last"], ex=TTL_PRICE)
            envelope = {"channel": "quotes", "symbol": symbol, "data": data}
            pipe.publish(quotes_channel(symbol), orjson.dumps(envelope))
        for index in sorted(prints):
            envelopes = [self.print_envelope(index, *trade) for trade in prints[index]]
            # One message per symbol, like the engine's trades: the envelope alone, or a JSON array in order.
            payload = orjson.dumps(envelopes[0] if len(envelopes) == 1 else envelopes)
            pipe.publish(trades_channel(self.instruments[index].symbol), payload)
        for (timeframe, symbol), by_bucket in candles.items():
            sent = self._sent_candles.setdefault((timeframe, symbol), set())
            for bucket in sorted(by_bucket):  # oldest first: the newest candle is the last a subscriber gets
                envelope = {"channel": f"candles:{timeframe}", "symbol": symbol, "data": by_bucket[bucket]}
                pipe.publish(candles_channel(timeframe, symbol), orjson.dumps(envelope))
                sent.add(bucket)
            # A bucket ending before the newest published start minus the tolerance can take no late tick.
            horizon = max(sent) - self._tolerance_ns
            width = Timeframe(timeframe).width_ns
            sent.difference_update([b for b in sent if b + width <= horizon])
        try:
            await pipe.execute()
        except REDIS_ERRORS as exc:
            raise InfrastructureUnavailable(f"Redis unavailable: {exc}") from exc


def _highest_offsets(chunks: Sequence[_Chunk]) -> dict[str, int]:
    offsets: dict[str, int] = {}
    for chunk in chunks:
        if chunk.offset is not None and chunk.offset.sequence > offsets.get(chunk.offset.consumer, 0):
            offsets[chunk.offset.consumer] = chunk.offset.sequence
    return offsets


@dataclass(frozen=True, slots=True)
class _Grid:
    symbol: str
    tick_size: Decimal


def _trade_prints(cols: TickColumns) -> list[tuple[int, int, int, int]]:
    """(instrument index, ts ns, price ticks, volume lots) of each trade in ``cols`` (last and volume > 0),
    in arrival order."""
    rows = np.flatnonzero((cols.last > 0) & (cols.volume > 0))
    if not len(rows):
        return []
    return list(
        zip(
            cols.instrument[rows].tolist(),
            cols.ts_ns[rows].tolist(),
            cols.last[rows].tolist(),
            cols.volume[rows].tolist(),
            strict=True,
        )
    )


def _trade_ranges(cols: TickColumns, instruments: int) -> dict[int, tuple[int, int]]:
    """instrument index -> (oldest, newest) ts among the ticks of ``cols`` that carry a trade (``last``)."""
    trade = cols.last > 0
    if not bool(trade.any()):
        return {}
    oldest = np.full(instruments, np.iinfo(np.int64).max, dtype=np.int64)
    newest = np.full(instruments, -1, dtype=np.int64)
    np.minimum.at(oldest, cols.instrument[trade], cols.ts_ns[trade])
    np.maximum.at(newest, cols.instrument[trade], cols.ts_ns[trade])
    return {
        index: (lo, hi) for index, (lo, hi) in enumerate(zip(oldest.tolist(), newest.tolist(), strict=True)) if hi >= 0
    }


def candle_buckets(newest_trade: dict[int, int]) -> list[sql.CandleBucket]:
    """For each instrument id -> newest trade ts: the bucket holding that trade in every timeframe."""
    out = []
    for instrument_id, ts in sorted(newest_trade.items()):
        for tf in Timeframe:
            start = tf.bucket_start(ts)
            out.append(sql.CandleBucket(instrument_id, tf, start, start + tf.width_ns))
    return out


def _first_rows(keys: np.ndarray[Any, Any], mask: np.ndarray[Any, Any]) -> dict[int, int]:
    """For each key value among the rows where ``mask``: the index of its first such row (arrival order)."""
    rows = np.flatnonzero(mask)
    if not len(rows):
        return {}
    unique, first = np.unique(keys[rows], return_index=True)
    return dict(zip(unique.tolist(), rows[first].tolist(), strict=True))


def _by_instrument(
    instrument: np.ndarray[Any, Any], mask: np.ndarray[Any, Any]
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """The rows where ``mask``, grouped by instrument and in arrival order within a group: ``(rows, group,
    first)``, ``group`` the dense group number of each row and ``first`` the position of each group's first."""
    selected = np.flatnonzero(mask)
    rows = selected[np.argsort(instrument[selected], kind="stable")]
    keys = instrument[rows]
    starts = np.r_[True, keys[1:] != keys[:-1]]
    return rows, np.cumsum(starts) - 1, np.flatnonzero(starts)


def _applied(
    cols: TickColumns, mask: np.ndarray[Any, Any], quotes: list[_Quote], held: str, in_order: bool
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """The rows where ``mask``, grouped by instrument (``_by_instrument``), and which of them apply when fed one at
    a time: not older than the time their instrument's quote already holds (its attribute ``held``) nor than
    any earlier row of their group (checked only when the chunk is not ``in_order``)."""
    rows, group, first = _by_instrument(cols.instrument, mask)
    held_ts = np.array([getattr(quotes[int(cols.instrument[r])], held) for r in rows[first]], dtype=np.int64)
    ts = cols.ts_ns[rows]
    applied = ts >= held_ts[group]
    if not in_order:
        applied &= _newest_so_far(ts, group)
    return rows, group, first, applied


def _newest_so_far(ts: np.ndarray[Any, Any], group: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Per row of grouped rows: whether its ``ts`` is >= every earlier ``ts`` of its group (a running max per
    group, on ranks so that the group number can be folded into one int64 key without overflow)."""
    n = len(ts)
    rank = np.empty(n, dtype=np.int64)
    rank[np.argsort(ts, kind="stable")] = np.arange(n)  # equal ts rank in arrival order, later higher
    key = group * n + rank
    return np.asarray(key == np.maximum.accumulate(key))


def _last_per_group(
    instrument: np.ndarray[Any, Any],
    rows: np.ndarray[Any, Any],
    group: np.ndarray[Any, Any],
    mask: np.ndarray[Any, Any],
) -> dict[int, int]:
    """instrument index -> the last row (in arrival order) of its group among the grouped rows where ``mask``."""
    picked = np.flatnonzero(mask)
    if not len(picked):
        return {}
    groups = group[picked]
    last = picked[np.r_[groups[1:] != groups[:-1], True]]
    return dict(zip(instrument[rows[last]].tolist(), rows[last].tolist(), strict=True))


# ------------------------------------------------------------------------------------------ retention


@dataclass(frozen=True, slots=True)
class RetentionResult:
    #: Partitions (chunks) dropped, by their partition name.
    dropped: list[str]
    #: Archive files written.
    archived: list[Path]
    #: Detached ``ticks`` partitions (``<partition>_archiving``) kept because their archive failed: nothing
    #: of them is lost, and the next run with an archive folder archives and drops them.
    pending: list[str] = field(default_factory=list)


RETAINED_TABLES: tuple[str, ...] = ("ticks", "spreads", "depth_snapshots")


async def apply_retention(
    db: Database,
    *,
    retention_days: int,
    instruments: Sequence[ListedInstrument],
    archive_dir: Path | None = None,
    today: date | None = None,
) -> RetentionResult:
    """Drop market data partitions (chunks) wholly older than ``retention_days`` before ``today`` (UTC).

    With ``archive_dir`` and native partitions, each expired ``ticks`` partition is first detached (which
    waits for writers in flight; no row can enter it afterwards), then written to
    ``<archive_dir>/<partition>.parquet`` in the replay format (``<partition>.<n>.parquet`` when a late row
    made the day's partition anew after an earlier archive: an archive is never overwritten), then dropped.
    A partition whose archive fails stays detached, is logged and listed in ``pending``, and is archived
    and dropped by a later run. Candles are kept: they are small and outlive the raw ticks.
    """
    if retention_days < 1:
        raise ValueError("retention_days must be >= 1")
    cutoff = (today or datetime.now(UTC).date()) - timedelta(days=retention_days)
    archived: list[Path] = []
    dropped: list[str] = []
    pending: list[str] = []
    async with db.connection("marketdata.retention") as conn:
        tables = RETAINED_TABLES
        if (await storage_kind_async(conn))["ticks"] == "partitioned":
            left_over = await detached_partitions_async(conn, "ticks")
            if archive_dir is not None:
                tables = tuple(table for table in RETAINED_TABLES if table != "ticks")
                # First what an earlier run detached but could not archive, so those days can be detached again.
                for detached in left_over:
                    await _archive_detached(conn, detached, archive_dir, instruments, archived, dropped, pending)
                for detached in await detach_partitions_older_than_async(conn, "ticks", cutoff):
                    await _archive_detached(conn, detached, archive_dir, instruments, archived, dropped, pending)
            elif left_over:
                log.warning(
                    "detached ticks partitions %s wait for an archive, but no archive folder is set: kept",
                    ", ".join(left_over),
                )
                pending += left_over
        for table in tables:
            dropped += await drop_partitions_older_than_async(conn, table, cutoff)
    return RetentionResult(dropped, archived, pending)


async def _archive_detached(
    conn: asyncpg.Connection,
    detached: str,
    archive_dir: Path,
    instruments: Sequence[ListedInstrument],
    archived: list[Path],
    dropped: list[str],
    pending: list[str],
) -> None:
    """Archive a detached ``ticks`` partition, then drop it; if the archive cannot be written, keep the table
    (listed in ``pending``) for a later run."""
    partition = detached.removesuffix(ARCHIVING_SUFFIX)
    target = archive_dir / f"{partition}.parquet"
    try:
        copies = 0
        while target.exists():  # the day came back (a late row) after an earlier archive: keep that archive
            copies += 1
            target = archive_dir / f"{partition}.{copies}.parquet"
        rows = await sql.archive_tick_partition(conn, detached, target, instruments)
    except Exception as exc:  # any failure (folder, disk, data): the rows stay in the table, never lost
        log.error(
            "could not archive %s to %s (%s): its rows are kept in %s for the next run",
            partition,
            target,
            exc,
            detached,
        )
        pending.append(detached)
        return
    await drop_detached_async(conn, "ticks", detached)
    log.info("archived %s (%d ticks) to %s", partition, rows, target)
    archived.append(target)
    dropped.append(partition)


__all__ = [
    "TICKS_DROPPED",
    "FeedBatch",
    "IngestStats",
    "MarketDataPipeline",
    "PipelineFailed",
    "RetentionResult",
    "apply_retention",
    "candle_buckets",
    "candles_channel",
    "market_data_key",
    "price_key",
    "quotes_channel",
    "trades_channel",
]
