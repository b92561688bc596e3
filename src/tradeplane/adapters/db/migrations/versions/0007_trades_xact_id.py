"""Trades: the id of the transaction that inserted each trade, so market data can read the tape exactly once.

The market data worker ingests the engine's trades from this table (the system of record) rather than from
at-most-once pub/sub. A cursor over ``trade_id`` or ``ts`` cannot be exact: several engine shards commit
concurrently, so a trade with a smaller id or an earlier ``ts`` can become visible after a larger one was
read. Transaction ids can: every transaction below a snapshot's ``xmin`` has finished, so the trades with
``xact_id`` in ``[cursor, xmin)`` are final once read, and ``xmin`` is the next cursor (``engine_offsets``).

``xact_id`` is ``pg_current_xact_id()`` (64-bit, no wraparound) as BIGINT, set by the column default, so the
engine's INSERT is unchanged. Rows written before this revision stay NULL: the old feed already took them
from pub/sub, and the cursor never reads NULLs.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable first, then the default: adding a column with a volatile default would rewrite every
    # partition (chunk) and stamp old trades with this migration's transaction id.
    op.add_column(
        "trades",
        sa.Column("xact_id", sa.BigInteger(), nullable=True, comment="inserting transaction (market data cursor)"),
    )
    op.execute("ALTER TABLE trades ALTER COLUMN xact_id SET DEFAULT (pg_current_xact_id()::text)::bigint")
    op.create_index("ix_trades_xact_id", "trades", ["xact_id"])


def downgrade() -> None:
    op.drop_index("ix_trades_xact_id", table_name="trades")
    op.drop_column("trades", "xact_id")
