"""Accounts: a default self-trade prevention mode.

Issue 3 sets self-trade prevention per account: cancel newest (the default), cancel oldest or cancel both.
``accounts.stp_mode`` holds the account's choice; an order that names no mode of its own gets the account's
when it is placed (``orders.stp_mode`` keeps what the order got, so changing the default later does not
change orders already placed).

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "accounts",
        sa.Column(
            "stp_mode",
            sa.String(16),
            nullable=False,
            server_default="cancel_newest",
            comment="self-trade prevention for orders that name none",
        ),
    )
    op.create_check_constraint("stp_mode", "accounts", "stp_mode IN ('cancel_newest', 'cancel_oldest', 'cancel_both')")


def downgrade() -> None:
    op.drop_column("accounts", "stp_mode")  # and its CHECK
