"""A ledger transaction that does not balance per asset cannot be built."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tradeplane.domain.ledger import LedgerEntry, LedgerTransaction, UnbalancedTransaction

amounts = st.decimals(min_value=Decimal("0.01"), max_value=Decimal("1e12"), places=2)


@given(st.lists(st.tuples(st.integers(1, 50), st.sampled_from(["USD", "BTC"]), amounts), min_size=1, max_size=10))
def test_mirrored_entries_always_balance(legs: list[tuple[int, str, Decimal]]) -> None:
    entries = []
    for account, asset, amount in legs:
        entries += [LedgerEntry(account, asset, amount), LedgerEntry(0, asset, -amount)]
    tx = LedgerTransaction("trade", "t", tuple(entries))
    for asset in {e.asset for e in tx.entries}:
        assert sum(e.amount for e in tx.entries if e.asset == asset) == 0


@given(amounts, st.decimals(min_value=Decimal("0.01"), max_value=Decimal("1"), places=2))
def test_any_imbalance_is_refused(amount: Decimal, skew: Decimal) -> None:
    with pytest.raises(UnbalancedTransaction):
        LedgerTransaction("deposit", "d", (LedgerEntry(1, "USD", amount), LedgerEntry(2, "USD", -amount + skew)))


def test_balance_is_per_asset() -> None:
    with pytest.raises(UnbalancedTransaction, match="does not balance"):
        LedgerTransaction("trade", "x", (LedgerEntry(1, "USD", Decimal("10")), LedgerEntry(2, "BTC", Decimal("-10"))))


def test_zero_entries_and_single_legs_are_refused() -> None:
    with pytest.raises(UnbalancedTransaction):
        LedgerTransaction("x", "x", (LedgerEntry(1, "USD", Decimal(0)), LedgerEntry(2, "USD", Decimal(0))))
    with pytest.raises(UnbalancedTransaction):
        LedgerTransaction("x", "x", (LedgerEntry(1, "USD", Decimal(1)),))
