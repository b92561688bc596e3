"""Pre-trade risk as pure functions: each rule refuses with its own reason, and a clean order is accepted."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, time, timedelta
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tradeplane.domain.orders import OrderType, Side, TimeInForce
from tradeplane.domain.risk import (
    DEFAULT_MAX_ORDERS_PER_SECOND,
    Acceptance,
    Exposure,
    InstrumentRules,
    MarketState,
    OrderTerms,
    RiskLimits,
    RiskReason,
    RiskRejection,
    assess,
    check_reduce_only,
    day_expiry,
    expiry_for,
    hold_price_for,
    price_band,
    shape_error,
)

NOW = datetime(2026, 11, 21, 15, 0, tzinfo=UTC)
D = Decimal

BTC = InstrumentRules(
    instrument_id=1,
    symbol="BTC-USD",
    base_asset="BTC",
    quote_asset="USD",
    quote_scale=2,
    tick_size=D("0.01"),
    lot_size=D("0.0001"),
    min_qty=D("0.0001"),
    max_qty=D("100"),
    price_band_pct=D("10"),
    maker_fee_rate=D("0.0002"),
    taker_fee_rate=D("0.0005"),
    margin_rate=D("0.10"),
    session_close_utc=None,
)
OPEN = MarketState(status="open", last_price=None, reference_price=D("65000"))
RICH = Exposure(account_kind="cash", free_quote=D("1000000"), free_base=D("10"), net_position=D("10"))


def limit(side: Side = Side.BUY, qty: str = "0.5", price: str = "65000", **kw: object) -> OrderTerms:
    return OrderTerms(side=side, order_type=OrderType.LIMIT, quantity=D(qty), price=D(price), **kw)  # type: ignore[arg-type]


def verdict(
    terms: OrderTerms,
    *,
    market: MarketState = OPEN,
    limits: RiskLimits = RiskLimits(),
    exposure: Exposure = RICH,
    rate: int = 1,
    rules: InstrumentRules = BTC,
) -> Acceptance | RiskRejection:
    assert shape_error(terms, NOW) is None
    return assess(terms, rules, market, limits, exposure, orders_this_second=rate)


def reason(result: Acceptance | RiskRejection) -> RiskReason:
    assert isinstance(result, RiskRejection), result
    return result.reason


# ----------------------------------------------------------------------------------------------- shape


@pytest.mark.parametrize(
    ("terms", "message"),
    [
        (OrderTerms(Side.BUY, OrderType.MARKET, D("1"), price=D("1")), "takes no price"),
        (OrderTerms(Side.BUY, OrderType.LIMIT, D("1")), "needs a price"),
        (OrderTerms(Side.BUY, OrderType.LIMIT, D("0"), price=D("1")), "quantity"),
        (OrderTerms(Side.BUY, OrderType.LIMIT, D("1"), price=D("-1")), "price must be positive"),
        (OrderTerms(Side.BUY, OrderType.STOP, D("1")), "needs a stop_price"),
        (OrderTerms(Side.BUY, OrderType.LIMIT, D("1"), price=D("1"), stop_price=D("1")), "takes no stop_price"),
        (OrderTerms(Side.BUY, OrderType.MARKET, D("1"), post_only=True), "post_only"),
        (
            OrderTerms(Side.BUY, OrderType.LIMIT, D("1"), price=D("1"), time_in_force=TimeInForce.IOC, post_only=True),
            "post_only",
        ),
        (OrderTerms(Side.BUY, OrderType.LIMIT, D("1"), price=D("1"), time_in_force=TimeInForce.GTD), "needs expire_at"),
        (
            OrderTerms(Side.BUY, OrderType.LIMIT, D("1"), price=D("1"), time_in_force=TimeInForce.GTD, expire_at=NOW),
            "future",
        ),
        (
            OrderTerms(Side.BUY, OrderType.LIMIT, D("1"), price=D("1"), time_in_force=TimeInForce.DAY, expire_at=NOW),
            "only for GTD",
        ),
    ],
)
def test_malformed_requests_are_refused_before_risk(terms: OrderTerms, message: str) -> None:
    problem = shape_error(terms, NOW)
    assert problem is not None and message.split()[0] in problem


def test_a_gtd_order_expiring_in_the_future_is_well_formed() -> None:
    terms = limit(time_in_force=TimeInForce.GTD, expire_at=NOW + timedelta(minutes=1))
    assert shape_error(terms, NOW) is None
    assert expiry_for(terms, BTC, NOW) == NOW + timedelta(minutes=1)


def test_day_orders_expire_at_the_next_session_close_or_the_end_of_the_utc_day() -> None:
    assert day_expiry(NOW, time(20, 0)) == datetime(2026, 11, 21, 20, 0, tzinfo=UTC)
    assert day_expiry(NOW, time(9, 30)) == datetime(2026, 11, 22, 9, 30, tzinfo=UTC)  # today's close has passed
    assert day_expiry(NOW, time(15, 0)) == datetime(2026, 11, 22, 15, 0, tzinfo=UTC)  # closing right now: tomorrow
    assert day_expiry(NOW, None) == datetime(2026, 11, 22, 0, 0, tzinfo=UTC)
    assert expiry_for(limit(time_in_force=TimeInForce.DAY), BTC, NOW) == datetime(2026, 11, 22, tzinfo=UTC)
    assert expiry_for(limit(), BTC, NOW) is None


# ---------------------------------------------------------------------------------------- market rules


def test_a_clean_limit_buy_is_accepted_with_its_cash_reservation() -> None:
    result = verdict(limit())
    assert isinstance(result, Acceptance)
    assert result.hold_price == D("65000")
    assert (result.reservation.asset, result.reservation.amount) == ("USD", D("32516.25"))  # 32500 * 1.0005


def test_instrument_not_open_and_account_not_active() -> None:
    assert reason(verdict(limit(), market=replace(OPEN, status="halted"))) is RiskReason.INSTRUMENT_NOT_OPEN
    terms = limit()
    result = assess(terms, BTC, OPEN, RiskLimits(), RICH, orders_this_second=1, account_active=False)
    assert reason(result) is RiskReason.ACCOUNT_NOT_ACTIVE


@pytest.mark.parametrize(
    ("terms", "expected"),
    [
        (limit(price="65000.005"), RiskReason.PRICE_NOT_ON_TICK),
        (limit(qty="0.00015"), RiskReason.QUANTITY_NOT_ON_LOT),
        (limit(qty="100.0001"), RiskReason.QUANTITY_ABOVE_MAX),
        (
            OrderTerms(Side.BUY, OrderType.STOP, D("1"), stop_price=D("65000.001")),
            RiskReason.STOP_PRICE_NOT_ON_TICK,
        ),
    ],
)
def test_grid_rules(terms: OrderTerms, expected: RiskReason) -> None:
    assert reason(verdict(terms)) is expected


def test_quantity_below_the_minimum() -> None:
    rules = replace(BTC, min_qty=D("0.01"))
    assert reason(verdict(limit(qty="0.0099"), rules=rules)) is RiskReason.QUANTITY_BELOW_MIN
    assert isinstance(verdict(limit(qty="0.01"), rules=rules), Acceptance)


def test_price_band_is_inclusive_and_centred_on_the_last_price_when_there_is_one() -> None:
    assert price_band(BTC, D("65000")) == (D("58500.00"), D("71500.00"))
    assert isinstance(verdict(limit(price="71500")), Acceptance)
    assert reason(verdict(limit(price="71500.01"))) is RiskReason.PRICE_OUTSIDE_BAND
    assert reason(verdict(limit(price="58499.99"))) is RiskReason.PRICE_OUTSIDE_BAND
    traded = replace(OPEN, last_price=D("70000"))
    assert isinstance(verdict(limit(price="76000"), market=traded), Acceptance)  # 77000 is the new ceiling
    assert reason(verdict(limit(price="58500"), market=traded)) is RiskReason.PRICE_OUTSIDE_BAND


def test_band_edges_snap_inward_to_the_tick_grid() -> None:
    low, high = price_band(BTC, D("100.05"))  # +-10.005
    assert (low, high) == (D("90.05"), D("110.05"))
    assert low % BTC.tick_size == 0 and high % BTC.tick_size == 0


def test_without_any_price_a_limit_sets_the_market_but_a_market_order_is_refused() -> None:
    blank = MarketState(status="open", last_price=None, reference_price=None)
    assert isinstance(verdict(limit(price="1.00"), market=blank), Acceptance)
    market = OrderTerms(Side.BUY, OrderType.MARKET, D("1"))
    assert reason(verdict(market, market=blank)) is RiskReason.NO_REFERENCE_PRICE


def test_market_and_stop_orders_hold_at_the_worst_price_of_the_band() -> None:
    buy = OrderTerms(Side.BUY, OrderType.MARKET, D("1"))
    sell = OrderTerms(Side.SELL, OrderType.MARKET, D("1"))
    assert hold_price_for(buy, BTC, OPEN) == D("71500.00")
    assert hold_price_for(sell, BTC, OPEN) == D("58500.00")
    stop = OrderTerms(Side.BUY, OrderType.STOP, D("1"), stop_price=D("70000"))
    assert hold_price_for(stop, BTC, OPEN) == D("77000.00")
    result = verdict(buy)
    assert isinstance(result, Acceptance) and result.reservation.amount == D("71535.75")


def test_a_stop_already_through_the_market_holds_around_the_market_not_its_stop() -> None:
    """It triggers on arrival and trades where the market is (65,000), not around a stop price of 50,000."""
    buy = OrderTerms(Side.BUY, OrderType.STOP, D("1"), stop_price=D("50000"))
    sell = OrderTerms(Side.SELL, OrderType.STOP, D("1"), stop_price=D("80000"))
    assert hold_price_for(buy, BTC, OPEN) == D("71500.00")
    assert hold_price_for(sell, BTC, OPEN) == D("58500.00")
    no_market = MarketState(status="open", last_price=None, reference_price=None)
    assert hold_price_for(buy, BTC, no_market) == D("55000.00")


# ---------------------------------------------------------------------------------------------- limits


def test_max_order_quantity_and_notional() -> None:
    assert reason(verdict(limit(qty="2"), limits=RiskLimits(max_order_qty=D("1")))) is (
        RiskReason.MAX_ORDER_QTY_EXCEEDED
    )
    assert isinstance(verdict(limit(qty="1"), limits=RiskLimits(max_order_qty=D("1"))), Acceptance)
    capped = RiskLimits(max_order_notional=D("65000"))
    assert isinstance(verdict(limit(qty="1"), limits=capped), Acceptance)
    assert reason(verdict(limit(qty="1.0001"), limits=capped)) is RiskReason.MAX_ORDER_NOTIONAL_EXCEEDED


def test_max_position_counts_the_worst_case_of_all_open_orders_on_the_same_side() -> None:
    exposure = replace(RICH, net_position=D("3"), open_buy_leaves=D("1"), open_sell_leaves=D("5"))
    limits = RiskLimits(max_position=D("5"))
    assert isinstance(verdict(limit(qty="1"), limits=limits, exposure=exposure), Acceptance)  # 3 + 1 + 1
    result = verdict(limit(qty="1.0001"), limits=limits, exposure=exposure)
    assert reason(result) is RiskReason.MAX_POSITION_EXCEEDED
    # selling: 3 - 5 open - 3 = -5 is allowed, one lot more is not
    assert isinstance(verdict(limit(Side.SELL, qty="3"), limits=limits, exposure=exposure), Acceptance)
    assert reason(verdict(limit(Side.SELL, qty="3.0001"), limits=limits, exposure=exposure)) is (
        RiskReason.MAX_POSITION_EXCEEDED
    )


def test_max_open_orders() -> None:
    limits = RiskLimits(max_open_orders=3)
    assert isinstance(verdict(limit(), limits=limits, exposure=replace(RICH, open_orders=2)), Acceptance)
    assert reason(verdict(limit(), limits=limits, exposure=replace(RICH, open_orders=3))) is (
        RiskReason.MAX_OPEN_ORDERS_EXCEEDED
    )


def test_order_rate_defaults_to_fifty_per_second() -> None:
    assert isinstance(verdict(limit(), rate=DEFAULT_MAX_ORDERS_PER_SECOND), Acceptance)
    assert reason(verdict(limit(), rate=DEFAULT_MAX_ORDERS_PER_SECOND + 1)) is RiskReason.RATE_LIMITED
    assert reason(verdict(limit(), rate=3, limits=RiskLimits(max_orders_per_second=2))) is RiskReason.RATE_LIMITED


# ------------------------------------------------------------------------------------ funds and reduce


def test_cash_buy_needs_free_cash_for_notional_and_worst_fee() -> None:
    exact = replace(RICH, free_quote=D("32516.25"))
    assert isinstance(verdict(limit(), exposure=exact), Acceptance)
    short = replace(RICH, free_quote=D("32516.24"))
    assert reason(verdict(limit(), exposure=short)) is RiskReason.INSUFFICIENT_FUNDS


def test_cash_sell_needs_free_position() -> None:
    exposure = replace(RICH, net_position=D("1"), free_base=D("0.5"))
    assert isinstance(verdict(limit(Side.SELL, qty="0.5"), exposure=exposure), Acceptance)
    assert reason(verdict(limit(Side.SELL, qty="0.5001"), exposure=exposure)) is RiskReason.INSUFFICIENT_POSITION


def test_margin_account_may_sell_short_within_margin() -> None:
    margin = Exposure(account_kind="margin", free_quote=D("6532.50"))  # 1 * 65000 * (0.10 + 0.0005), no position
    result = verdict(limit(Side.SELL, qty="1"), exposure=margin)
    assert isinstance(result, Acceptance)
    assert (result.reservation.asset, result.reservation.amount) == ("USD", D("6532.50"))
    assert reason(verdict(limit(Side.SELL, qty="1"), exposure=replace(margin, free_quote=D("6532.49")))) is (
        RiskReason.INSUFFICIENT_FUNDS
    )


def test_reduce_only_may_only_shrink_the_position_counting_every_open_order_on_its_side() -> None:
    long3 = replace(RICH, net_position=D("3"), free_base=D("3"))
    assert isinstance(verdict(limit(Side.SELL, qty="3", reduce_only=True), exposure=long3), Acceptance)
    assert reason(verdict(limit(Side.SELL, qty="3.0001", reduce_only=True), exposure=long3)) is (
        RiskReason.REDUCE_ONLY_WOULD_INCREASE
    )
    assert reason(verdict(limit(Side.BUY, qty="1", reduce_only=True), exposure=long3)) is (
        RiskReason.REDUCE_ONLY_WOULD_INCREASE
    )
    pending = replace(long3, open_sell_leaves=D("2"))  # reduce-only or not: either may fill first
    assert reason(verdict(limit(Side.SELL, qty="1.0001", reduce_only=True), exposure=pending)) is (
        RiskReason.REDUCE_ONLY_WOULD_INCREASE
    )
    assert isinstance(verdict(limit(Side.SELL, qty="1", reduce_only=True), exposure=pending), Acceptance)
    flat = replace(RICH, net_position=D("0"))
    assert check_reduce_only(Side.SELL, D("1"), flat) is not None
    short2 = Exposure(account_kind="margin", net_position=D("-2"), free_quote=D("1000000"))
    assert isinstance(verdict(limit(Side.BUY, qty="2", reduce_only=True), exposure=short2), Acceptance)


def test_a_margin_reduce_only_order_needs_the_fee_but_no_margin() -> None:
    """Closing a leveraged long: the free funds (equity - margin in use) no longer cover fresh initial margin."""
    long1 = Exposure(account_kind="margin", net_position=D("1"), free_quote=D("100"))
    plain = verdict(limit(Side.SELL, qty="1"), exposure=long1)  # 65000 * (0.10 + 0.0005) = 6532.50
    assert reason(plain) is RiskReason.INSUFFICIENT_FUNDS
    closing = verdict(limit(Side.SELL, qty="1", reduce_only=True), exposure=long1)
    assert isinstance(closing, Acceptance) and closing.reservation.amount == D("32.50")  # 65000 * 0.0005
    assert reason(
        verdict(limit(Side.SELL, qty="1", reduce_only=True), exposure=replace(long1, free_quote=D("32.49")))
    ) is (RiskReason.INSUFFICIENT_FUNDS)


def test_the_first_failing_rule_decides_the_reason() -> None:
    # off tick, over the band and unaffordable: the grid is checked first
    poor = replace(RICH, free_quote=D("0"))
    assert reason(verdict(limit(price="99999.999"), exposure=poor)) is RiskReason.PRICE_NOT_ON_TICK
    assert reason(verdict(limit(price="99999.99"), exposure=poor)) is RiskReason.PRICE_OUTSIDE_BAND
    assert reason(verdict(limit(), exposure=poor)) is RiskReason.INSUFFICIENT_FUNDS


@given(
    st.decimals(min_value=D("0.0001"), max_value=D("100"), places=4),
    st.decimals(min_value=D("58500"), max_value=D("71500"), places=2),
    st.decimals(min_value=D("0"), max_value=D("10000000"), places=2),
)
def test_an_accepted_cash_buy_never_reserves_more_than_the_free_cash(qty: D, price: D, free: D) -> None:
    terms = limit(qty=str(qty), price=str(price))
    result = verdict(terms, exposure=replace(RICH, free_quote=free))
    if isinstance(result, Acceptance):
        assert result.reservation.amount <= free
        assert result.reservation.amount >= qty * price
    else:
        assert result.reason is RiskReason.INSUFFICIENT_FUNDS
        assert qty * price * (1 + BTC.taker_fee_rate) > free
