"""Two more foreign keys off the order path: instruments and ledger transactions are never removed instead.

Each foreign-key check is a ``SELECT ... FOR KEY SHARE`` through SPI on the referenced row, which also writes the
lock into that row's tuple header (a dirtied page and a WAL record). This revision drops the two left on the
order path and puts in their place a rule that the referenced rows are never removed:

- ``orders.instrument_id``: every placement share-locked the instrument's row, the hottest row of the schema:
  the engine updates it (``last_price``) in every batch while api placements lock it, so most of these locks
  became MultiXacts. Every writer of ``orders`` (``services.orders``, the placement statements) takes the
  instrument from the catalog and reads that instrument's row in the same transaction (the exposure read joins
  it), and instruments are now never deleted, truncated or given another id: ``tp_instruments_kept`` refuses
  each (an instrument is delisted through its ``status``). So an order's instrument exists when the order is
  written and ever after. The other references to instruments (fills' orders, positions, trades, candles,
  risk limits, trading sessions) keep their keys; the guard makes their ``ON DELETE`` actions moot.
- ``ledger_entries.transaction_id``: checked per entry (4 to 6 an engine fill). ``tp_ledger_entries_balanced``
  (0016), which already runs once per INSERT statement over the statement's entries, now also looks up the
  ledger transactions they name, with no lock, and refuses the statement as the key did (``foreign_key_violation``,
  the key's name) if one does not exist. No lock is needed because ledger
  transactions are never deleted, truncated or given another id either (``tp_ledger_transactions_kept``):
  that is also what the zero-sum rule needs, since an unbalanced share is queued for COMMIT through its
  ``ledger_transactions`` row. ``services.ledger.post_many``, the only writer, inserts the ledger
  transactions in the same statement as their entries, so the lookups find rows in pages just written.

Both guards are statement triggers for DELETE and TRUNCATE, and a row trigger for an UPDATE that changes ``id``
(the ``WHEN`` clause is evaluated without calling the function, so the engine's updates of ``last_price`` and
0016's ``kind = kind`` cost nothing more). ``check_invariants`` (tests) looks for orders and entries whose
reference is missing.

Measured: the bench's own PostgreSQL (``pg_stat_statements``, ``tests/bench/bench_orders_e2e.py --rate 500``) ran
6.0 foreign-key checks per order before, 3.5 after. Posting 20 four-entry ledger transactions per statement
through ``post_many`` (backend CPU per ledger transaction, medians of 3 interleaved rounds on a shared 2-core
machine): 160 us with the key, 113 us with this check, 113 us with no existence check at all.

Revision ID: 0017
Revises: 0016
Create Date: 2026-11-22
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

from alembic import op

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

KEYS = (
    ("orders", "fk_orders_instrument_id_instruments", "instrument_id", "instruments"),
    ("ledger_entries", "fk_ledger_entries_transaction_id_ledger_transactions", "transaction_id", "ledger_transactions"),
)


def _entries_balanced_0016() -> str:
    """0016's statement check, read from that revision's file (which never changes) rather than copied here."""
    spec = importlib.util.spec_from_file_location(
        "_revision_0016", Path(__file__).with_name("0016_ledger_balance_per_statement.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return str(module.ENTRIES_BALANCED).replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1)


ENTRIES_BALANCED_0016 = _entries_balanced_0016()

# 0016's check, plus: every ledger transaction the statement's entries name exists. One pass over the statement's
# rows, as 0016's; the existence probe runs once per (ledger transaction, asset) group (OFFSET 0 keeps it a probe of
# the primary key, never a hash of the whole table). A second grouping level to probe once per transaction cost
# more than the probes it saved.
ENTRIES_BALANCED = """
CREATE OR REPLACE FUNCTION tp_ledger_entries_balanced() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    unbalanced bigint[];
    missing bigint;
BEGIN
    SELECT array_agg(DISTINCT legs.transaction_id) FILTER (WHERE legs.total <> 0),
           min(legs.transaction_id) FILTER (
               WHERE NOT EXISTS (SELECT FROM ledger_transactions t WHERE t.id = legs.transaction_id OFFSET 0))
      INTO unbalanced, missing
      FROM (SELECT transaction_id, sum(amount) AS total FROM new_entries GROUP BY transaction_id, asset) AS legs;
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'ledger entries name ledger transaction %, which does not exist', missing
            USING ERRCODE = 'foreign_key_violation', TABLE = 'ledger_entries',
                  CONSTRAINT = 'fk_ledger_entries_transaction_id_ledger_transactions';
    END IF;
    IF unbalanced IS NOT NULL THEN
        UPDATE ledger_transactions SET kind = kind WHERE id = ANY (unbalanced);
    END IF;
    RETURN NULL;
END
$$
"""

REFUSE_REMOVAL = """
CREATE FUNCTION tp_refuse_removal() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% on % is refused: its rows are referenced by id and are never removed or renumbered',
        TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'restrict_violation';
END
$$
"""

KEPT_TABLES = ("instruments", "ledger_transactions")


def _guards(table: str) -> tuple[str, ...]:
    return (
        f"CREATE TRIGGER tp_{table}_kept BEFORE DELETE OR TRUNCATE ON {table}"
        " FOR EACH STATEMENT EXECUTE FUNCTION tp_refuse_removal()",
        f"CREATE TRIGGER tp_{table}_id_kept BEFORE UPDATE OF id ON {table}"
        " FOR EACH ROW WHEN (OLD.id IS DISTINCT FROM NEW.id) EXECUTE FUNCTION tp_refuse_removal()",
    )


def upgrade() -> None:
    op.execute(REFUSE_REMOVAL)
    for table in KEPT_TABLES:
        for ddl in _guards(table):
            op.execute(ddl)
    op.execute(ENTRIES_BALANCED)
    for table, name, _, _ in KEYS:
        op.drop_constraint(name, table, type_="foreignkey")


def downgrade() -> None:
    for table, name, column, referred in KEYS:
        op.create_foreign_key(name, table, referred, [column], ["id"])
    op.execute(ENTRIES_BALANCED_0016)
    for table in KEPT_TABLES:
        op.execute(f"DROP TRIGGER tp_{table}_id_kept ON {table}")
        op.execute(f"DROP TRIGGER tp_{table}_kept ON {table}")
    op.execute("DROP FUNCTION tp_refuse_removal()")
