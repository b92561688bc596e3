"""A naive, obviously-correct matcher: the yardstick the differential test holds ``OrderBook`` against.

It keeps every open order in one flat list and re-sorts the opposite side by (price, priority) before every
single trade. FOK is decided by actually matching on a deep copy and throwing the copy away if the order was
not completely filled. Nothing is optimised; each rule reads as its English statement in the book's module
docstring. It emits the domain's own event classes so the two sides compare with ``==``.

Reduce-only, in its plainest form: every fill moves both accounts' positions and is followed at once by
``enforce`` for the maker's account, then the taker's, which cuts that account's open reduce-only orders back to
its position newest first; a reduce-only maker above its position is cut before it is traded with.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from tradeplane.domain.book import PRIORITY_SHIFT
from tradeplane.domain.matching import (
    Cancel,
    CancelAll,
    CancelRejected,
    Command,
    Event,
    Expire,
    Fill,
    Modify,
    ModifyRejected,
    NewOrder,
    OrderAccepted,
    OrderCanceled,
    OrderExpired,
    OrderModified,
    OrderRejected,
    StopTriggered,
)
from tradeplane.domain.orders import OrderState, OrderType, SelfTradePrevention, Side, TimeInForce

STOP_TYPES = (OrderType.STOP, OrderType.STOP_LIMIT)


@dataclass
class RefOrder:
    order_id: int
    account_id: int
    side: Side
    order_type: OrderType
    price: int | None
    stop_price: int | None
    leaves: int
    filled: int
    tif: TimeInForce
    expire_at_ns: int | None
    post_only: bool
    stp: SelfTradePrevention
    priority: int
    triggered: bool = False
    reduce_only: bool = False

    def state(self) -> OrderState:
        return OrderState(
            order_id=self.order_id,
            account_id=self.account_id,
            side=self.side,
            order_type=self.order_type,
            qty=self.leaves + self.filled,
            filled_qty=self.filled,
            price=self.price,
            stop_price=self.stop_price,
            time_in_force=self.tif,
            expire_at_ns=self.expire_at_ns,
            post_only=self.post_only,
            stp=self.stp,
            priority=self.priority,
            triggered=self.triggered,
            reduce_only=self.reduce_only,
        )


def crosses(side: Side, limit: int | None, resting_price: int) -> bool:
    """Whether an order on ``side`` with ``limit`` (None: market) may trade at ``resting_price``."""
    if limit is None:
        return True
    return resting_price <= limit if side is Side.BUY else resting_price >= limit


def room(position: int, side: Side) -> int:
    """What a reduce-only order on ``side`` may still trade: the part of the position it brings back to zero."""
    if side is Side.SELL:
        return max(position, 0)
    return max(-position, 0)


def stop_fires(o: RefOrder, trade_price: int) -> bool:
    assert o.stop_price is not None
    return trade_price >= o.stop_price if o.side is Side.BUY else trade_price <= o.stop_price


class ReferenceBook:
    def __init__(self, symbol: str) -> None:
        self.symbol = symbol
        self.resting: list[RefOrder] = []
        self.stops: list[RefOrder] = []
        self.last_price: int | None = None
        self.priority_seq = -1
        self.priority_n = -1
        self.match_no = 0
        self.positions: dict[int, int] = {}

    # -- views ---------------------------------------------------------------------------------------
    def opposite_in_priority(self, side: Side) -> list[RefOrder]:
        if side is Side.BUY:
            return sorted((o for o in self.resting if o.side is Side.SELL), key=lambda o: (o.price, o.priority))
        return sorted(
            (o for o in self.resting if o.side is Side.BUY),
            key=lambda o: (-o.price, o.priority),  # type: ignore[operator]
        )

    def depth(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        totals: dict[tuple[Side, int], int] = {}
        for o in self.resting:
            assert o.price is not None
            totals[(o.side, o.price)] = totals.get((o.side, o.price), 0) + o.leaves
        bids = sorted(((p, q) for (s, p), q in totals.items() if s is Side.BUY), reverse=True)
        asks = sorted((p, q) for (s, p), q in totals.items() if s is Side.SELL)
        return bids, asks

    def resting_orders(self) -> list[OrderState]:
        return sorted((o.state() for o in self.resting + self.stops), key=lambda s: s.priority)

    def find(self, order_id: int) -> RefOrder | None:
        for o in self.resting + self.stops:
            if o.order_id == order_id:
                return o
        return None

    def remove(self, o: RefOrder) -> None:
        if o in self.stops:
            self.stops.remove(o)
        else:
            self.resting.remove(o)

    def next_priority(self, seq: int) -> int:
        """The n-th priority handed out during command ``seq`` is (seq << 20) + n, n counting from 0."""
        if seq != self.priority_seq:
            self.priority_seq, self.priority_n = seq, -1
        self.priority_n += 1
        return (seq << PRIORITY_SHIFT) + self.priority_n

    # -- matching ------------------------------------------------------------------------------------
    def take(self, t: RefOrder, seq: int, out: list[Event]) -> bool:
        """Trade ``t`` one maker at a time; True if self-trade prevention stopped it."""
        while t.leaves > 0:
            opposite = self.opposite_in_priority(t.side)
            if not opposite or not crosses(t.side, t.price, opposite[0].price):  # type: ignore[arg-type]
                return False
            maker = opposite[0]
            if maker.account_id == t.account_id:
                if t.stp in (SelfTradePrevention.CANCEL_OLDEST, SelfTradePrevention.CANCEL_BOTH):
                    self.resting.remove(maker)
                    out.append(OrderCanceled(seq, self.symbol, maker.order_id, "stp", maker.leaves))
                if t.stp in (SelfTradePrevention.CANCEL_NEWEST, SelfTradePrevention.CANCEL_BOTH):
                    return True
                continue
            if maker.reduce_only and maker.leaves > self.room(maker.account_id, maker.side):
                self.enforce(maker.account_id, seq, out)
                continue
            qty = min(maker.leaves, t.leaves)
            maker.leaves -= qty
            maker.filled += qty
            t.leaves -= qty
            t.filled += qty
            self.match_no += 1
            assert maker.price is not None
            self.last_price = maker.price
            out.append(
                Fill(
                    seq,
                    self.symbol,
                    self.match_no,
                    maker.price,
                    qty,
                    t.side,
                    maker.order_id,
                    maker.account_id,
                    maker.leaves,
                    t.order_id,
                    t.account_id,
                    t.leaves,
                )
            )
            if maker.leaves == 0:
                self.resting.remove(maker)
            self.move_position(maker.account_id, maker.side, qty)
            self.move_position(t.account_id, t.side, qty)
            self.enforce(maker.account_id, seq, out)
            self.enforce(t.account_id, seq, out)
        return False

    # -- reduce-only ----------------------------------------------------------------------------------
    def room(self, account_id: int, side: Side) -> int:
        return room(self.positions.get(account_id, 0), side)

    def move_position(self, account_id: int, side: Side, qty: int) -> None:
        self.positions[account_id] = self.positions.get(account_id, 0) + (qty if side is Side.BUY else -qty)

    def enforce(self, account_id: int, seq: int, out: list[Event]) -> None:
        """Per side (sells, then buys), cut the account's open reduce-only orders newest first until they total
        no more than what they may reduce: a cut to zero cancels, anything else is a modify-down."""
        for side in (Side.SELL, Side.BUY):
            mine = [o for o in self.resting + self.stops if o.reduce_only and o.account_id == account_id]
            mine = [o for o in mine if o.side is side]
            allowed = self.room(account_id, side)
            for o in sorted(mine, key=lambda o: o.priority, reverse=True):
                excess = sum(m.leaves for m in mine if m in self.resting + self.stops) - allowed
                if excess <= 0:
                    break
                if o.leaves <= excess:
                    self.remove(o)
                    reason = "reduce_only_capped" if allowed else "reduce_only_no_position"
                    out.append(OrderCanceled(seq, self.symbol, o.order_id, reason, o.leaves))
                else:
                    o.leaves -= excess
                    out.append(self.capped(o, seq))

    def capped(self, o: RefOrder, seq: int) -> OrderModified:
        return OrderModified(
            seq, self.symbol, o.order_id, o.leaves + o.filled, o.price, o.leaves, o.priority, "reduce_only_capped"
        )

    def cap_taker(self, o: RefOrder, seq: int, out: list[Event]) -> bool:
        """A reduce-only order about to trade or rest on its own: no more than the position; False if canceled."""
        allowed = self.room(o.account_id, o.side)
        if allowed == 0:
            out.append(OrderCanceled(seq, self.symbol, o.order_id, "reduce_only_no_position", o.leaves))
            return False
        if o.leaves > allowed:
            o.leaves = allowed
            out.append(self.capped(o, seq))
        return True

    def rest(self, o: RefOrder, seq: int, out: list[Event], stop_book: bool = False) -> None:
        (self.stops if stop_book else self.resting).append(o)
        if o.reduce_only:
            self.enforce(o.account_id, seq, out)

    def fills_completely(self, t: RefOrder) -> bool:
        trial = copy.deepcopy(self)
        trial_order = copy.deepcopy(t)
        trial.take(trial_order, 0, [])
        return trial_order.leaves == 0

    def would_cross(self, side: Side, price: int) -> bool:
        opposite = self.opposite_in_priority(side)
        return bool(opposite) and crosses(side, price, opposite[0].price)  # type: ignore[arg-type]

    def execute(self, t: RefOrder, seq: int, out: list[Event]) -> None:
        stopped = self.take(t, seq, out)
        if t.leaves == 0:
            return
        if stopped:
            out.append(OrderCanceled(seq, self.symbol, t.order_id, "stp", t.leaves))
        elif t.price is None:
            out.append(OrderCanceled(seq, self.symbol, t.order_id, "market_no_liquidity", t.leaves))
        elif t.tif in (TimeInForce.IOC, TimeInForce.FOK):
            out.append(OrderCanceled(seq, self.symbol, t.order_id, "ioc_remainder", t.leaves))
        else:
            self.rest(t, seq, out)

    def run_stops(self, seq: int, out: list[Event], scan_from: int, queue: list[tuple[RefOrder, int]]) -> None:
        scanned = scan_from
        while True:
            while scanned < len(out):
                ev = out[scanned]
                scanned += 1
                if isinstance(ev, Fill):
                    fired = sorted((o for o in self.stops if stop_fires(o, ev.price)), key=lambda o: o.priority)
                    for o in fired:
                        self.stops.remove(o)
                        queue.append((o, ev.price))
            if not queue:
                return
            o, at = queue.pop(0)
            o.priority = self.next_priority(seq)
            o.triggered = True
            out.append(StopTriggered(seq, self.symbol, o.order_id, at, o.priority))
            scanned = len(out)
            if o.reduce_only and not self.cap_taker(o, seq, out):
                continue
            opposite = self.opposite_in_priority(o.side)
            can_trade = bool(opposite) and crosses(o.side, o.price, opposite[0].price)  # type: ignore[arg-type]
            if not can_trade:
                if o.price is None:
                    out.append(OrderCanceled(seq, self.symbol, o.order_id, "market_no_liquidity", o.leaves))
                elif o.tif is TimeInForce.IOC:
                    out.append(OrderCanceled(seq, self.symbol, o.order_id, "ioc_remainder", o.leaves))
                elif o.tif is TimeInForce.FOK:
                    out.append(OrderCanceled(seq, self.symbol, o.order_id, "fok_unfillable", o.leaves))
                else:
                    self.rest(o, seq, out)
            elif o.tif is TimeInForce.FOK and not self.fills_completely(o):
                out.append(OrderCanceled(seq, self.symbol, o.order_id, "fok_unfillable", o.leaves))
            else:
                self.execute(o, seq, out)

    # -- commands ------------------------------------------------------------------------------------
    def new_order(self, c: NewOrder, out: list[Event]) -> None:
        def reject(reason: str) -> None:
            out.append(OrderRejected(c.seq, self.symbol, c.order_id, reason))

        is_stop = c.order_type in STOP_TYPES
        has_limit = c.order_type in (OrderType.LIMIT, OrderType.STOP_LIMIT)
        timed = c.time_in_force in (TimeInForce.DAY, TimeInForce.GTD)
        if self.find(c.order_id) is not None:
            return reject("duplicate_order_id")
        if c.qty <= 0:
            return reject("invalid_quantity")
        if (has_limit and (c.price is None or c.price <= 0)) or (not has_limit and c.price is not None):
            return reject("invalid_price")
        if (is_stop and (c.stop_price is None or c.stop_price <= 0)) or (not is_stop and c.stop_price is not None):
            return reject("invalid_stop_price")
        if (timed and c.expire_at_ns is None) or (not timed and c.expire_at_ns is not None):
            return reject("invalid_expiry")
        if timed and c.expire_at_ns is not None and c.expire_at_ns <= c.ts_ns:
            return reject("already_expired")
        if c.post_only and (
            c.order_type is not OrderType.LIMIT or c.time_in_force in (TimeInForce.IOC, TimeInForce.FOK)
        ):
            return reject("invalid_post_only")
        if c.reduce_only and self.room(c.account_id, c.side) == 0:
            return reject("reduce_only_no_position")
        if c.reduce_only and c.time_in_force is TimeInForce.FOK and c.qty > self.room(c.account_id, c.side):
            return reject("fok_unfillable")  # all or nothing: never cut
        o = RefOrder(
            c.order_id,
            c.account_id,
            c.side,
            c.order_type,
            c.price,
            c.stop_price,
            c.qty,
            0,
            c.time_in_force,
            c.expire_at_ns,
            c.post_only,
            c.stp,
            0,
            reduce_only=c.reduce_only,
        )
        capped = c.reduce_only and o.leaves > self.room(c.account_id, c.side)
        if capped:
            o.leaves = self.room(c.account_id, c.side)
        self.match_no = 0
        start = len(out)
        if is_stop:
            o.priority = self.next_priority(c.seq)
            out.append(OrderAccepted(c.seq, self.symbol, o.order_id, o.priority))
            if capped:
                out.append(self.capped(o, c.seq))
            if self.last_price is not None and stop_fires(o, self.last_price):
                self.run_stops(c.seq, out, start, [(o, self.last_price)])
            else:
                self.rest(o, c.seq, out, stop_book=True)
            return
        opposite = self.opposite_in_priority(o.side)
        can_trade = bool(opposite) and crosses(o.side, o.price, opposite[0].price)  # type: ignore[arg-type]
        if can_trade and o.post_only:
            return reject("post_only_would_take")
        if o.tif is TimeInForce.FOK and not self.fills_completely(o):
            return reject("fok_unfillable")
        if not can_trade and o.price is None:
            return reject("no_liquidity")
        o.priority = self.next_priority(c.seq)
        out.append(OrderAccepted(c.seq, self.symbol, o.order_id, o.priority))
        if capped:
            out.append(self.capped(o, c.seq))
        if can_trade:
            self.execute(o, c.seq, out)
            self.run_stops(c.seq, out, start, [])
        elif o.tif is TimeInForce.IOC:
            out.append(OrderCanceled(c.seq, self.symbol, o.order_id, "ioc_remainder", o.leaves))
        else:
            self.rest(o, c.seq, out)

    def cancel(self, c: Cancel, out: list[Event]) -> None:
        o = self.find(c.order_id)
        if o is None:
            out.append(CancelRejected(c.seq, self.symbol, c.order_id, "unknown_order"))
            return
        self.remove(o)
        out.append(OrderCanceled(c.seq, self.symbol, o.order_id, "user", o.leaves))

    def modify(self, c: Modify, out: list[Event]) -> None:
        o = self.find(c.order_id)

        def reject(reason: str) -> None:
            out.append(ModifyRejected(c.seq, self.symbol, c.order_id, reason))

        if o is None:
            return reject("unknown_order")
        pending_stop = o in self.stops
        if c.new_qty is None and c.new_price is None:
            return reject("no_change")
        if c.new_qty is not None and c.new_qty <= 0:
            return reject("invalid_quantity")
        if c.new_price is not None and (c.new_price <= 0 or o.order_type is OrderType.STOP):
            return reject("invalid_price")
        cancels = c.new_qty is not None and c.new_qty <= o.filled
        if (
            not pending_stop
            and o.post_only
            and c.new_price is not None
            and not cancels
            and self.would_cross(o.side, c.new_price)
        ):
            return reject("post_only_would_take")
        if cancels:
            self.remove(o)
            out.append(OrderCanceled(c.seq, self.symbol, o.order_id, "modify_qty_filled", o.leaves))
            return
        price_changed = c.new_price is not None and c.new_price != o.price
        qty_up = c.new_qty is not None and c.new_qty > o.leaves + o.filled
        if c.new_qty is not None:
            o.leaves = c.new_qty - o.filled
        if c.new_price is not None:
            o.price = c.new_price
        if not (price_changed or qty_up):
            out.append(
                OrderModified(c.seq, self.symbol, o.order_id, o.leaves + o.filled, o.price, o.leaves, o.priority, None)
            )
            return
        o.priority = self.next_priority(c.seq)
        start = len(out)
        out.append(
            OrderModified(c.seq, self.symbol, o.order_id, o.leaves + o.filled, o.price, o.leaves, o.priority, None)
        )
        self.remove(o)  # re-queued: in again below, unless it trades or its reduce-only cap cancels it
        if o.reduce_only and not self.cap_taker(o, c.seq, out):
            return
        if pending_stop:
            self.rest(o, c.seq, out, stop_book=True)
            return
        assert o.price is not None
        if self.would_cross(o.side, o.price):
            self.match_no = 0
            self.execute(o, c.seq, out)
            self.run_stops(c.seq, out, start, [])
        else:
            self.rest(o, c.seq, out)

    def cancel_account(self, account_id: int, seq: int, out: list[Event]) -> None:
        for o in sorted((o for o in self.resting + self.stops if o.account_id == account_id), key=lambda o: o.order_id):
            self.remove(o)
            out.append(OrderCanceled(seq, self.symbol, o.order_id, "cancel_all", o.leaves))

    def expire(self, now_ns: int, seq: int, out: list[Event]) -> None:
        due = [o for o in self.resting + self.stops if o.expire_at_ns is not None and o.expire_at_ns <= now_ns]
        for o in sorted(due, key=lambda o: (o.expire_at_ns, o.order_id)):
            self.remove(o)
            out.append(OrderExpired(seq, self.symbol, o.order_id, o.leaves))


class ReferenceEngine:
    """Just enough engine around ``ReferenceBook`` for the differential test (known symbols only)."""

    def __init__(self, symbols: list[str]) -> None:
        self.books = {s: ReferenceBook(s) for s in symbols}

    def process(self, c: Command) -> list[Event]:
        out: list[Event] = []
        if isinstance(c, NewOrder):
            self.books[c.symbol].new_order(c, out)
        elif isinstance(c, Cancel):
            self.books[c.symbol].cancel(c, out)
        elif isinstance(c, Modify):
            self.books[c.symbol].modify(c, out)
        elif isinstance(c, CancelAll):
            for s in sorted(self.books) if c.symbol is None else [c.symbol]:
                self.books[s].cancel_account(c.account_id, c.seq, out)
        elif isinstance(c, Expire):
            for s in sorted(self.books) if c.symbol is None else [c.symbol]:
                self.books[s].expire(c.now_ns, c.seq, out)
        return out
