"""Holds: at most one active hold per order, found by its own index.

The engine releases or resizes the holds of every order a batch finished or filled with
``UPDATE holds ... FROM unnest($1) WHERE order_id = ... AND released_at IS NULL``. With only
``ix_holds_order_id`` and the partial ``ix_holds_active_account_id_asset``, a planner without fresh
statistics (a new or fast-growing table, before autovacuum's next ANALYZE) ANDed the two bitmaps and scanned
the whole active-holds index once per order: 88 us per order for a batch of 2,000 on the embedded default
benchmark, against 6 us with statistics.

A partial unique index on ``order_id WHERE released_at IS NULL`` matches that condition exactly, so the
plan is one unique lookup per order whatever the statistics say, and it states the rule the code already
keeps: placement inserts one hold per order and a modify resizes it, so an order never has two active
holds. It replaces ``ix_holds_order_id``: nothing reads released holds by order, and orders are never
deleted.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op
from sqlalchemy import text

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    doubled = (
        op.get_bind()
        .execute(
            text(
                "SELECT order_id FROM holds WHERE released_at IS NULL AND order_id IS NOT NULL"
                " GROUP BY order_id HAVING count(*) > 1 ORDER BY order_id LIMIT 10"
            )
        )
        .scalars()
        .all()
    )
    if doubled:
        raise RuntimeError(
            f"orders {doubled} have more than one active hold; release the extra holds"
            " (UPDATE holds SET released_at = now() WHERE id = ...) and run the migration again"
        )
    op.create_index(
        "ux_holds_active_order_id",
        "holds",
        ["order_id"],
        unique=True,
        postgresql_where=text("released_at IS NULL"),
    )
    op.drop_index("ix_holds_order_id", table_name="holds")


def downgrade() -> None:
    op.create_index("ix_holds_order_id", "holds", ["order_id"])
    op.drop_index("ux_holds_active_order_id", table_name="holds")
