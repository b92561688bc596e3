"""Orders: the largest quantity the modifies in flight can leave an order with.

The engine may refuse any modify in flight (a post-only reprice that would take, a cut below what has filled
meanwhile), so the order does not necessarily end at the latest target: 10 raised to 20, then 5 at a crossing
price (refused), then a reprice ends at 20, not 5. The api funded the reprice for the target's 5, and the engine
then grew the hold to what 20 needs with no funds check. Now the api records the largest quantity any outcome
can give the order while modifies are in flight (``max_target_quantity``, meaningful only while
``modifies_requested > modifies_done``) and funds each modify for that quantity at the hold price.

Revision ID: 0014
Revises: 0013
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "orders",
        sa.Column(
            "max_target_quantity",
            sa.Numeric(38, 18, asdecimal=True),
            nullable=True,
            comment="largest quantity the modifies in flight can leave the order with (NULL: none in flight yet)",
        ),
    )
    # Modifies in flight at upgrade time: their earlier targets are unknown, so the latest target and the
    # order's quantity now are the best bound there is (what the api used before).
    op.execute(
        "UPDATE orders SET max_target_quantity = greatest(quantity, coalesce(target_quantity, quantity))"
        " WHERE modifies_requested > modifies_done"
    )


def downgrade() -> None:
    op.drop_column("orders", "max_target_quantity")
