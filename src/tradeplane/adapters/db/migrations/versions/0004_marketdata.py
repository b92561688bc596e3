"""Market data: the trade timestamps candle upserts merge on.

``candles.open_ts_ns`` / ``close_ts_ns`` are the epoch-nanosecond timestamps of the bucket's first and last
trade. The ingester upserts a candle many times while its bucket is open, and after a restart it starts
with an empty aggregator while the stored candle already holds earlier trades: to merge exactly (open from
the earliest trade, close from the latest, a tie keeping the first to arrive as open and the last to arrive
as close) the stored candle must say when its open and close happened. Nanoseconds, not ``timestamptz``:
ticks are ordered by nanosecond timestamps and a microsecond would tie trades the aggregator tells apart.
NULL for candles written without them (the merge then keeps the stored open and takes the new close).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _candles_is_table() -> bool:
    kind = op.get_bind().execute(sa.text("SELECT relkind::text FROM pg_class WHERE oid = to_regclass('candles')"))
    return kind.scalar() in ("r", "p")


def upgrade() -> None:
    if not _candles_is_table():
        return
    op.add_column(
        "candles",
        sa.Column("open_ts_ns", sa.BigInteger(), nullable=True, comment="epoch ns of the first trade in the bucket"),
    )
    op.add_column(
        "candles",
        sa.Column("close_ts_ns", sa.BigInteger(), nullable=True, comment="epoch ns of the last trade in the bucket"),
    )


def downgrade() -> None:
    if not _candles_is_table():
        return
    op.drop_column("candles", "close_ts_ns")
    op.drop_column("candles", "open_ts_ns")
