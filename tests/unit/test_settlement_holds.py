"""The hold settlement gives a touched order: at rest what its terms need; while client modifies are in flight,
the hold the api funded them with, less only what the batch's fills used of it (and never less than the terms)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal as D
from typing import Any

from tradeplane.domain.matching import InstrumentSpec
from tradeplane.domain.orders import OrderStatus, OrderType, Side
from tradeplane.domain.reservations import modify_hold_price, reservation
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


def in_flight(row: OrderRow, held: str, batch_filled: str = "0") -> OrderRow:
    """``row`` with a client modify sent and not yet processed after the batch: ``held`` was its hold when the
    row was locked (what the api funded its modifies with), and the batch's fills have filled ``batch_filled``
    of its ``filled_quantity``."""
    return replace(row, modifies_requested=row.modifies_done + 1, held=D(held), batch_filled=D(batch_filled))


def cash_buy(qty: str, price: str, **kind: Any) -> D:
    """``reservation`` of a buy of ``qty`` at ``price`` on INFO (a cash account unless ``account_kind`` says)."""
    return reservation(
        side=Side.BUY,
        account_kind=kind.get("account_kind", "cash"),
        leaves_qty=D(qty),
        hold_price=D(price),
        maker_fee_rate=INFO.maker_fee_rate,
        taker_fee_rate=INFO.taker_fee_rate,
        margin_rate=INFO.margin_rate,
        base_asset=INFO.base_asset,
        quote_asset=INFO.quote_asset,
        quote_scale=INFO.quote_scale,
        reduce_only=kind.get("reduce_only", False),
    ).amount


def test_at_rest_the_hold_is_what_the_leaves_reserve() -> None:
    assert hold_amount(BID, INFO) == D("800.40")
    # a hold read while modifies were in flight is no reservation once the engine has processed them all
    done = replace(BID, modifies_requested=3, modifies_done=3, held=D("2001.00"), batch_filled=D(2))
    assert hold_amount(done, INFO) == D("800.40")


def test_a_fill_releases_only_what_it_used_of_the_funding_of_an_earlier_larger_modify() -> None:
    """BUY 10 at 100, raised to 20 (the api held 2001.00 for it), then lowered to 15, both in flight; the batch
    filled 2. The first modify, once applied, will need 18 at 100; the latest target, 15, only 13 at 100."""
    row = in_flight(replace(BID, filled_quantity=D(2)), held="2001.00", batch_filled="2")
    assert hold_amount(row, INFO) == cash_buy("18", "100") == D("1800.90")  # not 1300.65
    # and the next fill of 3 takes 300.15 off it: what 15 at 100 needs after it
    row = in_flight(replace(BID, filled_quantity=D(5)), held="1800.90", batch_filled="3")
    assert hold_amount(row, INFO) == cash_buy("15", "100") == D("1500.75")


def test_with_no_fill_in_the_batch_nothing_is_released() -> None:
    """A refused modify, or a modify applied, settled while others are still in flight: the hold stays."""
    assert hold_amount(in_flight(BID, held="2001.00"), INFO) == D("2001.00")
    assert hold_amount(in_flight(replace(BID, quantity=D(5)), held="2001.00"), INFO) == D("2001.00")


def test_what_fills_used_is_priced_at_the_limit_not_at_a_hold_price_raised_for_a_reprice_in_flight() -> None:
    """BUY 10 at 100 raised to 20 (2001.00 held), then repriced to 101 with quantity 11 (the hold price is 101,
    the hold stays); the batch filled 2 at the current limit. The first modify will need 18 at 100 (1800.90):
    priced at 101, the fills would take 202.10 off and leave 1798.90, for that modify to grow back unfunded."""
    row = in_flight(replace(BID, hold_price=D("101")), held="2001.00", batch_filled="2")
    assert hold_amount(row, INFO) == D("1800.90")


def test_the_terms_in_flight_are_priced_at_their_limit() -> None:
    """BUY 10 at 100 (1000.50 held), then a modify to 5 at 101 in flight (the hold price is 101; 5 at 101 needs
    less, so the hold stays); a fill of 1. Fills at the current terms cost at most 100: 9 at 101 (909.46) is
    more than the api ever funded."""
    row = in_flight(replace(BID, filled_quantity=D(1), hold_price=D("101")), held="1000.50", batch_filled="1")
    assert hold_amount(row, INFO) == cash_buy("9", "100") == D("900.45")


def test_what_fills_used_is_rounded_down() -> None:
    """A reservation is rounded up, so it shrinks by no less than the rounded-down reservation of what is taken
    off it: 18 at 100.03 needs 1801.45 and 17 needs 1701.37, 100.08 less, though 1 at 100.03 reserves 100.09."""
    bid = replace(BID, price=D("100.03"), hold_price=D("100.03"), filled_quantity=D(3))
    assert hold_amount(in_flight(bid, held="1801.45", batch_filled="1"), INFO) == cash_buy("17", "100.03")
    assert cash_buy("17", "100.03") == D("1701.37")


def test_the_terms_are_kept_whatever_the_hold_was() -> None:
    """Over-reserving while modifies are in flight is safe, under-reserving is not: the terms fills may still
    come at are always covered."""
    assert hold_amount(in_flight(BID, held="500.00"), INFO) == D("800.40")


def test_a_finished_order_releases_its_hold_whatever_is_in_flight() -> None:
    for status in (OrderStatus.FILLED, OrderStatus.CANCELED, OrderStatus.EXPIRED, OrderStatus.REJECTED):
        assert hold_amount(in_flight(replace(BID, status=status), held="2001.00", batch_filled="2"), INFO) == 0


def test_a_market_buy_in_flight_is_priced_at_its_protection_price() -> None:
    market = replace(BID, order_type=OrderType.MARKET, price=None, hold_price=D("110"))
    assert hold_amount(in_flight(market, held="2201.10", batch_filled="2"), INFO) == cash_buy("18", "110")


def test_a_cash_sell_in_flight_keeps_the_base_asset_it_was_funded_with() -> None:
    """SELL 10 (3 filled) raised to 20 then lowered to 15: 18 was held when 2 were filled, the batch sold 1."""
    ask = replace(BID, side=Side.SELL, filled_quantity=D(3))
    assert hold_amount(replace(ask, filled_quantity=D(2)), INFO) == D(8)  # at rest: the leaves themselves
    assert hold_amount(in_flight(ask, held="18", batch_filled="1"), INFO) == D(17)


def test_a_margin_order_in_flight_releases_the_margin_its_fills_used() -> None:
    for side in (Side.BUY, Side.SELL):  # a sell filled above its limit: its margin hold is still at the limit
        row = replace(BID, account_kind="margin", side=side, filled_quantity=D(4))
        held = cash_buy("18", "100", account_kind="margin")
        assert hold_amount(in_flight(row, held=str(held), batch_filled="2"), INFO) == D("160.80")


def test_a_reduce_only_order_cut_by_the_engine_keeps_its_funding_while_a_modify_is_in_flight() -> None:
    """Margin, reduce-only (only the fee is held): raised to 20 (0.90 held with 2 filled), then in the batch 2
    more fill and the engine cuts it to 6 as the position shrank. The client's modify, applied later, is capped
    by the engine again; until then the hold keeps what the api funded less the fills: 0.80, not the cut's 0.10."""
    row = replace(BID, account_kind="margin", reduce_only=True, quantity=D(6), filled_quantity=D(4))
    assert hold_amount(in_flight(row, held="0.90", batch_filled="2"), INFO) == D("0.80")
    assert hold_amount(row, INFO) == cash_buy("2", "100", account_kind="margin", reduce_only=True) == D("0.10")


def test_the_hold_price_of_a_modify() -> None:
    """The api funds a modify at it, and settlement keeps that funding while the modify is in flight."""
    assert modify_hold_price(OrderType.LIMIT, D("100"), D("105")) == D("105")
    assert modify_hold_price(OrderType.STOP_LIMIT, D("100"), D("105")) == D("105")
    assert modify_hold_price(OrderType.LIMIT, D("100"), D("95")) == D("100")  # fills in flight may still cost 100
    assert modify_hold_price(OrderType.LIMIT, D("100"), None) == D("100")
    assert modify_hold_price(OrderType.MARKET, D("110"), None) == D("110")  # protection, not a limit
    assert modify_hold_price(OrderType.STOP, D("110"), D("120")) == D("110")
