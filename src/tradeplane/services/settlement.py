"""Settlement: the events of one engine batch become one PostgreSQL transaction.

The engine worker runs ``MatchingEngine.process`` over a batch of commands and hands the events here, inside
the transaction it opened; ``settle`` writes every consequence and nothing else commits:

- order rows: status (only through ``domain.orders.transition``), filled quantity, average fill price,
  ``sequence`` (the engine's time priority, so a restart rebuilds the same queue), and after a modify the new
  quantity, price and hold price, and ``modifies_done``, the number of the last client modify processed
  (applied or refused), which ends the api's pricing of later modifies from that one's target;
- one ``fills`` row per side of each trade (``fill_id`` = ``Fill.maker_fill_id`` / ``taker_fill_id``: a
  replayed batch collides on the unique key instead of filling twice) and one ``trades`` row for the tape;
- positions netted per (account, instrument): net quantity, average price of the open position and realized
  P&L when a fill reduces or flips it;
- one balanced ledger transaction per trade: the buyer pays notional plus fee, the seller receives notional
  minus fee, the house fee account ``house:fees:<quote>`` takes both fees;
- an engine-made quantity cut or cancel of a reduce-only order (its position shrank) is an ``OrderModified`` or
  ``OrderCanceled`` like any other, with its reason kept in ``reject_reason``;
- the funds hold of every touched order set to ``reservation`` of its remaining quantity, or released when
  the order is finished (so active holds always equal what open orders reserve); while client modifies are
  still in flight after the batch, lowered only by what the batch's fills used of it (``hold_amount``);
- ``instruments.last_price`` (the mark) and the consumer offsets given by the caller.

It returns what changed (``SettledBatch``) so the worker can publish execution reports after the commit.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import ROUND_DOWN, ROUND_FLOOR, ROUND_HALF_EVEN, Decimal
from typing import Any

import asyncpg

from tradeplane.domain.ledger import LedgerEntry, LedgerTransaction
from tradeplane.domain.matching import (
    CancelReason,
    CancelRejected,
    Event,
    Fill,
    InstrumentSpec,
    ModifyRejected,
    OrderAccepted,
    OrderCanceled,
    OrderExpired,
    OrderModified,
    OrderRejected,
    StopTriggered,
)
from tradeplane.domain.orders import (
    OPEN_STATUSES,
    PRICED_TYPES,
    OrderStatus,
    OrderType,
    Side,
    status_after_fill,
    transition,
)
from tradeplane.domain.reservations import reservation
from tradeplane.services import ledger
from tradeplane.services.accounts import house_account
from tradeplane.services.queries import decimal_text

log = logging.getLogger("tradeplane.settlement")

#: Scale of every NUMERIC(38, 18) column: averages are rounded here so Python and PostgreSQL agree.
AMOUNT_QUANTUM = Decimal(1).scaleb(-18)

#: Cancel reasons kept in ``orders.reject_reason``: every cancel the engine made on its own (self-trade prevention
#: canceling a resting order, an IOC/FOK/market remainder, a reduce-only order left nothing to reduce, a modify
#: to no more than was filled), so the client can tell why; a cancel the client asked for needs none.
_REPORTED_CANCEL_REASONS: frozenset[str] = frozenset(CancelReason) - {CancelReason.USER, CancelReason.CANCEL_ALL}


@dataclass(frozen=True, slots=True)
class InstrumentInfo:
    """What settlement and the engine need to know about one instrument: loaded when the engine starts or meets
    the symbol; its fee and margin rates are re-read by every batch that trades it (``refresh_rates``)."""

    instrument_id: int
    symbol: str
    spec: InstrumentSpec
    base_asset: str
    quote_asset: str
    quote_scale: int
    maker_fee_rate: Decimal
    taker_fee_rate: Decimal
    margin_rate: Decimal
    last_price: Decimal | None


INSTRUMENT_COLUMNS = (
    "SELECT i.id, i.symbol, i.base_asset, i.quote_asset, i.tick_size, i.lot_size, i.maker_fee_rate,"
    " i.taker_fee_rate, i.margin_rate, i.last_price, a.scale AS quote_scale"
    " FROM instruments i JOIN assets a ON a.code = i.quote_asset"
)


def instrument_from_row(row: Mapping[str, Any]) -> InstrumentInfo:
    return InstrumentInfo(
        instrument_id=row["id"],
        symbol=row["symbol"],
        # normalize(): NUMERIC(38, 18) hands back 0.010000000000000000; the grid is the value, not its digits.
        spec=InstrumentSpec(row["symbol"], row["tick_size"].normalize(), row["lot_size"].normalize()),
        base_asset=row["base_asset"],
        quote_asset=row["quote_asset"],
        quote_scale=row["quote_scale"],
        maker_fee_rate=row["maker_fee_rate"],
        taker_fee_rate=row["taker_fee_rate"],
        margin_rate=row["margin_rate"],
        last_price=row["last_price"],
    )


async def load_instruments(conn: asyncpg.Connection) -> dict[str, InstrumentInfo]:
    """Every instrument by symbol (the engine keeps those of its shard)."""
    rows = await conn.fetch(INSTRUMENT_COLUMNS)
    return {row["symbol"]: instrument_from_row(row) for row in rows}


async def load_instrument(conn: asyncpg.Connection, symbol: str) -> InstrumentInfo | None:
    row = await conn.fetchrow(INSTRUMENT_COLUMNS + " WHERE i.symbol = $1", symbol)
    return None if row is None else instrument_from_row(row)


# FOR KEY SHARE: the weakest row lock that still conflicts with the FOR UPDATE an operator's change takes on the
# row (``services.instruments``), and compatible with the KEY SHARE of the api's order inserts. ORDER BY: the rows
# are locked in id order, under the sort.
_RATES = (
    "SELECT id, maker_fee_rate, taker_fee_rate, margin_rate FROM instruments WHERE id = ANY($1::bigint[])"
    " ORDER BY id FOR KEY SHARE"
)


async def refresh_rates(
    conn: asyncpg.Connection, instruments: dict[str, InstrumentInfo], symbols: Iterable[str]
) -> list[InstrumentInfo]:
    """Re-read the fee and margin rates of ``symbols`` (those of ``instruments``) into ``instruments``, in the
    caller's batch transaction and before it locks any order row; returns the instruments whose rates changed.

    The row lock puts an operator's change and a batch one after the other: a change waits for a batch that read
    the old rates to commit before it re-prices the holds of open orders, and a batch waits for a change to commit
    and then reads the new rates. So no fill is charged, and no hold priced, at rates other than those the holds
    of the batch's orders were last priced at. One short statement per batch (``tests/bench/bench_engine_rates.py``
    measures it).
    """
    by_id = {info.instrument_id: info for symbol in symbols if (info := instruments.get(symbol)) is not None}
    if not by_id:
        return []
    changed: list[InstrumentInfo] = []
    for row in await conn.fetch(_RATES, list(by_id)):
        info = by_id[row["id"]]
        rates = (row["maker_fee_rate"], row["taker_fee_rate"], row["margin_rate"])
        if rates != (info.maker_fee_rate, info.taker_fee_rate, info.margin_rate):
            info = replace(info, maker_fee_rate=rates[0], taker_fee_rate=rates[1], margin_rate=rates[2])
            instruments[info.symbol] = info
            changed.append(info)
    return changed


# ------------------------------------------------------------------------------------------- order rows

ORDER_COLUMNS = (
    "SELECT o.id, o.account_id, o.instrument_id, o.client_order_id, o.side, o.type, o.time_in_force,"
    " o.quantity, o.price, o.stop_price, o.expire_at, o.post_only, o.reduce_only, o.stp_mode, o.status,"
    " o.filled_quantity, o.average_fill_price, o.reject_reason, o.sequence, o.hold_price, o.created_at,"
    " o.modifies_done, o.modifies_requested, a.user_id, a.kind AS account_kind,"
    # the active hold, which only an order with client modifies in flight needs (``hold_amount``): the api
    # changes it only under the row lock taken with it, so it is what the api funded them with, less fills
    " CASE WHEN o.modifies_requested > o.modifies_done THEN (SELECT h.amount FROM holds h"
    " WHERE h.order_id = o.id AND h.released_at IS NULL) END AS held"
    " FROM orders o JOIN accounts a ON a.id = o.account_id"
)


@dataclass(slots=True)
class OrderRow:
    """The engine's working copy of one order row while a batch is settled."""

    order_id: int
    account_id: int
    user_id: int | None
    account_kind: str
    instrument_id: int
    symbol: str
    client_order_id: str | None
    side: Side
    order_type: OrderType
    time_in_force: str
    quantity: Decimal
    price: Decimal | None
    stop_price: Decimal | None
    expire_at: datetime | None
    post_only: bool
    reduce_only: bool
    stp_mode: str
    status: OrderStatus
    filled_quantity: Decimal
    average_fill_price: Decimal | None
    reject_reason: str | None
    sequence: int | None
    hold_price: Decimal | None
    created_at: datetime
    modifies_done: int = 0  # the last client modify the engine processed (see ``modify_processed``)
    modifies_requested: int = 0  # the client modifies the api has sent: more than modifies_done are in flight
    # With modifies in flight when the row was locked: the order's active hold then, and the quantity this
    # batch's fills have filled since (``hold_amount`` releases only what they used of the hold).
    held: Decimal = Decimal(0)
    batch_filled: Decimal = Decimal(0)
    updated_at: datetime | None = None
    dirty: bool = False

    @property
    def leaves_quantity(self) -> Decimal:
        return self.quantity - self.filled_quantity if self.status in OPEN_STATUSES else Decimal(0)

    def modify_processed(self, modify_no: int) -> None:
        """The engine has processed the client's modify number ``modify_no`` (applied, refused, or its order
        gone): it is no longer in flight. Numbers only grow, so a stale one never lowers the record."""
        if modify_no > self.modifies_done:
            self.modifies_done = modify_no
            self.dirty = True

    def to_public(self) -> dict[str, Any]:
        """The order as execution reports carry it: decimals as strings (``dec``); enum members and datetimes as
        they are, which ``orjson`` writes as their values and as ``isoformat()`` does (times are UTC, from
        PostgreSQL and the engine's clock), for a fraction of the cost of converting them first."""
        return {
            "id": self.order_id,
            "account_id": self.account_id,
            "symbol": self.symbol,
            "client_order_id": self.client_order_id,
            "side": self.side,
            "type": self.order_type,
            "time_in_force": self.time_in_force,
            "quantity": dec(self.quantity),
            "price": dec(self.price),
            "stop_price": dec(self.stop_price),
            "expire_at": self.expire_at,
            "post_only": self.post_only,
            "reduce_only": self.reduce_only,
            "stp": self.stp_mode,
            "status": self.status,
            "filled_quantity": dec(self.filled_quantity),
            "leaves_quantity": dec(self.leaves_quantity),
            "average_fill_price": dec(self.average_fill_price),
            "reject_reason": self.reject_reason,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


#: ``dec`` of recent values by their ``str()``, which names a Decimal exactly: a batch's reports repeat the same
#: prices and quantities, and so do the next batches. Emptied when full.
_DEC_TEXTS: dict[str, str] = {}
_DEC_TEXTS_MAX = 4096


def dec(value: Decimal | None) -> str | None:
    """A decimal as the API writes it: plain notation, no trailing zeros (0.500000000000000000 -> "0.5"), every
    digit kept; the text ``queries.decimal_text`` writes.

    ``str()`` writes plain notation except for a positive exponent or a tiny number (with an ``E``): stripping
    the zeros of that text is the same number, at half the cost. Those and long texts take the long way.
    """
    if value is None:
        return None
    text = str(value)
    known = _DEC_TEXTS.get(text)
    if known is not None:
        return known
    if "E" in text or len(text) > 28:
        plain = decimal_text(value)
    elif "." in text:
        plain = text.rstrip("0").rstrip(".")
    else:
        plain = text
    if plain == "-0":
        plain = "0"
    if len(_DEC_TEXTS) >= _DEC_TEXTS_MAX:
        _DEC_TEXTS.clear()
    _DEC_TEXTS[text] = plain
    return plain


async def load_order_rows(
    conn: asyncpg.Connection, order_ids: Iterable[int], symbols: Mapping[int, str]
) -> dict[int, OrderRow]:
    """Lock and read the rows of ``order_ids`` (in id order, so concurrent lockers cannot deadlock on them)."""
    ids = sorted(set(order_ids))
    if not ids:
        return {}
    rows = await conn.fetch(ORDER_COLUMNS + " WHERE o.id = ANY($1::bigint[]) ORDER BY o.id FOR UPDATE OF o", ids)
    out: dict[int, OrderRow] = {}
    for r in rows:
        out[r["id"]] = OrderRow(
            order_id=r["id"],
            account_id=r["account_id"],
            user_id=r["user_id"],
            account_kind=r["account_kind"],
            instrument_id=r["instrument_id"],
            symbol=symbols.get(r["instrument_id"], ""),
            client_order_id=r["client_order_id"],
            side=Side(r["side"]),
            order_type=OrderType(r["type"]),
            time_in_force=r["time_in_force"],
            quantity=r["quantity"],
            price=r["price"],
            stop_price=r["stop_price"],
            expire_at=r["expire_at"],
            post_only=r["post_only"],
            reduce_only=r["reduce_only"],
            stp_mode=r["stp_mode"],
            status=OrderStatus(r["status"]),
            filled_quantity=r["filled_quantity"],
            average_fill_price=r["average_fill_price"],
            reject_reason=r["reject_reason"],
            sequence=r["sequence"],
            hold_price=r["hold_price"],
            created_at=r["created_at"],
            modifies_done=r["modifies_done"],
            modifies_requested=r["modifies_requested"],
            held=r["held"] or Decimal(0),
        )
    return out


# -------------------------------------------------------------------------------------------- positions


@dataclass(slots=True)
class Position:
    account_id: int
    user_id: int | None
    instrument_id: int
    symbol: str
    net_quantity: Decimal
    average_price: Decimal
    realized_pnl: Decimal
    mark_price: Decimal | None = None  # the last trade price once the batch is settled

    def apply_fill(self, side: Side, qty: Decimal, price: Decimal) -> None:
        """Net a fill into the position.

        Adding to the position (or opening one) moves the average price to the quantity-weighted mean;
        reducing it realizes (price - average) per unit closed, in the position's direction, and keeps the
        average; a fill larger than the position closes it and opens the rest at the fill price.
        """
        signed = qty if side is Side.BUY else -qty
        net = self.net_quantity
        if net == 0 or (net > 0) == (signed > 0):
            total = abs(net) + qty
            self.average_price = ((abs(net) * self.average_price + qty * price) / total).quantize(
                AMOUNT_QUANTUM, ROUND_HALF_EVEN
            )
            self.net_quantity = net + signed
            return
        closed = min(abs(net), qty)
        direction = 1 if net > 0 else -1
        self.realized_pnl += closed * (price - self.average_price) * direction
        self.net_quantity = net + signed
        if self.net_quantity == 0:
            self.average_price = Decimal(0)
        elif (self.net_quantity > 0) != (net > 0):
            self.average_price = price  # flipped: the remainder opened at this fill's price

    def to_public(self) -> dict[str, Any]:
        """As the API's PositionPublic: unrealized P&L = net x (mark - average)."""
        mark = self.mark_price
        unrealized = Decimal(0) if mark is None else self.net_quantity * (mark - self.average_price)
        return {
            "account_id": self.account_id,
            "symbol": self.symbol,
            "net_quantity": dec(self.net_quantity),
            "average_price": dec(self.average_price),
            "realized_pnl": dec(self.realized_pnl),
            "mark_price": dec(mark),
            "unrealized_pnl": dec(unrealized),
        }


# ------------------------------------------------------------------------------------------------ result


@dataclass(slots=True)
class FillRecord:
    """One fill as settled; ``id`` is set once the row is inserted (not frozen: dataclasses.replace per fill
    cost 7 % of the engine's CPU)."""

    fill_id: str
    order_id: int
    account_id: int
    user_id: int | None
    symbol: str
    side: Side
    quantity: Decimal
    price: Decimal
    fee: Decimal
    fee_asset: str
    liquidity: str
    trade_id: str
    ts: datetime
    id: int | None = None  # the fills row's id, known once inserted

    def to_public(self) -> dict[str, Any]:
        """As the API's FillPublic, for ``orjson`` (like ``OrderRow.to_public``)."""
        return {
            "id": self.id,
            "fill_id": self.fill_id,
            "order_id": self.order_id,
            "account_id": self.account_id,
            "symbol": self.symbol,
            "side": self.side,
            "quantity": dec(self.quantity),
            "price": dec(self.price),
            "fee": dec(self.fee),
            "fee_asset": self.fee_asset,
            "liquidity": self.liquidity,
            "trade_id": self.trade_id,
            "created_at": self.ts,
        }


@dataclass(frozen=True, slots=True)
class TradeRecord:
    trade_id: str
    symbol: str
    price: Decimal
    quantity: Decimal
    aggressor_side: Side
    ts: datetime

    def to_public(self) -> dict[str, Any]:
        return {
            "trade_id": self.trade_id,
            "price": format(self.price, "f"),
            "qty": format(self.quantity, "f"),
            "aggressor_side": self.aggressor_side.value,
            "ts": self.ts.isoformat(),
        }


@dataclass(slots=True)
class SettledBatch:
    """What one committed batch changed, for execution reports and cache invalidation."""

    orders: list[OrderRow] = field(default_factory=list)
    fills: list[FillRecord] = field(default_factory=list)
    trades: list[TradeRecord] = field(default_factory=list)
    positions: list[Position] = field(default_factory=list)
    symbols: set[str] = field(default_factory=set)

    @property
    def users(self) -> set[int]:
        found = {o.user_id for o in self.orders} | {p.user_id for p in self.positions}
        return {u for u in found if u is not None}


# ------------------------------------------------------------------------------------------------ settle


def fee_for(notional: Decimal, rate: Decimal, scale: int) -> Decimal:
    """notional * rate to the quote asset's scale, rounded toward zero (negative for a maker rebate).

    Toward zero, because an order can fill in any number of pieces and each fill's fee is rounded on its own:
    rounding up, or half up, could make the pieces' fees add up to more than the order's hold reserved (ten
    fills of 0.005 rounded half up cost 0.10 where the hold kept 0.05) and take a cash account below zero.
    """
    return (notional * rate).quantize(Decimal(1).scaleb(-scale), rounding=ROUND_DOWN)


def hold_amount(row: OrderRow, info: InstrumentInfo) -> Decimal:
    """What ``row`` must keep reserved after the batch: ``reservation`` of its leaves, 0 once it is finished.

    At rest, exactly that at its hold price. While client modifies are in flight (``modifies_requested >
    modifies_done``), the hold the api funded them with stays, less only what this batch's fills used of it: the
    engine will apply each of them with no funds check, and only the last one's target is stored, so an earlier,
    larger one is known by its funding alone. The fills used ``reservation`` of their quantity at the order's
    price in force (its limit, or a market or stop order's protection), rounded down: every modify in flight was
    funded at a hold price no lower (``modify_hold_price``, kept so by ``_hold_price_after_modify``), and a
    reservation, rounded up, shrinks by at least the rounded-down reservation of the quantity taken off it. So
    the hold never falls below what a modify will need once applied. It is at least the terms' reservation at
    that price too, as fills may come at them until then. It may keep more than the modifies end up needing (a
    lower target, a cut by the engine): the surplus goes once the last one is processed.
    """
    leaves = row.leaves_quantity
    if leaves <= 0 or row.hold_price is None:
        return Decimal(0)
    if row.modifies_requested <= row.modifies_done:
        return _reserved(row, info, leaves, row.hold_price)
    price = row.price if row.order_type in PRICED_TYPES and row.price is not None else row.hold_price
    # reservation rounds up; of minus the quantity, it is minus the reservation of the quantity rounded down
    used = -_reserved(row, info, -row.batch_filled, price)
    return max(_reserved(row, info, leaves, price), row.held - used)


def _hold_price_after_modify(row: OrderRow) -> None:
    """A limit order's hold price once the engine has applied, refused or cut a modify: its limit, all its fills
    can cost from now on. Not lower than it was while client modifies are still in flight, though: the api prices
    the next modify at no less than the hold price (``modify_hold_price``), which must stay at least the highest
    limit a modify in flight may yet give the order, or that next modify would be funded for less than fills at
    that limit may cost before the engine applies it; and ``hold_amount`` relies on it."""
    if row.modifies_requested > row.modifies_done and row.hold_price is not None and row.price is not None:
        row.hold_price = max(row.hold_price, row.price)
    else:
        row.hold_price = row.price


def _reserved(row: OrderRow, info: InstrumentInfo, leaves: Decimal, hold_price: Decimal) -> Decimal:
    return reservation(
        side=row.side,
        account_kind=row.account_kind,
        leaves_qty=leaves,
        hold_price=hold_price,
        maker_fee_rate=info.maker_fee_rate,
        taker_fee_rate=info.taker_fee_rate,
        margin_rate=info.margin_rate,
        base_asset=info.base_asset,
        quote_asset=info.quote_asset,
        quote_scale=info.quote_scale,
        reduce_only=row.reduce_only,
    ).amount


def protection_price(hold_price: Decimal, side: Side, spec: InstrumentSpec) -> int:
    """The hold price on the tick grid, rounded inwards: a market buy never pays more than its hold price and a
    market sell never receives less than the price its margin hold assumed."""
    ticks = hold_price / spec.tick_size
    whole = int(ticks.to_integral_value(ROUND_FLOOR))
    if side is Side.SELL and whole != ticks:
        whole += 1
    return max(whole, 1)


class _Settler:
    def __init__(
        self,
        conn: asyncpg.Connection,
        instruments: Mapping[str, InstrumentInfo],
        rows: dict[int, OrderRow],
        now: datetime,
        fee_accounts: Mapping[str, int],
        offsets: Mapping[str, int],
    ) -> None:
        self.conn = conn
        self.instruments = instruments
        self.by_id = {i.instrument_id: i for i in instruments.values()}
        self.rows = rows
        self.now = now
        self.offsets = offsets
        self.result = SettledBatch()
        self.positions: dict[tuple[int, int], Position] = {}
        self.fee_accounts: dict[str, int] = dict(fee_accounts)
        self.ledger_txs: list[LedgerTransaction] = []
        self.fill_rows: list[tuple[Any, ...]] = []
        self.trade_rows: list[tuple[Any, ...]] = []
        self.last_prices: dict[int, Decimal] = {}

    def _set_status(self, row: OrderRow, target: OrderStatus) -> None:
        if row.status is not target:
            row.status = transition(row.status, target)
        row.dirty = True

    async def run(self, events: Sequence[Event]) -> SettledBatch:
        missing = set()
        for ev in events:
            if type(ev) is Fill:
                missing.add(ev.maker_order_id)
                missing.add(ev.taker_order_id)
            else:
                missing.add(ev.order_id)  # type: ignore[union-attr]
        missing -= self.rows.keys()
        if missing:
            symbols = {i.instrument_id: i.symbol for i in self.instruments.values()}
            self.rows.update(await load_order_rows(self.conn, missing, symbols))
        fills = [ev for ev in events if type(ev) is Fill]
        if fills:
            await self._load_positions(fills)
        for ev in events:
            self._apply(ev)
        await self._write()
        return self.result

    def _row(self, order_id: int) -> OrderRow | None:
        row = self.rows.get(order_id)
        if row is None:
            log.error("engine event for order %s which PostgreSQL does not have", order_id)
        return row

    def _apply(self, ev: Event) -> None:
        kind = type(ev)
        if kind is Fill:
            self._fill(ev)  # type: ignore[arg-type]
            return
        row = self._row(ev.order_id)  # type: ignore[union-attr]
        if row is None:
            return
        if kind is OrderAccepted:
            if row.status is OrderStatus.PENDING_NEW:
                self._set_status(row, OrderStatus.NEW)
            row.sequence = ev.priority  # type: ignore[union-attr]
            row.dirty = True
        elif kind is OrderRejected:
            row.reject_reason = ev.reason  # type: ignore[union-attr]
            # A cancel requested before the engine saw the order cannot become "rejected" (not in the table):
            # the order simply ends canceled, with the engine's reason kept.
            target = OrderStatus.CANCELED if row.status is OrderStatus.PENDING_CANCEL else OrderStatus.REJECTED
            self._set_status(row, target)
        elif kind is OrderCanceled:
            canceled: OrderCanceled = ev  # type: ignore[assignment]
            self._set_status(row, OrderStatus.CANCELED)
            if canceled.reason in _REPORTED_CANCEL_REASONS:
                row.reject_reason = canceled.reason
        elif kind is OrderExpired:
            self._set_status(row, OrderStatus.EXPIRED)
        elif kind is OrderModified:
            info = self.by_id[row.instrument_id]
            m: OrderModified = ev  # type: ignore[assignment]
            row.quantity = info.spec.lots_to_qty(m.qty)
            # A stop's engine price is its protection, not a limit: its row keeps no price and its hold price.
            if m.price is not None and row.order_type in PRICED_TYPES:
                row.price = info.spec.ticks_to_price(m.price)
                _hold_price_after_modify(row)
            row.sequence = m.priority
            # None for a client's modify (an earlier refused modify no longer describes the order); the engine's
            # own cut of a reduce-only order says why the quantity went down.
            row.reject_reason = m.reason
            row.dirty = True
        elif kind is StopTriggered:
            row.sequence = ev.priority  # type: ignore[union-attr]
            row.dirty = True
        elif kind is ModifyRejected:
            # The api raised the hold price (and hold) for the new terms before the engine saw them; the order
            # kept its old terms, so its hold goes back to what they need once no other modify is in flight: a
            # limit price is its own hold price, a market or stop order's protection price was never changed by
            # a modify.
            if row.order_type in PRICED_TYPES and row.price is not None:
                _hold_price_after_modify(row)
            if row.status in OPEN_STATUSES:  # a finished order keeps the outcome it already reported
                row.reject_reason = ev.reason  # type: ignore[union-attr]
            row.dirty = True
        elif kind is CancelRejected:
            row.dirty = True  # the hold is recomputed from the row

    def _fill(self, ev: Fill) -> None:
        maker = self._row(ev.maker_order_id)
        taker = self._row(ev.taker_order_id)
        if maker is None or taker is None:
            return
        info = self.by_id[taker.instrument_id]
        price = info.spec.ticks_to_price(ev.price)
        qty = info.spec.lots_to_qty(ev.qty)
        notional = price * qty
        maker_fee = fee_for(notional, info.maker_fee_rate, info.quote_scale)
        taker_fee = fee_for(notional, info.taker_fee_rate, info.quote_scale)
        for row, fill_id, fee, liquidity, leaves in (
            (maker, ev.maker_fill_id, maker_fee, "maker", ev.maker_leaves_qty),
            (taker, ev.taker_fill_id, taker_fee, "taker", ev.taker_leaves_qty),
        ):
            previous = row.filled_quantity
            row.filled_quantity = previous + qty
            row.batch_filled += qty
            row.average_fill_price = (
                (previous * (row.average_fill_price or Decimal(0)) + notional) / row.filled_quantity
            ).quantize(AMOUNT_QUANTUM, ROUND_HALF_EVEN)
            if leaves == 0:
                self._set_status(row, OrderStatus.FILLED)
            elif row.status is not OrderStatus.PENDING_CANCEL:  # a fill racing a cancel leaves it pending
                self._set_status(row, status_after_fill(1, leaves))
            row.dirty = True
            record = FillRecord(
                fill_id=fill_id,
                order_id=row.order_id,
                account_id=row.account_id,
                user_id=row.user_id,
                symbol=info.symbol,
                side=row.side,
                quantity=qty,
                price=price,
                fee=fee,
                fee_asset=info.quote_asset,
                liquidity=liquidity,
                trade_id=ev.trade_id,
                ts=self.now,
            )
            self.result.fills.append(record)
            self.fill_rows.append(
                (
                    fill_id,
                    row.order_id,
                    row.side.value,
                    qty,
                    price,
                    fee,
                    info.quote_asset,
                    liquidity,
                    ev.trade_id,
                )
            )
            position = self.positions[(row.account_id, row.instrument_id)]
            position.apply_fill(row.side, qty, price)
        buyer, seller = (taker, maker) if ev.aggressor_side is Side.BUY else (maker, taker)
        buyer_fee, seller_fee = (taker_fee, maker_fee) if buyer is taker else (maker_fee, taker_fee)
        self.trade_rows.append(
            (
                ev.trade_id,
                info.instrument_id,
                price,
                qty,
                buyer.order_id,
                seller.order_id,
                ev.aggressor_side.value,
                self.now,
            )
        )
        self.result.trades.append(TradeRecord(ev.trade_id, info.symbol, price, qty, ev.aggressor_side, self.now))
        self.result.symbols.add(info.symbol)
        self.last_prices[info.instrument_id] = price
        legs: dict[int, Decimal] = {}
        legs[buyer.account_id] = legs.get(buyer.account_id, Decimal(0)) - notional - buyer_fee
        legs[seller.account_id] = legs.get(seller.account_id, Decimal(0)) + notional - seller_fee
        fees = buyer_fee + seller_fee
        if fees:
            house = self.fee_accounts[info.quote_asset]
            legs[house] = legs.get(house, Decimal(0)) + fees
        entries = tuple(LedgerEntry(account, info.quote_asset, amount) for account, amount in legs.items() if amount)
        self.ledger_txs.append(LedgerTransaction(kind="trade", reference=ev.trade_id, entries=entries))

    async def _load_positions(self, fills: list[Fill]) -> None:
        keys: set[tuple[int, int]] = set()
        for ev in fills:
            for order_id in (ev.maker_order_id, ev.taker_order_id):
                row = self.rows.get(order_id)
                if row is not None:
                    keys.add((row.account_id, row.instrument_id))
        ordered = sorted(keys)
        existing = await self.conn.fetch(
            "SELECT p.account_id, p.instrument_id, p.net_quantity, p.average_price, p.realized_pnl"
            " FROM positions p JOIN unnest($1::bigint[], $2::bigint[]) AS k(account_id, instrument_id)"
            " USING (account_id, instrument_id) ORDER BY p.account_id, p.instrument_id FOR UPDATE OF p",
            [k[0] for k in ordered],
            [k[1] for k in ordered],
        )
        found = {(r["account_id"], r["instrument_id"]): r for r in existing}
        users = {row.account_id: row.user_id for row in self.rows.values()}
        for key in ordered:
            r = found.get(key)
            symbol = self.by_id[key[1]].symbol
            self.positions[key] = Position(
                account_id=key[0],
                user_id=users.get(key[0]),
                instrument_id=key[1],
                symbol=symbol,
                net_quantity=r["net_quantity"] if r else Decimal(0),
                average_price=r["average_price"] if r else Decimal(0),
                realized_pnl=r["realized_pnl"] if r else Decimal(0),
            )
        for quote in {self.by_id[k[1]].quote_asset for k in ordered} - self.fee_accounts.keys():
            self.fee_accounts[quote] = await house_account(self.conn, "fees", quote)

    async def _write(self) -> None:
        conn = self.conn
        now = self.now
        if self.fill_rows:
            columns = list(zip(*self.fill_rows, strict=True))
            # The fills, their trades and the instruments' last price in one statement. A fill's account and
            # instrument are its order's, read from the order row here: fills has no foreign keys of its own to
            # accounts and instruments (migration 0015), the order's keys vouch for them. (A fill of an unknown
            # order: NULLs, refused by NOT NULL.) A batch has fills exactly when it has a last price.
            inserted = await conn.fetch(
                "WITH f AS (INSERT INTO fills (fill_id, order_id, account_id, instrument_id, side, quantity, price,"
                " fee, fee_asset, liquidity, trade_id, created_at)"
                " SELECT f.fill_id, f.order_id, o.account_id, o.instrument_id, f.side, f.quantity, f.price, f.fee,"
                " f.fee_asset, f.liquidity, f.trade_id, $10::timestamptz FROM unnest($1::text[], $2::bigint[],"
                " $3::text[], $4::numeric[], $5::numeric[], $6::numeric[], $7::text[], $8::text[], $9::text[])"
                " WITH ORDINALITY AS f(fill_id, order_id, side, quantity, price, fee, fee_asset, liquidity, trade_id,"
                " k) LEFT JOIN orders o ON o.id = f.order_id ORDER BY f.k"
                " RETURNING id, fill_id), t AS (INSERT INTO trades (trade_id, instrument_id, price, quantity,"
                " buy_order_id, sell_order_id, aggressor_side, ts) SELECT * FROM unnest($11::text[], $12::bigint[],"
                " $13::numeric[], $14::numeric[], $15::bigint[], $16::bigint[], $17::text[], $18::timestamptz[])),"
                " i AS (UPDATE instruments i SET last_price = l.price, last_trade_at = $10"
                " FROM unnest($19::bigint[], $20::numeric[]) AS l(id, price) WHERE i.id = l.id)"
                " SELECT id, fill_id FROM f",
                *[list(column) for column in columns],
                now,
                *[list(column) for column in zip(*self.trade_rows, strict=True)],
                list(self.last_prices),
                list(self.last_prices.values()),
            )
            ids = {r["fill_id"]: r["id"] for r in inserted}
            for fill in self.result.fills:
                fill.id = ids[fill.fill_id]
        if self.positions:
            # One statement for every position of the batch (a statement per row cost a round of executor
            # work each), in the (account, instrument) order _load_positions locked them in.
            positions = [self.positions[key] for key in sorted(self.positions)]
            await conn.execute(
                "INSERT INTO positions (account_id, instrument_id, net_quantity, average_price, realized_pnl,"
                " updated_at) SELECT p.account_id, p.instrument_id, p.net_quantity, p.average_price,"
                " p.realized_pnl, $6 FROM unnest($1::bigint[], $2::bigint[], $3::numeric[], $4::numeric[],"
                " $5::numeric[]) WITH ORDINALITY AS p(account_id, instrument_id, net_quantity, average_price,"
                " realized_pnl, k) ORDER BY p.k ON CONFLICT (account_id, instrument_id) DO UPDATE"
                " SET net_quantity = EXCLUDED.net_quantity, average_price = EXCLUDED.average_price,"
                " realized_pnl = EXCLUDED.realized_pnl, updated_at = EXCLUDED.updated_at",
                [p.account_id for p in positions],
                [p.instrument_id for p in positions],
                [p.net_quantity for p in positions],
                [p.average_price for p in positions],
                [p.realized_pnl for p in positions],
                now,
            )
            for p in self.positions.values():
                p.mark_price = self.last_prices.get(p.instrument_id)
            self.result.positions.extend(self.positions.values())
        await self._write_orders()
        await self._post_ledger()

    async def _post_ledger(self) -> None:
        """The batch's ledger transactions, last: the balances they move are locked until commit.

        Every shard's trades move the shared fee account's balance, so while one shard holds these locks the
        others wait; taking them after every other write keeps that window to the ledger rows and the commit.
        ``ledger.post_many`` moves (so locks) the balances in one (account, asset) order, so two shards queue
        instead of deadlocking.
        """
        if self.ledger_txs:
            await ledger.post_many(self.conn, self.ledger_txs)

    async def _write_orders(self) -> None:
        conn = self.conn
        now = self.now
        dirty = [row for row in self.rows.values() if row.dirty]
        if not dirty and not self.offsets:
            return
        for row in dirty:
            row.updated_at = now
        consumers = sorted(self.offsets)
        # One statement for the order rows, their holds and the consumer offsets, whatever the batch size (every
        # order row is already locked by load_order_rows, so the order the rows are visited in cannot deadlock);
        # a batch that changed no order still writes its offsets through it. Each changed order's hold is resized
        # to what it still reserves, or released (0) once the order is finished.
        await conn.execute(
            "WITH o AS (UPDATE orders o SET status = u.status, filled_quantity = u.filled_quantity,"
            " average_fill_price = u.average_fill_price, sequence = u.sequence, quantity = u.quantity,"
            " price = u.price, hold_price = u.hold_price, reject_reason = u.reject_reason, updated_at = $10,"
            " modifies_done = u.modifies_done"
            " FROM unnest($1::bigint[], $2::text[], $3::numeric[], $4::numeric[], $5::bigint[], $6::numeric[],"
            " $7::numeric[], $8::numeric[], $9::text[], $11::integer[]) AS u(id, status, filled_quantity,"
            " average_fill_price, sequence, quantity, price, hold_price, reject_reason, modifies_done)"
            " WHERE o.id = u.id),"
            " c AS (INSERT INTO engine_offsets (consumer, last_sequence, updated_at)"
            " SELECT c.consumer, c.last_sequence, $10 FROM unnest($13::text[], $14::bigint[]) WITH ORDINALITY"
            " AS c(consumer, last_sequence, k) ORDER BY c.k ON CONFLICT (consumer) DO UPDATE"
            " SET last_sequence = EXCLUDED.last_sequence, updated_at = EXCLUDED.updated_at)"
            " UPDATE holds h SET amount = CASE WHEN u.amount > 0 THEN u.amount ELSE h.amount END,"
            " released_at = CASE WHEN u.amount > 0 THEN NULL ELSE $10::timestamptz END"
            " FROM unnest($1::bigint[], $12::numeric[]) AS u(order_id, amount)"
            " WHERE h.order_id = u.order_id AND h.released_at IS NULL AND (u.amount = 0 OR h.amount <> u.amount)",
            [r.order_id for r in dirty],
            [r.status.value for r in dirty],
            [r.filled_quantity for r in dirty],
            [r.average_fill_price for r in dirty],
            [r.sequence for r in dirty],
            [r.quantity for r in dirty],
            [r.price for r in dirty],
            [r.hold_price for r in dirty],
            [r.reject_reason for r in dirty],
            now,
            [r.modifies_done for r in dirty],
            [hold_amount(row, self.by_id[row.instrument_id]) for row in dirty],
            consumers,
            [self.offsets[consumer] for consumer in consumers],
        )
        self.result.orders.extend(dirty)
        self.result.symbols.update(r.symbol for r in dirty)


async def settle(
    conn: asyncpg.Connection,
    events: Sequence[Event],
    *,
    instruments: Mapping[str, InstrumentInfo],
    now: datetime,
    rows: dict[int, OrderRow] | None = None,
    offsets: Mapping[str, int] | None = None,
    fee_accounts: Mapping[str, int] | None = None,
) -> SettledBatch:
    """Persist ``events`` (in order) inside the caller's transaction and return what changed.

    ``rows`` are order rows the caller already locked with ``load_order_rows`` (the rest are loaded here);
    ``offsets`` are ``engine_offsets`` rows (consumer -> last value) written in the same transaction, so
    the batch and the mark of how far the stream was applied commit or roll back together. ``fee_accounts``
    are the ids of ``house:fees:<quote>`` accounts the caller already knows (committed ones: the rest are
    looked up, or created, here), which saves a statement per batch.
    """
    settler = _Settler(conn, instruments, rows if rows is not None else {}, now, fee_accounts or {}, offsets or {})
    return await settler.run(events)
