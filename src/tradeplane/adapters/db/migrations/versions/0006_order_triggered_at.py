"""Orders: when a stop triggered.

``orders.triggered_at`` is set by the matching engine, in its batch transaction, when a stop or stop-limit
order leaves the stop book. The engine rebuilds its books from PostgreSQL on start, and before this column it
could only guess a trigger from a fill or from a last price beyond the stop: a stop-limit that triggered,
rested unfilled and then saw the price move back went back to the stop book on restart, out of the live book
it belongs in. Only stop and stop-limit orders trigger (CHECK). Rows written before this revision stay NULL;
the engine still treats a filled quantity or a crossed stop as a trigger for them.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "orders",
        sa.Column(
            "triggered_at",
            sa.DateTime(timezone=True),
            nullable=True,
            comment="when the stop left the stop book (engine)",
        ),
    )
    op.create_check_constraint(
        "triggered_only_stops", "orders", "triggered_at IS NULL OR type IN ('stop', 'stop_limit')"
    )


def downgrade() -> None:
    # dropping a column drops its CHECK constraint with it
    op.drop_column("orders", "triggered_at")
