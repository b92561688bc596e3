"""Orders: the modifies in flight, counted, and the terms they aim at.

Several modifies of one order can be on their way to the engine at once, so the api computes a modify's new
terms (and the hold they need) from what the earlier ones asked for. It used to read that from the last
``order.modify`` audit row, which still named the refused terms after the engine refused that modify: a later
quantity-only modify then reserved (and risk-checked) a price the client never asked for again.

Now the api counts the modifies it sends (``modifies_requested``, each modify command carries its number) and
the engine records the number of the last one it processed, applied or refused (``modifies_done``). While
``modifies_requested > modifies_done`` the order will have ``target_quantity`` / ``target_price`` (NULL: what
the order has now); otherwise its own quantity and price are the target.

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_AMOUNT = sa.Numeric(38, 18, asdecimal=True)


def upgrade() -> None:
    op.add_column(
        "orders",
        sa.Column(
            "modifies_requested",
            sa.Integer(),
            nullable=False,
            server_default=sa.text("0"),
            comment="modifies the api sent to the engine (the last one's number)",
        ),
    )
    op.add_column(
        "orders",
        sa.Column(
            "modifies_done",
            sa.Integer(),
            nullable=False,
            server_default=sa.text("0"),
            comment="number of the last modify the engine processed, applied or refused",
        ),
    )
    op.add_column(
        "orders",
        sa.Column(
            "target_quantity",
            _AMOUNT,
            nullable=True,
            comment="quantity the modifies in flight ask for (NULL: unchanged)",
        ),
    )
    op.add_column(
        "orders",
        sa.Column(
            "target_price",
            _AMOUNT,
            nullable=True,
            comment="limit price the modifies in flight ask for (NULL: unchanged)",
        ),
    )


def downgrade() -> None:
    for column in ("target_price", "target_quantity", "modifies_done", "modifies_requested"):
        op.drop_column("orders", column)
