"""Holds: what an open order reserves, and the stable symbol-to-shard map."""

from __future__ import annotations

from decimal import Decimal

from hypothesis import example, given
from hypothesis import strategies as st

from tradeplane.domain.orders import Side
from tradeplane.domain.reservations import reservation, shard_for
from tradeplane.services.settlement import fee_for

BASE = {
    "maker_fee_rate": Decimal("0.0002"),
    "taker_fee_rate": Decimal("0.0005"),
    "margin_rate": Decimal("0.10"),
    "base_asset": "BTC",
    "quote_asset": "USD",
    "quote_scale": 2,
}


def test_cash_buy_reserves_notional_plus_worst_fee_rounded_up() -> None:
    r = reservation(
        side=Side.BUY, account_kind="cash", leaves_qty=Decimal("0.0003"), hold_price=Decimal("65000.01"), **BASE
    )
    assert r.asset == "USD"
    assert r.amount == Decimal("19.51")  # 19.500003 * 1.0005 = 19.509753... rounded up to the cent


def test_cash_sell_reserves_the_quantity_in_the_base_asset() -> None:
    r = reservation(side=Side.SELL, account_kind="cash", leaves_qty=Decimal("1.5"), hold_price=Decimal("10"), **BASE)
    assert (r.asset, r.amount) == ("BTC", Decimal("1.5"))


def test_margin_reserves_initial_margin_on_either_side() -> None:
    for side in Side:
        r = reservation(side=side, account_kind="margin", leaves_qty=Decimal("2"), hold_price=Decimal("100"), **BASE)
        assert (r.asset, r.amount) == ("USD", Decimal("20.10"))


def test_a_margin_reduce_only_order_reserves_the_worst_fee_alone() -> None:
    for side in Side:
        r = reservation(
            side=side,
            account_kind="margin",
            leaves_qty=Decimal("2"),
            hold_price=Decimal("100"),
            reduce_only=True,
            **BASE,
        )
        assert (r.asset, r.amount) == ("USD", Decimal("0.10"))
    cash = reservation(
        side=Side.SELL,
        account_kind="cash",
        leaves_qty=Decimal("2"),
        hold_price=Decimal("100"),
        reduce_only=True,
        **BASE,
    )
    assert (cash.asset, cash.amount) == ("BTC", Decimal("2"))  # a cash account's sell holds what it sells


@given(
    st.decimals(min_value=Decimal("0.0001"), max_value=Decimal("1000"), places=4),
    st.decimals(min_value=Decimal("0.01"), max_value=Decimal("100000"), places=2),
    st.decimals(min_value=Decimal("0.01"), max_value=Decimal("100000"), places=2),
)
def test_a_buy_fill_never_costs_more_than_the_hold_it_releases(qty: Decimal, limit: Decimal, fill: Decimal) -> None:
    fill = min(fill, limit)  # a buy fills at or below its limit
    hold = reservation(side=Side.BUY, account_kind="cash", leaves_qty=qty, hold_price=limit, **BASE).amount
    cost = qty * fill * (1 + BASE["taker_fee_rate"])
    assert cost <= hold


@given(
    st.lists(st.integers(min_value=1, max_value=10_000), min_size=1, max_size=40),
    st.decimals(min_value=Decimal("0.01"), max_value=Decimal("100000"), places=2),
    st.lists(st.decimals(min_value=Decimal("0"), max_value=Decimal("0.5"), places=2), min_size=40, max_size=40),
)
@example(lots=[1000] * 10, limit=Decimal("100.00"), discounts=[Decimal(0)] * 40)  # ten fees of 0.005 each
def test_an_order_filled_in_pieces_never_costs_more_than_its_hold(
    lots: list[int], limit: Decimal, discounts: list[Decimal]
) -> None:
    """Each fill's fee is rounded on its own: however an order is split, cash paid stays within the hold."""
    fills = [(Decimal(n).scaleb(-4), max(limit - d, Decimal("0.01"))) for n, d in zip(lots, discounts, strict=False)]
    qty = sum((q for q, _ in fills), Decimal(0))
    hold = reservation(side=Side.BUY, account_kind="cash", leaves_qty=qty, hold_price=limit, **BASE).amount
    paid = sum((q * p + fee_for(q * p, BASE["taker_fee_rate"], 2) for q, p in fills), Decimal(0))
    assert paid <= hold


def test_shards_are_stable_and_in_range() -> None:
    assert shard_for("BTC-USD", 1) == 0
    assert [shard_for("BTC-USD", 4) for _ in range(3)] == [shard_for("BTC-USD", 4)] * 3
    assert shard_for("BTC-USD", 4) == 515687408 % 4  # crc32, fixed forever: changing it would move books
    assert {shard_for(f"S{i}", 4) for i in range(100)} == {0, 1, 2, 3}
