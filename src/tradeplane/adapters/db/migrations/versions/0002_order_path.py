"""Order path: the mark price on instruments and the reservation price on orders.

- ``instruments.last_price`` / ``last_trade_at``: the last trade price, written by the matching engine in its
  batch transaction; it is the mark for unrealized P&L and the centre of the price band when present.
- ``orders.hold_price``: the price the funds hold was computed at (the limit price, or the band's worst price
  for a market order), so the engine can shrink the hold exactly as the order fills.
- ``ix_orders_open_account_id_instrument_id``: pre-trade risk counts an account's open orders and their
  leaves in one instrument on every placement; this partial index keeps that read small however deep the
  instrument's book is.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

AMOUNT: postgresql.NUMERIC[Decimal] = postgresql.NUMERIC(38, 18)


def upgrade() -> None:
    op.add_column("instruments", sa.Column("last_price", AMOUNT, nullable=True, comment="mark: last trade price"))
    op.add_column("instruments", sa.Column("last_trade_at", sa.DateTime(timezone=True), nullable=True))
    op.create_check_constraint("last_price_positive", "instruments", "last_price IS NULL OR last_price > 0")
    op.add_column(
        "orders",
        sa.Column("hold_price", AMOUNT, nullable=True, comment="price the funds hold is computed at"),
    )
    op.create_check_constraint("hold_price_positive", "orders", "hold_price IS NULL OR hold_price > 0")
    op.create_index(
        "ix_orders_open_account_id_instrument_id",
        "orders",
        ["account_id", "instrument_id"],
        unique=False,
        postgresql_where=sa.text("status IN ('pending_new', 'new', 'partially_filled', 'pending_cancel')"),
    )


def downgrade() -> None:
    op.drop_index("ix_orders_open_account_id_instrument_id", table_name="orders")
    # dropping a column drops its CHECK constraint with it
    op.drop_column("orders", "hold_price")
    op.drop_column("instruments", "last_trade_at")
    op.drop_column("instruments", "last_price")
