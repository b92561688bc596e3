"""Orders: a rejected order for a symbol no instrument has.

Issue 3 asks that every risk denial be stored as a rejected order, so it is auditable. An order for a symbol
that names no instrument had only an audit row: ``orders.instrument_id`` was NOT NULL. Such an order is now
stored with a NULL ``instrument_id`` and the symbol the client asked for in ``unlisted_symbol``; exactly one
of the two is set (CHECK), and only a rejected order may lack an instrument (CHECK), so no open order, fill
or hold can ever refer to a missing instrument. Its ``client_order_id`` is taken like any other order's: a
retry gets the same rejected order back.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.alter_column("orders", "instrument_id", existing_type=sa.BigInteger(), nullable=True)
    op.add_column(
        "orders",
        sa.Column(
            "unlisted_symbol",
            sa.String(32),
            nullable=True,
            comment="the symbol asked for when no instrument has it (rejected orders only)",
        ),
    )
    op.create_check_constraint(
        "instrument_or_unlisted_symbol", "orders", "(instrument_id IS NULL) = (unlisted_symbol IS NOT NULL)"
    )
    op.create_check_constraint("unlisted_only_rejected", "orders", "instrument_id IS NOT NULL OR status = 'rejected'")


def downgrade() -> None:
    # the rejected orders without an instrument cannot be kept under NOT NULL; their audit rows remain
    op.execute("DELETE FROM orders WHERE instrument_id IS NULL")
    op.drop_constraint("unlisted_only_rejected", "orders", type_="check")
    op.drop_column("orders", "unlisted_symbol")  # and the CHECK on it
    op.alter_column("orders", "instrument_id", existing_type=sa.BigInteger(), nullable=False)
