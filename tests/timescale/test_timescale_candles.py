"""The TimescaleDB storage path, built by the real migrations on PostgreSQL + TimescaleDB (pglite): market data
in hypertables, candles M1..D1 as continuous aggregates equal to the domain's CandleAggregator, compression,
retention, and ``tp_candles`` answering the same on TimescaleDB and on native PostgreSQL.

All tests share one pglite database (see conftest.py): each keeps to its own instrument id. Ticks are
inserted with one ``INSERT ... SELECT FROM unnest(...)`` per batch: pglite-socket has no COPY.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
import pytest

from tradeplane.adapters.db import marketdata as sql
from tradeplane.adapters.db.migrate import current, downgrade, heads, upgrade
from tradeplane.adapters.db.timeseries import ensure_daily_partitions_async, storage_kind_async
from tradeplane.domain.candles import Candle, CandleAggregator, Timeframe
from tradeplane.domain.ticks import NS_PER_SECOND, PriceScale, Tick
from tradeplane.services.ingest import candle_buckets

pytestmark = pytest.mark.timescale

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
NS_PER_US = 1_000
CANDLE_VIEWS = {tf: f"candles_{tf.value.lower()}" for tf in Timeframe}
SERIES_TABLES = ("ticks", "trades", "depth_snapshots", "spreads")
RETAINED = ("ticks", "spreads", "depth_snapshots")
#: Out-of-order tolerance large enough that the reference aggregator applies every generated tick.
ALL_TICKS_NS = 10**18


# ------------------------------------------------------------------------------------------------ helpers


@asynccontextmanager
async def connect(url: str) -> AsyncIterator[asyncpg.Connection]:
    """pglite serves one connection at a time: always close it, or the next test waits in its queue."""
    conn = await asyncpg.connect(url)
    try:
        yield conn
    finally:
        await conn.close()


def to_dt(ts_ns: int) -> datetime:
    return EPOCH + timedelta(microseconds=ts_ns // NS_PER_US)


def to_ns(moment: datetime) -> int:
    delta = moment - EPOCH
    return (delta.days * 86_400 + delta.seconds) * NS_PER_SECOND + delta.microseconds * NS_PER_US


def midnight_utc(days_ago: int) -> datetime:
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return today - timedelta(days=days_ago)


def exact_int(value: Decimal) -> int:
    assert value == value.to_integral_value(), f"{value} is not a whole number"
    return int(value)


def random_ticks(symbol: str, start: datetime, count: int, seed: int) -> list[Tick]:
    """A random walk in arrival order: microsecond-distinct timestamps (the database keeps microseconds),
    quote-only updates, gaps of hours (empty buckets), and neighbours arriving swapped (late ticks), so open
    and close must follow ``ts``, not arrival."""
    rng = random.Random(seed)
    ts = to_ns(start)
    price = 10_000
    ticks: list[Tick] = []
    for _ in range(count):
        gap_us = rng.randrange(1, 40_000_000) if rng.random() > 0.001 else rng.randrange(1, 3) * 3_600_000_000
        ts += gap_us * NS_PER_US
        price = max(1, price + rng.randint(-7, 7))
        spread = rng.randint(1, 4)
        traded = rng.random() < 0.8
        ticks.append(
            Tick(
                ts,
                symbol,
                price - spread,
                price + spread,
                rng.randint(1, 500),
                rng.randint(1, 500),
                price + rng.randint(-spread, spread) if traded else None,
                rng.randint(1, 50) if traded else 0,
            )
        )
    for i in range(1, len(ticks) - 1, 7):
        ticks[i], ticks[i + 1] = ticks[i + 1], ticks[i]
    return ticks


def expected_candles(ticks: Iterable[Tick]) -> dict[Timeframe, list[Candle]]:
    aggregator = CandleAggregator(max_out_of_order_ns=ALL_TICKS_NS)
    aggregator.add_batch(ticks)
    out: dict[Timeframe, list[Candle]] = {tf: [] for tf in Timeframe}
    for candle in aggregator.drain_changed():
        out[candle.timeframe].append(candle)
    return out


async def insert_ticks(conn: asyncpg.Connection, instrument_id: int, scale: PriceScale, ticks: Sequence[Tick]) -> None:
    """One statement per batch, rows in arrival order (``executemany`` would pipeline, which pglite refuses)."""

    def price(value: int | None) -> Decimal | None:
        return None if value is None else scale.to_price(value)

    await conn.execute(
        "INSERT INTO ticks (ts, instrument_id, bid, ask, bid_size, ask_size, last, volume)"
        " SELECT ts, $2, bid, ask, bid_size, ask_size, last, volume FROM unnest("
        "$1::timestamptz[], $3::numeric[], $4::numeric[], $5::numeric[], $6::numeric[], $7::numeric[], $8::numeric[]"
        ") WITH ORDINALITY AS t(ts, bid, ask, bid_size, ask_size, last, volume, arrival) ORDER BY arrival",
        [to_dt(t.ts_ns) for t in ticks],
        instrument_id,
        [price(t.bid) for t in ticks],
        [price(t.ask) for t in ticks],
        [Decimal(t.bid_size) for t in ticks],
        [Decimal(t.ask_size) for t in ticks],
        [price(t.last) for t in ticks],
        [Decimal(t.volume) for t in ticks],
    )


async def stored_candles(
    conn: asyncpg.Connection,
    instrument_id: int,
    symbol: str,
    scale: PriceScale,
    timeframe: Timeframe,
    start: datetime,
    end: datetime,
) -> list[Candle]:
    """Candles through the one query interface, back in the domain's integer ticks (exactly, or it raises)."""
    rows = await conn.fetch("SELECT * FROM tp_candles($1, $2, $3, $4)", instrument_id, timeframe.value, start, end)
    return [
        Candle(
            symbol,
            timeframe,
            to_ns(row["bucket"]),
            scale.to_ticks(row["open"]),
            scale.to_ticks(row["high"]),
            scale.to_ticks(row["low"]),
            scale.to_ticks(row["close"]),
            exact_int(row["volume"]),
            row["tick_count"],
        )
        for row in rows
    ]


async def assert_candles_equal_aggregator(
    conn: asyncpg.Connection,
    instrument_id: int,
    symbol: str,
    scale: PriceScale,
    ticks: Sequence[Tick],
) -> None:
    expected = expected_candles(ticks)
    start = to_dt(min(t.ts_ns for t in ticks)) - timedelta(days=2)
    end = to_dt(max(t.ts_ns for t in ticks)) + timedelta(days=2)
    for timeframe in Timeframe:
        actual = await stored_candles(conn, instrument_id, symbol, scale, timeframe, start, end)
        assert actual == expected[timeframe], f"{timeframe} candles differ from the aggregator's"


async def job_id(conn: asyncpg.Connection, proc_name: str, relation: str) -> int:
    found: int | None = await conn.fetchval(
        "SELECT job_id FROM timescaledb_information.jobs WHERE proc_name = $1 AND hypertable_name = $2",
        proc_name,
        relation,
    )
    assert found is not None, f"no {proc_name} job on {relation}"
    return found


async def materialized_rows(conn: asyncpg.Connection, timeframe: Timeframe, instrument_id: int) -> int:
    """Rows a refresh has written for the instrument (the aggregate's own hypertable, not real-time)."""
    table = await conn.fetchval(
        "SELECT format('%I.%I', materialization_hypertable_schema, materialization_hypertable_name)"
        " FROM timescaledb_information.continuous_aggregates WHERE view_name = $1",
        CANDLE_VIEWS[timeframe],
    )
    count: int = await conn.fetchval(f"SELECT count(*) FROM {table} WHERE instrument_id = $1", instrument_id)
    return count


# ------------------------------------------------------------------------------------------------- schema


async def test_migrations_put_market_data_in_hypertables(timescale_url: str) -> None:
    assert await asyncio.to_thread(current, timescale_url) == heads()[0]
    async with connect(timescale_url) as conn:
        hypertables = {
            row["hypertable_name"]
            for row in await conn.fetch(
                "SELECT hypertable_name FROM timescaledb_information.hypertables WHERE hypertable_schema = 'public'"
            )
        }
        assert hypertables == set(SERIES_TABLES)
        assert await storage_kind_async(conn) == dict.fromkeys(SERIES_TABLES, "hypertable")
        interval = await conn.fetchval(
            "SELECT time_interval FROM timescaledb_information.dimensions"
            " WHERE hypertable_name = 'ticks' AND column_name = 'ts'"
        )
        assert interval == timedelta(days=1)


async def test_candles_are_continuous_aggregates_with_real_time_data_and_refresh_policies(timescale_url: str) -> None:
    async with connect(timescale_url) as conn:
        views = {
            row["view_name"]: row["materialized_only"]
            for row in await conn.fetch(
                "SELECT view_name, materialized_only FROM timescaledb_information.continuous_aggregates"
            )
        }
        assert views == dict.fromkeys(CANDLE_VIEWS.values(), False)
        policies = {
            row["hypertable_name"]: (row["config"], row["schedule_interval"])
            for row in await conn.fetch(
                "SELECT hypertable_name, config::jsonb AS config, schedule_interval FROM timescaledb_information.jobs"
                " WHERE proc_name = 'policy_refresh_continuous_aggregate'",
            )
        }
    # Each window spans at least two buckets and ends one bucket back (the open bucket is real-time); M1 looks
    # back 12 hours, inside the shortest retention, so a refresh never empties buckets of dropped ticks.
    assert {
        view: (json.loads(config)["start_offset"], json.loads(config)["end_offset"], schedule)
        for view, (config, schedule) in policies.items()
    } == {
        "candles_m1": ("12:00:00", "00:01:00", timedelta(minutes=1)),
        "candles_m5": ("1 day", "00:05:00", timedelta(minutes=5)),
        "candles_m15": ("1 day", "00:15:00", timedelta(minutes=15)),
        "candles_h1": ("1 day", "01:00:00", timedelta(minutes=30)),
        "candles_h4": ("2 days", "04:00:00", timedelta(hours=1)),
        "candles_d1": ("3 days", "1 day", timedelta(hours=1)),
    }


async def test_ticks_are_compressed_by_instrument_in_time_order_after_two_days(timescale_url: str) -> None:
    async with connect(timescale_url) as conn:
        settings = await conn.fetchrow(
            "SELECT segmentby, orderby FROM timescaledb_information.hypertable_compression_settings"
            " WHERE hypertable = 'ticks'::regclass"
        )
        assert tuple(settings) == ("instrument_id", "ts")
        config = await conn.fetchval(
            "SELECT config::jsonb FROM timescaledb_information.jobs"
            " WHERE proc_name = 'policy_compression' AND hypertable_name = 'ticks'"
        )
        assert '"compress_after": "2 days"' in config


async def test_retention_policies_keep_thirty_days_of_market_data(timescale_url: str) -> None:
    async with connect(timescale_url) as conn:
        rows = await conn.fetch(
            "SELECT hypertable_name, config::jsonb AS config FROM timescaledb_information.jobs"
            " WHERE proc_name = 'policy_retention' ORDER BY 1"
        )
    assert {row["hypertable_name"] for row in rows} == set(RETAINED)
    assert all('"drop_after": "30 days"' in row["config"] for row in rows)


# ------------------------------------------------------------------------------------------------ candles

SCALE = PriceScale(Decimal("0.01"))


async def test_candles_equal_the_aggregator_before_and_after_refresh(fresh_timescale_url: str) -> None:
    """Real-time aggregation answers as soon as the ticks commit; the refreshed (materialized) candles are
    the same. Ticks cross a UTC midnight, so every timeframe has buckets on both sides of a day."""
    instrument_id, symbol = 101, "TSA"
    ticks = random_ticks(symbol, midnight_utc(1) - timedelta(hours=6), 3_000, seed=1)
    assert {to_dt(t.ts_ns).date() for t in ticks} >= {midnight_utc(2).date(), midnight_utc(1).date()}
    async with connect(fresh_timescale_url) as conn:
        await insert_ticks(conn, instrument_id, SCALE, ticks)
        assert await materialized_rows(conn, Timeframe.M1, instrument_id) == 0
        await assert_candles_equal_aggregator(conn, instrument_id, symbol, SCALE, ticks)

        await conn.execute(
            "CALL tp_refresh_candles($1, $2)", to_dt(ticks[0].ts_ns), to_dt(max(t.ts_ns for t in ticks) + 1)
        )
        for timeframe in Timeframe:
            assert await materialized_rows(conn, timeframe, instrument_id) > 0
        await assert_candles_equal_aggregator(conn, instrument_id, symbol, SCALE, ticks)


async def test_refresh_continuous_aggregate_directly_gives_the_same_candles(timescale_url: str) -> None:
    """The stock procedure, M1 first and then the timeframes built on it, over whole buckets."""
    instrument_id, symbol = 102, "TSB"
    ticks = random_ticks(symbol, midnight_utc(1) + timedelta(hours=1), 800, seed=2)
    async with connect(timescale_url) as conn:
        await insert_ticks(conn, instrument_id, SCALE, ticks)
        start, end = midnight_utc(1), midnight_utc(-1)
        for timeframe in Timeframe:
            await conn.execute(
                f"CALL refresh_continuous_aggregate('{CANDLE_VIEWS[timeframe]}', $1::timestamptz, $2::timestamptz)",
                start,
                end,
            )
            assert await materialized_rows(conn, timeframe, instrument_id) > 0
        await assert_candles_equal_aggregator(conn, instrument_id, symbol, SCALE, ticks)


async def test_a_late_tick_changes_its_candles_after_refresh(timescale_url: str) -> None:
    instrument_id, symbol = 103, "TSC"
    ticks = random_ticks(symbol, midnight_utc(1) + timedelta(hours=2), 300, seed=3)
    first = min(t.ts_ns for t in ticks)
    async with connect(timescale_url) as conn:
        await insert_ticks(conn, instrument_id, SCALE, ticks)
        await conn.execute("CALL tp_refresh_candles($1, $2)", midnight_utc(1), midnight_utc(0))
        # Earlier than every stored tick, a new low and the new open of its buckets.
        late = Tick(first - NS_PER_US, symbol, 1, 3, 1, 1, 2, 9)
        await insert_ticks(conn, instrument_id, SCALE, [late])
        await conn.execute("CALL tp_refresh_candles($1, $2)", midnight_utc(1), midnight_utc(0))
        await assert_candles_equal_aggregator(conn, instrument_id, symbol, SCALE, [*ticks, late])
        m1 = await stored_candles(conn, instrument_id, symbol, SCALE, Timeframe.M1, midnight_utc(1), midnight_utc(0))
        assert (m1[0].open, m1[0].low) == (2, 2)


async def test_candles_are_not_invented_for_empty_intervals_or_quote_only_ticks(timescale_url: str) -> None:
    instrument_id, symbol = 104, "TSD"
    base = midnight_utc(1) + timedelta(hours=3)
    quote_only = Tick(to_ns(base + timedelta(seconds=30)), symbol, 100, 102)
    trades = [
        Tick(to_ns(base + timedelta(seconds=5)), symbol, 100, 102, 1, 1, 101, 4),
        Tick(to_ns(base + timedelta(minutes=7, seconds=1)), symbol, 100, 102, 1, 1, 105, 6),
    ]
    async with connect(timescale_url) as conn:
        await insert_ticks(conn, instrument_id, SCALE, [trades[0], quote_only, trades[1]])
        await conn.execute("CALL tp_refresh_candles($1, $2)", midnight_utc(1), midnight_utc(0))
        m1 = await stored_candles(conn, instrument_id, symbol, SCALE, Timeframe.M1, base, base + timedelta(hours=1))
    assert m1 == [
        Candle(symbol, Timeframe.M1, to_ns(base), 101, 101, 101, 101, 4, 1),
        Candle(symbol, Timeframe.M1, to_ns(base + timedelta(minutes=7)), 105, 105, 105, 105, 6, 1),
    ]


async def test_refresh_policies_materialize_recent_candles(fresh_timescale_url: str) -> None:
    """pglite runs no background workers, so the policies' jobs are run by hand, as the scheduler would.

    A server of its own: its ticks are the last three hours'. Between midnight and 03:00 UTC they fall on
    yesterday, which other tests' refreshes on the shared server can already have materialized without them
    (below the watermark only materialized candles are served): its D1 candle read back empty at 00:10."""
    instrument_id, symbol = 105, "TSE"
    start = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(hours=3)
    ticks = random_ticks(symbol, start, 200, seed=5)
    ticks = [t for t in ticks if to_dt(t.ts_ns) < start + timedelta(hours=2)]
    async with connect(fresh_timescale_url) as conn:
        await insert_ticks(conn, instrument_id, SCALE, ticks)
        for timeframe in Timeframe:
            await conn.execute(
                "CALL run_job($1)", await job_id(conn, "policy_refresh_continuous_aggregate", CANDLE_VIEWS[timeframe])
            )
        assert await materialized_rows(conn, Timeframe.M1, instrument_id) == len(expected_candles(ticks)[Timeframe.M1])
        assert await materialized_rows(conn, Timeframe.M5, instrument_id) > 0
        await assert_candles_equal_aggregator(conn, instrument_id, symbol, SCALE, ticks)


async def test_compression_policy_compresses_old_ticks_and_candles_still_read_them(timescale_url: str) -> None:
    instrument_id, symbol = 106, "TSF"
    ticks = random_ticks(symbol, midnight_utc(5) + timedelta(hours=9), 400, seed=6)
    async with connect(timescale_url) as conn:
        await insert_ticks(conn, instrument_id, SCALE, ticks)
        await conn.execute("CALL run_job($1)", await job_id(conn, "policy_compression", "ticks"))
        chunks = await conn.fetch(
            "SELECT is_compressed FROM timescaledb_information.chunks WHERE hypertable_name = 'ticks'"
            " AND range_start <= $1 AND range_end > $1",
            to_dt(ticks[0].ts_ns),
        )
        assert [row["is_compressed"] for row in chunks] == [True]
        # A refresh materializes candles from the compressed chunk...
        await conn.execute("CALL tp_refresh_candles($1, $2)", midnight_utc(5), midnight_utc(4))
        await assert_candles_equal_aggregator(conn, instrument_id, symbol, SCALE, ticks)
        # ...and a tick replayed into it lands in the candles after the next refresh.
        late = Tick(ticks[0].ts_ns - 5 * NS_PER_SECOND, symbol, 100, 200, 1, 1, 150, 3)
        await insert_ticks(conn, instrument_id, SCALE, [late])
        await conn.execute("CALL tp_refresh_candles($1, $2)", midnight_utc(5), midnight_utc(4))
        await assert_candles_equal_aggregator(conn, instrument_id, symbol, SCALE, [*ticks, late])


async def test_retention_drops_old_ticks_but_their_candles_outlive_them(timescale_url: str) -> None:
    instrument_id, symbol = 107, "TSG"
    old = random_ticks(symbol, midnight_utc(40) + timedelta(hours=10), 50, seed=7)
    recent = random_ticks(symbol, midnight_utc(1) + timedelta(hours=10), 50, seed=8)
    async with connect(timescale_url) as conn:
        await insert_ticks(conn, instrument_id, SCALE, [*old, *recent])
        await conn.execute("CALL tp_refresh_candles($1, $2)", midnight_utc(40), midnight_utc(39))
        await conn.execute("CALL run_job($1)", await job_id(conn, "policy_retention", "ticks"))

        counts = await conn.fetchrow(
            "SELECT count(*) FILTER (WHERE ts < $2) AS old, count(*) FILTER (WHERE ts >= $2) AS recent"
            " FROM ticks WHERE instrument_id = $1",
            instrument_id,
            midnight_utc(30),
        )
        assert tuple(counts) == (0, len(recent))
        d1 = await stored_candles(conn, instrument_id, symbol, SCALE, Timeframe.D1, midnight_utc(41), midnight_utc(39))
        assert d1 == expected_candles(old)[Timeframe.D1]


async def test_retention_can_be_changed_but_not_below_one_day(timescale_url: str) -> None:
    async with connect(timescale_url) as conn:
        try:
            assert await conn.fetchval("SELECT tp_set_market_data_retention(INTERVAL '90 days')") is True
            configs = await conn.fetch(
                "SELECT config::jsonb AS config FROM timescaledb_information.jobs WHERE proc_name = 'policy_retention'"
            )
            assert len(configs) == len(RETAINED)
            assert all('"drop_after": "90 days"' in row["config"] for row in configs)
            with pytest.raises(asyncpg.InvalidParameterValueError, match="shorter than 1 day"):
                await conn.fetchval("SELECT tp_set_market_data_retention(INTERVAL '6 hours')")
        finally:
            await conn.fetchval("SELECT tp_set_market_data_retention(INTERVAL '30 days')")


async def test_unknown_timeframe_is_refused(timescale_url: str) -> None:
    async with connect(timescale_url) as conn:
        with pytest.raises(asyncpg.InvalidParameterValueError, match="unknown candle timeframe W1"):
            await conn.fetch("SELECT * FROM tp_candles(1, 'W1', '-infinity', 'infinity')")


async def test_the_candles_a_batch_touched_read_back_in_its_transaction_as_candles_serves_them(
    fresh_timescale_url: str,
) -> None:
    """What the ingester publishes on ``candles:<tf>`` on this path: right after a batch's ticks are written, in
    the same transaction, ``touched_candles`` gives for every timeframe the bucket of the batch's newest trade
    as ``tp_candles`` (``/candles``) serves it, real-time aggregation already counting the uncommitted ticks on
    top of refreshed M1 buckets, and equal to the aggregator's candle over every tick."""
    instrument_id, symbol = 131, "TSP"
    earlier = random_ticks(symbol, midnight_utc(1) + timedelta(hours=3), 200, seed=31)
    newest = max(t.ts_ns for t in earlier)
    batch = [
        Tick(newest + 10 * NS_PER_SECOND, symbol, 9_990, 9_994, 5, 5, 9_992, 4),
        Tick(newest + 11 * NS_PER_SECOND, symbol, 9_991, 9_995, 5, 5, None, 0),  # a quote: not a candle's
        Tick(newest + 12 * NS_PER_SECOND, symbol, 9_991, 9_995, 5, 5, 10_500, 6),  # the newest trade
    ]
    expected = expected_candles([*earlier, *batch])
    last_trade = batch[2].ts_ns
    async with connect(fresh_timescale_url) as conn:
        await insert_ticks(conn, instrument_id, SCALE, earlier)
        # M1 materialized up to the batch's minute; the higher timeframes aggregate it in real time
        await conn.execute(
            f"CALL refresh_continuous_aggregate('{CANDLE_VIEWS[Timeframe.M1]}', $1::timestamptz, $2::timestamptz)",
            midnight_utc(1),
            to_dt(Timeframe.M1.bucket_start(newest)),
        )
        assert await materialized_rows(conn, Timeframe.M1, instrument_id) > 0
        buckets = candle_buckets({instrument_id: last_trade})
        async with conn.transaction():
            await insert_ticks(conn, instrument_id, SCALE, batch)
            rows = await sql.touched_candles(conn, buckets)
            served = {
                timeframe: await sql.fetch_candles(
                    conn,
                    instrument_id,
                    timeframe,
                    to_dt(timeframe.bucket_start(last_trade)),
                    to_dt(timeframe.bucket_start(last_trade) + timeframe.width_ns),
                    1,
                )
                for timeframe in Timeframe
            }
    assert [(row["instrument_id"], row["timeframe"]) for row in rows] == [(instrument_id, tf.value) for tf in Timeframe]
    for row in rows:
        timeframe = Timeframe(row["timeframe"])
        (candle,) = [c for c in expected[timeframe] if c.bucket_start_ns == timeframe.bucket_start(last_trade)]
        assert (row["bucket"], row["open"], row["high"], row["low"], row["close"], row["volume"]) == (
            to_dt(candle.bucket_start_ns),
            SCALE.to_price(candle.open),
            SCALE.to_price(candle.high),
            SCALE.to_price(candle.low),
            SCALE.to_price(candle.close),
            Decimal(candle.volume),
        ), timeframe
        assert row["tick_count"] == candle.tick_count
        (api_row,) = served[timeframe]  # /candles: the same query, decimals as trimmed text
        assert (api_row["bucket"], api_row["close"], api_row["tick_count"]) == (
            row["bucket"],
            str(row["close"].normalize()),
            row["tick_count"],
        )
        assert [Decimal(api_row[k]) for k in ("open", "high", "low", "volume")] == [
            row[k] for k in ("open", "high", "low", "volume")
        ]
    assert (rows[0]["close"], rows[0]["tick_count"]) == (Decimal("105.00"), 2)  # the batch's M1: two trades


# -------------------------------------------------------------------------------------- both storage paths


async def native_candles_from(database_url: str, symbol: str, ticks: Sequence[Tick]) -> int:
    """The native path on real PostgreSQL: the same ticks in daily partitions and the aggregator's candles
    in the ``candles`` table, as the ingester maintains them. Returns the instrument id."""
    async with connect(database_url) as conn:
        assert (await storage_kind_async(conn))["ticks"] == "partitioned"
        await conn.execute("INSERT INTO assets (code, scale, name) VALUES ('USD', 2, 'US dollar')")
        instrument_id: int = await conn.fetchval(
            "INSERT INTO instruments (symbol, base_asset, quote_asset, tick_size, lot_size, min_qty, max_qty,"
            " price_band_pct) VALUES ($1, $1, 'USD', $2, 1, 1, 1000000, 10) RETURNING id",
            symbol,
            SCALE.tick_size,
        )
        first_day = to_dt(min(t.ts_ns for t in ticks)).date()
        days = (to_dt(max(t.ts_ns for t in ticks)).date() - first_day).days + 1
        await ensure_daily_partitions_async(conn, "ticks", first_day, days)
        await insert_ticks(conn, instrument_id, SCALE, ticks)
        candles = [c for per_tf in expected_candles(ticks).values() for c in per_tf]
        await conn.executemany(
            "INSERT INTO candles (instrument_id, timeframe, bucket, open, high, low, close, volume, tick_count)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            [
                (
                    instrument_id,
                    c.timeframe.value,
                    to_dt(c.bucket_start_ns),
                    SCALE.to_price(c.open),
                    SCALE.to_price(c.high),
                    SCALE.to_price(c.low),
                    SCALE.to_price(c.close),
                    Decimal(c.volume),
                    c.tick_count,
                )
                for c in candles
            ],
        )
    return instrument_id


QUERIES: tuple[tuple[str, tuple[object, ...]], ...] = (
    ("all", ()),
    ("first 5", (5,)),
    ("newest 3", (3, True)),
)


async def test_tp_candles_answers_the_same_on_timescaledb_and_native_postgres(
    timescale_url: str, database_url: str
) -> None:
    symbol = "BOTH"
    ticks = random_ticks(symbol, midnight_utc(1) - timedelta(hours=2), 1_500, seed=9)
    native_id = await native_candles_from(database_url, symbol, ticks)
    timescale_id = 108
    async with connect(timescale_url) as conn:
        await insert_ticks(conn, timescale_id, SCALE, ticks)

    start, end = midnight_utc(3), midnight_utc(-1)

    async def answers(url: str, instrument_id: int) -> dict[tuple[Timeframe, str], list[tuple[object, ...]]]:
        out = {}
        async with connect(url) as conn:
            for timeframe in Timeframe:
                for name, extra in QUERIES:
                    placeholders = "".join(f", ${i + 5}" for i in range(len(extra)))
                    rows = await conn.fetch(
                        f"SELECT * FROM tp_candles($1, $2, $3, $4{placeholders})",
                        instrument_id,
                        timeframe.value,
                        start,
                        end,
                        *extra,
                    )
                    out[timeframe, name] = [tuple(row) for row in rows]
            with pytest.raises(asyncpg.InvalidParameterValueError):
                await conn.fetch("SELECT * FROM tp_candles($1, 'M2', $2, $3)", instrument_id, start, end)
        return out

    async with connect(timescale_url) as conn:
        await conn.execute("CALL tp_refresh_candles($1, $2)", start, end)
    native = await answers(database_url, native_id)
    assert await answers(timescale_url, timescale_id) == native

    expected = expected_candles(ticks)
    for timeframe in Timeframe:
        assert len(native[timeframe, "all"]) == len(expected[timeframe]) > 0
        assert native[timeframe, "first 5"] == native[timeframe, "all"][:5]
        assert native[timeframe, "newest 3"] == native[timeframe, "all"][::-1][:3]


async def test_native_refresh_and_retention_routines_are_harmless_no_ops(database_url: str) -> None:
    async with connect(database_url) as conn:
        await conn.execute("CALL tp_refresh_candles('2020-01-01', '2020-01-02')")
        assert await conn.fetchval("SELECT tp_set_market_data_retention(INTERVAL '30 days')") is False
        assert await conn.fetchval("SELECT count(*) FROM pg_extension WHERE extname = 'timescaledb'") == 0


# ------------------------------------------------------------------------------------------------ downgrade


async def test_downgrade_removes_the_timescale_objects_and_upgrade_restores_them(fresh_pglite_url: str) -> None:
    url = fresh_pglite_url
    await asyncio.to_thread(upgrade, url)
    ticks = random_ticks("DOWN", midnight_utc(6), 200, seed=10)
    async with connect(url) as conn:
        await insert_ticks(conn, 1, SCALE, ticks)
        await conn.execute("CALL run_job($1)", await job_id(conn, "policy_compression", "ticks"))
        assert (
            await conn.fetchval(
                "SELECT bool_and(is_compressed) FROM timescaledb_information.chunks WHERE hypertable_name = 'ticks'"
            )
            is True
        )

    await asyncio.to_thread(downgrade, url, "0002")
    async with connect(url) as conn:
        assert await conn.fetchval("SELECT count(*) FROM timescaledb_information.continuous_aggregates") == 0
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM timescaledb_information.jobs WHERE proc_name LIKE 'policy_%'"
                " AND proc_name <> 'policy_job_stat_history_retention'"
            )
            == 0
        )
        assert (
            await conn.fetchval(
                "SELECT compression_enabled FROM timescaledb_information.hypertables WHERE hypertable_name = 'ticks'"
            )
            is False
        )
        assert await conn.fetchval("SELECT count(*) FROM pg_proc WHERE proname LIKE 'tp_%candles%'") == 0
        assert await conn.fetchval("SELECT count(*) FROM ticks") == len(ticks)

    await asyncio.to_thread(upgrade, url)
    async with connect(url) as conn:
        assert await conn.fetchval("SELECT count(*) FROM timescaledb_information.continuous_aggregates") == 6
        await assert_candles_equal_aggregator(conn, 1, "DOWN", SCALE, ticks)

    await asyncio.to_thread(downgrade, url, "base")
    assert await asyncio.to_thread(current, url) is None
    async with connect(url) as conn:
        assert await conn.fetchval("SELECT count(*) FROM pg_extension WHERE extname = 'timescaledb'") == 0
        assert await conn.fetchval("SELECT to_regclass('ticks')") is None
