"""Order vocabulary and the one status transition table."""

from __future__ import annotations

import itertools

import pytest

from tradeplane.domain.orders import (
    OPEN_STATUSES,
    ORDER_TRANSITIONS,
    TERMINAL_STATUSES,
    IllegalTransition,
    OrderState,
    OrderStatus,
    OrderType,
    SelfTradePrevention,
    Side,
    TimeInForce,
    can_transition,
    status_after_fill,
    transition,
)

S = OrderStatus


def test_enum_values_are_the_lowercase_strings_the_database_check_constraints_hold() -> None:
    assert [s.value for s in Side] == ["buy", "sell"]
    assert [t.value for t in OrderType] == ["market", "limit", "stop", "stop_limit"]
    assert [t.value for t in TimeInForce] == ["gtc", "ioc", "fok", "day", "gtd"]
    assert [s.value for s in OrderStatus] == [
        "pending_new",
        "new",
        "partially_filled",
        "filled",
        "pending_cancel",
        "canceled",
        "rejected",
        "expired",
        "replaced",
    ]
    assert [m.value for m in SelfTradePrevention] == ["cancel_newest", "cancel_oldest", "cancel_both"]
    assert OrderStatus("partially_filled") is S.PARTIALLY_FILLED


def test_the_default_self_trade_prevention_mode_of_a_new_order_is_cancel_newest() -> None:
    from tradeplane.domain.matching import NewOrder

    order = NewOrder(
        seq=1,
        ts_ns=1,
        symbol="X",
        order_id=1,
        account_id=1,
        side=Side.BUY,
        order_type=OrderType.LIMIT,
        qty=1,
        price=1,
    )
    assert order.stp is SelfTradePrevention.CANCEL_NEWEST


def test_side_opposite() -> None:
    assert Side.BUY.opposite is Side.SELL
    assert Side.SELL.opposite is Side.BUY


def test_every_status_has_a_row_in_the_table() -> None:
    assert set(ORDER_TRANSITIONS) == set(OrderStatus)


def test_terminal_statuses_have_no_way_out() -> None:
    assert {S.FILLED, S.CANCELED, S.REJECTED, S.EXPIRED, S.REPLACED} == TERMINAL_STATUSES
    for terminal, target in itertools.product(TERMINAL_STATUSES, OrderStatus):
        with pytest.raises(IllegalTransition):
            transition(terminal, target)


def test_open_and_terminal_statuses_partition_all_statuses() -> None:
    assert set(OrderStatus) == OPEN_STATUSES | TERMINAL_STATUSES
    assert not OPEN_STATUSES & TERMINAL_STATUSES


@pytest.mark.parametrize(
    ("current", "target"),
    [
        (S.PENDING_NEW, S.NEW),
        (S.PENDING_NEW, S.REJECTED),
        (S.PENDING_NEW, S.FILLED),  # the engine's first report can already be a complete fill
        (S.NEW, S.PARTIALLY_FILLED),
        (S.NEW, S.FILLED),
        (S.PARTIALLY_FILLED, S.PARTIALLY_FILLED),
        (S.PARTIALLY_FILLED, S.FILLED),
        (S.NEW, S.PENDING_CANCEL),
        (S.PENDING_CANCEL, S.CANCELED),
        (S.PENDING_CANCEL, S.FILLED),  # a fill raced the cancel
        (S.PENDING_CANCEL, S.NEW),  # the cancel was refused
        (S.NEW, S.EXPIRED),
        (S.PARTIALLY_FILLED, S.CANCELED),
        (S.NEW, S.REPLACED),
    ],
)
def test_allowed_transitions_return_the_target(current: OrderStatus, target: OrderStatus) -> None:
    assert can_transition(current, target)
    assert transition(current, target) is target


@pytest.mark.parametrize(
    ("current", "target"),
    [
        (S.FILLED, S.NEW),
        (S.CANCELED, S.FILLED),
        (S.REJECTED, S.NEW),
        (S.NEW, S.REJECTED),  # an acknowledged order is never rejected afterwards
        (S.NEW, S.PENDING_NEW),
        (S.PARTIALLY_FILLED, S.NEW),  # fills are never undone
        (S.NEW, S.NEW),
        (S.EXPIRED, S.CANCELED),
    ],
)
def test_illegal_transitions_raise_with_both_statuses(current: OrderStatus, target: OrderStatus) -> None:
    assert not can_transition(current, target)
    with pytest.raises(IllegalTransition) as raised:
        transition(current, target)
    assert raised.value.current is current
    assert raised.value.target is target
    assert current.value in str(raised.value) and target.value in str(raised.value)


def test_transition_agrees_with_the_table_for_every_pair() -> None:
    for current, target in itertools.product(OrderStatus, OrderStatus):
        allowed = target in ORDER_TRANSITIONS[current]
        if allowed:
            assert transition(current, target) is target
        else:
            with pytest.raises(IllegalTransition):
                transition(current, target)


def test_the_table_cannot_be_modified_at_run_time() -> None:
    with pytest.raises(TypeError):
        ORDER_TRANSITIONS[S.FILLED] = frozenset({S.NEW})  # type: ignore[index]


def test_status_after_fill() -> None:
    assert status_after_fill(filled_qty=5, leaves_qty=0) is S.FILLED
    assert status_after_fill(filled_qty=2, leaves_qty=3) is S.PARTIALLY_FILLED
    assert status_after_fill(filled_qty=0, leaves_qty=3) is S.NEW


def test_order_state_leaves_is_total_minus_filled() -> None:
    state = OrderState(
        order_id=1,
        account_id=2,
        side=Side.SELL,
        order_type=OrderType.LIMIT,
        qty=10,
        filled_qty=4,
        price=100,
        stop_price=None,
        time_in_force=TimeInForce.GTC,
        expire_at_ns=None,
        post_only=False,
        stp=SelfTradePrevention.CANCEL_NEWEST,
        priority=1,
    )
    assert state.leaves_qty == 6
