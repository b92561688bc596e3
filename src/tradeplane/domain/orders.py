"""Order vocabulary shared by the API, risk, the engine and the database, and the one order status table.

The enum values are lowercase strings because they are stored as-is in PostgreSQL columns guarded by CHECK
constraints; renaming a value is a migration.

An order's status changes only through ``ORDER_TRANSITIONS`` (via ``transition``): anything not in the table
is a bug and raises ``IllegalTransition`` rather than being silently written::

    pending_new ──▶ new ──▶ partially_filled ──▶ filled       (partially_filled ──▶ itself: more fills)
    new | partially_filled ──▶ pending_cancel ──▶ canceled
    any open status ──▶ canceled | expired;  new | partially_filled | pending_cancel ──▶ replaced
    pending_new ──▶ rejected                 (terminal: filled, canceled, rejected, expired, replaced)

``pending_new`` may jump straight to any engine outcome (the engine's first report for an order can already
be a fill or a cancel); ``pending_cancel`` may still fill (a fill raced the cancel) or fall back to the open
status it came from (the cancel was refused). An accepted order is never rejected afterwards, and a fill is
never undone (no way back from partially_filled to new).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType


class DomainError(Exception):
    """Base of the errors the pure domain raises; the service layer maps them onto the platform's tree."""


class IllegalTransition(DomainError):
    """An order status change that ``ORDER_TRANSITIONS`` does not allow: always a bug, never user input."""

    def __init__(self, current: OrderStatus, target: OrderStatus) -> None:
        super().__init__(f"illegal order status transition {current.value} -> {target.value}")
        self.current = current
        self.target = target


class Side(StrEnum):
    BUY = "buy"
    SELL = "sell"

    @property
    def opposite(self) -> Side:
        return Side.SELL if self is Side.BUY else Side.BUY


class OrderType(StrEnum):
    """``stop`` becomes a market order when triggered, ``stop_limit`` a limit order at its limit price."""

    MARKET = "market"
    LIMIT = "limit"
    STOP = "stop"
    STOP_LIMIT = "stop_limit"


#: Order types with a limit price of their own; a market or stop order's hold price is a protection price.
PRICED_TYPES: frozenset[OrderType] = frozenset({OrderType.LIMIT, OrderType.STOP_LIMIT})


class TimeInForce(StrEnum):
    """``day`` expires at the instrument's session close, ``gtd`` at the order's own ``expire_at``."""

    GTC = "gtc"
    IOC = "ioc"
    FOK = "fok"
    DAY = "day"
    GTD = "gtd"


class OrderStatus(StrEnum):
    PENDING_NEW = "pending_new"
    NEW = "new"
    PARTIALLY_FILLED = "partially_filled"
    FILLED = "filled"
    PENDING_CANCEL = "pending_cancel"
    CANCELED = "canceled"
    REJECTED = "rejected"
    EXPIRED = "expired"
    REPLACED = "replaced"


class SelfTradePrevention(StrEnum):
    """What happens when an incoming order would trade with a resting order of the same account.

    The incoming (taker) order's mode decides: ``cancel_newest`` cancels the incoming order's remainder,
    ``cancel_oldest`` cancels the resting order and keeps matching, ``cancel_both`` cancels both.
    """

    CANCEL_NEWEST = "cancel_newest"
    CANCEL_OLDEST = "cancel_oldest"
    CANCEL_BOTH = "cancel_both"


_S = OrderStatus
_TERMINAL: frozenset[OrderStatus] = frozenset()

ORDER_TRANSITIONS: Mapping[OrderStatus, frozenset[OrderStatus]] = MappingProxyType(
    {
        _S.PENDING_NEW: frozenset(
            {
                _S.NEW,
                _S.PARTIALLY_FILLED,
                _S.FILLED,
                _S.PENDING_CANCEL,
                _S.CANCELED,
                _S.REJECTED,
                _S.EXPIRED,
            }
        ),
        _S.NEW: frozenset({_S.PARTIALLY_FILLED, _S.FILLED, _S.PENDING_CANCEL, _S.CANCELED, _S.EXPIRED, _S.REPLACED}),
        # A partially filled order stays partially filled across further partial fills.
        _S.PARTIALLY_FILLED: frozenset(
            {_S.PARTIALLY_FILLED, _S.FILLED, _S.PENDING_CANCEL, _S.CANCELED, _S.EXPIRED, _S.REPLACED}
        ),
        _S.PENDING_CANCEL: frozenset({_S.NEW, _S.PARTIALLY_FILLED, _S.FILLED, _S.CANCELED, _S.EXPIRED, _S.REPLACED}),
        _S.FILLED: _TERMINAL,
        _S.CANCELED: _TERMINAL,
        _S.REJECTED: _TERMINAL,
        _S.EXPIRED: _TERMINAL,
        _S.REPLACED: _TERMINAL,
    }
)

TERMINAL_STATUSES: frozenset[OrderStatus] = frozenset(s for s, nxt in ORDER_TRANSITIONS.items() if not nxt)
OPEN_STATUSES: frozenset[OrderStatus] = frozenset({_S.PENDING_NEW, _S.NEW, _S.PARTIALLY_FILLED, _S.PENDING_CANCEL})


def can_transition(current: OrderStatus, target: OrderStatus) -> bool:
    return target in ORDER_TRANSITIONS[current]


def transition(current: OrderStatus, target: OrderStatus) -> OrderStatus:
    """Return ``target`` if ``current -> target`` is in the table, else raise ``IllegalTransition``."""
    if target not in ORDER_TRANSITIONS[current]:
        raise IllegalTransition(current, target)
    return target


def status_after_fill(filled_qty: int, leaves_qty: int) -> OrderStatus:
    """The status an open order reaches after a fill, from its cumulative filled and remaining quantity."""
    if leaves_qty == 0:
        return OrderStatus.FILLED
    return OrderStatus.PARTIALLY_FILLED if filled_qty > 0 else OrderStatus.NEW


@dataclass(frozen=True, slots=True)
class OrderState:
    """A snapshot of one open order as the engine holds it, in integer ticks and lots.

    This is what ``OrderBook.resting_orders()`` lists and what ``OrderBook.restore()`` takes back, so a book
    rebuilt from PostgreSQL's open orders equals the book that wrote them. ``priority`` orders resting orders
    in time: lower is older. ``qty`` is the order's total quantity, ``filled_qty`` what has traded, so the
    remaining (leaves) quantity is their difference. ``triggered`` is meaningful for stop and stop-limit
    orders only: an untriggered one waits in the stop book, a triggered stop-limit rests at ``price``.
    ``reduce_only``: the engine keeps the order within its account's position (see ``tradeplane.domain.book``).
    """

    order_id: int
    account_id: int
    side: Side
    order_type: OrderType
    qty: int
    filled_qty: int
    price: int | None
    stop_price: int | None
    time_in_force: TimeInForce
    expire_at_ns: int | None
    post_only: bool
    stp: SelfTradePrevention
    priority: int
    triggered: bool = False
    reduce_only: bool = False

    @property
    def leaves_qty(self) -> int:
        return self.qty - self.filled_qty
