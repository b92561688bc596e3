"""The ledger's zero-sum rule is checked once per INSERT statement, not once per entry.

0001's ``tp_ledger_balanced`` was a deferred constraint trigger ``FOR EACH ROW`` on ``ledger_entries``: at COMMIT
it ran once per entry, re-summing the entry's whole ledger transaction each time (a transaction of n legs was
summed n times). On the order path that was 1.5 runs per order at about 37 us each (``pg_stat_statements``).

Now:

- ``tp_ledger_entries_balanced``: ``AFTER INSERT ... FOR EACH STATEMENT`` on ``ledger_entries``, with the
  statement's rows as a transition table. Once per statement it sums the statement's own entries per ledger
  transaction and asset. All balanced, nothing more happens: ``services.ledger.post_many``, the only writer,
  inserts every entry of every transaction it posts in one statement, so this is its whole cost, and it reads
  nothing but the statement's rows.
- A ledger transaction whose share of the statement does not balance is not refused there: its
  ``ledger_transactions`` row is touched (``kind = kind``), which queues the deferred constraint trigger
  ``tp_ledger_balanced`` (now ``AFTER UPDATE`` on ``ledger_transactions``, one row per ledger transaction) to
  sum all its entries at COMMIT with 0001's query and message. So a writer may still insert the legs of one
  transaction over several statements, in any order, as 0001 promised; it is refused at COMMIT (or at once under
  ``SET CONSTRAINTS tp_ledger_balanced IMMEDIATE``) unless they balance by then.

Nothing is weaker. Entries are immutable (UPDATE, DELETE and TRUNCATE are refused), so a ledger transaction
changes only by inserts, and a savepoint rollback takes back a statement's entries together with the check it
queued. At COMMIT, take the entries this database transaction added to a ledger transaction: either every
statement's share of them balanced, so they balance, or one of them queued the full sum. The entries committed
before balance too, since every earlier database transaction passed the same rule (0001's trigger before this
revision). A ledger transaction created in this database transaction, which is every one ``post_many`` writes,
has no other entries at all: its statement's share is its whole. Concurrent writers to one old ledger transaction
each add a balanced share, so their sum balances whatever order they commit in.

``tests/bench/bench_ledger_balance.py`` (4-entry ledger transactions through ``post_many``, medians of 6
interleaved rounds on a shared 2-core machine): PostgreSQL backend CPU per ledger transaction 902 -> 620 us when
each is committed alone, 237 -> 149 us in statements of 20; time inside the check functions 174 -> 49 us and
90 -> 7.5 us.

Revision ID: 0016
Revises: 0015
Create Date: 2026-11-26
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _ledger_balanced_0001() -> str:
    """0001's per-entry function, read from that revision's file (which never changes) rather than copied."""
    spec = importlib.util.spec_from_file_location("_revision_0001", Path(__file__).with_name("0001_initial.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return str(module.LEDGER_BALANCED).replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1)


LEDGER_BALANCED_0001 = _ledger_balanced_0001()
TRIGGER_0001 = (
    "CREATE CONSTRAINT TRIGGER tp_ledger_balanced AFTER INSERT ON ledger_entries"
    " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION tp_ledger_balanced()"
)

# A statement's own entries, summed per ledger transaction and asset: nothing is read from ledger_entries, so the
# cost does not depend on the ledger's size or statistics (an index probe per transaction, planned once by
# PL/pgSQL for an unknown number of them, was costed high enough to be JIT-compiled on every call). Transactions
# whose share does not balance get their row touched, which queues tp_ledger_balanced for COMMIT.
ENTRIES_BALANCED = """
CREATE FUNCTION tp_ledger_entries_balanced() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    unbalanced bigint[];
BEGIN
    SELECT array_agg(DISTINCT legs.transaction_id) INTO unbalanced
      FROM (SELECT transaction_id FROM new_entries GROUP BY transaction_id, asset HAVING sum(amount) <> 0) AS legs;
    IF unbalanced IS NOT NULL THEN
        UPDATE ledger_transactions SET kind = kind WHERE id = ANY (unbalanced);
    END IF;
    RETURN NULL;
END
$$
"""

# At COMMIT, once per ledger transaction the statement trigger found unbalanced: 0001's sum and message.
LEDGER_BALANCED = """
CREATE OR REPLACE FUNCTION tp_ledger_balanced() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    unbalanced record;
BEGIN
    SELECT asset, sum(amount) AS total INTO unbalanced
      FROM ledger_entries
     WHERE transaction_id = NEW.id
     GROUP BY asset
    HAVING sum(amount) <> 0
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'ledger transaction % does not balance: % entries sum to %',
            NEW.id, unbalanced.asset, unbalanced.total
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END
$$
"""

TRIGGERS = (
    "CREATE TRIGGER tp_ledger_entries_balanced AFTER INSERT ON ledger_entries REFERENCING NEW TABLE AS new_entries"
    " FOR EACH STATEMENT EXECUTE FUNCTION tp_ledger_entries_balanced()",
    "CREATE CONSTRAINT TRIGGER tp_ledger_balanced AFTER UPDATE ON ledger_transactions"
    " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION tp_ledger_balanced()",
)


def upgrade() -> None:
    op.execute("DROP TRIGGER tp_ledger_balanced ON ledger_entries")
    op.execute(LEDGER_BALANCED)
    op.execute(ENTRIES_BALANCED)
    for ddl in TRIGGERS:
        op.execute(ddl)


def downgrade() -> None:
    op.execute("DROP TRIGGER tp_ledger_balanced ON ledger_transactions")
    op.execute("DROP TRIGGER tp_ledger_entries_balanced ON ledger_entries")
    op.execute("DROP FUNCTION tp_ledger_entries_balanced()")
    op.execute(LEDGER_BALANCED_0001)
    op.execute(TRIGGER_0001)
