"""Matching rules, one test per rule: what a trader relies on when an order meets the book."""

from __future__ import annotations

from decimal import Decimal
from typing import Any, TypeVar

import pytest

from tradeplane.domain.book import PRIORITY_SHIFT
from tradeplane.domain.matching import (
    BookStateError,
    Cancel,
    CancelAll,
    CancelRejected,
    Event,
    Expire,
    Fill,
    InstrumentSpec,
    MatchingEngine,
    Modify,
    ModifyRejected,
    NewOrder,
    OffGridValue,
    OrderAccepted,
    OrderCanceled,
    OrderExpired,
    OrderModified,
    OrderRejected,
    StopTriggered,
    UnknownCommand,
)
from tradeplane.domain.orders import OrderState, OrderType, SelfTradePrevention, Side, TimeInForce

BUY, SELL = Side.BUY, Side.SELL
E = TypeVar("E")


class Desk:
    """Sends commands to an engine with increasing sequence numbers and timestamps (1 ns per command)."""

    def __init__(self, symbols: tuple[str, ...] = ("X",)) -> None:
        self.engine = MatchingEngine(symbols)
        self.seq = 0

    def _next(self) -> int:
        self.seq += 1
        return self.seq

    def order(
        self,
        order_id: int,
        side: Side,
        qty: int,
        price: int | None = None,
        *,
        account: int = 1,
        order_type: OrderType | None = None,
        symbol: str = "X",
        **fields: Any,
    ) -> list[Event]:
        seq = self._next()
        if order_type is None:
            order_type = OrderType.LIMIT if price is not None else OrderType.MARKET
        return self.engine.process(
            NewOrder(
                seq=seq,
                ts_ns=seq,
                symbol=symbol,
                order_id=order_id,
                account_id=account,
                side=side,
                order_type=order_type,
                qty=qty,
                price=price,
                **fields,
            )
        )

    def cancel(self, order_id: int, symbol: str = "X") -> list[Event]:
        seq = self._next()
        return self.engine.process(Cancel(seq=seq, ts_ns=seq, symbol=symbol, order_id=order_id))

    def modify(
        self, order_id: int, new_qty: int | None = None, new_price: int | None = None, symbol: str = "X"
    ) -> list[Event]:
        seq = self._next()
        return self.engine.process(
            Modify(seq=seq, ts_ns=seq, symbol=symbol, order_id=order_id, new_qty=new_qty, new_price=new_price)
        )

    def depth(self, symbol: str = "X") -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        return self.engine.book(symbol).depth()

    def resting(self, symbol: str = "X") -> list[int]:
        return sorted(s.order_id for s in self.engine.book(symbol).resting_orders())


def of(events: list[Event], kind: type[E]) -> list[E]:
    return [ev for ev in events if isinstance(ev, kind)]


def trades(events: list[Event]) -> list[tuple[int, int, int, int]]:
    """(maker order, taker order, price, qty) of each fill, in order."""
    return [(f.maker_order_id, f.taker_order_id, f.price, f.qty) for f in of(events, Fill)]


def reasons(events: list[Event]) -> list[tuple[int, str]]:
    return [(ev.order_id, ev.reason) for ev in events if isinstance(ev, OrderCanceled | OrderRejected)]


@pytest.fixture
def desk() -> Desk:
    return Desk()


# ----------------------------------------------------------------------------------- price-time priority


def test_a_buy_takes_the_lowest_ask_first(desk: Desk) -> None:
    desk.order(1, SELL, 5, 103, account=2)
    desk.order(2, SELL, 5, 101, account=2)
    desk.order(3, SELL, 5, 102, account=2)
    assert trades(desk.order(4, BUY, 12, 103)) == [(2, 4, 101, 5), (3, 4, 102, 5), (1, 4, 103, 2)]


def test_a_sell_takes_the_highest_bid_first(desk: Desk) -> None:
    desk.order(1, BUY, 5, 98, account=2)
    desk.order(2, BUY, 5, 100, account=2)
    assert trades(desk.order(3, SELL, 7, 97)) == [(2, 3, 100, 5), (1, 3, 98, 2)]


def test_at_one_price_the_oldest_order_fills_first(desk: Desk) -> None:
    desk.order(1, SELL, 5, 100, account=2)
    desk.order(2, SELL, 5, 100, account=3)
    desk.order(3, SELL, 5, 100, account=4)
    assert trades(desk.order(4, BUY, 7, 100)) == [(1, 4, 100, 5), (2, 4, 100, 2)]
    assert trades(desk.order(5, BUY, 4, 100)) == [(2, 5, 100, 3), (3, 5, 100, 1)]


def test_the_trade_price_is_the_resting_orders_price(desk: Desk) -> None:
    desk.order(1, SELL, 5, 101, account=2)
    [fill] = of(desk.order(2, BUY, 5, 105), Fill)
    assert fill.price == 101
    assert fill.aggressor_side is BUY


def test_a_limit_order_that_does_not_cross_rests_and_the_book_stays_uncrossed(desk: Desk) -> None:
    desk.order(1, SELL, 5, 101, account=2)
    events = desk.order(2, BUY, 5, 100)
    assert [type(ev) for ev in events] == [OrderAccepted]
    assert desk.depth() == ([(100, 5)], [(101, 5)])


# ------------------------------------------------------------------------------------------ partial fills


def test_a_partially_filled_maker_keeps_its_remainder_and_place(desk: Desk) -> None:
    desk.order(1, SELL, 10, 100, account=2)
    desk.order(2, SELL, 10, 100, account=3)
    [fill] = of(desk.order(3, BUY, 4, 100), Fill)
    assert (fill.maker_leaves_qty, fill.taker_leaves_qty) == (6, 0)
    assert desk.depth() == ([], [(100, 16)])
    assert trades(desk.order(4, BUY, 6, 100)) == [(1, 4, 100, 6)]  # order 1 is still first in line


def test_a_partially_filled_taker_rests_its_remainder_at_its_limit(desk: Desk) -> None:
    desk.order(1, SELL, 3, 100, account=2)
    events = desk.order(2, BUY, 10, 101)
    assert of(events, Fill)[0].taker_leaves_qty == 7
    assert desk.depth() == ([(101, 7)], [])
    [state] = desk.engine.book("X").resting_orders()
    assert (state.qty, state.filled_qty, state.leaves_qty) == (10, 3, 7)


# ------------------------------------------------------------------------------------------ market orders


def test_a_market_order_walks_the_book_and_cancels_what_is_left(desk: Desk) -> None:
    desk.order(1, SELL, 2, 100, account=2)
    desk.order(2, SELL, 3, 105, account=2)
    events = desk.order(3, BUY, 10)
    assert trades(events) == [(1, 3, 100, 2), (2, 3, 105, 3)]
    assert reasons(events) == [(3, "market_no_liquidity")]
    assert of(events, OrderCanceled)[0].canceled_qty == 5
    assert desk.depth() == ([], [])


def test_a_market_order_into_an_empty_side_is_rejected(desk: Desk) -> None:
    desk.order(1, BUY, 2, 100, account=2)  # liquidity on the wrong side does not count
    events = desk.order(2, BUY, 5)
    assert reasons(events) == [(2, "no_liquidity")]
    assert not of(events, OrderAccepted)


def test_a_market_order_walks_only_up_to_its_protection_price(desk: Desk) -> None:
    desk.order(1, SELL, 2, 100, account=2)
    desk.order(2, SELL, 3, 105, account=2)
    events = desk.order(3, BUY, 10, 104, order_type=OrderType.MARKET)
    assert trades(events) == [(1, 3, 100, 2)]
    assert reasons(events) == [(3, "market_no_liquidity")]  # not an IOC remainder: it is a market order
    assert desk.depth() == ([], [(105, 3)])


def test_a_market_order_with_nothing_within_its_protection_is_rejected(desk: Desk) -> None:
    desk.order(1, SELL, 2, 105, account=2)
    events = desk.order(2, BUY, 5, 104, order_type=OrderType.MARKET)
    assert reasons(events) == [(2, "no_liquidity")]
    assert not of(events, OrderAccepted) and desk.depth() == ([], [(105, 2)])


def test_a_market_order_never_rests(desk: Desk) -> None:
    desk.order(1, SELL, 2, 100, account=2)
    desk.order(2, BUY, 5, time_in_force=TimeInForce.GTC)
    assert desk.resting() == []


# ------------------------------------------------------------------------------------------- IOC and FOK


def test_ioc_fills_what_it_can_and_cancels_the_remainder(desk: Desk) -> None:
    desk.order(1, SELL, 3, 100, account=2)
    desk.order(2, SELL, 3, 102, account=2)
    events = desk.order(3, BUY, 10, 101, time_in_force=TimeInForce.IOC)
    assert trades(events) == [(1, 3, 100, 3)]
    assert reasons(events) == [(3, "ioc_remainder")]
    assert desk.depth() == ([], [(102, 3)])


def test_ioc_that_cannot_trade_is_accepted_then_canceled_without_resting(desk: Desk) -> None:
    events = desk.order(1, BUY, 10, 101, time_in_force=TimeInForce.IOC)
    assert [type(ev) for ev in events] == [OrderAccepted, OrderCanceled]
    assert desk.resting() == []


def test_fok_fills_completely_across_levels(desk: Desk) -> None:
    desk.order(1, SELL, 3, 100, account=2)
    desk.order(2, SELL, 3, 101, account=3)
    events = desk.order(3, BUY, 6, 101, time_in_force=TimeInForce.FOK)
    assert sum(f.qty for f in of(events, Fill)) == 6
    assert desk.depth() == ([], [])


def test_fok_that_cannot_fill_completely_is_rejected_and_changes_nothing(desk: Desk) -> None:
    desk.order(1, SELL, 3, 100, account=2)
    desk.order(2, SELL, 3, 102, account=3)  # beyond the FOK's limit
    before = desk.engine.book("X").resting_orders()
    events = desk.order(3, BUY, 6, 101, time_in_force=TimeInForce.FOK)
    assert reasons(events) == [(3, "fok_unfillable")]
    assert not of(events, Fill)
    assert desk.engine.book("X").resting_orders() == before
    assert desk.engine.book("X").last_price is None


def test_fok_counts_only_liquidity_self_trade_prevention_lets_it_reach(desk: Desk) -> None:
    desk.order(1, SELL, 3, 100, account=7)  # own order in front: cancel_newest would stop the FOK here
    desk.order(2, SELL, 5, 100, account=2)
    events = desk.order(3, BUY, 5, 100, account=7, time_in_force=TimeInForce.FOK)
    assert reasons(events) == [(3, "fok_unfillable")]
    assert desk.resting() == [1, 2]
    events = desk.order(4, BUY, 5, 100, account=7, time_in_force=TimeInForce.FOK, stp=SelfTradePrevention.CANCEL_OLDEST)
    assert trades(events) == [(2, 4, 100, 5)]
    assert reasons(events) == [(1, "stp")]


# ------------------------------------------------------------------------------------------------ post-only


def test_post_only_that_would_take_is_rejected(desk: Desk) -> None:
    desk.order(1, SELL, 3, 100, account=2)
    events = desk.order(2, BUY, 3, 100, post_only=True)
    assert reasons(events) == [(2, "post_only_would_take")]
    assert desk.depth() == ([], [(100, 3)])


def test_post_only_that_does_not_cross_rests(desk: Desk) -> None:
    desk.order(1, SELL, 3, 100, account=2)
    events = desk.order(2, BUY, 3, 99, post_only=True)
    assert of(events, OrderAccepted)
    assert desk.depth() == ([(99, 3)], [(100, 3)])


def test_post_only_is_only_valid_on_resting_limit_orders(desk: Desk) -> None:
    assert reasons(desk.order(1, BUY, 3, 99, post_only=True, time_in_force=TimeInForce.IOC)) == [
        (1, "invalid_post_only")
    ]
    assert reasons(desk.order(2, BUY, 3, post_only=True)) == [(2, "invalid_post_only")]


# ------------------------------------------------------------------------------------------------- stops


def test_a_buy_stop_triggers_when_the_last_trade_reaches_its_stop_price(desk: Desk) -> None:
    desk.order(1, BUY, 5, order_type=OrderType.STOP, stop_price=102, account=3)
    desk.order(2, SELL, 10, 105, account=2)
    desk.order(3, SELL, 1, 101, account=2)
    assert not of(desk.order(4, BUY, 1, 101, account=4), StopTriggered)  # last 101 < 102: waits
    assert desk.resting() == [1, 2]
    desk.order(5, SELL, 1, 102, account=2)
    events = desk.order(6, BUY, 1, 102, account=4)  # last 102 >= 102
    [triggered] = of(events, StopTriggered)
    assert (triggered.order_id, triggered.trigger_price) == (1, 102)
    assert trades(events)[-1] == (2, 1, 105, 5)  # then it traded as a market order


def test_a_sell_stop_triggers_when_the_last_trade_falls_to_its_stop_price(desk: Desk) -> None:
    desk.order(1, SELL, 5, order_type=OrderType.STOP, stop_price=98, account=3)
    desk.order(2, BUY, 10, 95, account=2)
    desk.order(3, BUY, 1, 99, account=2)
    assert not of(desk.order(4, SELL, 1, 99, account=4), StopTriggered)
    desk.order(5, BUY, 1, 98, account=2)
    events = desk.order(6, SELL, 1, 98, account=4)
    assert [ev.order_id for ev in of(events, StopTriggered)] == [1]
    assert trades(events)[-1] == (2, 1, 95, 5)


def test_a_stop_with_a_protection_price_trades_up_to_it_and_cancels_the_rest(desk: Desk) -> None:
    desk.order(1, BUY, 5, 103, order_type=OrderType.STOP, stop_price=101, account=3)  # 103: its protection
    desk.order(2, SELL, 2, 102, account=2)
    desk.order(3, SELL, 9, 104, account=2)  # beyond the protection: never touched
    desk.order(4, SELL, 1, 101, account=2)
    events = desk.order(5, BUY, 1, 101, account=4)  # last 101: triggers
    assert [ev.order_id for ev in of(events, StopTriggered)] == [1]
    assert trades(events)[-1] == (2, 1, 102, 2)
    assert reasons(events) == [(1, "market_no_liquidity")]  # the remainder never rests at 103
    assert desk.resting() == [3]


def test_a_sell_stop_with_a_protection_price_keeps_its_day_expiry_and_is_capped(desk: Desk) -> None:
    desk.order(
        1,
        SELL,
        4,
        97,
        order_type=OrderType.STOP,
        stop_price=99,
        time_in_force=TimeInForce.DAY,
        expire_at_ns=10_000,
        account=3,
    )
    desk.order(2, BUY, 1, 98, account=2)
    desk.order(3, BUY, 9, 96, account=2)
    desk.order(4, BUY, 1, 99, account=2)
    events = desk.order(5, SELL, 1, 99, account=4)
    assert [ev.order_id for ev in of(events, StopTriggered)] == [1]
    assert trades(events)[-1] == (2, 1, 98, 1)
    assert reasons(events) == [(1, "market_no_liquidity")]
    assert desk.depth()[0] == [(96, 9)]


def test_a_fok_stop_with_a_protection_price_counts_only_liquidity_inside_it(desk: Desk) -> None:
    desk.order(1, BUY, 5, 102, order_type=OrderType.STOP, stop_price=101, time_in_force=TimeInForce.FOK, account=3)
    desk.order(2, SELL, 2, 102, account=2)
    desk.order(3, SELL, 9, 104, account=2)
    desk.order(4, SELL, 1, 101, account=2)
    events = desk.order(5, BUY, 1, 101, account=4)
    assert not of(events, Fill) or all(f.taker_order_id != 1 for f in of(events, Fill))
    assert reasons(events) == [(1, "fok_unfillable")]
    assert desk.resting() == [2, 3]


def test_a_market_or_stop_orders_price_is_a_positive_protection(desk: Desk) -> None:
    assert reasons(desk.order(1, BUY, 1, 0, order_type=OrderType.MARKET)) == [(1, "invalid_price")]
    assert reasons(desk.order(2, BUY, 1, 0, order_type=OrderType.STOP, stop_price=101)) == [(2, "invalid_price")]
    assert reasons(desk.order(3, BUY, 1, 105, order_type=OrderType.STOP, stop_price=101)) == []


def test_a_triggered_stop_limit_becomes_a_limit_order_and_rests_its_remainder(desk: Desk) -> None:
    desk.order(1, BUY, 5, 103, order_type=OrderType.STOP_LIMIT, stop_price=101, account=3)
    desk.order(2, SELL, 1, 101, account=2)
    desk.order(3, SELL, 2, 103, account=2)
    desk.order(4, SELL, 9, 104, account=2)
    events = desk.order(5, BUY, 1, 101, account=4)
    assert [ev.order_id for ev in of(events, StopTriggered)] == [1]
    assert trades(events)[-1] == (3, 1, 103, 2)
    assert desk.depth() == ([(103, 3)], [(104, 9)])
    [state] = [s for s in desk.engine.book("X").resting_orders() if s.order_id == 1]
    assert state.triggered


def test_triggered_stops_can_cascade(desk: Desk) -> None:
    desk.order(1, BUY, 1, order_type=OrderType.STOP, stop_price=101, account=3)
    desk.order(2, BUY, 1, order_type=OrderType.STOP, stop_price=102, account=4)
    desk.order(10, SELL, 1, 101, account=2)
    desk.order(11, SELL, 1, 102, account=2)
    desk.order(12, SELL, 1, 103, account=2)
    events = desk.order(20, BUY, 1, 101, account=5)
    # 20 trades at 101 -> stop 1 fires, takes 102 -> stop 2 fires, takes 103.
    assert [ev.order_id for ev in of(events, StopTriggered)] == [1, 2]
    assert trades(events) == [(10, 20, 101, 1), (11, 1, 102, 1), (12, 2, 103, 1)]
    assert desk.engine.book("X").last_price == 103


def test_stops_triggered_by_the_same_trade_enter_oldest_first(desk: Desk) -> None:
    desk.order(1, BUY, 1, order_type=OrderType.STOP, stop_price=100, account=3)
    desk.order(2, BUY, 1, order_type=OrderType.STOP, stop_price=99, account=4)
    desk.order(10, SELL, 1, 100, account=2)
    desk.order(11, SELL, 1, 105, account=2)
    desk.order(12, SELL, 1, 106, account=2)
    events = desk.order(20, BUY, 1, 100, account=5)
    assert [ev.order_id for ev in of(events, StopTriggered)] == [1, 2]  # by age, not by stop price
    assert trades(events)[1:] == [(11, 1, 105, 1), (12, 2, 106, 1)]


def test_a_stop_already_through_the_last_price_triggers_on_arrival(desk: Desk) -> None:
    desk.order(1, SELL, 5, 100, account=2)
    desk.order(2, BUY, 1, 100, account=3)  # last = 100
    events = desk.order(3, BUY, 2, order_type=OrderType.STOP, stop_price=99, account=4)
    assert [type(ev) for ev in events] == [OrderAccepted, StopTriggered, Fill]


def test_an_untriggered_stop_is_not_in_the_depth_and_can_be_canceled(desk: Desk) -> None:
    desk.order(1, BUY, 5, order_type=OrderType.STOP, stop_price=110)
    assert desk.depth() == ([], [])
    assert reasons(desk.cancel(1)) == [(1, "user")]
    assert desk.resting() == []


# ------------------------------------------------------------------------------------ self-trade prevention


def test_stp_cancel_newest_cancels_the_incoming_remainder_and_keeps_the_resting_order(desk: Desk) -> None:
    desk.order(1, SELL, 2, 100, account=2)
    desk.order(2, SELL, 5, 101, account=1)
    desk.order(3, SELL, 5, 102, account=3)
    events = desk.order(4, BUY, 10, 102, account=1)
    assert trades(events) == [(1, 4, 100, 2)]
    assert reasons(events) == [(4, "stp")]
    assert of(events, OrderCanceled)[0].canceled_qty == 8
    assert desk.resting() == [2, 3]


def test_stp_cancel_oldest_cancels_the_resting_order_and_keeps_matching(desk: Desk) -> None:
    desk.order(1, SELL, 5, 101, account=1)
    desk.order(2, SELL, 5, 101, account=3)
    events = desk.order(3, BUY, 5, 101, account=1, stp=SelfTradePrevention.CANCEL_OLDEST)
    assert reasons(events) == [(1, "stp")]
    assert trades(events) == [(2, 3, 101, 5)]
    assert desk.resting() == []


def test_stp_cancel_both_cancels_both_orders(desk: Desk) -> None:
    desk.order(1, SELL, 5, 101, account=1)
    desk.order(2, SELL, 5, 101, account=3)
    events = desk.order(3, BUY, 5, 101, account=1, stp=SelfTradePrevention.CANCEL_BOTH)
    assert reasons(events) == [(1, "stp"), (3, "stp")]
    assert not of(events, Fill)
    assert desk.resting() == [2]


def test_orders_of_different_accounts_trade_normally(desk: Desk) -> None:
    desk.order(1, SELL, 5, 101, account=1)
    assert trades(desk.order(2, BUY, 5, 101, account=2)) == [(1, 2, 101, 5)]


# --------------------------------------------------------------------------------------------------- modify


def test_lowering_the_quantity_keeps_time_priority(desk: Desk) -> None:
    desk.order(1, SELL, 10, 100, account=2)
    desk.order(2, SELL, 10, 100, account=3)
    [modified] = of(desk.modify(1, new_qty=4), OrderModified)
    assert (modified.qty, modified.leaves_qty) == (4, 4)
    assert trades(desk.order(3, BUY, 4, 100)) == [(1, 3, 100, 4)]


def test_raising_the_quantity_loses_time_priority(desk: Desk) -> None:
    desk.order(1, SELL, 10, 100, account=2)
    desk.order(2, SELL, 10, 100, account=3)
    [modified] = of(desk.modify(1, new_qty=12), OrderModified)
    assert modified.priority > desk.engine.book("X").order(2).priority  # type: ignore[union-attr]
    assert trades(desk.order(3, BUY, 4, 100)) == [(2, 3, 100, 4)]


def test_changing_the_price_loses_time_priority(desk: Desk) -> None:
    desk.order(1, SELL, 10, 100, account=2)
    desk.order(2, SELL, 10, 101, account=3)
    desk.modify(1, new_price=101)
    assert trades(desk.order(3, BUY, 4, 101)) == [(2, 3, 101, 4)]
    assert desk.depth() == ([], [(101, 16)])


def test_a_modify_to_a_crossing_price_trades_like_an_incoming_order(desk: Desk) -> None:
    desk.order(1, SELL, 3, 100, account=2)
    desk.order(2, BUY, 5, 98, account=3)
    events = desk.modify(2, new_price=100)
    assert [type(ev) for ev in events] == [OrderModified, Fill]
    assert trades(events) == [(1, 2, 100, 3)]
    assert desk.depth() == ([(100, 2)], [])


def test_a_modify_down_to_the_filled_quantity_cancels_the_order(desk: Desk) -> None:
    desk.order(1, SELL, 10, 100, account=2)
    desk.order(2, BUY, 4, 100, account=3)
    events = desk.modify(1, new_qty=4)
    assert reasons(events) == [(1, "modify_qty_filled")]
    assert of(events, OrderCanceled)[0].canceled_qty == 6
    assert desk.resting() == []


def test_a_post_only_order_cannot_be_modified_into_a_crossing_price(desk: Desk) -> None:
    desk.order(1, SELL, 3, 100, account=2)
    desk.order(2, BUY, 3, 98, post_only=True)
    events = desk.modify(2, new_price=100)
    assert [(ev.order_id, ev.reason) for ev in of(events, ModifyRejected)] == [(2, "post_only_would_take")]
    assert desk.depth() == ([(98, 3)], [(100, 3)])


def test_modifying_an_unknown_order_is_rejected(desk: Desk) -> None:
    assert [ev.reason for ev in of(desk.modify(42, new_qty=1), ModifyRejected)] == ["unknown_order"]


def test_a_modify_without_a_change_or_with_a_bad_value_is_rejected(desk: Desk) -> None:
    desk.order(1, SELL, 3, 100)
    assert [ev.reason for ev in of(desk.modify(1), ModifyRejected)] == ["no_change"]
    assert [ev.reason for ev in of(desk.modify(1, new_qty=0), ModifyRejected)] == ["invalid_quantity"]
    assert [ev.reason for ev in of(desk.modify(1, new_price=0), ModifyRejected)] == ["invalid_price"]
    assert desk.depth() == ([], [(100, 3)])


# --------------------------------------------------------------------------------------- cancel, cancel-all


def test_cancel_removes_the_order_and_a_second_cancel_is_refused(desk: Desk) -> None:
    desk.order(1, SELL, 3, 100)
    events = desk.cancel(1)
    assert reasons(events) == [(1, "user")]
    assert of(events, OrderCanceled)[0].canceled_qty == 3
    assert desk.depth() == ([], [])
    assert [ev.reason for ev in of(desk.cancel(1), CancelRejected)] == ["unknown_order"]


def test_cancel_all_cancels_one_accounts_orders_in_every_symbol() -> None:
    desk = Desk(("X", "Y"))
    desk.order(1, SELL, 3, 100, account=1, symbol="X")
    desk.order(2, BUY, 3, 90, account=1, symbol="Y")
    desk.order(3, BUY, 3, 90, account=2, symbol="Y")
    desk.order(4, BUY, 3, order_type=OrderType.STOP, stop_price=120, account=1, symbol="X")
    events = desk.engine.process(CancelAll(seq=99, ts_ns=99, account_id=1))
    assert reasons(events) == [(1, "cancel_all"), (4, "cancel_all"), (2, "cancel_all")]
    assert desk.resting("X") == [] and desk.resting("Y") == [3]


def test_cancel_all_can_be_limited_to_one_symbol() -> None:
    desk = Desk(("X", "Y"))
    desk.order(1, SELL, 3, 100, account=1, symbol="X")
    desk.order(2, BUY, 3, 90, account=1, symbol="Y")
    events = desk.engine.process(CancelAll(seq=99, ts_ns=99, account_id=1, symbol="Y"))
    assert reasons(events) == [(2, "cancel_all")]
    assert desk.resting("X") == [1]


# ---------------------------------------------------------------------------------------------- expiry


def test_day_and_gtd_orders_expire_when_their_time_has_passed(desk: Desk) -> None:
    desk.order(1, SELL, 3, 100, time_in_force=TimeInForce.GTD, expire_at_ns=1_000)
    desk.order(2, SELL, 3, 101, time_in_force=TimeInForce.DAY, expire_at_ns=2_000)
    desk.order(3, SELL, 3, 102)  # GTC
    assert desk.engine.process(Expire(seq=10, now_ns=999)) == []
    events = desk.engine.process(Expire(seq=11, now_ns=1_000))
    assert [(ev.order_id, ev.expired_qty) for ev in of(events, OrderExpired)] == [(1, 3)]
    events = desk.engine.process(Expire(seq=12, now_ns=5_000))
    assert [ev.order_id for ev in of(events, OrderExpired)] == [2]
    assert desk.resting() == [3]


def test_a_filled_gtd_order_does_not_expire_again(desk: Desk) -> None:
    desk.order(1, SELL, 3, 100, time_in_force=TimeInForce.GTD, expire_at_ns=1_000)
    desk.order(2, BUY, 3, 100, account=2)
    assert desk.engine.process(Expire(seq=10, now_ns=5_000)) == []


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"time_in_force": TimeInForce.GTD}, "invalid_expiry"),
        ({"time_in_force": TimeInForce.DAY}, "invalid_expiry"),
        ({"time_in_force": TimeInForce.GTC, "expire_at_ns": 10**12}, "invalid_expiry"),
        ({"time_in_force": TimeInForce.GTD, "expire_at_ns": 1}, "already_expired"),
    ],
)
def test_expiry_must_match_the_time_in_force(desk: Desk, fields: dict[str, Any], reason: str) -> None:
    assert reasons(desk.order(1, SELL, 3, 100, **fields)) == [(1, reason)]


# ------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("qty", "price", "fields", "reason"),
    [
        (0, 100, {}, "invalid_quantity"),
        (5, 0, {}, "invalid_price"),
        (5, None, {"order_type": OrderType.LIMIT}, "invalid_price"),
        (5, -1, {"order_type": OrderType.MARKET}, "invalid_price"),
        (5, None, {"order_type": OrderType.STOP}, "invalid_stop_price"),
        (5, 100, {"stop_price": 90}, "invalid_stop_price"),
    ],
)
def test_malformed_orders_are_rejected(
    desk: Desk, qty: int, price: int | None, fields: dict[str, Any], reason: str
) -> None:
    assert reasons(desk.order(1, BUY, qty, price, **fields)) == [(1, reason)]
    assert desk.resting() == []


def test_a_duplicate_open_order_id_is_rejected(desk: Desk) -> None:
    desk.order(1, BUY, 3, 100)
    assert reasons(desk.order(1, BUY, 3, 99)) == [(1, "duplicate_order_id")]
    assert desk.depth() == ([(100, 3)], [])


def test_an_unknown_symbol_is_rejected_not_raised(desk: Desk) -> None:
    assert reasons(desk.order(1, BUY, 3, 100, symbol="NOPE")) == [(1, "unknown_instrument")]
    assert [ev.reason for ev in of(desk.cancel(1, symbol="NOPE"), CancelRejected)] == ["unknown_instrument"]


def test_something_that_is_not_a_command_raises(desk: Desk) -> None:
    with pytest.raises(UnknownCommand):
        desk.engine.process("cancel everything")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ ids and determinism


def test_trade_and_fill_ids_derive_from_symbol_sequence_and_match_number(desk: Desk) -> None:
    desk.order(1, SELL, 1, 100, account=2)
    desk.order(2, SELL, 1, 101, account=2)
    events = desk.order(3, BUY, 2, 101)  # seq 3
    assert [f.trade_id for f in of(events, Fill)] == ["X-3-1", "X-3-2"]
    assert (of(events, Fill)[0].maker_fill_id, of(events, Fill)[0].taker_fill_id) == ("X-3-1-M", "X-3-1-T")


def test_priorities_derive_from_the_command_sequence(desk: Desk) -> None:
    [accepted] = of(desk.order(1, SELL, 1, 100), OrderAccepted)
    assert accepted.priority == 1 << PRIORITY_SHIFT


# ----------------------------------------------------------------------------------------- depth, restore


def test_depth_aggregates_quantity_per_price_level_best_first(desk: Desk) -> None:
    for order_id, (side, qty, price) in enumerate(
        [(BUY, 1, 98), (BUY, 2, 99), (BUY, 3, 99), (SELL, 4, 101), (SELL, 5, 103), (SELL, 6, 101)], start=1
    ):
        desk.order(order_id, side, qty, price, account=order_id)
    assert desk.depth() == ([(99, 5), (98, 1)], [(101, 10), (103, 5)])
    assert desk.engine.book("X").depth(1) == ([(99, 5)], [(101, 10)])
    assert desk.engine.book("X").depth(0) == ([], [])


def test_restore_keeps_time_priority_regardless_of_input_order(desk: Desk) -> None:
    desk.order(1, SELL, 5, 100, account=2)
    desk.order(2, SELL, 5, 100, account=3)
    desk.order(3, BUY, 5, order_type=OrderType.STOP, stop_price=120, account=4)
    snapshot = desk.engine.book("X").resting_orders()
    restarted = MatchingEngine()
    book = restarted.restore("X", reversed(snapshot), last_price=99)
    assert book.resting_orders() == snapshot
    assert book.last_price == 99
    events = restarted.process(
        NewOrder(
            seq=50,
            ts_ns=50,
            symbol="X",
            order_id=9,
            account_id=5,
            side=BUY,
            order_type=OrderType.LIMIT,
            qty=5,
            price=100,
        )
    )
    assert trades(events) == [(1, 9, 100, 5)]


def test_restore_refuses_impossible_books(desk: Desk) -> None:
    def state(order_id: int, side: Side, price: int, priority: int, qty: int = 5) -> OrderState:
        return OrderState(
            order_id=order_id,
            account_id=1,
            side=side,
            order_type=OrderType.LIMIT,
            qty=qty,
            filled_qty=0,
            price=price,
            stop_price=None,
            time_in_force=TimeInForce.GTC,
            expire_at_ns=None,
            post_only=False,
            stp=SelfTradePrevention.CANCEL_NEWEST,
            priority=priority,
        )

    with pytest.raises(BookStateError, match="twice"):
        MatchingEngine().restore("X", [state(1, BUY, 99, 1), state(1, BUY, 98, 2)])
    engine = MatchingEngine()
    with pytest.raises(BookStateError, match="crossed"):
        engine.restore("X", [state(1, BUY, 101, 1), state(2, SELL, 100, 2)])
    assert len(engine.book("X")) == 0  # a refused restore leaves nothing half-built
    engine.restore("X", [state(1, BUY, 99, 1)])
    assert engine.book("X").depth() == ([(99, 5)], [])
    with pytest.raises(BookStateError, match="nothing left"):
        MatchingEngine().restore("X", [state(1, BUY, 99, 1, qty=0)])
    desk.order(1, BUY, 3, 99)
    with pytest.raises(BookStateError, match="not empty"):
        desk.engine.book("X").restore([state(2, BUY, 98, 1)])


# ------------------------------------------------------------------------------------------ instrument grid


def test_instrument_spec_converts_exactly_between_decimals_and_ticks_and_lots() -> None:
    spec = InstrumentSpec("BTC-USD", tick_size=Decimal("0.01"), lot_size=Decimal("0.0001"))
    assert spec.price_to_ticks(Decimal("123.45")) == 12345
    assert spec.ticks_to_price(12345) == Decimal("123.45")
    assert str(spec.ticks_to_price(12345)) == "123.45"
    assert spec.qty_to_lots(Decimal("1.5")) == 15000
    assert spec.lots_to_qty(15000) == Decimal("1.5")
    big = Decimal("98765432109876543210.12")
    assert spec.ticks_to_price(spec.price_to_ticks(big)) == big


def test_instrument_spec_refuses_off_grid_values_instead_of_rounding() -> None:
    spec = InstrumentSpec("X", tick_size=Decimal("0.05"), lot_size=Decimal("10"))
    with pytest.raises(OffGridValue):
        spec.price_to_ticks(Decimal("1.07"))
    with pytest.raises(OffGridValue):
        spec.qty_to_lots(Decimal("15"))
    with pytest.raises(OffGridValue):
        spec.price_to_ticks(Decimal("NaN"))
    with pytest.raises(TypeError):
        spec.price_to_ticks(1.05)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        InstrumentSpec("X", tick_size=Decimal("0"), lot_size=Decimal("1"))


# ---------------------------------------------------------------------------------- stops: modify, expiry


def test_a_pending_stop_limit_can_be_repriced_and_resized_before_it_triggers(desk: Desk) -> None:
    desk.order(1, BUY, 5, 103, order_type=OrderType.STOP_LIMIT, stop_price=101, account=3)
    [modified] = of(desk.modify(1, new_qty=2, new_price=104), OrderModified)
    assert (modified.qty, modified.price) == (2, 104)
    desk.order(2, SELL, 1, 101, account=2)
    desk.order(3, SELL, 5, 104, account=2)
    events = desk.order(4, BUY, 1, 101, account=4)
    assert trades(events)[-1] == (3, 1, 104, 2)


def test_a_stop_market_order_takes_no_limit_price_on_modify(desk: Desk) -> None:
    desk.order(1, BUY, 5, order_type=OrderType.STOP, stop_price=101)
    assert [ev.reason for ev in of(desk.modify(1, new_price=100), ModifyRejected)] == ["invalid_price"]


def test_a_pending_gtd_stop_expires(desk: Desk) -> None:
    desk.order(1, BUY, 5, order_type=OrderType.STOP, stop_price=101, time_in_force=TimeInForce.GTD, expire_at_ns=500)
    events = desk.engine.process(Expire(seq=10, now_ns=500))
    assert [ev.order_id for ev in of(events, OrderExpired)] == [1]
    assert desk.resting() == []


def test_a_restored_stop_still_triggers(desk: Desk) -> None:
    desk.order(1, BUY, 2, order_type=OrderType.STOP, stop_price=101, account=3)
    desk.order(2, SELL, 1, 101, account=2)
    desk.order(3, SELL, 2, 102, account=2)
    restarted = MatchingEngine()
    restarted.restore("X", desk.engine.book("X").resting_orders())
    events = restarted.process(
        NewOrder(
            seq=9,
            ts_ns=9,
            symbol="X",
            order_id=4,
            account_id=4,
            side=BUY,
            order_type=OrderType.LIMIT,
            qty=1,
            price=101,
        )
    )
    assert [ev.order_id for ev in of(events, StopTriggered)] == [1]
    assert trades(events)[-1] == (3, 1, 102, 2)


# -------------------------------------------------------------------------------------- L2 increments, API


def test_level_changes_report_each_touched_level_with_its_new_total_then_reset(desk: Desk) -> None:
    book = desk.engine.book("X")
    desk.order(1, SELL, 5, 101, account=2)
    desk.order(2, SELL, 5, 102, account=2)
    desk.order(3, BUY, 3, 99, account=3)
    assert book.take_level_changes() == ([(99, 3)], [(101, 5), (102, 5)])
    assert book.take_level_changes() == ([], [])
    desk.order(4, BUY, 7, 102, account=4)  # takes 101 entirely and 2 of 102
    assert book.take_level_changes() == ([], [(101, 0), (102, 3)])
    desk.cancel(3)
    desk.modify(2, new_qty=4)  # 2 filled, so 2 left: a quantity decrease in place
    assert book.take_level_changes() == ([(99, 0)], [(102, 2)])


def test_events_are_immutable_values() -> None:
    from dataclasses import FrozenInstanceError

    fill = Fill(1, "X", 1, 100, 5, BUY, 10, 1, 0, 11, 2, 0)
    assert fill == Fill(
        seq=1,
        symbol="X",
        match_no=1,
        price=100,
        qty=5,
        aggressor_side=BUY,
        maker_order_id=10,
        maker_account_id=1,
        maker_leaves_qty=0,
        taker_order_id=11,
        taker_account_id=2,
        taker_leaves_qty=0,
    )
    with pytest.raises(FrozenInstanceError):
        fill.qty = 6  # type: ignore[misc]
    with pytest.raises(TypeError):
        OrderAccepted(1, "X", 2)  # type: ignore[call-arg]


def test_engine_built_events_equal_class_built_ones() -> None:
    """The engine builds its events without calling their classes (``book._builder``): what comes out must be
    the very class, equal and hashing like the class-built value, and just as frozen (no store, no delete)."""
    from dataclasses import FrozenInstanceError, fields

    from tradeplane.domain import book as book_module

    built = {
        book_module._accepted: OrderAccepted,
        book_module._rejected: OrderRejected,
        book_module._fill: Fill,
        book_module._canceled: OrderCanceled,
        book_module._expired: OrderExpired,
        book_module._modified: OrderModified,
        book_module._modify_rejected: ModifyRejected,
        book_module._cancel_rejected: CancelRejected,
        book_module._stop_triggered: StopTriggered,
    }
    for build, cls in built.items():
        values = [f"v{i}" if f.type == "str" else i for i, f in enumerate(fields(cls))]
        event = build(*values)
        assert type(event) is cls
        assert event == cls(*values) and hash(event) == hash(cls(*values))
        assert repr(event) == repr(cls(*values))
        with pytest.raises(FrozenInstanceError):
            event.seq = 99
        with pytest.raises(FrozenInstanceError):
            del event.seq
    assert len(built) == len(Event.__args__)  # type: ignore[attr-defined]


def test_process_into_collects_a_batch_in_order(desk: Desk) -> None:
    batch: list[Event] = []
    for seq, side in ((1, SELL), (2, BUY)):
        desk.engine.process_into(
            NewOrder(
                seq=seq,
                ts_ns=seq,
                symbol="X",
                order_id=seq,
                account_id=seq,
                side=side,
                order_type=OrderType.LIMIT,
                qty=1,
                price=100,
            ),
            batch,
        )
    assert [type(ev) for ev in batch] == [OrderAccepted, OrderAccepted, Fill]
