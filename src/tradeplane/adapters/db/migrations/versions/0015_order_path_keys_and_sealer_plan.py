"""Fewer foreign-key checks on the order path; a sealer whose cost does not grow with the chain.

Foreign keys. Every check is a ``SELECT ... FOR KEY SHARE`` through SPI on the referenced row. The engine's
checks land on rows that the api holds ``FOR NO KEY UPDATE`` at the same moment (the traders' accounts, locked by
every placement) or that both engine shards lock (the house fee account), so each one records a MultiXact. The
bench's own PostgreSQL (``pg_stat_statements``, ``tests/bench/bench_orders_e2e.py``) ran 10.5 checks per order.
This revision drops the four whose reference something else already guarantees:

- ``ledger_entries.account_id``: ``services.ledger.post_many``, the only writer, moves the balance of every
  (account, asset) it posts in the same statement, and ``balances.account_id`` keeps its foreign key: a new
  (account, asset) pair is checked there, once, rather than on every entry, and an account with a balance row
  cannot be deleted (the balances key refuses it). Migration 0010 argued the same for ``ledger_entries.asset``.
- ``holds.account_id``: every hold belongs to an order (``holds.order_id``, which keeps its key), and its writers
  (``services.orders``) copy the account of that order: the placement statement from the order row it inserts,
  a modify from the order row it locked. The order's own ``account_id`` keeps its key.
- ``fills.account_id`` and ``fills.instrument_id``: the settlement statement takes both from the fill's order row
  (a join on ``fills.order_id``, which keeps its key), so they are the order's, whose columns keep their keys.

The sealer. 0009's ``tp_audit_log_seal`` finds the window's unsealed rows with ``NOT EXISTS`` on ``audit_chain``.
Inside PL/pgSQL the statement runs a generic plan (its bounds are variables), and the planner turned the
``NOT EXISTS`` into a hash anti join over the whole of ``audit_chain``: every call read every chain row ever
written, 2.3 ms a call after 20,000 orders in the bench, 29 ms with 20,000 chain rows against a window of 240,
and it grows without bound. ``OFFSET 0`` keeps the ``NOT EXISTS`` a per-row probe of ``uq_audit_chain_audit_id``
(1.5 ms for the same 240 rows), so a call costs what its window holds. The function is otherwise 0009's.

Revision ID: 0015
Revises: 0014
Create Date: 2026-11-22
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

KEYS = (
    ("ledger_entries", "fk_ledger_entries_account_id_accounts", "account_id", "accounts"),
    ("holds", "fk_holds_account_id_accounts", "account_id", "accounts"),
    ("fills", "fk_fills_account_id_accounts", "account_id", "accounts"),
    ("fills", "fk_fills_instrument_id_instruments", "instrument_id", "instruments"),
)


def _seal_0009() -> str:
    """0009's sealer, read from that revision's file (which never changes) rather than copied here."""
    spec = importlib.util.spec_from_file_location(
        "_revision_0009", Path(__file__).with_name("0009_audit_chain_table.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return str(module.AUDIT_SEAL).replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1)


SEAL_0009 = _seal_0009()

_WINDOW_PROBE = "AND NOT EXISTS (SELECT FROM audit_chain c WHERE c.audit_id = a.id)\n                         ORDER BY"
# The window's probe stays a correlated subplan (OFFSET 0 keeps the planner from pulling it up into an anti join).
SEAL = SEAL_0009.replace(_WINDOW_PROBE, _WINDOW_PROBE.replace("c.audit_id = a.id)", "c.audit_id = a.id OFFSET 0)"), 1)
if SEAL == SEAL_0009:
    raise RuntimeError("revision 0015: the window probe of 0009's sealer was not found")


def upgrade() -> None:
    for table, name, _, _ in KEYS:
        op.drop_constraint(name, table, type_="foreignkey")
    op.execute(SEAL)


def downgrade() -> None:
    op.execute(SEAL_0009)
    for table, name, column, referred in KEYS:
        op.create_foreign_key(name, table, referred, [column], ["id"])
