"""The matching engine's own trades as market data, read from the ``trades`` table exactly once.

A trade becomes a trade-only tick: ``last = price`` and ``volume = quantity`` (in lots), no bid or ask, so it
updates candles, the last price and ``price:{symbol}`` but not the quote's sides.

Source and delivery. The engine commits each batch's trades to ``trades`` (the system of record) and then
publishes them on Redis ``tp:trades:<symbol>``; pub/sub is at most once (a trade published while this feed is
disconnected is gone). So the table is the source and pub/sub only a wake-up:

- Cursor: ``trades.xact_id`` is the inserting transaction's id (migration 0007). A read takes the trades of
  transactions in ``[cursor, xmin)``, where ``xmin`` is the oldest transaction still running on the server:
  every transaction below it has committed or aborted, so those trades are final and none can appear behind
  the next cursor, ``xmin``. Several engine shards committing out of order, or clocks stamping ``ts`` out of
  order, cannot make the cursor skip a trade (a cursor over ``trade_id`` or ``ts`` could).
- Stored with the ticks: each batch carries a ``ConsumerOffset`` (``engine_offsets`` row ``CONSUMER``, the
  cursor after the batch) that the pipeline writes in the transaction committing the batch's ticks. On start
  the feed resumes from the stored cursor; ``TradeCursor`` carries what was already handed to the pipeline
  across restarts of the feed in one process. Together: each trade is stored once, after a crash too.
- When: on start (catch-up, ``caught_up`` is set once the table has been read to its end), on every
  ``tp:trades:*`` message with engine trades (re-read every ``retry_s`` until the announced trades were read,
  since a commit becomes readable only once older transactions end), on every (re)subscription, and every
  ``poll_interval_s`` whatever Redis does, so a lost message or a Redis outage only delays a trade. External
  venues' prints announced on the same channels by the pipeline (``"source": "external"``) are not in the
  table and are ignored.

Order: each page is sorted by (``ts``, command sequence, match number) from the deterministic trade id
``{symbol}-{seq}-{match}``, the engine's match order, so the trades of one batch (one ``ts``) close a candle
with the last match. Candles merge with stored ones (the upsert adds volume and counts), so trades caught up
after a restart land in candles that already hold earlier ticks. Caught-up trades are still subject to the
validator's out-of-order tolerance against other feeds of the same symbol: the worker lets this feed catch up
before it starts the others.

InfluxDB (optional ``influx``): after a page's ticks are committed, each of its trades is written to the
``trades`` measurement (price in ticks, quantity in lots), refused-as-tick or not: the trade happened. InfluxDB
keeps one point per series and timestamp, and the trades of one engine batch share a microsecond, so each is
stamped ``ts + its ordinal among the page's trades of that symbol and microsecond`` in nanoseconds (match order);
a page read again after a crash writes the same points, which InfluxDB overwrites in place.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal

import asyncpg
import redis.asyncio as aioredis

from tradeplane.adapters.cache import REDIS_ERRORS
from tradeplane.adapters.db import marketdata as sql
from tradeplane.adapters.db.marketdata import ListedInstrument
from tradeplane.adapters.feeds import EXTERNAL_SOURCE, ConsumerOffset
from tradeplane.adapters.feeds.bus import SettledBatch, _price
from tradeplane.adapters.feeds.replay import MalformedValue, parse_ts_ns, to_lots
from tradeplane.adapters.influxdb import InfluxSink
from tradeplane.adapters.postgres import Database
from tradeplane.domain.ticks import DropReason, OffTickGrid, Tick, TickValidator

log = logging.getLogger("tradeplane.marketdata")

TRADES_PATTERN = "tp:trades:*"
#: ``engine_offsets`` row: every trade whose ``xact_id`` is below ``last_sequence`` is stored.
CONSUMER = "marketdata.engine-trades"
#: How long an announced trade id is waited for with fast re-reads before the regular poll takes over.
EXPECT_S = 5.0
MAX_EXPECTED = 100_000
MAX_RECENT = 10_000
RESUBSCRIBE_DELAY_S = 1.0


def trade_to_tick(payload: bytes, validator: TickValidator, lot_sizes: Mapping[str, Decimal]) -> Tick | None:
    """The accepted tick of one ``tp:trades`` envelope, or None (the drop is counted by the validator)."""
    try:
        envelope = json.loads(payload)
        data = envelope["data"]
        symbol = envelope.get("symbol") or data.get("symbol")
        if not isinstance(symbol, str):
            raise MalformedValue("no symbol")
        lot_size = lot_sizes.get(symbol)
        if lot_size is None:
            validator.reject(DropReason.UNKNOWN_SYMBOL, envelope)
            return None
        result = validator.normalize(
            parse_ts_ns(data["ts"]),
            symbol,
            None,
            None,
            0,
            0,
            _price(data["price"]),
            to_lots(data["qty"], lot_size),
        )
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        validator.reject(DropReason.MALFORMED_ROW, payload[:200])
        return None
    return result if isinstance(result, Tick) else None


def match_order(trade_id: str) -> tuple[int, int]:
    """(command sequence, match number) of an engine trade id ``{symbol}-{seq}-{match}``; (0, 0) otherwise."""
    parts = trade_id.rsplit("-", 2)
    if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
        return int(parts[1]), int(parts[2])
    return 0, 0


@dataclass(frozen=True, slots=True)
class TradePrint:
    """One engine trade for the InfluxDB ``trades`` measurement: price in ticks, quantity in lots."""

    instrument: ListedInstrument
    trade_id: str
    price: int
    quantity: int
    aggressor_side: str
    ts_ns: int

    def write_to(self, influx: InfluxSink) -> None:
        influx.write_trade(
            symbol=self.instrument.symbol,
            trade_id=self.trade_id,
            price=self.price,
            quantity=self.quantity,
            aggressor_side=self.aggressor_side,
            ts_ns=self.ts_ns,
            tick_size=self.instrument.tick_size,
            lot_size=self.instrument.lot_size,
        )


@dataclass(slots=True)
class TradeCursor:
    """The ``xact_id`` cursor handed to the pipeline so far (``None``: not loaded from ``engine_offsets`` yet);
    shared by the successive feeds the worker starts after failures, since the pipeline outlives them."""

    through: int | None = None


class EngineTradesFeed:
    """Yields ``SettledBatch``es of trade ticks read from ``trades`` after the stored cursor, each with its
    ``ConsumerOffset``; see the module docstring. Iteration runs until cancelled."""

    def __init__(
        self,
        db: Database,
        client: aioredis.Redis,
        validator: TickValidator,
        instruments: Sequence[ListedInstrument],
        *,
        cursor: TradeCursor | None = None,
        page: int = 5_000,
        poll_interval_s: float = 1.0,
        retry_s: float = 0.02,
        caught_up: asyncio.Event | None = None,
        influx: InfluxSink | None = None,
    ) -> None:
        """``cursor``: shared across restarts of the feed (see ``TradeCursor``); ``caught_up`` is set once the
        table has been read to its end (a given event lets a caller outlive this feed); ``influx``: where the
        trades go once committed (module docstring)."""
        self.influx = influx
        self.db = db
        self.client = client
        self.validator = validator
        self.instruments = {i.instrument_id: i for i in instruments}
        self.cursor = cursor if cursor is not None else TradeCursor()
        self.page = page
        self.poll_interval_s = poll_interval_s
        self.retry_s = retry_s
        self.rows_read = 0
        self.reads = 0
        self.subscribed = asyncio.Event()
        self.caught_up = caught_up if caught_up is not None else asyncio.Event()
        self._wake = asyncio.Event()
        self._expected: dict[str, float] = {}  # announced, not read yet: trade id -> when announced
        self._recent: dict[str, None] = {}  # read lately (a message can arrive after its trade was read)

    async def __aiter__(self) -> AsyncIterator[SettledBatch]:
        listener = asyncio.create_task(self._listen(), name="marketdata-engine-trades-wakeup")
        try:
            if self.cursor.through is None:
                async with self.db.connection("marketdata.trades.cursor") as conn:
                    self.cursor.through = await sql.consumer_offset(conn, CONSUMER)
            while True:
                self._wake.clear()
                async with self.db.connection("marketdata.trades") as conn:
                    page = await sql.engine_trades_after(conn, self.cursor.through, limit=self.page)
                self.reads += 1
                if page.rows:
                    prints: list[TradePrint] = []
                    ticks = self._ticks(page.rows, prints if self.influx is not None else None)
                    self.rows_read += len(page.rows)
                    yield SettledBatch(
                        ticks,
                        self.rows_read,
                        on_stored=self._writer(prints) if prints else None,
                        offset=ConsumerOffset(CONSUMER, page.next_cursor),
                    )
                # Advanced only once the pipeline has queued the batch: now it counts as handed over.
                self.cursor.through = max(self.cursor.through, page.next_cursor)
                if len(page.rows) >= self.page:
                    continue  # more behind this page
                self.caught_up.set()
                await self._idle()
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener

    def _writer(self, prints: list[TradePrint]) -> Callable[[], Awaitable[None]]:
        """The page's after-commit callback: its trades into the sink's buffer (never waits for InfluxDB)."""
        influx = self.influx
        assert influx is not None

        async def write() -> None:
            for trade in prints:
                trade.write_to(influx)

        return write

    def _ticks(self, rows: Sequence[asyncpg.Record], prints: list[TradePrint] | None = None) -> list[Tick]:
        """Accepted trade ticks of ``rows`` in (ts, match) order; drops are counted by the validator. With
        ``prints``, every decodable trade is appended to it too (stamped apart, see the module docstring)."""
        decoded = []
        for row in rows:
            trade_id: str = row["trade_id"]
            self._expected.pop(trade_id, None)
            self._recent[trade_id] = None
            decoded.append((sql.datetime_to_ns(row["ts"]), match_order(trade_id), trade_id, row))
        if len(self._recent) > MAX_RECENT:
            for trade_id in list(self._recent)[: len(self._recent) - MAX_RECENT]:
                del self._recent[trade_id]
        decoded.sort(key=lambda d: (d[0], d[1], d[2]))
        ticks: list[Tick] = []
        ordinals: dict[tuple[int, int], int] = {}
        for ts_ns, _, trade_id, row in decoded:
            instrument = self.instruments.get(row["instrument_id"])
            if instrument is None:
                self.validator.reject(DropReason.UNKNOWN_SYMBOL, dict(row))
                continue
            try:
                lots = to_lots(row["quantity"], instrument.lot_size)
            except MalformedValue:
                self.validator.reject(DropReason.MALFORMED_ROW, dict(row))
                continue
            if prints is not None:
                with contextlib.suppress(OffTickGrid, ValueError):
                    price = instrument.price_scale.to_ticks(row["price"])
                    ordinal = ordinals.get((instrument.instrument_id, ts_ns), 0)
                    ordinals[(instrument.instrument_id, ts_ns)] = ordinal + 1
                    side = row["aggressor_side"]
                    prints.append(TradePrint(instrument, trade_id, price, lots, side, ts_ns + ordinal))
            result = self.validator.normalize(ts_ns, instrument.symbol, None, None, 0, 0, row["price"], lots)
            if isinstance(result, Tick):
                ticks.append(result)
        return ticks

    async def _idle(self) -> None:
        """Until the next read is due: a wake-up, a fast re-read while announced trades are unread, or the
        regular poll."""
        timeout = self.poll_interval_s
        if self._expected:
            horizon = time.monotonic() - EXPECT_S
            self._expected = {k: t for k, t in self._expected.items() if t > horizon}
            if self._expected:
                timeout = self.retry_s
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    async def _listen(self) -> None:
        """Wake the reader on every ``tp:trades:*`` message and (re)subscription; outlives Redis outages."""
        while True:
            pubsub = self.client.pubsub()
            try:
                await pubsub.psubscribe(TRADES_PATTERN)
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    kind = message.get("type")
                    if kind == "psubscribe":
                        self.subscribed.set()
                        self._wake.set()  # a reconnect may have missed messages: read now
                    elif kind == "pmessage" and self._note(message["data"]):
                        self._wake.set()
            except asyncio.CancelledError:
                raise
            except (*REDIS_ERRORS, aioredis.RedisError) as exc:
                log.warning("engine trades wake-up subscription lost (%s); polling the trades table meanwhile", exc)
                self.subscribed.clear()
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(RESUBSCRIBE_DELAY_S)

    def _note(self, payload: bytes) -> bool:
        """Remember the announced trade ids, so the reader re-reads quickly until their commit is readable.
        Returns whether the message may announce engine trades (worth a read of the table).

        A message is one trade envelope, or a batch's trades of a symbol as a JSON array of them (workers.engine).
        The market data pipeline announces external venues' prints on the same channels (``"source":
        "external"``, no trade id): those are not in the ``trades`` table, so they neither wake the reader nor
        are waited for.
        """
        try:
            decoded = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            return True  # unreadable: read the table rather than risk missing a trade
        now = time.monotonic()
        engine = False
        for envelope in decoded if isinstance(decoded, list) else [decoded]:
            try:
                data = envelope["data"]
                if data.get("source") == EXTERNAL_SOURCE:
                    continue
                trade_id = data["trade_id"]
            except (KeyError, TypeError, AttributeError):
                engine = True
                continue
            engine = True
            if isinstance(trade_id, str) and trade_id not in self._recent:
                if len(self._expected) >= MAX_EXPECTED:
                    self._expected.clear()
                self._expected[trade_id] = now
        return engine
