"""No foreign keys from the hot money tables to ``assets``.

Every foreign key check locks the referenced row (``FOR KEY SHARE``). ``ledger_entries.asset``,
``holds.asset`` and ``fills.fee_asset`` all point at a handful of ``assets`` rows, so every placement (its
hold) and every engine shard (its fills and ledger entries) locked the same ``USD`` row at once, and
PostgreSQL records concurrent share lockers of one row as a MultiXact, created afresh as lockers come and go.
Under ``EXPLAIN ANALYZE`` in the two-shard batch benchmark the ``fills.fee_asset`` check took 31 us a row,
against 5-6 us for the checks on accounts and instruments; without these three keys PostgreSQL spent 11-13 %
less CPU per order (``tests/bench/bench_orders_e2e.py --batch 100 --shards 2``, two interleaved pairs).

What still guarantees a known asset in each column:
- ``ledger_entries.asset``: ``services.ledger.post_many``, the only writer, moves the balance of every
  (account, asset) it posts in the same transaction, and ``balances.asset`` keeps its foreign key, so a new
  (account, asset) pair is checked there, once, rather than on every entry.
- ``holds.asset``: the base or quote asset of the order's instrument, whose columns reference ``assets``.
- ``fills.fee_asset``: the quote asset of the fill's instrument, likewise.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

KEYS = (
    ("ledger_entries", "fk_ledger_entries_asset_assets", "asset"),
    ("holds", "fk_holds_asset_assets", "asset"),
    ("fills", "fk_fills_fee_asset_assets", "fee_asset"),
)


def upgrade() -> None:
    for table, name, _ in KEYS:
        op.drop_constraint(name, table, type_="foreignkey")


def downgrade() -> None:
    for table, name, column in KEYS:
        op.create_foreign_key(name, table, "assets", [column], ["code"])
