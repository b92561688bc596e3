"""The engine shard worker: stream ``orders.<k>`` in, one PostgreSQL transaction per batch, reports out.

One ``EngineWorker`` owns the books of the symbols that ``shard_for`` maps to its shard. Its loop:

1. fetch a batch of deliveries (settle it before fetching the next: RabbitMQ's prefetch is the batch size);
2. skip deliveries whose bus sequence is at or below ``engine_offsets(engine-<k>)`` (applied before a crash
   or a lost ack) and "new" commands whose order the engine has already seen (RabbitMQ may redeliver a
   re-published command under a new sequence); a message is one command or a ``batch`` of them (one batch
   placement's orders for this shard), applied in order;
3. re-read the fee and margin rates of the batch's instruments (``refresh_rates``: an operator's change applies
   from the next batch, no restart), translate the rest into domain commands (numbers from the order row, on the
   instrument's grid) and run them through the ``MatchingEngine``;
4. settle every event in ONE transaction (``services.settlement.settle``) together with the offsets;
5. commit, THEN publish to Redis: private ``tp:user:<id>`` reports, ``tp:trades:<symbol>``,
   ``tp:book:<symbol>`` increments with the ``tp:book:<symbol>:snapshot`` key in the same MULTI, and DEL of
   the ``order_book:`` / ``positions:`` caches of every user touched; THEN ack, just before the next fetch, so
   that on NATS the acks and the next pull request leave in one write (a delivery acked late is only one more
   that a crash hands back, and the offset skips it).

Execution report wire format (internal: the WebSocket hub, the order-queue worker and the market data feed
read it; WebSocket clients get one frame per envelope). An envelope is ``{"channel": <kind>, "symbol": ...,
"data": {...}}``, kind ``trades`` on ``tp:trades:<symbol>`` and ``fills`` / ``orders`` / ``positions`` on
``tp:user:<id>``. A batch publishes ONE message per channel (a PUBLISH per report was ~20 % of the engine's
CPU): the envelope itself when the channel has a single report in the batch, otherwise a JSON array of its
envelopes, ``[{"channel": "fills", ...}, {"channel": "orders", ...}, ...]``. Within a channel the envelopes are
in the order of separate messages before: trades, then fills, then orders, then positions, each in settlement
order. Every ``tp:trades:`` message of a batch is published before any ``tp:user:`` one, so a process
subscribed to both still sees a batch's trades before its private reports. Each envelope is encoded by
``orjson`` on its own terms (no spaces), so a subscriber that re-encodes an array element with ``orjson.dumps``
gets exactly the bytes the single-envelope form carries. ``tp:book:`` increments stay one message per symbol.

Between batches it expires DAY/GTD orders from its injected clock. If a batch cannot be committed the
in-memory books are ahead of PostgreSQL, so they are thrown away and rebuilt from it, and the deliveries are
nak'd so the bus hands them over again: nothing is lost and nothing applies twice. PostgreSQL, Redis and
bus outages are waited out with a capped back-off; anything else is a bug and is raised.

Command sequence numbers. The domain derives trade ids and time priorities from ``seq`` ((seq << 20) + n
must fit a BIGINT, so seq < 2**43). RabbitMQ's stream sequences are wall-clock microseconds (~2**50), so the
worker numbers its commands itself, densely, and persists that counter as ``engine_offsets(engine-<k>.commands)``
in the batch transaction: it grows strictly across restarts, which is all the domain requires.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

import asyncpg
import orjson
from redis.exceptions import RedisError

from tradeplane.adapters.bus import Delivery, MessageBus, Subscription, order_stream
from tradeplane.adapters.cache import Cache, invalidate
from tradeplane.adapters.db.timeseries import ensure_daily_partitions_async
from tradeplane.adapters.postgres import Database
from tradeplane.domain.matching import (
    Cancel,
    Command,
    Event,
    Expire,
    InstrumentSpec,
    MatchingEngine,
    Modify,
    NewOrder,
    OffGridValue,
    OrderRejected,
    OrderState,
    StopTriggered,
)
from tradeplane.domain.orders import OrderStatus, OrderType, SelfTradePrevention, Side, TimeInForce
from tradeplane.domain.reservations import shard_for
from tradeplane.entrypoints.heap import freeze_long_lived
from tradeplane.errors import InfrastructureUnavailable
from tradeplane.services.accounts import house_account
from tradeplane.services.queries import order_book_key, positions_key
from tradeplane.services.settlement import (
    InstrumentInfo,
    OrderRow,
    SettledBatch,
    load_instrument,
    load_instruments,
    load_order_rows,
    protection_price,
    refresh_rates,
    settle,
)
from tradeplane.services.stopping import pause

log = logging.getLogger("tradeplane.engine")

ENGINE_DURABLE = "engine"
MAX_BATCH_COMMANDS = 2000
BOOK_LEVELS = 50
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_REBUILD_STATUSES = ("new", "partially_filled", "pending_cancel")
# Errors that mean "a server is away or refused this transaction": wait and retry, never crash.
_TRANSIENT: tuple[type[BaseException], ...] = (
    InfrastructureUnavailable,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    OSError,
    RedisError,
)

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


def commands_of(payload: Any) -> list[dict[str, Any]]:
    """The order commands of one bus message: a single command, or a ``batch`` (the orders of one placement
    for this shard, in request order). Raises ValueError for anything else."""
    commands = payload.get("commands") if isinstance(payload, dict) and payload.get("type") == "batch" else [payload]
    if not isinstance(commands, list) or not commands:
        raise ValueError("a batch without commands")
    for command in commands:
        if not isinstance(command, dict) or not isinstance(command.get("order_id"), int):
            raise ValueError("not an order command")
    return commands


def consumer_name(shard: int) -> str:
    """``engine_offsets`` row of the last bus sequence this shard applied."""
    return f"engine-{shard}"


def command_counter_name(shard: int) -> str:
    """``engine_offsets`` row of the last domain command sequence this shard used."""
    return f"engine-{shard}.commands"


def to_ns(moment: datetime) -> int:
    """Exact nanoseconds since the epoch (no float on the way)."""
    return ((moment - _EPOCH) // timedelta(microseconds=1)) * 1000


def book_channel(symbol: str) -> str:
    return f"tp:book:{symbol}"


def book_snapshot_key(symbol: str) -> str:
    return f"tp:book:{symbol}:snapshot"


def trades_channel(symbol: str) -> str:
    return f"tp:trades:{symbol}"


def user_channel(user_id: int) -> str:
    return f"tp:user:{user_id}"


def _message(channel: str, symbol: str | None, data: Any) -> bytes:
    return orjson.dumps({"channel": channel, "symbol": symbol, "data": data})


def execution_reports(result: SettledBatch) -> list[tuple[str, bytes]]:
    """(Redis channel, payload) for each channel with reports in ``result``, in publishing order: one message per
    channel, the envelope alone or a JSON array of them (the module docstring has the format)."""
    trades: dict[str, list[dict[str, Any]]] = {}
    for trade in result.trades:
        envelope = {"channel": "trades", "symbol": trade.symbol, "data": trade.to_public()}
        trades.setdefault(trade.symbol, []).append(envelope)
    private: dict[int, list[dict[str, Any]]] = {}
    for kind, reports in (("fills", result.fills), ("orders", result.orders), ("positions", result.positions)):
        for report in reports:
            if report.user_id is not None:
                envelope = {"channel": kind, "symbol": report.symbol, "data": report.to_public()}
                private.setdefault(report.user_id, []).append(envelope)
    # Every trades channel first (see the module docstring).
    grouped = [(trades_channel(symbol), envelopes) for symbol, envelopes in trades.items()]
    grouped += [(user_channel(user_id), envelopes) for user_id, envelopes in private.items()]
    return [
        (channel, orjson.dumps(envelopes[0] if len(envelopes) == 1 else envelopes)) for channel, envelopes in grouped
    ]


@dataclass(slots=True)
class _PublishedBook:
    """What subscribers have of one book: the last snapshot written to Redis and its sequence number."""

    seq: int
    bids: dict[str, str] = field(default_factory=dict)
    asks: dict[str, str] = field(default_factory=dict)


def _levels(spec_levels: list[tuple[int, int]], info: InstrumentInfo) -> dict[str, str]:
    spec = info.spec
    return {format(spec.ticks_to_price(p), "f"): format(spec.lots_to_qty(q), "f") for p, q in spec_levels}


def _diff(old: dict[str, str], new: dict[str, str], descending: bool) -> list[list[str]]:
    changed = [[p, q] for p, q in new.items() if old.get(p) != q]
    changed += [[p, "0"] for p in old if p not in new]
    changed.sort(key=lambda level: Decimal(level[0]), reverse=descending)
    return changed


class EngineWorker:
    """One engine shard. ``run(stop)`` until ``stop`` is set; ``ready`` is set once the books are rebuilt."""

    def __init__(
        self,
        db: Database,
        cache: Cache,
        bus: MessageBus,
        *,
        shard: int = 0,
        shards: int = 1,
        clock: Clock = utc_now,
        batch_size: int = 500,
        fetch_timeout: float = 0.05,
        max_backoff: float = 5.0,
    ) -> None:
        if not 0 <= shard < shards:
            raise ValueError(f"shard must be in 0..{shards - 1} (got {shard})")
        self.db = db
        self.cache = cache
        self.bus = bus
        self.shard = shard
        self.shards = shards
        self.clock = clock
        self.batch_size = batch_size
        self.fetch_timeout = fetch_timeout
        self.max_backoff = max_backoff
        self.stream = order_stream(shard)
        self.consumer = consumer_name(shard)
        self.counter = command_counter_name(shard)
        self.ready = asyncio.Event()
        self.engine = MatchingEngine()
        self.instruments: dict[str, InstrumentInfo] = {}
        self.fee_accounts: dict[str, int] = {}  # house:fees:<quote> account ids, committed (see rebuild)
        self.bus_offset = 0
        self.command_seq = 0
        self._published: dict[str, _PublishedBook | None] = {}
        self._stale_books: set[str] = set()
        self._stale_caches: set[int] = set()
        self._subscription: Subscription | None = None
        self._partitions_until: date | None = None
        self._commands_per_message = 1.0  # moving average: batch placements carry many commands per message

    def fetch_size(self) -> int:
        """Messages to fetch next: `batch_size`, fewer when messages carry batches of commands, so one
        transaction settles about MAX_BATCH_COMMANDS commands at most (a bounded transaction and latency)."""
        return max(1, min(self.batch_size, int(MAX_BATCH_COMMANDS / max(self._commands_per_message, 1.0))))

    # ------------------------------------------------------------------------------------------ rebuild

    async def rebuild(self) -> None:
        """Replace the books by PostgreSQL's open orders (time priority = ``orders.sequence``) and positions.

        ``pending_new`` rows and never-accepted rows are left out: their "new" is still on the bus. Positions
        change only through this engine's fills, settled in the same transactions as its orders, so together
        they are exactly what the books held after the last committed batch (the book keeps reduce-only orders
        within them).
        """
        started = time.perf_counter()
        async with self.db.transaction("engine.rebuild") as conn:
            instruments = await load_instruments(conn)
            mine = {s: i for s, i in instruments.items() if shard_for(s, self.shards) == self.shard}
            offsets = {
                r["consumer"]: r["last_sequence"]
                for r in await conn.fetch(
                    "SELECT consumer, last_sequence FROM engine_offsets WHERE consumer = ANY($1::text[])",
                    [self.consumer, self.counter],
                )
            }
            # Create the fee accounts now, where a race with another shard is just a retried rebuild, rather
            # than inside a batch, and keep their ids: accounts are never removed, so batches need not look them
            # up (an instrument adopted later with another quote asset looks its own up in each batch).
            fee_accounts = {
                quote: await house_account(conn, "fees", quote)
                for quote in sorted({i.quote_asset for i in mine.values()})
            }
            rows = await conn.fetch(
                "SELECT id, account_id, instrument_id, side, type, time_in_force, quantity, filled_quantity,"
                " price, stop_price, hold_price, expire_at, post_only, reduce_only, stp_mode, sequence, triggered_at"
                " FROM orders"
                " WHERE instrument_id = ANY($1::bigint[]) AND status = ANY($2::text[]) AND sequence IS NOT NULL"
                " ORDER BY sequence",
                [i.instrument_id for i in mine.values()],
                list(_REBUILD_STATUSES),
            )
            position_rows = await conn.fetch(
                "SELECT account_id, instrument_id, net_quantity FROM positions"
                " WHERE instrument_id = ANY($1::bigint[]) AND net_quantity <> 0",
                [i.instrument_id for i in mine.values()],
            )
        by_id = {i.instrument_id: i for i in mine.values()}
        states: dict[str, list[OrderState]] = {s: [] for s in mine}
        for r in rows:
            info = by_id[r["instrument_id"]]
            states[info.symbol].append(self._state_from_row(r, info))
        positions: dict[str, dict[int, int]] = {s: {} for s in mine}
        for r in position_rows:
            info = by_id[r["instrument_id"]]
            positions[info.symbol][r["account_id"]] = position_lots(r["net_quantity"], info.spec)
        engine = MatchingEngine()
        for symbol in sorted(mine):
            info = mine[symbol]
            last = None if info.last_price is None else info.spec.price_to_ticks(info.last_price.normalize())
            engine.restore(symbol, states[symbol], last_price=last, positions=positions[symbol])
        self.engine = engine
        self.instruments = mine
        self.fee_accounts = fee_accounts
        self.bus_offset = offsets.get(self.consumer, 0)
        self.command_seq = offsets.get(self.counter, 0)
        # Subscribers may hold a book that differs from the rebuilt one: re-read what they have, then send
        # the difference as the next increment.
        self._published = dict.fromkeys(mine)
        self._stale_books = set(mine)
        log.info(
            "engine shard %s rebuilt %d open orders in %d books in %.3f s",
            self.shard,
            len(rows),
            len(mine),
            time.perf_counter() - started,
        )
        freeze_long_lived()  # the rebuilt books live long: keep full GC collections from rescanning them

    @staticmethod
    def _state_from_row(r: Mapping[str, Any], info: InstrumentInfo) -> OrderState:
        spec = info.spec
        order_type = OrderType(r["type"])
        stop = r["stop_price"]
        filled = spec.qty_to_lots(r["filled_quantity"].normalize())
        stop_ticks = None if stop is None else spec.price_to_ticks(stop.normalize())
        triggered = False
        if order_type in (OrderType.STOP, OrderType.STOP_LIMIT) and stop_ticks is not None:
            # ``triggered_at`` is the record (a triggered stop-limit stays in the live book when the price moves
            # back). Rows from before migration 0006 have none: a stop that has traded, or that the mark has
            # reached, has triggered too (a stop at or beyond the last price fires on arrival or on that trade).
            last = info.last_price
            side = Side(r["side"])
            crossed = last is not None and (last >= stop if side is Side.BUY else last <= stop)
            triggered = r["triggered_at"] is not None or filled > 0 or crossed
        expire_at = r["expire_at"]
        tif = TimeInForce(r["time_in_force"])
        # The same price the live engine gave the order (a waiting stop's protection included). A triggered
        # stop never stays open, so only a stop-limit may come back triggered, and it rests at its own price.
        price = book_price(order_type, Side(r["side"]), r["price"], None if triggered else r["hold_price"], spec)
        return OrderState(
            order_id=r["id"],
            account_id=r["account_id"],
            side=Side(r["side"]),
            order_type=order_type,
            qty=spec.qty_to_lots(r["quantity"].normalize()),
            filled_qty=filled,
            price=price,
            stop_price=stop_ticks,
            time_in_force=tif,
            expire_at_ns=to_ns(expire_at) if expire_at is not None and tif in _EXPIRING else None,
            post_only=r["post_only"],
            stp=SelfTradePrevention(r["stp_mode"]),
            priority=r["sequence"],
            triggered=triggered,
            reduce_only=r["reduce_only"],
        )

    # --------------------------------------------------------------------------------------------- loop

    async def run(self, stop: asyncio.Event) -> None:
        """Rebuild, then consume until ``stop`` is set. Outages are waited out; bugs are raised."""
        backoff = 0.1
        while not stop.is_set():
            try:
                await self.rebuild()
                break
            except _TRANSIENT as exc:
                log.warning("engine shard %s waiting for PostgreSQL to rebuild: %s", self.shard, exc)
                await pause(stop, backoff)
                backoff = min(backoff * 2, self.max_backoff)
        if stop.is_set():
            return
        self.ready.set()
        backoff = 0.1
        try:
            while not stop.is_set():
                try:
                    await self.step(stop)
                    backoff = 0.1
                except _TRANSIENT as exc:
                    log.warning("engine shard %s waiting for infrastructure: %s", self.shard, exc)
                    await self._drop_subscription()
                    await pause(stop, backoff)
                    backoff = min(backoff * 2, self.max_backoff)
        finally:
            await self._drop_subscription()

    async def step(self, stop: asyncio.Event | None = None) -> int:
        """One turn of the loop: fetch and apply a batch, expire due orders, retry stale publications.
        Returns how many deliveries were fetched."""
        if self._subscription is None:
            # From the committed offset, not from wherever the bus consumer got to: on JetStream a dead
            # subscriber's unacked messages would otherwise come back after later ones (a cancel before its
            # order). Deliveries at or below the offset may still come (RabbitMQ) and are skipped below.
            self._subscription = await self.bus.subscribe(self.stream, ENGINE_DURABLE, start_after=self.bus_offset)
        deliveries = await self._subscription.fetch(self.fetch_size(), timeout=self.fetch_timeout)
        if deliveries:
            await self.apply_batch(deliveries, stop)
        await self.expire_due(stop)
        if self._stale_books or self._stale_caches:
            await self._publish(SettledBatch())
        return len(deliveries)

    async def _ensure_trade_partitions(self) -> None:
        """The trade tape has one partition per UTC day and no default one: make sure tomorrow's exists
        before today's trades need it (a no-op on TimescaleDB)."""
        today = self.clock().date()
        if self._partitions_until is not None and today + timedelta(days=1) <= self._partitions_until:
            return
        async with self.db.connection("engine.partitions") as conn:
            await ensure_daily_partitions_async(conn, "trades", today - timedelta(days=1), 4)
        self._partitions_until = today + timedelta(days=2)

    async def close(self) -> None:
        """Let go of the stream: unsettled deliveries go back to the bus for whoever subscribes next."""
        await self._drop_subscription()

    async def _drop_subscription(self) -> None:
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            with contextlib.suppress(Exception):
                await subscription.close()

    # -------------------------------------------------------------------------------------------- batch

    async def apply_batch(self, deliveries: list[Delivery], stop: asyncio.Event | None = None) -> None:
        """Apply one batch: skip what was applied, settle the rest in one transaction, commit, publish, ack."""
        todo: list[dict[str, Any]] = []
        top = self.bus_offset
        for d in deliveries:
            if d.sequence and d.sequence <= self.bus_offset:
                continue  # applied before a crash or a lost ack
            top = max(top, d.sequence)
            try:
                commands = commands_of(orjson.loads(d.data))
            except ValueError as exc:
                log.error("engine shard %s drops undecodable message %s: %s", self.shard, d.msg_id, exc)
                continue
            todo.extend(commands)
        if deliveries:
            self._commands_per_message += (len(todo) / len(deliveries) - self._commands_per_message) / 4
        result: SettledBatch | None = None
        if todo or top > self.bus_offset:
            await self._ensure_trade_partitions()
            before = self.command_seq
            try:
                async with self.db.transaction("engine.batch") as conn:
                    result = await self._settle_commands(conn, todo, top)
            except asyncio.CancelledError:
                raise  # stopping: the uncommitted deliveries come back to the next engine
            except Exception as exc:
                self.command_seq = before
                await self._abandon(deliveries, stop, exc)
                raise
            self.bus_offset = top
            log.debug("engine shard %s applied %d deliveries up to #%d", self.shard, len(deliveries), top)
        if result is not None:
            await self._publish(result)
        for d in deliveries:
            try:
                await d.ack()
            except InfrastructureUnavailable as exc:
                # Committed already: the redelivery will be skipped by its sequence.
                log.warning("engine shard %s could not ack %s: %s", self.shard, d.msg_id, exc)

    async def _abandon(self, deliveries: list[Delivery], stop: asyncio.Event | None, exc: BaseException) -> None:
        """The batch did not commit: rebuild the books from PostgreSQL and hand the deliveries back."""
        log.warning("engine shard %s batch not committed (%s); rebuilding books", self.shard, exc)
        await self._rebuild_until_done(stop)
        for d in deliveries:
            with contextlib.suppress(InfrastructureUnavailable):
                await d.nak()

    async def _rebuild_until_done(self, stop: asyncio.Event | None) -> None:
        backoff = 0.1
        while True:
            try:
                await self.rebuild()
                return
            except _TRANSIENT as exc:
                if stop is not None and stop.is_set():
                    return
                log.warning("engine shard %s waiting for PostgreSQL to rebuild: %s", self.shard, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff)

    async def _settle_commands(self, conn: asyncpg.Connection, todo: list[dict[str, Any]], top: int) -> SettledBatch:
        batch_symbols = {str(p.get("symbol")) for p in todo}
        for symbol in batch_symbols - self.instruments.keys():
            await self._adopt_instrument(conn, symbol)
        # Fees and margin rate as they are now, before any order row is locked (``refresh_rates``): a change the
        # operator made applies from the next batch on, with no restart.
        await self._refresh_rates(conn, batch_symbols)
        symbols = {i.instrument_id: i.symbol for i in self.instruments.values()}
        rows = await load_order_rows(conn, (p["order_id"] for p in todo), symbols)
        # a command whose symbol does not name its order's instrument (never from the api): re-read that one too
        await self._refresh_rates(conn, {row.symbol for row in rows.values()} - batch_symbols)
        now = self.clock()
        now_ns = to_ns(now)
        # Orders whose expiry has come go before this batch trades: after a quiet spell or a restart the pass
        # between batches has not run yet, and an expired order must never fill.
        events = self.engine.process(Expire(seq=self.command_seq + 1, now_ns=now_ns))
        if events:
            self.command_seq += 1
        for payload in todo:
            command = self._translate(payload, rows, now_ns, events)
            if command is not None:
                events.extend(self.engine.process(command))
        offsets = {self.consumer: top, self.counter: self.command_seq}
        result = await settle(
            conn,
            events,
            instruments=self.instruments,
            now=now,
            rows=rows,
            offsets=offsets,
            fee_accounts=self.fee_accounts,
        )
        triggered = [ev.order_id for ev in events if type(ev) is StopTriggered]
        if triggered:
            # In the batch's transaction: a rebuild must know the stop left the stop book, whatever the price
            # did since.
            await conn.execute(
                "UPDATE orders SET triggered_at = $2 WHERE id = ANY($1::bigint[]) AND triggered_at IS NULL",
                triggered,
                now,
            )
        return result

    async def _refresh_rates(self, conn: asyncpg.Connection, symbols: set[str]) -> None:
        for info in await refresh_rates(conn, self.instruments, symbols):
            log.info(
                "engine shard %s: %s now charges maker %s, taker %s, margin rate %s",
                self.shard,
                info.symbol,
                info.maker_fee_rate,
                info.taker_fee_rate,
                info.margin_rate,
            )

    async def _adopt_instrument(self, conn: asyncpg.Connection, symbol: str) -> None:
        """An instrument listed after this engine started: give it an empty book if it is ours."""
        if shard_for(symbol, self.shards) != self.shard:
            return
        info = await load_instrument(conn, symbol)
        if info is None:
            return
        self.instruments[symbol] = info
        last = None if info.last_price is None else info.spec.price_to_ticks(info.last_price.normalize())
        self.engine.restore(symbol, [], last_price=last)
        self._published.setdefault(symbol, None)

    def _next_seq(self) -> int:
        self.command_seq += 1
        return self.command_seq

    def _translate(
        self, payload: dict[str, Any], rows: dict[int, OrderRow], now_ns: int, events: list[Event]
    ) -> Command | None:
        """The domain command for one bus message, or None when it must be skipped."""
        kind = payload.get("type")
        order_id: int = payload["order_id"]
        row = rows.get(order_id)
        if row is None or row.symbol not in self.instruments:
            log.error("engine shard %s: %s for unknown order %s (or not our symbol)", self.shard, kind, order_id)
            return None
        info = self.instruments[row.symbol]
        spec = info.spec
        if kind == "new":
            # Applied once: a duplicate (re-published under a new sequence) finds the order accepted already.
            fresh = row.status in (OrderStatus.PENDING_NEW, OrderStatus.PENDING_CANCEL) and row.sequence is None
            if not fresh or order_id in self.engine.book(row.symbol):
                return None
            seq = self._next_seq()
            try:
                return self._new_order(row, info, seq, now_ns)
            except OffGridValue:
                reason = "invalid_price" if row.price is not None else "invalid_quantity"
                events.append(OrderRejected(seq, row.symbol, order_id, reason))
                return None
        if kind == "cancel":
            return Cancel(seq=self._next_seq(), ts_ns=now_ns, symbol=row.symbol, order_id=order_id)
        if kind == "modify":
            # Applied, refused or dropped below, this modify is no longer in flight: the api stops pricing the
            # next modify from its target. A message from before modify numbers has none and changes nothing.
            modify_no = payload.get("modify_no")
            if type(modify_no) is int:
                row.modify_processed(modify_no)
            try:
                new_qty = _optional_decimal(payload.get("new_qty"))
                new_price = _optional_decimal(payload.get("new_price"))
                return Modify(
                    seq=self._next_seq(),
                    ts_ns=now_ns,
                    symbol=row.symbol,
                    order_id=order_id,
                    new_qty=None if new_qty is None else spec.qty_to_lots(new_qty),
                    new_price=None if new_price is None else spec.price_to_ticks(new_price),
                )
            except (OffGridValue, InvalidOperation, TypeError):
                log.error("engine shard %s: modify of order %s is off the grid: %s", self.shard, order_id, payload)
                return None
        log.error("engine shard %s: unknown command type %r for order %s", self.shard, kind, order_id)
        return None

    @staticmethod
    def _new_order(row: OrderRow, info: InstrumentInfo, seq: int, now_ns: int) -> NewOrder:
        """A new order from its row, priced by ``book_price``. A market order stays a market order (it never
        rests: IOC, or FOK) and carries its protection price, the worst it may trade at, so running out of book
        within it reads ``no_liquidity`` / ``market_no_liquidity``; a stop keeps its type (and its DAY/GTD
        expiry while it waits) and carries the protection as its price, which the book applies once it
        triggers."""
        spec = info.spec
        tif = TimeInForce(row.time_in_force)
        order_type = row.order_type
        price = book_price(order_type, row.side, row.price, row.hold_price, spec)
        if order_type is OrderType.MARKET and tif is not TimeInForce.FOK:
            tif = TimeInForce.IOC
        expire_at_ns = to_ns(row.expire_at) if row.expire_at is not None and tif in _EXPIRING else None
        return NewOrder(
            seq=seq,
            ts_ns=now_ns,
            symbol=row.symbol,
            order_id=row.order_id,
            account_id=row.account_id,
            side=row.side,
            order_type=order_type,
            qty=spec.qty_to_lots(row.quantity),
            price=price,
            stop_price=None if row.stop_price is None else spec.price_to_ticks(row.stop_price),
            time_in_force=tif,
            expire_at_ns=expire_at_ns,
            post_only=row.post_only,
            stp=SelfTradePrevention(row.stp_mode),
            reduce_only=row.reduce_only,
        )

    # ------------------------------------------------------------------------------------------- expiry

    async def expire_due(self, stop: asyncio.Event | None = None) -> int:
        """Expire DAY/GTD orders whose time has come by the injected clock; returns how many expired."""
        now = self.clock()
        events = self.engine.process(Expire(seq=self.command_seq + 1, now_ns=to_ns(now)))
        if not events:
            return 0
        self.command_seq += 1
        try:
            async with self.db.transaction("engine.expire") as conn:
                result = await settle(
                    conn,
                    events,
                    instruments=self.instruments,
                    now=now,
                    offsets={self.counter: self.command_seq},
                    fee_accounts=self.fee_accounts,
                )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.command_seq -= 1
            await self._abandon([], stop, exc)
            raise
        await self._publish(result)
        return len(events)

    # ------------------------------------------------------------------------------------------ reports

    async def _publish(self, result: SettledBatch) -> None:
        """Execution reports (one message per channel), book increments + snapshots and cache invalidation, in
        one MULTI.

        Pub/sub is fire-and-forget: if Redis is away the reports are lost (PostgreSQL has them), but the
        book snapshot and the caches are retried until Redis takes them, so no reader stays stale.
        """
        users = result.users | self._stale_caches
        symbols = result.symbols | self._stale_books
        try:
            books = await self._book_updates(symbols)
            async with self.cache.client.pipeline(transaction=True) as pipe:
                for channel, payload in execution_reports(result):
                    pipe.publish(channel, payload)
                for symbol, (published, increment) in books.items():
                    snapshot = {
                        "seq": published.seq,
                        "bids": [[p, q] for p, q in published.bids.items()],
                        "asks": [[p, q] for p, q in published.asks.items()],
                    }
                    pipe.set(book_snapshot_key(symbol), orjson.dumps(snapshot))
                    if increment is not None:
                        pipe.publish(book_channel(symbol), _message("book", symbol, increment))
                invalidate(
                    pipe, *(key for user_id in users for key in (order_book_key(user_id), positions_key(user_id)))
                )
                await pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("engine shard %s could not publish to Redis: %s", self.shard, exc)
            self._stale_books |= symbols
            self._stale_caches |= users
            return
        for symbol, (published, _) in books.items():
            self._published[symbol] = published
        self._stale_books.clear()
        self._stale_caches.clear()

    async def _book_updates(self, symbols: Iterable[str]) -> dict[str, tuple[_PublishedBook, dict[str, Any] | None]]:
        """Per symbol, the next snapshot and the increment from what subscribers have (None if unchanged)."""
        updates: dict[str, tuple[_PublishedBook, dict[str, Any] | None]] = {}
        for symbol in sorted(symbols):
            info = self.instruments.get(symbol)
            if info is None:
                continue
            previous = self._published.get(symbol)
            if previous is None:
                previous = await self._read_snapshot(symbol)
            bids, asks = self.engine.book(symbol).depth(BOOK_LEVELS)
            new_bids, new_asks = _levels(bids, info), _levels(asks, info)
            bid_changes = _diff(previous.bids, new_bids, descending=True)
            ask_changes = _diff(previous.asks, new_asks, descending=False)
            if bid_changes or ask_changes:
                seq = previous.seq + 1
                increment = {"seq": seq, "bids": bid_changes, "asks": ask_changes}
                updates[symbol] = (_PublishedBook(seq, new_bids, new_asks), increment)
            elif self._published.get(symbol) is None:
                updates[symbol] = (previous, None)  # nothing to send, but now we know what subscribers have
        return updates

    async def _read_snapshot(self, symbol: str) -> _PublishedBook:
        raw = await self.cache.client.get(book_snapshot_key(symbol))
        if raw is None:
            return _PublishedBook(0)
        data = orjson.loads(raw)
        return _PublishedBook(
            int(data.get("seq", 0)),
            {str(p): str(q) for p, q in data.get("bids", [])},
            {str(p): str(q) for p, q in data.get("asks", [])},
        )


_EXPIRING = (TimeInForce.DAY, TimeInForce.GTD)
_PROTECTED = (OrderType.MARKET, OrderType.STOP)


def book_price(
    order_type: OrderType, side: Side, price: Decimal | None, hold_price: Decimal | None, spec: InstrumentSpec
) -> int | None:
    """The price the book matches an order at, in ticks: a limit's own price, or for a market or stop order its
    protection price (its hold price on the grid, see ``protection_price``), so that no fill costs more than the
    api reserved. Both a new order and a rebuilt one are priced here."""
    if order_type in _PROTECTED and hold_price is not None:
        return protection_price(hold_price, side, spec)
    return None if price is None else spec.price_to_ticks(price.normalize())


def position_lots(net_quantity: Decimal, spec: InstrumentSpec) -> int:
    """A stored net position in signed whole lots. Fills are on the lot grid, so it is exact; should the lot
    size ever change under a position, the part off the new grid is dropped towards zero, so reduce-only orders
    may close a little less than the position but never cross it."""
    return int(net_quantity // spec.lot_size)  # Decimal // truncates towards zero


def _optional_decimal(value: object) -> Decimal | None:
    if value is None:
        return None
    if not isinstance(value, str | int):
        raise TypeError(f"expected a decimal string, got {value!r}")
    return Decimal(value)
