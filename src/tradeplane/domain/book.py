"""One instrument's order book and its matching rules: price-time priority on integer ticks and lots.

Commands go in (``NewOrder``, ``Modify``, ``Cancel``; cancel-all and expiry through ``OrderBook`` methods) and
events come out, appended to a caller-supplied list in the order they happened. Nothing here does I/O, reads
a clock or draws a random number: the same commands always give the same events, ids included.

Prices are ``int`` ticks and quantities ``int`` lots; ``InstrumentSpec`` converts to and from ``Decimal`` at
the edges and refuses values off the grid. ``depth()`` gives an L2 snapshot, ``take_level_changes()`` the L2
increments since the previous call, ``resting_orders()`` the open orders that ``restore()`` takes back.

Invariants that hold between commands:

- every resting order has ``leaves > 0`` and a limit price, and sits in exactly one price level of its side;
- the best bid is below the best ask (the book is never crossed or locked after matching);
- within a level, orders are kept in time priority (insertion order of the level, oldest first) and
  ``priority`` grows strictly along it;
- untriggered stop and stop-limit orders live only in the stop book, never in a price level;
- ``Fill.match_no`` counts the fills of one command from 1, so ``trade_id`` = ``{symbol}-{seq}-{match_no}`` is
  unique as long as command sequence numbers are unique per symbol.

Matching rules (see also the tests, one per rule):

- an incoming order trades with the best opposite price first and, at a price, with the oldest order first;
  the trade price is the resting (maker) order's price;
- a market order walks the book; whatever is left when the opposite side runs out is canceled
  (``market_no_liquidity``); a market order arriving at an empty opposite side is rejected (``no_liquidity``).
  It may carry a ``price``, its protection: the worst price it may trade at (the engine gives every market
  order one, the edge of the instrument's price band). It walks the book up to that price only; the rest is
  canceled (``market_no_liquidity``), and with nothing within it the order is rejected (``no_liquidity``);
- IOC cancels its remainder (``ioc_remainder``); FOK is rejected (``fok_unfillable``) unless it can fill
  completely, checked before any state changes;
- post-only is rejected (``post_only_would_take``) if it would cross the opposite best price;
- stop orders wait in the stop book and trigger on the last trade price (buy when last >= stop, sell when
  last <= stop), on every trade in turn, also at arrival; stops triggered by the same trade enter oldest
  first; a triggered order's trades may trigger further stops (cascade), queued behind;
- a stop (market) order may carry a ``price``: its protection, the worst price it may trade at once
  triggered; it walks the book up to that price and whatever is left is canceled (``market_no_liquidity``)
  whatever its time in force, exactly like a stop without one that runs out of book;
- self-trade prevention uses the incoming order's mode when it meets a resting order of its own account;
- a modify that changes the price or raises the quantity re-queues the order at the back (new priority) and,
  if the new price crosses, trades like an incoming order; lowering the quantity keeps priority; lowering it
  to the filled quantity or below cancels the order (``modify_qty_filled``).

Reduce-only. The book knows each account's net position in it (signed lots, changed only by its own fills, given
back to ``restore``), and a reduce-only order may only bring that position towards zero, never through it:

- a new reduce-only order whose side cannot reduce the position (flat, or the position is on its own side) is
  rejected (``reduce_only_no_position``); one larger than the position is accepted and at once cut down to it
  (``OrderModified`` with reason ``reduce_only_capped``, priority kept), so as a taker it fills at most the
  position, except a FOK, which is all or nothing and so is rejected (``fok_unfillable``) instead;
- between commands, and after every single fill, an account's open reduce-only orders (resting and waiting
  stops) on the side that reduces its position total at most |position|, and none is left on the other side:
  after a fill that shrinks or flips the position, they are cut newest first (lowest time priority), each by a
  quantity decrease that keeps its priority (``OrderModified``, reason ``reduce_only_capped``) or, when cut to
  nothing, canceled (``reduce_only_capped`` while a position remains, ``reduce_only_no_position`` once none is
  left on their side). This runs in the middle of a taker's sweep too, so a reduce-only maker is only ever hit
  for what the position is at that moment;
- an order taking liquidity is not cut while it trades (it was capped when it started: a new order on arrival,
  a triggered stop when it fires, a modified order when re-queued, each canceled with
  ``reduce_only_no_position`` if nothing is left to reduce); if its remainder rests it is the newest, so it is
  the first one cut;
- FOK counts a reduce-only maker only for what the cuts during the sweep would leave of it.
"""

from __future__ import annotations

import decimal
import heapq
from bisect import bisect_left, insort
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from typing import Any, TypeAlias, TypeVar

from tradeplane.domain.orders import (
    DomainError,
    OrderState,
    OrderType,
    SelfTradePrevention,
    Side,
    TimeInForce,
)

# Enough digits that no realistic price or quantity is rounded; Inexact is trapped so a conversion is exact or
# raises.
_EXACT = decimal.Context(
    prec=80, traps=[decimal.InvalidOperation, decimal.Inexact, decimal.Overflow, decimal.DivisionByZero]
)


class OffGridValue(DomainError, ValueError):
    """A price or quantity that is not a whole number of the instrument's tick or lot size."""


class BookStateError(DomainError, ValueError):
    """``OrderBook.restore`` was given orders that cannot form a valid book (duplicates, no leaves, ...)."""


@dataclass(frozen=True, slots=True)
class InstrumentSpec:
    """An instrument's grid: prices are whole multiples of ``tick_size``, quantities of ``lot_size``.

    The engine works in ``int`` ticks and lots; these helpers are the only conversions, both exact:
    ``ticks_to_price(price_to_ticks(p)) == p`` for every on-grid ``p``; off-grid values raise
    ``OffGridValue``.
    """

    symbol: str
    tick_size: Decimal
    lot_size: Decimal

    def __post_init__(self) -> None:
        for name in ("tick_size", "lot_size"):
            size = getattr(self, name)
            if not isinstance(size, Decimal) or not size.is_finite() or size <= 0:
                raise ValueError(f"{name} must be a positive finite Decimal, got {size!r}")

    def price_to_ticks(self, price: Decimal) -> int:
        return _to_units(price, self.tick_size, "price", "tick size")

    def ticks_to_price(self, ticks: int) -> Decimal:
        return _EXACT.multiply(Decimal(ticks), self.tick_size)

    def qty_to_lots(self, qty: Decimal) -> int:
        return _to_units(qty, self.lot_size, "quantity", "lot size")

    def lots_to_qty(self, lots: int) -> Decimal:
        return _EXACT.multiply(Decimal(lots), self.lot_size)


def _to_units(value: Decimal, unit: Decimal, what: str, unit_name: str) -> int:
    if not isinstance(value, Decimal):
        raise TypeError(f"{what} must be a Decimal, got {type(value).__name__}")
    if not value.is_finite():
        raise OffGridValue(f"{what} is not finite: {value}")
    try:
        quotient, remainder = _EXACT.divmod(value, unit)
    except decimal.DecimalException as exc:
        raise OffGridValue(f"{what} {value} cannot be expressed in units of {unit}") from exc
    if remainder:
        raise OffGridValue(f"{what} {value} is not a multiple of the {unit_name} {unit}")
    return int(quotient)


class RejectReason(StrEnum):
    """Why a new order, a modify or a cancel was refused. Values are stored and sent to clients."""

    DUPLICATE_ORDER_ID = "duplicate_order_id"
    INVALID_QUANTITY = "invalid_quantity"
    INVALID_PRICE = "invalid_price"
    INVALID_STOP_PRICE = "invalid_stop_price"
    INVALID_EXPIRY = "invalid_expiry"
    ALREADY_EXPIRED = "already_expired"
    INVALID_POST_ONLY = "invalid_post_only"
    POST_ONLY_WOULD_TAKE = "post_only_would_take"
    FOK_UNFILLABLE = "fok_unfillable"
    NO_LIQUIDITY = "no_liquidity"
    UNKNOWN_ORDER = "unknown_order"
    UNKNOWN_INSTRUMENT = "unknown_instrument"
    NO_CHANGE = "no_change"
    # A reduce-only order that cannot reduce anything: its account is flat, or its position is on the order's side.
    REDUCE_ONLY_NO_POSITION = "reduce_only_no_position"


class CancelReason(StrEnum):
    """Why an accepted order (or its remainder) was canceled by the engine."""

    USER = "user"
    CANCEL_ALL = "cancel_all"
    IOC_REMAINDER = "ioc_remainder"
    MARKET_NO_LIQUIDITY = "market_no_liquidity"
    FOK_UNFILLABLE = "fok_unfillable"
    STP = "stp"
    MODIFY_QTY_FILLED = "modify_qty_filled"
    # A reduce-only order cut to nothing because the account has no position left on the side it reduces (flat,
    # flipped, or a triggered/modified reduce-only order meets such a position).
    REDUCE_ONLY_NO_POSITION = "reduce_only_no_position"
    # A reduce-only order cut to nothing because older reduce-only orders of its account already cover the whole
    # position. Also the ``OrderModified.reason`` of a reduce-only order cut down but not to nothing.
    REDUCE_ONLY_CAPPED = "reduce_only_capped"


# ---------------------------------------------------------------------------------------------- commands
# Every command carries ``seq``: its position in the engine's input stream (the bus sequence). It must grow
# strictly per symbol, across restarts too, because trade ids are derived from it.


@dataclass(frozen=True, slots=True, kw_only=True)
class NewOrder:
    """A new order, already past risk.

    ``price`` is the limit (limit, stop-limit) or, optionally, a stop's protection price (see the module
    docstring); ``stop_price`` the trigger (stop, stop-limit);
    ``expire_at_ns`` is required for DAY (the session close) and GTD and refused otherwise.
    """

    seq: int
    ts_ns: int
    symbol: str
    order_id: int
    account_id: int
    side: Side
    order_type: OrderType
    qty: int
    price: int | None = None
    stop_price: int | None = None
    time_in_force: TimeInForce = TimeInForce.GTC
    expire_at_ns: int | None = None
    post_only: bool = False
    stp: SelfTradePrevention = SelfTradePrevention.CANCEL_NEWEST
    reduce_only: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Modify:
    """Change an open order's total quantity (``new_qty``, filled part included) and/or limit price."""

    seq: int
    ts_ns: int
    symbol: str
    order_id: int
    new_qty: int | None = None
    new_price: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Cancel:
    seq: int
    ts_ns: int
    symbol: str
    order_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class CancelAll:
    """Cancel every open order of ``account_id``, in one symbol or (``symbol=None``) in all."""

    seq: int
    ts_ns: int
    account_id: int
    symbol: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Expire:
    """Expire DAY and GTD orders whose ``expire_at_ns`` is at or before ``now_ns`` (all symbols or one)."""

    seq: int
    now_ns: int
    symbol: str | None = None


Command: TypeAlias = NewOrder | Modify | Cancel | CancelAll | Expire

# ------------------------------------------------------------------------------------------------ events
# Every event carries the ``seq`` of the command that caused it; events of one command are in causal order.


@dataclass(frozen=True, slots=True)
class OrderAccepted:
    """The order entered the engine; ``priority`` is its time priority (stored so a restore keeps it)."""

    seq: int
    symbol: str
    order_id: int
    priority: int


@dataclass(frozen=True, slots=True)
class OrderRejected:
    seq: int
    symbol: str
    order_id: int
    reason: str


@dataclass(frozen=True, slots=True)
class Fill:
    """One trade between a resting maker and an incoming taker, at the maker's price.

    ``*_leaves_qty`` is each order's remaining quantity after this trade (0 means filled). The trade id is
    ``{symbol}-{seq}-{match_no}``; each side's fill id appends ``-M`` or ``-T``. All derive from the inputs.
    """

    seq: int
    symbol: str
    match_no: int
    price: int
    qty: int
    aggressor_side: Side
    maker_order_id: int
    maker_account_id: int
    maker_leaves_qty: int
    taker_order_id: int
    taker_account_id: int
    taker_leaves_qty: int

    @property
    def trade_id(self) -> str:
        return f"{self.symbol}-{self.seq}-{self.match_no}"

    @property
    def maker_fill_id(self) -> str:
        return f"{self.symbol}-{self.seq}-{self.match_no}-M"

    @property
    def taker_fill_id(self) -> str:
        return f"{self.symbol}-{self.seq}-{self.match_no}-T"


OrderFilled = Fill


@dataclass(frozen=True, slots=True)
class OrderCanceled:
    """The order (or its unfilled remainder of ``canceled_qty``) was canceled for ``reason``."""

    seq: int
    symbol: str
    order_id: int
    reason: str
    canceled_qty: int


@dataclass(frozen=True, slots=True)
class OrderExpired:
    seq: int
    symbol: str
    order_id: int
    expired_qty: int


@dataclass(frozen=True, slots=True)
class OrderModified:
    """The order now has total ``qty`` at ``price`` with ``leaves_qty`` open and time priority ``priority``
    (unchanged when priority was kept). Fills that follow with the same ``seq`` come from the new price.

    ``reason`` is None for a client's modify; the engine cuts a reduce-only order down on its own with
    ``reduce_only_capped`` (see the module docstring)."""

    seq: int
    symbol: str
    order_id: int
    qty: int
    price: int | None
    leaves_qty: int
    priority: int
    reason: str | None


@dataclass(frozen=True, slots=True)
class ModifyRejected:
    """A modify was refused; the order, if it exists, is unchanged."""

    seq: int
    symbol: str
    order_id: int
    reason: str


@dataclass(frozen=True, slots=True)
class CancelRejected:
    seq: int
    symbol: str
    order_id: int
    reason: str


@dataclass(frozen=True, slots=True)
class StopTriggered:
    """A stop (stop-limit) order left the stop book on a trade at ``trigger_price``; it now acts as a market
    (limit) order with the new time priority ``priority``."""

    seq: int
    symbol: str
    order_id: int
    trigger_price: int
    priority: int


Event: TypeAlias = (
    OrderAccepted
    | OrderRejected
    | Fill
    | OrderCanceled
    | OrderExpired
    | OrderModified
    | ModifyRejected
    | CancelRejected
    | StopTriggered
)

_T = TypeVar("_T")


def _builder(cls: type[_T]) -> Callable[..., _T]:
    """A positional constructor of the frozen event class ``cls`` for the engine's own use, ~3x cheaper.

    ``cls(...)`` can only store each field by calling its slot descriptor (the frozen ``__setattr__`` refuses),
    and at hundreds of thousands of events per second those calls are the engine's largest single cost. The
    builder fills an instance of a twin class (ordinary attribute stores), then relabels it as ``cls`` by
    assigning ``__class__``, which Python allows between classes of the same layout. The twin is a subclass
    that adds no slots and puts ``object``'s own ``__init__``, ``__setattr__`` and ``__delattr__`` back (the
    last two share one C slot: both are needed for stores to take the interpreter's fast path). Relabelling an
    instance to its own base class skips the comparison of slot lists that a sibling class of the same slots
    costs (~8% of building a ``Fill``).
    What comes out is an ordinary ``cls``: equal to ``cls(...)`` of the same fields, and just as immutable.
    """
    names: tuple[str, ...] = cls.__slots__  # type: ignore[attr-defined]
    unfrozen = {
        "__slots__": (),
        "__init__": object.__init__,
        "__setattr__": object.__setattr__,
        "__delattr__": object.__delattr__,
    }
    twin = type(f"_{cls.__name__}Fields", (cls,), unfrozen)
    body = "".join(f"    event.{name} = {name}\n" for name in names)
    source = f"def build({', '.join(names)}):\n    event = twin()\n{body}    event.__class__ = cls\n    return event\n"
    namespace: dict[str, Any] = {"twin": twin, "cls": cls}
    exec(source, namespace)  # fixed source built from the field names
    build: Callable[..., _T] = namespace["build"]
    build.__qualname__ = f"{cls.__qualname__}.<engine builder>"
    return build


_accepted: Callable[[int, str, int, int], OrderAccepted] = _builder(OrderAccepted)
_rejected: Callable[[int, str, int, str], OrderRejected] = _builder(OrderRejected)
_fill: Callable[[int, str, int, int, int, Side, int, int, int, int, int, int], Fill] = _builder(Fill)
_canceled: Callable[[int, str, int, str, int], OrderCanceled] = _builder(OrderCanceled)
_expired: Callable[[int, str, int, int], OrderExpired] = _builder(OrderExpired)
_modified: Callable[[int, str, int, int, int | None, int, int, str | None], OrderModified] = _builder(OrderModified)
_modify_rejected: Callable[[int, str, int, str], ModifyRejected] = _builder(ModifyRejected)
_cancel_rejected: Callable[[int, str, int, str], CancelRejected] = _builder(CancelRejected)
_stop_triggered: Callable[[int, str, int, int, int], StopTriggered] = _builder(StopTriggered)

# Module-level aliases: a global load is cheaper than an enum attribute lookup on the hot path.
_BUY = Side.BUY
_SELL = Side.SELL
_MARKET = OrderType.MARKET
_LIMIT = OrderType.LIMIT
_STOP = OrderType.STOP
_STOP_LIMIT = OrderType.STOP_LIMIT
_GTC = TimeInForce.GTC
_IOC = TimeInForce.IOC
_FOK = TimeInForce.FOK
_DAY = TimeInForce.DAY
_GTD = TimeInForce.GTD
_CANCEL_NEWEST = SelfTradePrevention.CANCEL_NEWEST
_CANCEL_OLDEST = SelfTradePrevention.CANCEL_OLDEST
_CANCEL_BOTH = SelfTradePrevention.CANCEL_BOTH
_R = RejectReason
_C = CancelReason
# The cancel reasons of the hot paths: ``_C.USER`` would go through the enum metaclass's ``__getattr__`` hook, which
# costs about as much as the rest of a cancel's bookkeeping.
_USER = CancelReason.USER
_STP = CancelReason.STP
_IOC_REMAINDER = CancelReason.IOC_REMAINDER
_MARKET_NO_LIQUIDITY = CancelReason.MARKET_NO_LIQUIDITY


def _room_of(position: int, is_buy: bool) -> int:
    """How much a reduce-only order on that side may trade against a net ``position``: 0 unless it reduces it."""
    room = -position if is_buy else position
    return room if room > 0 else 0


class _Order:
    """The engine's mutable record of one open order. ``leaves + filled`` is the order's total quantity.

    Built by ``_order_record`` (inlined in ``new_order``), not by calling the class: a class with a Python
    ``__init__`` is called through C, which re-enters the interpreter, and on the add path that costs as much as
    setting the sixteen fields.
    """

    __slots__ = (
        "account_id",
        "expire_at_ns",
        "filled",
        "is_buy",
        "leaves",
        "order_id",
        "order_type",
        "post_only",
        "price",
        "priority",
        "reduce_only",
        "side",
        "stop_price",
        "stp",
        "tif",
        "triggered",
    )

    order_id: int
    account_id: int
    side: Side
    is_buy: bool
    order_type: OrderType
    leaves: int
    filled: int
    price: int | None
    stop_price: int | None
    tif: TimeInForce
    expire_at_ns: int | None
    post_only: bool
    stp: SelfTradePrevention
    priority: int
    triggered: bool
    reduce_only: bool

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


def _order_record(
    order_id: int,
    account_id: int,
    side: Side,
    order_type: OrderType,
    leaves: int,
    filled: int,
    price: int | None,
    stop_price: int | None,
    tif: TimeInForce,
    expire_at_ns: int | None,
    post_only: bool,
    stp: SelfTradePrevention,
    priority: int,
    triggered: bool,
    reduce_only: bool,
) -> _Order:
    o = _Order()
    o.order_id = order_id
    o.account_id = account_id
    o.side = side
    o.is_buy = side is _BUY
    o.order_type = order_type
    o.leaves = leaves
    o.filled = filled
    o.price = price
    o.stop_price = stop_price
    o.tif = tif
    o.expire_at_ns = expire_at_ns
    o.post_only = post_only
    o.stp = stp
    o.priority = priority
    o.triggered = triggered
    o.reduce_only = reduce_only
    return o


# Time priority of an order entering the book while command ``seq`` is handled: (seq << PRIORITY_SHIFT) + n.
# 2**20 entries per command is far beyond any stop cascade; seq < 2**43 keeps priorities within BIGINT.
PRIORITY_SHIFT = 20

# A price level: order id -> order, in time priority. An OrderedDict, not a dict: both delete by key in O(1),
# but finding the first live entry of a plain dict after deletions at its front scans the deleted slots, so
# draining a deep level is quadratic; the OrderedDict's linked list keeps it O(1). Measured: ~6% slower than a
# plain dict on the mixed flow (a dict with deletion counting and compaction was no faster), 30x faster
# popping the front of a 40,000-order level.
_Level: TypeAlias = OrderedDict[int, _Order]


class OrderBook:
    """The book of one instrument. Not thread-safe: one engine thread owns it.

    Bids and asks are ``price -> level`` dicts plus an ascending list of their prices (best bid last, best ask
    first) kept with ``bisect``; orders are found by id in ``_orders`` for O(1) cancel.
    """

    __slots__ = (
        "_ask_prices",
        "_asks",
        "_bid_prices",
        "_bids",
        "_buy_stops",
        "_changed_asks",
        "_changed_bids",
        "_expiries",
        "_match_no",
        "_orders",
        "_positions",
        "_priority_n",
        "_priority_seq",
        "_reduce_only",
        "_sell_stops",
        "_stops",
        "last_price",
        "symbol",
    )

    def __init__(self, symbol: str) -> None:
        self.symbol = symbol
        self.last_price: int | None = None
        self._orders: dict[int, _Order] = {}
        self._bids: dict[int, _Level] = {}
        self._asks: dict[int, _Level] = {}
        self._bid_prices: list[int] = []
        self._ask_prices: list[int] = []
        # Untriggered stops by id, and per side a sorted trigger ladder: buy stops keyed (stop, priority)
        # trigger from the front as the price rises; sell stops keyed (-stop, priority) as it falls.
        self._stops: dict[int, _Order] = {}
        self._buy_stops: list[tuple[int, int, int]] = []
        self._sell_stops: list[tuple[int, int, int]] = []
        # (expire_at_ns, order_id) of DAY/GTD orders; entries of orders gone since are skipped lazily.
        self._expiries: list[tuple[int, int]] = []
        # Priorities derive from the command sequence: (seq << PRIORITY_SHIFT) + n for the n-th priority
        # handed out while handling that command, so they need no state to survive a restart.
        self._priority_seq = -1
        self._priority_n = 0
        # Prices whose level total changed since the last ``take_level_changes()`` (for L2 increments).
        self._changed_bids: set[int] = set()
        self._changed_asks: set[int] = set()
        self._match_no = 0
        # Net position (signed lots, + long) of every account that traded here: only this book's fills move it.
        # A defaultdict: ``positions[a] -= qty`` is the cheapest update the fill loop can make.
        self._positions: defaultdict[int, int] = defaultdict(int)
        # account -> {order id: order} of its reduce-only orders. Every open one is in it; entries of orders gone
        # since (filled, canceled, or in flight as a taker) are dropped lazily by ``_live_reduce_only``, and an
        # order is entered again whenever it rests. An account with none costs the fill loop one dict test.
        self._reduce_only: dict[int, dict[int, _Order]] = {}

    # ------------------------------------------------------------------------------------------ queries

    @property
    def best_bid(self) -> int | None:
        return self._bid_prices[-1] if self._bid_prices else None

    @property
    def best_ask(self) -> int | None:
        return self._ask_prices[0] if self._ask_prices else None

    def __len__(self) -> int:
        """Open orders: resting plus untriggered stops."""
        return len(self._orders) + len(self._stops)

    def __contains__(self, order_id: object) -> bool:
        return order_id in self._orders or order_id in self._stops

    def depth(self, levels: int | None = None) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """L2 snapshot ``(bids, asks)``, each ``[(price, total leaves), ...]`` best first, ``levels`` deep."""
        bid_prices = self._bid_prices[::-1] if levels is None else self._bid_prices[: -levels - 1 : -1]
        ask_prices = self._ask_prices if levels is None else self._ask_prices[:levels]
        bids = [(p, sum(o.leaves for o in self._bids[p].values())) for p in bid_prices]
        asks = [(p, sum(o.leaves for o in self._asks[p].values())) for p in ask_prices]
        return bids, asks

    def take_level_changes(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """L2 increments: ``(bids, asks)`` of ``(price, new total)`` for every level whose total may have
        changed since the previous call, best first; a total of 0 means the level is gone. Clears the record.

        Apply them to the snapshot ``depth()`` gave at the previous call to get the current depth.
        """
        bids = [(p, self._level_total(self._bids, p)) for p in sorted(self._changed_bids, reverse=True)]
        asks = [(p, self._level_total(self._asks, p)) for p in sorted(self._changed_asks)]
        self._changed_bids.clear()
        self._changed_asks.clear()
        return bids, asks

    @staticmethod
    def _level_total(levels: dict[int, _Level], price: int) -> int:
        level = levels.get(price)
        return 0 if level is None else sum(o.leaves for o in level.values())

    def order(self, order_id: int) -> OrderState | None:
        o = self._orders.get(order_id)
        if o is None:
            o = self._stops.get(order_id)
        return None if o is None else o.state()

    def resting_orders(self) -> list[OrderState]:
        """Every open order (resting and untriggered stops), oldest priority first: ``restore``'s input."""
        return sorted(
            (o.state() for o in (*self._orders.values(), *self._stops.values())),
            key=lambda s: s.priority,
        )

    def account_orders(self, account_id: int) -> list[OrderState]:
        return [s for s in self.resting_orders() if s.account_id == account_id]

    def position(self, account_id: int) -> int:
        """``account_id``'s net position here in signed lots (+ long, - short), as this book's fills left it."""
        return self._positions.get(account_id, 0)

    def positions(self) -> dict[int, int]:
        """Every non-zero net position by account: with ``resting_orders()``, what ``restore()`` takes back."""
        return {account: net for account, net in sorted(self._positions.items()) if net}

    # ---------------------------------------------------------------------------------------- restore

    def restore(
        self,
        resting_orders: Iterable[OrderState],
        *,
        last_price: int | None = None,
        positions: Mapping[int, int] | None = None,
    ) -> None:
        """Rebuild an empty book from open orders (e.g. PostgreSQL's), keeping their time priority.

        Orders are placed by ascending ``priority`` (the input order does not matter); orders entering later
        get priorities from later command sequence numbers, so they queue behind. ``positions`` are the
        accounts' net positions in signed lots (reduce-only orders are kept within them). Raises
        ``BookStateError`` for input no live book could have produced, and then leaves the book empty. Starts
        a fresh L2 increment record: subscribers take a ``depth()`` snapshot after a restore.
        """
        if self._orders or self._stops:
            raise BookStateError(f"book {self.symbol} is not empty; restore only into a fresh book")
        try:
            self._restore(sorted(resting_orders, key=lambda s: s.priority))
        except BookStateError:
            self.__init__(self.symbol)  # type: ignore[misc]
            raise
        self._changed_bids.clear()
        self._changed_asks.clear()
        self.last_price = last_price
        self._positions = defaultdict(int, {account: net for account, net in (positions or {}).items() if net})

    def _restore(self, states: list[OrderState]) -> None:
        seen_priorities: set[int] = set()
        for s in states:
            if s.order_id in self._orders or s.order_id in self._stops:
                raise BookStateError(f"order {s.order_id} appears twice")
            if s.priority in seen_priorities:
                raise BookStateError(f"priority {s.priority} appears twice")
            seen_priorities.add(s.priority)
            leaves = s.qty - s.filled_qty
            if leaves <= 0 or s.filled_qty < 0:
                raise BookStateError(f"order {s.order_id} has nothing left to trade")
            is_stop = s.order_type is _STOP or s.order_type is _STOP_LIMIT
            if is_stop and not s.triggered:
                if s.stop_price is None:
                    raise BookStateError(f"stop order {s.order_id} has no stop price")
            elif s.price is None or s.time_in_force is _IOC or s.time_in_force is _FOK:
                raise BookStateError(f"order {s.order_id} cannot rest (no price, or IOC/FOK)")
            if (s.time_in_force is _DAY or s.time_in_force is _GTD) and s.expire_at_ns is None:
                raise BookStateError(f"order {s.order_id} is {s.time_in_force} without expire_at_ns")
            o = _order_record(
                s.order_id,
                s.account_id,
                s.side,
                s.order_type,
                leaves,
                s.filled_qty,
                s.price,
                s.stop_price,
                s.time_in_force,
                s.expire_at_ns,
                s.post_only,
                s.stp,
                s.priority,
                s.triggered,
                s.reduce_only,
            )
            if is_stop and not s.triggered:
                self._add_stop(o)
            else:
                self._rest(o)
            if s.reduce_only:
                self._track(o)
            if o.expire_at_ns is not None:
                heapq.heappush(self._expiries, (o.expire_at_ns, o.order_id))
        bid, ask = self.best_bid, self.best_ask
        if bid is not None and ask is not None and bid >= ask:
            raise BookStateError(f"restored book {self.symbol} is crossed: bid {bid} >= ask {ask}")

    # --------------------------------------------------------------------------------------- commands

    def new_order(self, cmd: NewOrder, out: list[Event]) -> None:
        """Accept or reject ``cmd``, match it, rest or cancel its remainder, then run triggered stops."""
        seq = cmd.seq
        order_id = cmd.order_id
        otype = cmd.order_type
        tif = cmd.time_in_force
        price = cmd.price
        stop_price = cmd.stop_price
        expire_at_ns = cmd.expire_at_ns
        is_stop = otype is _STOP or otype is _STOP_LIMIT
        reason = None
        if order_id in self._orders or order_id in self._stops:
            reason = _R.DUPLICATE_ORDER_ID
        elif cmd.qty <= 0:
            reason = _R.INVALID_QUANTITY
        elif otype is _LIMIT or otype is _STOP_LIMIT:
            if price is None or price <= 0:
                reason = _R.INVALID_PRICE
        elif price is not None and price <= 0:
            reason = _R.INVALID_PRICE  # a market or stop order's price is its protection price
        if reason is None:
            if is_stop:
                if stop_price is None or stop_price <= 0:
                    reason = _R.INVALID_STOP_PRICE
            elif stop_price is not None:
                reason = _R.INVALID_STOP_PRICE
        if reason is None:
            if tif is _GTC or tif is _IOC or tif is _FOK:
                if expire_at_ns is not None:
                    reason = _R.INVALID_EXPIRY
            elif expire_at_ns is None:
                reason = _R.INVALID_EXPIRY
            elif expire_at_ns <= cmd.ts_ns:
                reason = _R.ALREADY_EXPIRED
        if reason is None and cmd.post_only and (otype is not _LIMIT or tif is _IOC or tif is _FOK):
            reason = _R.INVALID_POST_ONLY
        reduce_only = cmd.reduce_only
        room = 0
        if reduce_only and reason is None:
            room = self._room(cmd.account_id, cmd.side is _BUY)
            if not room:
                reason = _R.REDUCE_ONLY_NO_POSITION
            elif tif is _FOK and cmd.qty > room:
                reason = _R.FOK_UNFILLABLE  # all or nothing: a FOK the position cannot take whole is not cut
        if reason is not None:
            out.append(_rejected(seq, self.symbol, order_id, reason))
            return

        # _order_record, inlined: passing it fifteen arguments costs about 5% of a passive add.
        o = _Order()
        o.order_id = order_id
        o.account_id = cmd.account_id
        o.side = side = cmd.side
        o.is_buy = side is _BUY
        o.order_type = otype
        o.leaves = cmd.qty
        o.filled = 0
        o.price = price
        o.stop_price = stop_price
        o.tif = tif
        o.expire_at_ns = expire_at_ns
        o.post_only = cmd.post_only
        o.stp = cmd.stp
        o.priority = 0
        o.triggered = False
        o.reduce_only = reduce_only
        # A reduce-only order never trades more than the position: cut before the checks below (FOK included).
        capped = reduce_only and o.leaves > room
        if capped:
            o.leaves = room
        if is_stop:
            o.priority = self._next_priority(seq)
            out.append(_accepted(seq, self.symbol, order_id, o.priority))
            if capped:
                self._report_cap(o, seq, out)
            if expire_at_ns is not None:
                heapq.heappush(self._expiries, (expire_at_ns, order_id))
            last = self.last_price
            assert stop_price is not None
            if last is not None and (last >= stop_price if o.is_buy else last <= stop_price):
                self._match_no = 0
                self._run_stops(seq, out, len(out), [o], last)
            elif reduce_only:
                self._rest_reduce_only(o, seq, out, stop_book=True)
            else:
                self._add_stop(o)
            return

        # Pre-acceptance checks: post-only, FOK and market-into-nothing are refused without touching the book.
        if o.is_buy:
            best = self._ask_prices[0] if self._ask_prices else None
            crosses = best is not None and (price is None or best <= price)
        else:
            best = self._bid_prices[-1] if self._bid_prices else None
            crosses = best is not None and (price is None or best >= price)
        if crosses:
            if o.post_only:
                reason = _R.POST_ONLY_WOULD_TAKE
            elif tif is _FOK and not self._fok_fillable(o):
                reason = _R.FOK_UNFILLABLE
        elif tif is _FOK:
            reason = _R.FOK_UNFILLABLE
        elif otype is _MARKET:
            reason = _R.NO_LIQUIDITY
        if reason is not None:
            out.append(_rejected(seq, self.symbol, order_id, reason))
            return

        # _next_priority, inlined: this is the hottest path.
        if seq == self._priority_seq:
            self._priority_n += 1
            priority = (seq << PRIORITY_SHIFT) + self._priority_n
        else:
            self._priority_seq = seq
            self._priority_n = 0
            priority = seq << PRIORITY_SHIFT
        o.priority = priority
        out.append(_accepted(seq, self.symbol, order_id, priority))
        if capped:
            self._report_cap(o, seq, out)
        if crosses:
            self._match_no = 0
            first_fill = len(out)
            self._execute(o, seq, out)
            if self._stops and len(out) > first_fill:
                self._run_stops(seq, out, first_fill, [], 0)
        elif tif is _IOC:
            out.append(_canceled(seq, self.symbol, order_id, _IOC_REMAINDER, o.leaves))
            return
        elif reduce_only:
            self._rest_reduce_only(o, seq, out)
        else:
            # _rest, inlined: resting a passive order is more than half of all commands.
            limit: int = price  # type: ignore[assignment]  # only a limit order gets here
            if o.is_buy:
                levels, prices, changed = self._bids, self._bid_prices, self._changed_bids
            else:
                levels, prices, changed = self._asks, self._ask_prices, self._changed_asks
            changed.add(limit)
            level = levels.get(limit)
            if level is None:
                level = levels[limit] = OrderedDict()
                insort(prices, limit)
            level[order_id] = o
            self._orders[order_id] = o
        if expire_at_ns is not None and order_id in self._orders:
            heapq.heappush(self._expiries, (expire_at_ns, order_id))

    def cancel(self, cmd: Cancel, out: list[Event]) -> None:
        order_id = cmd.order_id
        o = self._orders.pop(order_id, None)
        if o is not None:
            # _unlink, inlined (the order is already out of ``_orders``): cancels are a third of all commands.
            price: int = o.price  # type: ignore[assignment]
            if o.is_buy:
                levels, prices, changed = self._bids, self._bid_prices, self._changed_bids
            else:
                levels, prices, changed = self._asks, self._ask_prices, self._changed_asks
            changed.add(price)
            level = levels[price]
            del level[order_id]
            if not level:
                del levels[price]
                del prices[bisect_left(prices, price)]
        else:
            o = self._stops.get(order_id)
            if o is None:
                out.append(_cancel_rejected(cmd.seq, self.symbol, order_id, _R.UNKNOWN_ORDER))
                return
            self._remove_stop(o)
        out.append(_canceled(cmd.seq, self.symbol, order_id, _USER, o.leaves))

    def modify(self, cmd: Modify, out: list[Event]) -> None:
        """Apply a quantity and/or price change; see the module docstring for the priority rules."""
        seq = cmd.seq
        order_id = cmd.order_id
        o = self._orders.get(order_id)
        is_stop = False
        if o is None:
            o = self._stops.get(order_id)
            is_stop = True
            if o is None:
                out.append(_modify_rejected(seq, self.symbol, order_id, _R.UNKNOWN_ORDER))
                return
        new_qty = cmd.new_qty
        new_price = cmd.new_price
        reason = None
        if new_qty is None and new_price is None:
            reason = _R.NO_CHANGE
        elif new_qty is not None and new_qty <= 0:
            reason = _R.INVALID_QUANTITY
        elif new_price is not None and (new_price <= 0 or o.order_type is _STOP):
            reason = _R.INVALID_PRICE
        elif (
            not is_stop
            and o.post_only
            and new_price is not None
            and self._would_cross(o.is_buy, new_price)
            and (new_qty is None or new_qty > o.filled)
        ):
            reason = _R.POST_ONLY_WOULD_TAKE
        if reason is not None:
            out.append(_modify_rejected(seq, self.symbol, order_id, reason))
            return

        if new_qty is not None and new_qty <= o.filled:
            if is_stop:
                self._remove_stop(o)
            else:
                self._unlink(o)
            out.append(_canceled(seq, self.symbol, order_id, _C.MODIFY_QTY_FILLED, o.leaves))
            return

        total = o.leaves + o.filled
        price_changed = new_price is not None and new_price != o.price
        qty_up = new_qty is not None and new_qty > total
        loses_priority = price_changed or qty_up
        if not loses_priority:
            # Same price, same or lower quantity: modified in place, priority kept.
            if new_qty is not None:
                o.leaves = new_qty - o.filled
                if not is_stop:
                    (self._changed_bids if o.is_buy else self._changed_asks).add(o.price)  # type: ignore[arg-type]
            out.append(_modified(seq, self.symbol, order_id, o.leaves + o.filled, o.price, o.leaves, o.priority, None))
            return

        if is_stop:
            self._remove_stop(o)
        else:
            self._unlink(o)
        if new_qty is not None:
            o.leaves = new_qty - o.filled
        if new_price is not None:
            o.price = new_price
        o.priority = self._next_priority(seq)
        first_event = len(out)
        out.append(_modified(seq, self.symbol, order_id, o.leaves + o.filled, o.price, o.leaves, o.priority, None))
        # Re-queued, a reduce-only order is capped like a new one (a raised quantity may exceed the position).
        if o.reduce_only and not self._cap_taker(o, seq, out):
            return
        if is_stop:
            if o.reduce_only:
                self._rest_reduce_only(o, seq, out, stop_book=True)
            else:
                self._add_stop(o)
            return
        if self._would_cross(o.is_buy, o.price):  # type: ignore[arg-type]
            self._match_no = 0
            self._execute(o, seq, out)
            if self._stops and len(out) > first_event + 1:
                self._run_stops(seq, out, first_event, [], 0)
        elif o.reduce_only:
            self._rest_reduce_only(o, seq, out)
        else:
            self._rest(o)

    def cancel_account(self, account_id: int, seq: int, out: list[Event]) -> None:
        """Cancel every open order of ``account_id`` in this book, in order id order."""
        mine = [o for o in self._orders.values() if o.account_id == account_id]
        mine += [o for o in self._stops.values() if o.account_id == account_id]
        mine.sort(key=lambda o: o.order_id)
        for o in mine:
            if o.order_id in self._stops:
                self._remove_stop(o)
            else:
                self._unlink(o)
            out.append(_canceled(seq, self.symbol, o.order_id, _C.CANCEL_ALL, o.leaves))

    def expire(self, now_ns: int, seq: int, out: list[Event]) -> None:
        """Expire DAY/GTD orders with ``expire_at_ns <= now_ns``, earliest expiry first (then order id)."""
        heap = self._expiries
        while heap and heap[0][0] <= now_ns:
            expire_at, order_id = heapq.heappop(heap)
            o = self._orders.get(order_id)
            if o is not None and o.expire_at_ns == expire_at:
                self._unlink(o)
            else:
                o = self._stops.get(order_id)
                if o is None or o.expire_at_ns != expire_at:
                    continue  # filled, canceled or re-used id since: a stale entry
                self._remove_stop(o)
            out.append(_expired(seq, self.symbol, order_id, o.leaves))

    # ------------------------------------------------------------------------------------- internals

    def _next_priority(self, seq: int) -> int:
        if seq == self._priority_seq:
            self._priority_n += 1
            return (seq << PRIORITY_SHIFT) + self._priority_n
        self._priority_seq = seq
        self._priority_n = 0
        return seq << PRIORITY_SHIFT  # the first of the command: no addition (a new big int) needed

    def _would_cross(self, is_buy: bool, price: int) -> bool:
        if is_buy:
            return bool(self._ask_prices) and self._ask_prices[0] <= price
        return bool(self._bid_prices) and self._bid_prices[-1] >= price

    def _rest(self, o: _Order) -> None:
        price: int = o.price  # type: ignore[assignment]
        if o.is_buy:
            levels, prices, changed = self._bids, self._bid_prices, self._changed_bids
        else:
            levels, prices, changed = self._asks, self._ask_prices, self._changed_asks
        changed.add(price)
        level = levels.get(price)
        if level is None:
            level = levels[price] = OrderedDict()
            insort(prices, price)
        level[o.order_id] = o
        self._orders[o.order_id] = o

    def _unlink(self, o: _Order) -> None:
        price: int = o.price  # type: ignore[assignment]
        if o.is_buy:
            levels, prices, changed = self._bids, self._bid_prices, self._changed_bids
        else:
            levels, prices, changed = self._asks, self._ask_prices, self._changed_asks
        changed.add(price)
        level = levels[price]
        del level[o.order_id]
        if not level:
            del levels[price]
            del prices[bisect_left(prices, price)]
        del self._orders[o.order_id]

    def _add_stop(self, o: _Order) -> None:
        stop: int = o.stop_price  # type: ignore[assignment]
        if o.is_buy:
            insort(self._buy_stops, (stop, o.priority, o.order_id))
        else:
            insort(self._sell_stops, (-stop, o.priority, o.order_id))
        self._stops[o.order_id] = o

    def _remove_stop(self, o: _Order) -> None:
        stop: int = o.stop_price  # type: ignore[assignment]
        if o.is_buy:
            ladder, key = self._buy_stops, (stop, o.priority, o.order_id)
        else:
            ladder, key = self._sell_stops, (-stop, o.priority, o.order_id)
        del ladder[bisect_left(ladder, key)]
        del self._stops[o.order_id]

    # --------------------------------------------------------------------------------- reduce-only

    def _room(self, account_id: int, is_buy: bool) -> int:
        """How much an order of ``account_id`` on that side may trade and still only reduce its position."""
        return _room_of(self._positions.get(account_id, 0), is_buy)

    def _track(self, o: _Order) -> None:
        tracked = self._reduce_only.get(o.account_id)
        if tracked is None:
            tracked = self._reduce_only[o.account_id] = {}
        tracked[o.order_id] = o

    def _report_cap(self, o: _Order, seq: int, out: list[Event]) -> None:
        out.append(
            _modified(
                seq, self.symbol, o.order_id, o.leaves + o.filled, o.price, o.leaves, o.priority, _C.REDUCE_ONLY_CAPPED
            )
        )

    def _cap_taker(self, o: _Order, seq: int, out: list[Event]) -> bool:
        """Cut reduce-only ``o`` (out of the book, about to trade or rest) to its position; False if canceled."""
        room = self._room(o.account_id, o.is_buy)
        if not room:
            out.append(_canceled(seq, self.symbol, o.order_id, _C.REDUCE_ONLY_NO_POSITION, o.leaves))
            return False
        if o.leaves > room:
            o.leaves = room
            self._report_cap(o, seq, out)
        return True

    def _rest_reduce_only(self, o: _Order, seq: int, out: list[Event], *, stop_book: bool = False) -> None:
        """Rest reduce-only ``o`` (in the stop book if ``stop_book``): being the newest, it is the first cut if
        its account's reduce-only orders now exceed the position."""
        if stop_book:
            self._add_stop(o)
        else:
            self._rest(o)
        self._track(o)
        self._enforce_reduce_only(o.account_id, seq, out)

    def _live_reduce_only(self, account_id: int) -> list[_Order]:
        """``account_id``'s reduce-only orders now in the book (resting or waiting stops); forgets the rest."""
        tracked = self._reduce_only.get(account_id)
        if tracked is None:
            return []
        orders, stops = self._orders, self._stops
        live = [o for o in tracked.values() if orders.get(o.order_id) is o or stops.get(o.order_id) is o]
        if len(live) != len(tracked):
            if live:
                self._reduce_only[account_id] = {o.order_id: o for o in live}
            else:
                del self._reduce_only[account_id]
        return live

    @staticmethod
    def _reduce_only_cuts(orders: list[_Order], position: int, leaves: Mapping[int, int]) -> list[tuple[_Order, int]]:
        """``(order, leaves it keeps)`` for each of one account's reduce-only ``orders`` to cut so that those on
        the side reducing ``position`` total at most |position| and none remain on the other side: sells before
        buys, newest (highest priority value) first. ``leaves`` overrides an order's current leaves (FOK walk)."""
        cuts: list[tuple[_Order, int]] = []
        for is_buy in (False, True):
            mine = [o for o in orders if o.is_buy is is_buy and leaves.get(o.order_id, o.leaves)]
            if not mine:
                continue
            excess = sum(leaves.get(o.order_id, o.leaves) for o in mine) - _room_of(position, is_buy)
            if excess <= 0:
                continue
            mine.sort(key=lambda o: o.priority, reverse=True)
            for o in mine:
                left = leaves.get(o.order_id, o.leaves)
                cut = left if left < excess else excess
                cuts.append((o, left - cut))
                excess -= cut
                if not excess:
                    break
        return cuts

    def _enforce_reduce_only(self, account_id: int, seq: int, out: list[Event]) -> None:
        """Cut ``account_id``'s reduce-only orders down to its position (see ``_reduce_only_cuts``), reporting
        each as a priority-keeping ``OrderModified`` or, cut to nothing, an ``OrderCanceled``."""
        if account_id not in self._reduce_only:
            return
        position = self._positions.get(account_id, 0)
        for o, left in self._reduce_only_cuts(self._live_reduce_only(account_id), position, {}):
            if left:
                o.leaves = left
                if o.order_id in self._orders:
                    (self._changed_bids if o.is_buy else self._changed_asks).add(o.price)  # type: ignore[arg-type]
                self._report_cap(o, seq, out)
                continue
            if o.order_id in self._stops:
                self._remove_stop(o)
            else:
                self._unlink(o)
            reason = _C.REDUCE_ONLY_CAPPED if _room_of(position, o.is_buy) else _C.REDUCE_ONLY_NO_POSITION
            out.append(_canceled(seq, self.symbol, o.order_id, reason, o.leaves))

    def _fok_fillable(self, o: _Order) -> bool:
        """Whether ``o`` would fill completely, walking the book exactly as matching would (STP included)."""
        if self._reduce_only:
            return self._fok_fillable_cutting(o)
        need = o.leaves
        limit = o.price
        account = o.account_id
        skip_own = o.stp is _CANCEL_OLDEST
        prices: Iterable[int]
        if o.is_buy:
            levels, prices = self._asks, self._ask_prices
        else:
            levels, prices = self._bids, reversed(self._bid_prices)
        for px in prices:
            if limit is not None and (px > limit if o.is_buy else px < limit):
                return False
            for maker in levels[px].values():
                if maker.account_id == account:
                    if skip_own:
                        continue
                    return False
                need -= maker.leaves
                if need <= 0:
                    return True
        return False

    def _fok_fillable_cutting(self, o: _Order) -> bool:
        """``_fok_fillable`` while reduce-only orders rest: the sweep's fills may cut makers it has not reached
        yet (a plain fill shrinks a position its account's reduce-only orders then exceed), so the walk replays
        the cuts on a scratch copy of positions and leaves, through the same ``_reduce_only_cuts`` as matching."""
        need = o.leaves
        limit = o.price
        account = o.account_id
        is_buy = o.is_buy
        skip_own = o.stp is _CANCEL_OLDEST
        positions = dict(self._positions)
        leaves: dict[int, int] = {}  # order id -> leaves after the walk's fills and cuts so far

        def cut(account_id: int) -> None:
            orders = self._live_reduce_only(account_id)
            for order, left in self._reduce_only_cuts(orders, positions.get(account_id, 0), leaves):
                leaves[order.order_id] = left

        prices: Iterable[int]
        if is_buy:
            levels, prices = self._asks, self._ask_prices
        else:
            levels, prices = self._bids, reversed(self._bid_prices)
        for px in prices:
            if limit is not None and (px > limit if is_buy else px < limit):
                return False
            for maker in levels[px].values():
                left = leaves.get(maker.order_id, maker.leaves)
                if not left:
                    continue  # cut away earlier in this walk
                mid = maker.account_id
                if mid == account:
                    if skip_own:
                        continue
                    return False
                if maker.reduce_only and left > _room_of(positions.get(mid, 0), maker.is_buy):
                    cut(mid)  # as ``_take`` does before filling a maker above its position
                    left = leaves.get(maker.order_id, maker.leaves)
                    if not left:
                        continue
                qty = left if left < need else need
                need -= qty
                if not need:
                    return True
                leaves[maker.order_id] = left - qty
                positions[mid] = positions.get(mid, 0) + (-qty if is_buy else qty)
                positions[account] = positions.get(account, 0) + (qty if is_buy else -qty)
                cut(mid)
                cut(account)
        return False

    def _execute(self, o: _Order, seq: int, out: list[Event]) -> None:
        """Match an accepted, crossing order, then dispose of its remainder (rest or cancel)."""
        stp_stopped = self._take(o, seq, out)
        leaves = o.leaves
        if not leaves:
            return
        if stp_stopped:
            out.append(_canceled(seq, self.symbol, o.order_id, _STP, leaves))
        elif o.price is None or o.order_type is _STOP or o.order_type is _MARKET:  # a protection, not a limit
            out.append(_canceled(seq, self.symbol, o.order_id, _MARKET_NO_LIQUIDITY, leaves))
        elif o.tif is _IOC or o.tif is _FOK:
            out.append(_canceled(seq, self.symbol, o.order_id, _IOC_REMAINDER, leaves))
        elif o.reduce_only:
            self._rest_reduce_only(o, seq, out)
        else:
            self._rest(o)

    def _take(self, taker: _Order, seq: int, out: list[Event]) -> bool:
        """Trade ``taker`` against the opposite side while it crosses; return True if STP stopped it.

        The hot loop: locals only, one dict lookup and one iterator per price level. The makers a visit
        removes (filled, or canceled by STP) are always a prefix of the level, so they are popped from its
        front after the iteration, or the whole level is dropped when the visit consumed all of it.

        Positions move with every fill. When either account has reduce-only orders, the visit stops right after
        the fill (or before filling a reduce-only maker above its position, which only restored state can
        show), its reduce-only orders are cut (``_enforce_reduce_only``, which may remove orders of this very
        level), and the sweep goes on from the best price again.
        """
        is_buy = taker.is_buy
        if is_buy:
            levels, prices, best_index, changed = self._asks, self._ask_prices, 0, self._changed_asks
        else:
            levels, prices, best_index, changed = self._bids, self._bid_prices, -1, self._changed_bids
        limit = taker.price
        leaves = taker.leaves
        account = taker.account_id
        taker_id = taker.order_id
        side = taker.side
        symbol = self.symbol
        orders = self._orders
        positions = self._positions
        reduce_only = self._reduce_only  # account -> its reduce-only orders; usually empty
        booked = leaves  # the taker's leaves when its position was last brought up to date
        match_no = self._match_no
        append = out.append
        stp_stopped = False
        last_trade = -1
        while leaves and prices:
            px = prices[best_index]
            if limit is not None and (px > limit if is_buy else px < limit):
                break
            level = levels[px]
            changed.add(px)
            gone = 0  # makers removed by this visit: always a prefix of the level
            cut_account: int | None = None  # set: stop the visit, then cut its (and the taker's) reduce-only orders
            for maker in level.values():
                maker_account = maker.account_id
                if maker_account == account:
                    mode = taker.stp
                    if mode is not _CANCEL_NEWEST:  # cancel_oldest or cancel_both: the resting order goes
                        gone += 1
                        del orders[maker.order_id]
                        append(_canceled(seq, symbol, maker.order_id, _STP, maker.leaves))
                    if mode is not _CANCEL_OLDEST:  # cancel_newest or cancel_both: the taker stops here
                        stp_stopped = True
                        break
                    continue
                # (Every open reduce-only order is in ``reduce_only``, so an empty one rules them all out at once.)
                if reduce_only and maker.reduce_only and maker.leaves > self._room(maker_account, maker.is_buy):
                    self._track(maker)
                    cut_account = maker_account
                    break
                qty = maker.leaves if maker.leaves < leaves else leaves
                maker.leaves -= qty
                maker.filled += qty
                leaves -= qty
                match_no += 1
                last_trade = px
                if is_buy:  # the maker sold
                    positions[maker_account] -= qty
                else:
                    positions[maker_account] += qty
                append(
                    _fill(
                        seq,
                        symbol,
                        match_no,
                        px,
                        qty,
                        side,
                        maker.order_id,
                        maker_account,
                        maker.leaves,
                        taker_id,
                        account,
                        leaves,
                    )
                )
                if reduce_only and (maker_account in reduce_only or account in reduce_only):
                    cut_account = maker_account
                    if not maker.leaves:
                        gone += 1
                        del orders[maker.order_id]
                    break
                if maker.leaves:
                    break  # the taker is done; the maker keeps its place
                gone += 1
                del orders[maker.order_id]
                if not leaves:
                    break
            if gone == len(level):
                del levels[px]
                del prices[best_index]
            else:
                for _ in range(gone):
                    level.popitem(last=False)
                if cut_account is None:
                    break  # makers remain at this price: the taker is done or was stopped
            if cut_account is not None:
                done = booked - leaves
                positions[account] += done if is_buy else -done
                booked = leaves
                self._match_no = match_no
                self._enforce_reduce_only(cut_account, seq, out)
                self._enforce_reduce_only(account, seq, out)
            if stp_stopped:
                break
        if booked != leaves:
            done = booked - leaves
            positions[account] += done if is_buy else -done
        taker.filled += taker.leaves - leaves
        taker.leaves = leaves
        self._match_no = match_no
        if last_trade >= 0:
            self.last_price = last_trade
        return stp_stopped

    def _run_stops(self, seq: int, out: list[Event], scan_from: int, queue: list[_Order], trigger_price: int) -> None:
        """Trigger stops on each trade in ``out[scan_from:]`` in turn and run them, cascading, until quiet.

        ``queue`` may hold stops already triggered (at arrival, by ``trigger_price``). Stops triggered by the
        same trade are queued oldest priority first; every queued stop runs before the next is looked at.
        """
        pending: list[tuple[_Order, int]] = [(o, trigger_price) for o in queue]
        head = 0
        scan = scan_from
        while True:
            while scan < len(out):
                ev = out[scan]
                scan += 1
                if type(ev) is Fill and self._stops:
                    pending.extend((o, ev.price) for o in self._pop_triggered(ev.price))
            if head == len(pending):
                return
            o, at = pending[head]
            head += 1
            o.priority = self._next_priority(seq)
            o.triggered = True
            out.append(_stop_triggered(seq, self.symbol, o.order_id, at, o.priority))
            scan = len(out)  # the trigger event itself is not a trade
            self._execute_triggered(o, seq, out)

    def _pop_triggered(self, price: int) -> list[_Order]:
        """Remove and return the stops a trade at ``price`` triggers, oldest priority first."""
        fired: list[_Order] = []
        buy = self._buy_stops
        if buy and buy[0][0] <= price:
            n = bisect_left(buy, (price + 1,))
            fired += (self._stops.pop(oid) for _, _, oid in buy[:n])
            del buy[:n]
        sell = self._sell_stops
        if sell and sell[0][0] <= -price:
            n = bisect_left(sell, (-price + 1,))
            fired += (self._stops.pop(oid) for _, _, oid in sell[:n])
            del sell[:n]
        fired.sort(key=lambda o: o.priority)
        return fired

    def _execute_triggered(self, o: _Order, seq: int, out: list[Event]) -> None:
        """A triggered stop acts as a market (stop, capped at its protection price if it has one) or limit
        (stop-limit) order that is already accepted, so the checks that reject a new order cancel this one
        instead."""
        if o.reduce_only and not self._cap_taker(o, seq, out):
            return
        crosses = (
            bool(self._ask_prices if o.is_buy else self._bid_prices)
            if o.price is None
            else self._would_cross(o.is_buy, o.price)
        )
        if not crosses:
            if o.price is None or o.order_type is _STOP:
                out.append(_canceled(seq, self.symbol, o.order_id, _MARKET_NO_LIQUIDITY, o.leaves))
            elif o.tif is _IOC:
                out.append(_canceled(seq, self.symbol, o.order_id, _IOC_REMAINDER, o.leaves))
            elif o.tif is _FOK:
                out.append(_canceled(seq, self.symbol, o.order_id, _C.FOK_UNFILLABLE, o.leaves))
            elif o.reduce_only:
                self._rest_reduce_only(o, seq, out)
            else:
                self._rest(o)
            return
        if o.tif is _FOK and not self._fok_fillable(o):
            out.append(_canceled(seq, self.symbol, o.order_id, _C.FOK_UNFILLABLE, o.leaves))
            return
        self._execute(o, seq, out)
