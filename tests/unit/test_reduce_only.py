"""Reduce-only in the matching engine: an order flagged reduce-only only ever brings its account's position
towards zero, whatever other orders of that account fill first (issue 3).

Account 1 is the trader; account 2 (and 3) make the market. Positions are built by plain trades first.
"""

from __future__ import annotations

import pytest

from tests.unit.test_matching import Desk, of, reasons, trades
from tradeplane.domain.matching import (
    Fill,
    MatchingEngine,
    NewOrder,
    OrderAccepted,
    OrderCanceled,
    OrderModified,
    OrderRejected,
    StopTriggered,
)
from tradeplane.domain.orders import OrderType, SelfTradePrevention, Side, TimeInForce

BUY, SELL = Side.BUY, Side.SELL
TRADER, MM, MM2 = 1, 2, 3


@pytest.fixture
def desk() -> Desk:
    return Desk()


def go_long(desk: Desk, qty: int, *, first_id: int = 900, price: int = 100) -> None:
    """Account 1 buys ``qty`` from the market maker, leaving no order behind."""
    desk.order(first_id, SELL, qty, price, account=MM)
    assert trades(desk.order(first_id + 1, BUY, qty, price, account=TRADER)) == [(first_id, first_id + 1, price, qty)]
    assert desk.engine.book("X").position(TRADER) == qty


def position(desk: Desk, account: int = TRADER) -> int:
    return desk.engine.book("X").position(account)


def leaves(desk: Desk, order_id: int) -> int | None:
    state = desk.engine.book("X").order(order_id)
    return None if state is None else state.leaves_qty


# ------------------------------------------------------------------------------------------------ takers


def test_positions_follow_the_fills_of_both_sides(desk: Desk) -> None:
    desk.order(1, SELL, 5, 100, account=MM)
    desk.order(2, BUY, 3, 100, account=TRADER)
    assert (position(desk, TRADER), position(desk, MM)) == (3, -3)
    assert desk.engine.book("X").positions() == {TRADER: 3, MM: -3}


def test_a_reduce_only_taker_larger_than_the_position_is_capped_to_it(desk: Desk) -> None:
    go_long(desk, 10)
    desk.order(1, BUY, 25, 99, account=MM)
    events = desk.order(2, SELL, 25, 99, account=TRADER, reduce_only=True)
    assert [type(ev) for ev in events] == [OrderAccepted, OrderModified, Fill]
    capped = of(events, OrderModified)[0]
    assert (capped.qty, capped.leaves_qty, capped.reason) == (10, 10, "reduce_only_capped")
    assert trades(events) == [(1, 2, 99, 10)]
    assert position(desk) == 0
    assert leaves(desk, 1) == 15  # the rest of the bid is untouched


def test_a_reduce_only_market_order_stops_at_a_flat_position(desk: Desk) -> None:
    go_long(desk, 4)
    desk.order(1, BUY, 3, 99, account=MM)
    desk.order(2, BUY, 3, 98, account=MM)
    events = desk.order(3, SELL, 20, account=TRADER, reduce_only=True)
    assert trades(events) == [(1, 3, 99, 3), (2, 3, 98, 1)]
    assert position(desk) == 0


def test_a_reduce_only_order_with_no_position_is_rejected(desk: Desk) -> None:
    desk.order(1, BUY, 5, 99, account=MM)
    events = desk.order(2, SELL, 5, 99, account=TRADER, reduce_only=True)
    assert reasons(events) == [(2, "reduce_only_no_position")]
    assert of(events, OrderRejected) and not of(events, Fill)
    assert position(desk) == 0


def test_a_reduce_only_order_on_the_side_of_the_position_is_rejected(desk: Desk) -> None:
    go_long(desk, 5)
    desk.order(1, SELL, 5, 101, account=MM)
    events = desk.order(2, BUY, 2, 101, account=TRADER, reduce_only=True)
    assert reasons(events) == [(2, "reduce_only_no_position")]
    assert position(desk) == 5


# ------------------------------------------------------------------------------------------ resting cuts


def test_the_issue_scenario_a_plain_sell_first_leaves_nothing_for_the_reduce_only_one(desk: Desk) -> None:
    """Long 10, reduce-only SELL 10 resting above the market, a plain SELL 10 fills first: the reduce-only
    order is canceled at that fill, so a later buyer cannot open a short through it."""
    go_long(desk, 10)
    desk.order(1, SELL, 10, 110, account=TRADER, reduce_only=True)
    desk.order(2, BUY, 10, 100, account=MM)
    events = desk.order(3, SELL, 10, 100, account=TRADER)
    assert trades(events) == [(2, 3, 100, 10)]
    assert reasons(events) == [(1, "reduce_only_no_position")]
    assert of(events, OrderCanceled)[0].canceled_qty == 10
    assert position(desk) == 0
    assert desk.resting() == []
    desk.order(4, BUY, 10, 110, account=MM)  # would have hit the reduce-only order
    assert position(desk) == 0


def test_a_resting_reduce_only_order_is_cut_down_when_a_plain_order_reduces_the_position(desk: Desk) -> None:
    go_long(desk, 10)
    desk.order(1, SELL, 8, 110, account=TRADER, reduce_only=True)
    desk.order(2, BUY, 5, 100, account=MM)
    events = desk.order(3, SELL, 5, 100, account=TRADER)
    [cut] = of(events, OrderModified)
    assert (cut.order_id, cut.qty, cut.leaves_qty, cut.reason) == (1, 5, 5, "reduce_only_capped")
    assert leaves(desk, 1) == 5
    # A quantity decrease keeps time priority.
    priority = desk.engine.book("X").order(1).priority  # type: ignore[union-attr]
    assert cut.priority == priority
    assert desk.depth() == ([], [(110, 5)])


def test_cuts_take_the_newest_reduce_only_order_first(desk: Desk) -> None:
    go_long(desk, 10)
    desk.order(1, SELL, 4, 112, account=TRADER, reduce_only=True)  # oldest
    desk.order(2, SELL, 3, 110, account=TRADER, reduce_only=True)
    desk.order(3, SELL, 3, 111, account=TRADER, reduce_only=True)  # newest
    desk.order(4, BUY, 5, 100, account=MM)
    events = desk.order(5, SELL, 5, 100, account=TRADER)  # position 10 -> 5: 5 of the 10 pending go
    assert reasons(events) == [(3, "reduce_only_capped")]
    assert [(ev.order_id, ev.leaves_qty) for ev in of(events, OrderModified)] == [(2, 1)]
    assert (leaves(desk, 1), leaves(desk, 2), leaves(desk, 3)) == (4, 1, None)


def test_every_reduce_only_order_is_canceled_when_the_position_goes_flat(desk: Desk) -> None:
    go_long(desk, 6)
    desk.order(1, SELL, 2, 110, account=TRADER, reduce_only=True)
    desk.order(2, SELL, 3, 111, account=TRADER, reduce_only=True)
    desk.order(3, SELL, 1, None, account=TRADER, order_type=OrderType.STOP, stop_price=90, reduce_only=True)
    desk.order(4, BUY, 6, 100, account=MM)
    events = desk.order(5, SELL, 6, 100, account=TRADER)
    assert sorted(reasons(events)) == [
        (1, "reduce_only_no_position"),
        (2, "reduce_only_no_position"),
        (3, "reduce_only_no_position"),
    ]
    assert desk.resting() == []


def test_a_flip_cancels_the_reduce_only_orders_of_the_old_side(desk: Desk) -> None:
    go_long(desk, 5)
    desk.order(1, SELL, 5, 110, account=TRADER, reduce_only=True)
    desk.order(2, BUY, 8, 100, account=MM)
    events = desk.order(3, SELL, 8, 100, account=TRADER)  # long 5 -> short 3
    assert reasons(events) == [(1, "reduce_only_no_position")]
    assert position(desk) == -3
    # A reduce-only BUY now reduces the short, up to 3.
    desk.order(4, SELL, 10, 101, account=MM)
    assert trades(desk.order(5, BUY, 10, 101, account=TRADER, reduce_only=True)) == [(4, 5, 101, 3)]
    assert position(desk) == 0


def test_a_reduce_only_taker_filling_the_position_cancels_the_older_reduce_only_orders(desk: Desk) -> None:
    go_long(desk, 10)
    desk.order(1, SELL, 10, 110, account=TRADER, reduce_only=True)
    desk.order(2, BUY, 10, 100, account=MM)
    events = desk.order(3, SELL, 10, 100, account=TRADER, reduce_only=True)
    assert trades(events) == [(2, 3, 100, 10)]
    assert reasons(events) == [(1, "reduce_only_no_position")]


def test_a_new_reduce_only_order_that_rests_beyond_the_older_ones_is_cut_first(desk: Desk) -> None:
    go_long(desk, 10)
    desk.order(1, SELL, 7, 110, account=TRADER, reduce_only=True)
    events = desk.order(2, SELL, 5, 111, account=TRADER, reduce_only=True)
    assert [(ev.order_id, ev.leaves_qty) for ev in of(events, OrderModified)] == [(2, 3)]
    assert (leaves(desk, 1), leaves(desk, 2)) == (7, 3)


def test_a_modify_up_of_a_reduce_only_order_is_cut_back_to_the_position(desk: Desk) -> None:
    go_long(desk, 10)
    desk.order(1, SELL, 4, 110, account=TRADER, reduce_only=True)
    events = desk.modify(1, new_qty=15)
    assert [(ev.qty, ev.reason) for ev in of(events, OrderModified)] == [(15, None), (10, "reduce_only_capped")]
    assert leaves(desk, 1) == 10


# --------------------------------------------------------------------------------------- within one sweep


def test_a_sweep_never_fills_a_reduce_only_maker_beyond_the_position_at_that_moment(desk: Desk) -> None:
    """Long 10: a plain SELL 10 at 100 and a reduce-only SELL 10 at 101. A buyer of 20 takes the plain one
    first, the position is flat, so the reduce-only one is canceled before the sweep reaches it."""
    go_long(desk, 10)
    desk.order(1, SELL, 10, 101, account=TRADER, reduce_only=True)
    desk.order(2, SELL, 10, 100, account=TRADER)
    desk.order(3, SELL, 10, 102, account=MM2)
    events = desk.order(4, BUY, 20, 102, account=MM)
    assert trades(events) == [(2, 4, 100, 10), (3, 4, 102, 10)]
    assert reasons(events) == [(1, "reduce_only_no_position")]
    assert position(desk) == 0


def test_a_sweep_cuts_reduce_only_makers_at_the_same_price_level(desk: Desk) -> None:
    go_long(desk, 10)
    desk.order(1, SELL, 6, 100, account=TRADER)
    desk.order(2, SELL, 8, 100, account=TRADER, reduce_only=True)  # behind it at the same price
    desk.order(3, SELL, 5, 100, account=MM2)
    events = desk.order(4, BUY, 20, 100, account=MM)
    # After the plain 6, the position is 4: the reduce-only order is cut to 4 in place, then filled for 4.
    assert trades(events) == [(1, 4, 100, 6), (2, 4, 100, 4), (3, 4, 100, 5)]
    assert [(ev.order_id, ev.leaves_qty) for ev in of(events, OrderModified)] == [(2, 4)]
    assert position(desk) == 0
    assert desk.resting() == [4]  # the buyer's remaining 5 rests


def test_fok_does_not_count_reduce_only_makers_the_sweep_would_cut(desk: Desk) -> None:
    go_long(desk, 10)
    desk.order(1, SELL, 10, 100, account=TRADER)
    desk.order(2, SELL, 10, 101, account=TRADER, reduce_only=True)
    desk.order(3, SELL, 5, 102, account=MM2)
    events = desk.order(4, BUY, 20, 102, account=MM, time_in_force=TimeInForce.FOK)
    assert reasons(events) == [(4, "fok_unfillable")]
    assert not of(events, Fill)
    assert trades(desk.order(5, BUY, 15, 102, account=MM, time_in_force=TimeInForce.FOK)) == [
        (1, 5, 100, 10),
        (3, 5, 102, 5),
    ]


def test_a_reduce_only_fok_larger_than_the_position_is_killed_not_cut(desk: Desk) -> None:
    go_long(desk, 10)
    desk.order(1, BUY, 30, 99, account=MM)
    events = desk.order(2, SELL, 25, 99, account=TRADER, reduce_only=True, time_in_force=TimeInForce.FOK)
    assert reasons(events) == [(2, "fok_unfillable")] and not of(events, Fill)
    assert position(desk) == 10
    assert trades(desk.order(3, SELL, 10, 99, account=TRADER, reduce_only=True, time_in_force=TimeInForce.FOK)) == [
        (1, 3, 99, 10)
    ]
    assert position(desk) == 0


def test_a_triggered_reduce_only_stop_meets_a_position_closed_in_the_same_cascade(desk: Desk) -> None:
    """Two stops of the trader fire on the same trade: the plain one (older) closes the position, so the
    reduce-only one, waiting in the trigger queue rather than the book, is canceled when its turn comes."""
    go_long(desk, 10)
    desk.order(1, SELL, 10, None, account=TRADER, order_type=OrderType.STOP, stop_price=95)
    desk.order(2, SELL, 10, None, account=TRADER, order_type=OrderType.STOP, stop_price=95, reduce_only=True)
    desk.order(3, BUY, 30, 90, account=MM)
    desk.order(4, BUY, 1, 95, account=MM2)
    events = desk.order(5, SELL, 1, 95, account=MM)  # trades at 95: both stops fire
    assert [ev.order_id for ev in of(events, StopTriggered)] == [1, 2]
    assert trades(events)[1:] == [(3, 1, 90, 10)]
    assert reasons(events) == [(2, "reduce_only_no_position")]
    assert position(desk) == 0


def test_self_trade_prevention_does_not_let_a_reduce_only_order_through(desk: Desk) -> None:
    go_long(desk, 5)
    desk.order(1, BUY, 5, 100, account=TRADER)  # own bid
    desk.order(2, BUY, 10, 99, account=MM)
    events = desk.order(3, SELL, 10, 99, account=TRADER, reduce_only=True, stp=SelfTradePrevention.CANCEL_OLDEST)
    assert reasons(events)[0] == (1, "stp")
    assert trades(events) == [(2, 3, 99, 5)]
    assert position(desk) == 0


# ------------------------------------------------------------------------------------------------ restore


def test_a_restored_book_keeps_positions_and_cuts_stale_reduce_only_orders_before_they_fill() -> None:
    """State written before the engine enforced reduce-only (a flat account with a resting reduce-only sell):
    the restored book cuts it when a buyer reaches it instead of opening a short."""
    desk = Desk()
    go_long(desk, 10)
    desk.order(1, SELL, 10, 110, account=TRADER, reduce_only=True)
    book = desk.engine.book("X")
    restarted = MatchingEngine()
    restarted.restore("X", book.resting_orders(), last_price=book.last_price, positions={TRADER: 0, MM: -10})
    assert restarted.book("X").positions() == {MM: -10}
    buyer = NewOrder(
        seq=100,
        ts_ns=100,
        symbol="X",
        order_id=2,
        account_id=MM,
        side=BUY,
        order_type=OrderType.LIMIT,
        qty=10,
        price=110,
    )
    events = restarted.process(buyer)
    assert not of(events, Fill)
    assert reasons(events) == [(1, "reduce_only_no_position")]
