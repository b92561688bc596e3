"""Candles on TimescaleDB (continuous aggregates, compression, retention) and one candle query for both paths.

With TimescaleDB (``ticks`` is a hypertable, see 0001):

- Continuous aggregates ``candles_m1`` .. ``candles_d1`` with the columns of the ``candles`` table
  (``instrument_id, bucket, open, high, low, close, volume, tick_count``). ``candles_m1`` aggregates the
  ticks that carry a trade (``last IS NOT NULL``, as ``domain/candles.py`` defines a candle): open/close are
  ``first``/``last`` of the price by ``ts``, high/low the extremes, volume the sum, tick_count the count.
  The higher timeframes aggregate ``candles_m1`` (first open and last close by bucket, max, min, sums),
  which is the domain's rule that a higher timeframe is the resample of its M1 candles, and keeps their
  refresh to at most 1,440 M1 rows per instrument and day instead of re-reading every tick.
- Real-time aggregation is on (``materialized_only = false``): a query sees the materialized buckets plus
  the ticks above the watermark aggregated on the fly, so a candle is visible as soon as its tick commits.
- Refresh policies per timeframe. The M1 window starts 12 hours back: late ticks are refused by the
  validator long before that, and it stays inside the shortest retention (1 day), so a refresh never
  recomputes a bucket whose ticks retention has dropped (which would empty it). History loaded further
  back (a replay) is materialized with ``CALL tp_refresh_candles(start, end)``.
- ``ticks`` compressed (segment by ``instrument_id``, order by ``ts``) after 2 days.
- Retention drops ``ticks``, ``spreads`` and ``depth_snapshots`` chunks older than 30 days (seed 003);
  ``SELECT tp_set_market_data_retention(INTERVAL '90 days')`` changes it. Candles outlive the ticks.

On native PostgreSQL nothing of that exists; the ingester maintains the ``candles`` table.

On both paths the same three routines exist, so callers never ask which path they are on:

- ``tp_candles(instrument_id bigint, timeframe text, start timestamptz, end timestamptz,
  max_rows integer DEFAULT NULL, newest_first boolean DEFAULT false)`` returns
  ``(bucket, open, high, low, close, volume, tick_count)`` for ``start <= bucket < end``, ordered by bucket
  (newest first if asked), at most ``max_rows`` (NULL: all). It reads the continuous aggregate of the
  timeframe on TimescaleDB and ``candles`` natively; an unknown timeframe raises ``invalid_parameter_value``.
- ``CALL tp_refresh_candles(start, end)`` materializes every timeframe over the buckets touching
  ``[start, end)`` (M1 first, the others from it); a no-op natively. It commits between timeframes, so it
  must be called outside a transaction block.
- ``tp_set_market_data_retention(keep interval) RETURNS boolean`` replaces the retention policies (true) or,
  natively, does nothing and returns false (the market data worker drops partitions itself).

Known limit, shared with every SQL aggregate: ``ts`` has microsecond resolution and no arrival sequence is
stored, so when two trades of one instrument share the first (or last) microsecond of a bucket, which of them
is the open (close) is not defined here, whereas the ingester's aggregator takes the first (last) to arrive.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from alembic import op

from tradeplane.adapters.db.timeseries import storage_kind

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


class CandleView(NamedTuple):
    """One continuous aggregate and its refresh policy (offsets back from now, as SQL intervals).

    A NamedTuple, not a dataclass: Alembic loads revision files without registering them as modules.
    """

    timeframe: str
    width: str
    start_offset: str
    end_offset: str
    schedule: str

    @property
    def name(self) -> str:
        return f"candles_{self.timeframe.lower()}"


# Each window spans at least two buckets (TimescaleDB requires it); the end offset leaves the open bucket
# to real-time aggregation instead of re-materializing it on every run.
CANDLE_VIEWS: tuple[CandleView, ...] = (
    CandleView("M1", "1 minute", "12 hours", "1 minute", "1 minute"),
    CandleView("M5", "5 minutes", "1 day", "5 minutes", "5 minutes"),
    CandleView("M15", "15 minutes", "1 day", "15 minutes", "15 minutes"),
    CandleView("H1", "1 hour", "1 day", "1 hour", "30 minutes"),
    CandleView("H4", "4 hours", "2 days", "4 hours", "1 hour"),
    CandleView("D1", "1 day", "3 days", "1 day", "1 hour"),
)
M1 = CANDLE_VIEWS[0]
#: The shortest retention that keeps the M1 refresh window clear of dropped chunks.
MIN_RETENTION = "1 day"
RETENTION = "30 days"
RETAINED_TABLES = ("ticks", "spreads", "depth_snapshots")
COMPRESS_AFTER = "2 days"

CANDLE_COLUMNS = (
    "bucket timestamptz, open numeric, high numeric, low numeric, close numeric, volume numeric, tick_count bigint"
)
CANDLES_SIGNATURE = "tp_candles(bigint, text, timestamptz, timestamptz, integer, boolean)"
REFRESH_SIGNATURE = "tp_refresh_candles(timestamptz, timestamptz)"
RETENTION_SIGNATURE = "tp_set_market_data_retention(interval)"


def _m1_view() -> str:
    return f"""
CREATE MATERIALIZED VIEW {M1.name}
WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
SELECT instrument_id,
       time_bucket(INTERVAL '{M1.width}', ts) AS bucket,
       first(last, ts) AS open,
       max(last) AS high,
       min(last) AS low,
       last(last, ts) AS close,
       coalesce(sum(volume), 0) AS volume,
       count(*) AS tick_count
  FROM ticks
 WHERE last IS NOT NULL
 GROUP BY instrument_id, time_bucket(INTERVAL '{M1.width}', ts)
WITH NO DATA
"""


def _higher_view(view: CandleView) -> str:
    # M1 buckets are disjoint in time, so ordering them by bucket orders their opens and closes too.
    return f"""
CREATE MATERIALIZED VIEW {view.name}
WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
SELECT instrument_id,
       time_bucket(INTERVAL '{view.width}', bucket) AS bucket,
       first(open, bucket) AS open,
       max(high) AS high,
       min(low) AS low,
       last(close, bucket) AS close,
       sum(volume) AS volume,
       CAST(sum(tick_count) AS bigint) AS tick_count
  FROM {M1.name}
 GROUP BY instrument_id, time_bucket(INTERVAL '{view.width}', bucket)
WITH NO DATA
"""


def _refresh_policy(view: CandleView) -> str:
    return (
        f"SELECT add_continuous_aggregate_policy('{view.name}',"
        f" start_offset => INTERVAL '{view.start_offset}', end_offset => INTERVAL '{view.end_offset}',"
        f" schedule_interval => INTERVAL '{view.schedule}')"
    )


def _select(relation: str, extra_filter: str, direction: str) -> str:
    # Qualified columns: the OUT parameters of RETURNS TABLE share the names.
    return (
        "SELECT c.bucket, c.open, c.high, c.low, c.close, c.volume, CAST(c.tick_count AS bigint)"
        f" FROM {relation} c WHERE c.instrument_id = p_instrument_id{extra_filter}"
        f" AND c.bucket >= p_start AND c.bucket < p_end ORDER BY c.bucket {direction} LIMIT p_max_rows"
    )


def _both_orders(relation: str, extra_filter: str = "") -> str:
    return (
        f"IF p_newest_first THEN RETURN QUERY {_select(relation, extra_filter, 'DESC')};\n"
        f"        ELSE RETURN QUERY {_select(relation, extra_filter, 'ASC')};\n"
        "        END IF;"
    )


def _candles_function(timescale: bool) -> str:
    """``tp_candles``: static queries (plans cached per statement), one per timeframe on TimescaleDB."""
    if timescale:
        branches = "\n    ".join(
            f"{'IF' if index == 0 else 'ELSIF'} p_timeframe = '{view.timeframe}' THEN\n        "
            + _both_orders(view.name)
            for index, view in enumerate(CANDLE_VIEWS)
        )
        body = f"""
    {branches}
    ELSE
        RAISE EXCEPTION 'unknown candle timeframe %', p_timeframe USING ERRCODE = 'invalid_parameter_value';
    END IF;"""
    else:
        known = ", ".join(f"'{view.timeframe}'" for view in CANDLE_VIEWS)
        body = f"""
    IF p_timeframe IS NULL OR p_timeframe NOT IN ({known}) THEN
        RAISE EXCEPTION 'unknown candle timeframe %', p_timeframe USING ERRCODE = 'invalid_parameter_value';
    END IF;
    {_both_orders("candles", " AND c.timeframe = p_timeframe")}"""
    return f"""
CREATE FUNCTION tp_candles(
    p_instrument_id bigint,
    p_timeframe text,
    p_start timestamptz,
    p_end timestamptz,
    p_max_rows integer DEFAULT NULL,
    p_newest_first boolean DEFAULT false
) RETURNS TABLE ({CANDLE_COLUMNS}) LANGUAGE plpgsql STABLE AS $$
BEGIN{body}
END
$$
"""


def _refresh_procedure(timescale: bool) -> str:
    if not timescale:
        body = "    NULL;  -- native path: the ingester keeps the candles table current"
    else:
        # A refresh only materializes buckets wholly inside its window, so each window is widened to
        # whole buckets of its timeframe. M1 first: the others read its materialized rows.
        steps = []
        for view in CANDLE_VIEWS:
            width = f"INTERVAL '{view.width}'"
            steps.append(
                f"    CALL refresh_continuous_aggregate('{view.name}', time_bucket({width}, p_start),"
                f" time_bucket({width}, p_end - INTERVAL '1 microsecond') + {width});\n    COMMIT;"
            )
        body = "\n".join(steps)
    return f"""
CREATE PROCEDURE tp_refresh_candles(p_start timestamptz, p_end timestamptz) LANGUAGE plpgsql AS $$
BEGIN
    IF p_start IS NULL OR p_end IS NULL OR p_start >= p_end THEN
        RAISE EXCEPTION 'refresh window [%, %) is empty', p_start, p_end USING ERRCODE = 'invalid_parameter_value';
    END IF;
{body}
END
$$
"""


def _retention_function(timescale: bool) -> str:
    if not timescale:
        body = "    RETURN false;  -- native path: the market data worker drops expired partitions"
    else:
        tables = ", ".join(f"'{table}'" for table in RETAINED_TABLES)
        body = f"""    IF p_keep IS NULL OR p_keep < INTERVAL '{MIN_RETENTION}' THEN
        RAISE EXCEPTION 'market data retention % is shorter than {MIN_RETENTION}', p_keep
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOREACH series IN ARRAY ARRAY[{tables}] LOOP
        PERFORM remove_retention_policy(CAST(series AS regclass), if_exists => true);
        PERFORM add_retention_policy(CAST(series AS regclass), drop_after => p_keep);
    END LOOP;
    RETURN true;"""
    return f"""
CREATE FUNCTION tp_set_market_data_retention(p_keep interval) RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    series text;
BEGIN
{body}
END
$$
"""


def _uses_timescale() -> bool:
    return storage_kind(op.get_bind(), "ticks") == "hypertable"


def upgrade() -> None:
    timescale = _uses_timescale()
    if timescale:
        op.execute(_m1_view())
        for view in CANDLE_VIEWS[1:]:
            op.execute(_higher_view(view))
        for view in CANDLE_VIEWS:
            op.execute(_refresh_policy(view))
        op.execute(
            "ALTER TABLE ticks SET (timescaledb.compress, timescaledb.compress_segmentby = 'instrument_id',"
            " timescaledb.compress_orderby = 'ts')"
        )
        op.execute(f"SELECT add_compression_policy('ticks', compress_after => INTERVAL '{COMPRESS_AFTER}')")
    op.execute(_candles_function(timescale))
    op.execute(_refresh_procedure(timescale))
    op.execute(_retention_function(timescale))
    if timescale:
        op.execute(f"SELECT tp_set_market_data_retention(INTERVAL '{RETENTION}')")


def downgrade() -> None:
    timescale = _uses_timescale()
    for routine in (
        f"FUNCTION {RETENTION_SIGNATURE}",
        f"PROCEDURE {REFRESH_SIGNATURE}",
        f"FUNCTION {CANDLES_SIGNATURE}",
    ):
        op.execute(f"DROP {routine}")
    if not timescale:
        return
    for table in RETAINED_TABLES:
        op.execute(f"SELECT remove_retention_policy('{table}', if_exists => true)")
    op.execute("SELECT remove_compression_policy('ticks', if_exists => true)")
    # Compression can only be switched off once no chunk is compressed.
    op.execute("SELECT decompress_chunk(chunk, if_compressed => true) FROM show_chunks('ticks') AS chunk")
    op.execute("ALTER TABLE ticks SET (timescaledb.compress = false)")
    # Dependents first; dropping a continuous aggregate drops its refresh policy and materialized hypertable.
    for view in reversed(CANDLE_VIEWS):
        op.execute(f"DROP MATERIALIZED VIEW {view.name}")
