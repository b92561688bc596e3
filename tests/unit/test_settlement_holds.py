"""The hold settlement gives a touched order: what its terms need, and while client modifies are in flight at
least what their target needs, as the api reserved it when it checked the funds."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal as D

from tradeplane.domain.matching import InstrumentSpec
from tradeplane.domain.orders import OrderStatus, OrderType, Side
from tradeplane.domain.reservations import modify_hold_price
from tradeplane.services.settlement import InstrumentInfo, OrderRow, hold_amount

INFO = InstrumentInfo(
    instrument_id=1,
    symbol="BTC-USD",
    spec=InstrumentSpec("BTC-USD", D("0.01"), D("0.0001")),
    base_asset="BTC",
    quote_asset="USD",
    quote_scale=2,
    maker_fee_rate=D("0.0002"),
    taker_fee_rate=D("0.0005"),
    margin_rate=D("0.10"),
    last_price=None,
)

#: BUY 10 at 100 on a cash account, 2 filled: 8 left, 800.40 held (fees: the worst, 5 bp).
BID = OrderRow(
    order_id=1,
    account_id=1,
    user_id=1,
    account_kind="cash",
    instrument_id=1,
    symbol="BTC-USD",
    client_order_id=None,
    side=Side.BUY,
    order_type=OrderType.LIMIT,
    time_in_force="gtc",
    quantity=D(10),
    price=D("100"),
    stop_price=None,
    expire_at=None,
    post_only=False,
    reduce_only=False,
    stp_mode="cancel_newest",
    status=OrderStatus.PARTIALLY_FILLED,
    filled_quantity=D(2),
    average_fill_price=D("100"),
    reject_reason=None,
    sequence=1,
    hold_price=D("100"),
    created_at=datetime(2026, 3, 2, tzinfo=UTC),
)


def in_flight(row: OrderRow, quantity: str | None = None, price: str | None = None) -> OrderRow:
    """``row`` with one client modify sent and not yet processed, headed for ``quantity`` / ``price``."""
    return replace(
        row,
        modifies_requested=row.modifies_done + 1,
        target_quantity=None if quantity is None else D(quantity),
        target_price=None if price is None else D(price),
    )


def test_with_no_modify_in_flight_the_hold_is_what_the_leaves_reserve() -> None:
    assert hold_amount(BID, INFO) == D("800.40")
    # a target left behind by processed modifies is not a reservation any more
    assert hold_amount(replace(BID, modifies_requested=3, modifies_done=3, target_quantity=D(20)), INFO) == D("800.40")


def test_a_quantity_rise_in_flight_keeps_the_target_reserved_after_a_fill() -> None:
    assert hold_amount(in_flight(BID, quantity="20"), INFO) == D("1800.90")  # 18 left of 20, not 8 of 10


def test_a_price_rise_in_flight_is_reserved_at_the_target_price() -> None:
    # the api raised the hold price with the target; a refused earlier modify may have put it back to the limit
    assert hold_amount(in_flight(replace(BID, hold_price=D("110")), price="110"), INFO) == D("880.44")
    assert hold_amount(in_flight(BID, price="110"), INFO) == D("880.44")  # 8 x 110 x 1.0005 = 880.44
    assert hold_amount(in_flight(BID, "20", "110"), INFO) == D("1980.99")


def test_a_reduction_in_flight_keeps_what_the_current_terms_need() -> None:
    """Until the engine applies the smaller terms, fills may still come at the current ones."""
    assert hold_amount(in_flight(BID, quantity="5"), INFO) == D("800.40")
    assert hold_amount(in_flight(BID, price="90"), INFO) == D("800.40")
    # fills beyond the target: the engine will refuse it, the current terms still count
    assert hold_amount(in_flight(replace(BID, filled_quantity=D(6)), quantity="5"), INFO) == D("400.20")


def test_a_finished_order_releases_its_hold_whatever_is_in_flight() -> None:
    for status in (OrderStatus.FILLED, OrderStatus.CANCELED, OrderStatus.EXPIRED, OrderStatus.REJECTED):
        assert hold_amount(in_flight(replace(BID, status=status), quantity="20"), INFO) == 0


def test_a_market_buys_quantity_rise_in_flight_is_reserved_at_its_protection_price() -> None:
    market = replace(BID, order_type=OrderType.MARKET, price=None, hold_price=D("110"))
    assert hold_amount(in_flight(market, quantity="20"), INFO) == D("1980.99")  # 18 x 110 x 1.0005


def test_a_cash_sells_quantity_rise_in_flight_keeps_the_base_asset_reserved() -> None:
    ask = replace(BID, side=Side.SELL)
    assert hold_amount(ask, INFO) == D(8)
    assert hold_amount(in_flight(ask, quantity="20"), INFO) == D(18)


def test_the_hold_price_of_a_modify() -> None:
    """Shared by the api (the hold it raises) and settlement (the hold it keeps for a target in flight)."""
    assert modify_hold_price(OrderType.LIMIT, D("100"), D("105")) == D("105")
    assert modify_hold_price(OrderType.STOP_LIMIT, D("100"), D("105")) == D("105")
    assert modify_hold_price(OrderType.LIMIT, D("100"), D("95")) == D("100")  # fills in flight may still cost 100
    assert modify_hold_price(OrderType.LIMIT, D("100"), None) == D("100")
    assert modify_hold_price(OrderType.MARKET, D("110"), None) == D("110")  # protection, not a limit
    assert modify_hold_price(OrderType.STOP, D("110"), D("120")) == D("110")
