"""Pre-trade risk as pure functions: an order's terms against an instrument's rules and an account's exposure.

A denial is a value (``RiskRejection`` with a machine-readable ``RiskReason``), never an exception: the order
path stores the rejected order for audit and answers 422 with the reason. ``assess`` runs every check in a
fixed order, so the first failing rule decides the reason and the same inputs always give the same answer.

Two kinds of refusal are kept apart on purpose:

- ``shape_error`` finds requests that are malformed whatever the market does (a market order with a price,
  post-only on a market order, GTD without a future ``expire_at``): HTTP 422 ``validation_error``, nothing
  stored, because there is no order to audit;
- ``assess`` finds orders that are well formed but may not trade now (off the tick grid, outside the band,
  over a limit, not enough free cash): a rejected order row with the reason.

The checks are exactly the ones the matching engine would otherwise refuse, so an order the api acknowledges
is one the engine accepts (up to races such as an expiry passing in flight).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from decimal import ROUND_CEILING, ROUND_FLOOR, Context, Decimal
from enum import StrEnum

from tradeplane.domain.orders import PRICED_TYPES, OrderType, SelfTradePrevention, Side, TimeInForce
from tradeplane.domain.reservations import Reservation, reservation

DEFAULT_MAX_ORDERS_PER_SECOND = 50
"""Order rate allowed per account when no risk_limits row sets ``max_orders_per_second``."""

_HUNDRED = Decimal(100)
_PRICED = PRICED_TYPES
_STOPPED = frozenset({OrderType.STOP, OrderType.STOP_LIMIT})
_EXPIRING = frozenset({TimeInForce.DAY, TimeInForce.GTD})
# Prices and quantities are stored in NUMERIC(38, 18): below 10**20, at most 18 decimals. Arithmetic on values
# that size needs more than the default context's 28 digits to stay exact.
COLUMN_LIMIT = Decimal(10) ** 20
COLUMN_QUANTUM = Decimal(1).scaleb(-18)
_WIDE = Context(prec=80)


class RiskReason(StrEnum):
    """Why pre-trade risk refused an order. Values are stored in ``orders.reject_reason`` and sent to clients."""

    UNKNOWN_INSTRUMENT = "unknown_instrument"
    INSTRUMENT_NOT_OPEN = "instrument_not_open"
    ACCOUNT_NOT_ACTIVE = "account_not_active"
    RATE_LIMITED = "rate_limited"
    PRICE_NOT_ON_TICK = "price_not_on_tick"
    STOP_PRICE_NOT_ON_TICK = "stop_price_not_on_tick"
    QUANTITY_NOT_ON_LOT = "quantity_not_on_lot"
    QUANTITY_BELOW_MIN = "quantity_below_min"
    QUANTITY_ABOVE_MAX = "quantity_above_max"
    NO_REFERENCE_PRICE = "no_reference_price"
    PRICE_OUTSIDE_BAND = "price_outside_band"
    MAX_ORDER_QTY_EXCEEDED = "max_order_qty_exceeded"
    MAX_ORDER_NOTIONAL_EXCEEDED = "max_order_notional_exceeded"
    MAX_POSITION_EXCEEDED = "max_position_exceeded"
    MAX_OPEN_ORDERS_EXCEEDED = "max_open_orders_exceeded"
    REDUCE_ONLY_WOULD_INCREASE = "reduce_only_would_increase"
    INSUFFICIENT_FUNDS = "insufficient_funds"
    INSUFFICIENT_POSITION = "insufficient_position"


@dataclass(frozen=True, slots=True)
class RiskRejection:
    reason: RiskReason
    detail: str


@dataclass(frozen=True, slots=True)
class OrderTerms:
    """What a client asks for, already parsed. Two requests with equal terms are the same order (idempotency).

    For DAY orders ``expire_at`` is what the client sent (None); the session close is filled in separately,
    so a retry later in the day still has equal terms.
    """

    side: Side
    order_type: OrderType
    quantity: Decimal
    price: Decimal | None = None
    stop_price: Decimal | None = None
    time_in_force: TimeInForce = TimeInForce.GTC
    expire_at: datetime | None = None
    post_only: bool = False
    reduce_only: bool = False
    stp: SelfTradePrevention | None = None  # None: the account's default (accounts.stp_mode)


@dataclass(frozen=True, slots=True)
class InstrumentRules:
    """The static part of an instrument: its grid, limits, fees and margin. Safe to cache in process."""

    instrument_id: int
    symbol: str
    base_asset: str
    quote_asset: str
    quote_scale: int
    tick_size: Decimal
    lot_size: Decimal
    min_qty: Decimal
    max_qty: Decimal
    price_band_pct: Decimal
    maker_fee_rate: Decimal
    taker_fee_rate: Decimal
    margin_rate: Decimal
    session_close_utc: time | None


@dataclass(frozen=True, slots=True)
class MarketState:
    """The live part of an instrument, read in the order's transaction (a halt applies at once)."""

    status: str
    last_price: Decimal | None
    reference_price: Decimal | None

    @property
    def band_centre(self) -> Decimal | None:
        """The band is centred on the last trade price, or the reference price before the first trade."""
        return self.last_price if self.last_price is not None else self.reference_price


@dataclass(frozen=True, slots=True)
class RiskLimits:
    """The effective per account and instrument limits; None means no limit."""

    max_order_qty: Decimal | None = None
    max_order_notional: Decimal | None = None
    max_position: Decimal | None = None
    max_open_orders: int | None = None
    max_orders_per_second: int | None = None

    @property
    def orders_per_second(self) -> int:
        return self.max_orders_per_second or DEFAULT_MAX_ORDERS_PER_SECOND


@dataclass(frozen=True, slots=True)
class Exposure:
    """An account's state in one instrument, read after the account row is locked.

    ``free_quote`` = balance in the quote asset - active holds in it, and for a margin account plus what its
    positions in instruments quoted in that asset are worth at the mark less the initial margin they need
    (equity - margin in use - holds: a margin buy debits the whole notional from the balance, the position
    gives it back); ``free_base`` = position net quantity - active holds in the base asset (what a cash
    account may still sell). The leaves sums cover open orders.
    """

    account_kind: str
    net_position: Decimal = Decimal(0)
    open_orders: int = 0
    open_buy_leaves: Decimal = Decimal(0)
    open_sell_leaves: Decimal = Decimal(0)
    free_quote: Decimal = Decimal(0)
    free_base: Decimal = Decimal(0)


@dataclass(frozen=True, slots=True)
class Acceptance:
    """An order risk accepted: the price its hold is computed at and what it reserves."""

    hold_price: Decimal
    reservation: Reservation


def storable(value: Decimal) -> bool:
    """Whether the NUMERIC(38, 18) columns hold ``value`` exactly: finite, below 10**20 and at most 18 decimals
    (trailing zeros aside). Anything else would overflow the column or be rounded by PostgreSQL.

    ``copy_abs``, not ``abs``: abs rounds to the context, and a client's 1E+1000000 would raise Overflow."""
    if not value.is_finite() or value.copy_abs() >= COLUMN_LIMIT:
        return False
    return value.quantize(COLUMN_QUANTUM, context=_WIDE) == value


def shape_error(terms: OrderTerms, now: datetime) -> str | None:
    """Why the request is malformed regardless of market state, or None. Mirrors the engine's own checks."""
    t = terms
    if not t.quantity.is_finite() or t.quantity <= 0:
        return "quantity must be a positive number"
    for name, value in (("quantity", t.quantity), ("price", t.price), ("stop_price", t.stop_price)):
        if value is not None and value.is_finite() and not storable(value):
            return f"{name} must be below 10^20 with at most 18 decimals"
    if t.order_type in _PRICED:
        if t.price is None:
            return f"a {t.order_type.value} order needs a price"
    elif t.price is not None:
        return f"a {t.order_type.value} order takes no price"
    if t.price is not None and (not t.price.is_finite() or t.price <= 0):
        return "price must be a positive number"
    if t.order_type in _STOPPED:
        if t.stop_price is None:
            return f"a {t.order_type.value} order needs a stop_price"
        if not t.stop_price.is_finite() or t.stop_price <= 0:
            return "stop_price must be a positive number"
    elif t.stop_price is not None:
        return f"a {t.order_type.value} order takes no stop_price"
    if t.post_only and (t.order_type is not OrderType.LIMIT or t.time_in_force in (TimeInForce.IOC, TimeInForce.FOK)):
        return "post_only applies to resting limit orders only (not market, stop, IOC or FOK)"
    if t.time_in_force is TimeInForce.GTD:
        if t.expire_at is None:
            return "a GTD order needs expire_at"
        if t.expire_at.tzinfo is None:
            return "expire_at must carry a timezone"
        if t.expire_at <= now:
            return "expire_at must be in the future"
    elif t.expire_at is not None:
        return f"expire_at is only for GTD orders ({t.time_in_force.value} orders take none)"
    return None


def day_expiry(now: datetime, session_close_utc: time | None) -> datetime:
    """When a DAY order placed at ``now`` expires: today's session close, or tomorrow's if it has passed.

    Without a session close the order lives to the end of the UTC day.
    """
    now = now.astimezone(UTC)
    if session_close_utc is None:
        return datetime.combine(now.date() + timedelta(days=1), time(0), tzinfo=UTC)
    close = datetime.combine(now.date(), session_close_utc.replace(tzinfo=None), tzinfo=UTC)
    return close if close > now else close + timedelta(days=1)


def expiry_for(terms: OrderTerms, rules: InstrumentRules, now: datetime) -> datetime | None:
    """The expiry the engine enforces: the session close for DAY, the client's time for GTD, else None."""
    if terms.time_in_force is TimeInForce.DAY:
        return day_expiry(now, rules.session_close_utc)
    return terms.expire_at if terms.time_in_force in _EXPIRING else None


def on_grid(value: Decimal, unit: Decimal) -> bool:
    return _WIDE.remainder(value, unit) == 0


def check_grid(
    rules: InstrumentRules, quantity: Decimal, price: Decimal | None, stop_price: Decimal | None = None
) -> RiskRejection | None:
    """Price and stop price on the tick size; quantity on the lot size and within [min_qty, max_qty]."""
    if price is not None and not on_grid(price, rules.tick_size):
        return RiskRejection(RiskReason.PRICE_NOT_ON_TICK, f"price {price} is not a multiple of {rules.tick_size}")
    if stop_price is not None and not on_grid(stop_price, rules.tick_size):
        return RiskRejection(
            RiskReason.STOP_PRICE_NOT_ON_TICK, f"stop_price {stop_price} is not a multiple of {rules.tick_size}"
        )
    if not on_grid(quantity, rules.lot_size):
        return RiskRejection(
            RiskReason.QUANTITY_NOT_ON_LOT, f"quantity {quantity} is not a multiple of {rules.lot_size}"
        )
    if quantity < rules.min_qty:
        return RiskRejection(RiskReason.QUANTITY_BELOW_MIN, f"quantity {quantity} is below {rules.min_qty}")
    if quantity > rules.max_qty:
        return RiskRejection(RiskReason.QUANTITY_ABOVE_MAX, f"quantity {quantity} is above {rules.max_qty}")
    return None


def price_band(rules: InstrumentRules, centre: Decimal) -> tuple[Decimal, Decimal]:
    """The inclusive [low, high] prices allowed around ``centre``, snapped inward onto the tick grid."""
    width = centre * rules.price_band_pct / _HUNDRED
    tick = rules.tick_size
    low = ((centre - width) / tick).to_integral_value(rounding=ROUND_CEILING) * tick
    high = ((centre + width) / tick).to_integral_value(rounding=ROUND_FLOOR) * tick
    return max(low, tick), high


def check_band(rules: InstrumentRules, market: MarketState, price: Decimal) -> RiskRejection | None:
    centre = market.band_centre
    if centre is None:
        return None  # nothing to anchor a band to yet: the first limit price sets the market
    low, high = price_band(rules, centre)
    if not low <= price <= high:
        return RiskRejection(
            RiskReason.PRICE_OUTSIDE_BAND,
            f"price {price} is outside the {rules.price_band_pct}% band [{low}, {high}] around {centre}",
        )
    return None


def hold_price_for(terms: OrderTerms, rules: InstrumentRules, market: MarketState) -> Decimal | None:
    """The price an order's hold is computed at: its limit price, else the worst price the band allows.

    A market order may trade anywhere in the band around the current centre; a stop order (market once
    triggered) anywhere in the band around its stop price, or around the current centre when the market is
    already past the stop (the stop then triggers on arrival and trades where the market is). The engine
    caps a market or stop order's fills at this price. None when a market order has no centre at all.
    """
    if terms.order_type in _PRICED:
        return terms.price
    centre = market.band_centre
    if terms.order_type is OrderType.STOP and terms.stop_price is not None:
        if centre is None:
            centre = terms.stop_price
        else:
            centre = max(centre, terms.stop_price) if terms.side is Side.BUY else min(centre, terms.stop_price)
    if centre is None:
        return None
    low, high = price_band(rules, centre)
    return high if terms.side is Side.BUY else low


def check_limits(
    limits: RiskLimits,
    exposure: Exposure,
    side: Side,
    quantity: Decimal,
    notional: Decimal,
    *,
    position_quantity: Decimal | None = None,
    new_order: bool = True,
) -> RiskRejection | None:
    """Max order quantity and notional, max position after every open order on this side fills, open orders.

    ``position_quantity`` is what the order may still add to the position (default ``quantity``; a modify
    passes its new leaves). ``new_order`` is False for a modify, which changes an order already counted among
    the open ones (and whose old leaves the caller has already taken out of the exposure).
    """
    adds = quantity if position_quantity is None else position_quantity
    if limits.max_order_qty is not None and quantity > limits.max_order_qty:
        return RiskRejection(
            RiskReason.MAX_ORDER_QTY_EXCEEDED, f"quantity {quantity} exceeds the limit {limits.max_order_qty}"
        )
    if limits.max_order_notional is not None and notional > limits.max_order_notional:
        return RiskRejection(
            RiskReason.MAX_ORDER_NOTIONAL_EXCEEDED,
            f"notional {notional} exceeds the limit {limits.max_order_notional}",
        )
    if limits.max_position is not None:
        if side is Side.BUY:
            worst = exposure.net_position + exposure.open_buy_leaves + adds
        else:
            worst = exposure.net_position - exposure.open_sell_leaves - adds
        if abs(worst) > limits.max_position:
            return RiskRejection(
                RiskReason.MAX_POSITION_EXCEEDED,
                f"position could reach {worst}, beyond the limit {limits.max_position}",
            )
    if new_order and limits.max_open_orders is not None and exposure.open_orders >= limits.max_open_orders:
        return RiskRejection(
            RiskReason.MAX_OPEN_ORDERS_EXCEEDED,
            f"already {exposure.open_orders} open orders (limit {limits.max_open_orders})",
        )
    return None


def check_reduce_only(side: Side, quantity: Decimal, exposure: Exposure) -> RiskRejection | None:
    """A reduce-only order, with every order already open on its side, may not exceed |position|: whichever
    of them fills first, the position cannot cross zero through it. (An ordinary order placed later on the
    same side is not held back by a reduce-only one; if it fills first, the reduce-only one can still cross.)
    """
    net = exposure.net_position
    if side is Side.SELL:
        room, pending = net, exposure.open_sell_leaves
    else:
        room, pending = -net, exposure.open_buy_leaves
    if room <= 0 or pending + quantity > room:
        return RiskRejection(
            RiskReason.REDUCE_ONLY_WOULD_INCREASE,
            f"a reduce-only {side.value} of {quantity} (with {pending} already pending) would not only shrink "
            f"the position {net}",
        )
    return None


def reserve(
    side: Side,
    quantity: Decimal,
    hold_price: Decimal,
    rules: InstrumentRules,
    account_kind: str,
    *,
    reduce_only: bool = False,
) -> Reservation:
    return reservation(
        side=side,
        account_kind=account_kind,
        leaves_qty=quantity,
        hold_price=hold_price,
        maker_fee_rate=rules.maker_fee_rate,
        taker_fee_rate=rules.taker_fee_rate,
        margin_rate=rules.margin_rate,
        base_asset=rules.base_asset,
        quote_asset=rules.quote_asset,
        quote_scale=rules.quote_scale,
        reduce_only=reduce_only,
    )


def check_funds(needed: Reservation, rules: InstrumentRules, exposure: Exposure) -> RiskRejection | None:
    """Free quote cash covers a quote reservation; free position covers a cash account's sell."""
    if needed.asset == rules.quote_asset:
        if needed.amount > exposure.free_quote:
            return RiskRejection(
                RiskReason.INSUFFICIENT_FUNDS,
                f"needs {needed.amount} {needed.asset} free, has {exposure.free_quote}",
            )
    elif needed.amount > exposure.free_base:
        return RiskRejection(
            RiskReason.INSUFFICIENT_POSITION,
            f"needs {needed.amount} {needed.asset} free to sell, has {exposure.free_base}",
        )
    return None


def assess(
    terms: OrderTerms,
    rules: InstrumentRules,
    market: MarketState,
    limits: RiskLimits,
    exposure: Exposure,
    *,
    orders_this_second: int,
    account_active: bool = True,
) -> Acceptance | RiskRejection:
    """Every pre-trade check, in order; the first failure is the answer. ``terms`` must pass ``shape_error``.

    ``orders_this_second`` is the account's order count in the current one-second window, this order
    included (the shared Redis counter).
    """
    if not account_active:
        return RiskRejection(RiskReason.ACCOUNT_NOT_ACTIVE, "the account is not active")
    if market.status != "open":
        return RiskRejection(RiskReason.INSTRUMENT_NOT_OPEN, f"{rules.symbol} is {market.status}")
    if orders_this_second > limits.orders_per_second:
        return RiskRejection(
            RiskReason.RATE_LIMITED, f"more than {limits.orders_per_second} orders in one second for this account"
        )
    rejection = check_grid(rules, terms.quantity, terms.price, terms.stop_price)
    if rejection is None and terms.price is not None:
        rejection = check_band(rules, market, terms.price)
    if rejection is not None:
        return rejection
    hold_price = hold_price_for(terms, rules, market)
    if hold_price is None:
        return RiskRejection(
            RiskReason.NO_REFERENCE_PRICE, f"{rules.symbol} has no last or reference price to bound a market order"
        )
    rejection = check_limits(limits, exposure, terms.side, terms.quantity, terms.quantity * hold_price)
    if rejection is None and terms.reduce_only:
        rejection = check_reduce_only(terms.side, terms.quantity, exposure)
    if rejection is not None:
        return rejection
    needed = reserve(
        terms.side, terms.quantity, hold_price, rules, exposure.account_kind, reduce_only=terms.reduce_only
    )
    rejection = check_funds(needed, rules, exposure)
    if rejection is not None:
        return rejection
    return Acceptance(hold_price=hold_price, reservation=needed)
