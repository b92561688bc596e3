"""Double-entry ledger values. A LedgerTransaction that does not sum to zero per asset cannot be built."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from decimal import Decimal


class UnbalancedTransaction(ValueError):
    """Entries of one transaction do not sum to zero for some asset: a bug, never a user error."""


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    account_id: int
    asset: str
    amount: Decimal  # positive credits the account, negative debits it; never zero


@dataclass(frozen=True, slots=True)
class LedgerTransaction:
    kind: str
    reference: str
    entries: tuple[LedgerEntry, ...]

    def __post_init__(self) -> None:
        if len(self.entries) < 2:
            raise UnbalancedTransaction("a transaction needs at least two entries")
        totals: dict[str, Decimal] = defaultdict(Decimal)
        for entry in self.entries:
            if entry.amount == 0:
                raise UnbalancedTransaction("zero-amount entry")
            totals[entry.asset] += entry.amount
        unbalanced = {asset: total for asset, total in totals.items() if total != 0}
        if unbalanced:
            raise UnbalancedTransaction(f"transaction {self.reference!r} does not balance: {unbalanced}")
