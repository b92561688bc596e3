"""Market data ingestion end to end vs raw COPY, and the 1,000-candle query, against real PostgreSQL.

Run:  .venv/bin/python tests/bench/bench_ingest.py [--ticks N] [--symbols S] [--batch B] [--repeat R]
          [--database-url URL] [--redis-url URL]

The server is --database-url, else TRADEPLANE_TEST_DATABASE_URL, else an embedded PostgreSQL started here. A fresh
database is built by the real migrations and dropped at the end. Ticks are pre-built by the seeded simulated feed
(1 ms apart per tick, 70% carry a trade), so parsing is not timed. In the same run, into the same (truncated)
partitioned ``ticks`` table with its indexes, best of --repeat each:

- pipeline: ``MarketDataPipeline.submit`` of --batch-sized lists of ``Tick`` until ``flush`` returns: validation,
  M1..D1 candles (upserted), sampled spreads, latest quotes (to Redis when --redis-url or
  TRADEPLANE_TEST_REDIS_URL is set), binary COPY, all committed;
- raw COPY (records): asyncpg ``copy_records_to_table`` of the same rows pre-built as tuples (datetime, id,
  Decimal...), --batch rows per COPY, one transaction each: the baseline the issue names;
- raw COPY (binary): the same rows pre-encoded to PostgreSQL binary COPY bytes, --batch rows per COPY: what the
  server alone can take, for reference.

Then 1,000 M1 candles of one symbol (from a separate long-span ingest) are read through the API's query,
--queries times: p50 and p99. Prints one line per figure and a one-line JSON summary. Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import asyncpg

from tradeplane.adapters.cache import Cache
from tradeplane.adapters.db import marketdata as sql
from tradeplane.adapters.db.marketdata import ListedInstrument, TickCopyEncoder
from tradeplane.adapters.db.migrate import upgrade
from tradeplane.adapters.feeds.simulated import SimulatedFeed, SimulatedInstrument
from tradeplane.adapters.postgres import Database
from tradeplane.domain.candles import Timeframe
from tradeplane.domain.ticks import InstrumentGrid, Tick
from tradeplane.entrypoints.api.marketdata import candle_items, candle_series_json
from tradeplane.services.ingest import MarketDataPipeline

T0 = 1_709_596_800_000_000_000  # 2024-03-05T00:00:00Z


def with_database(url: str, name: str) -> str:
    head, _, _ = url.rpartition("/")
    return f"{head}/{name}"


async def list_instruments(conn: asyncpg.Connection, symbols: int) -> list[ListedInstrument]:
    await conn.execute("INSERT INTO assets (code, scale, name) VALUES ('USD', 2, 'US dollar') ON CONFLICT DO NOTHING")
    out = []
    for i in range(symbols):
        symbol = f"SYM{i:03d}-USD"
        instrument_id = await conn.fetchval(
            "INSERT INTO instruments (symbol, base_asset, quote_asset, tick_size, lot_size, min_qty, max_qty,"
            " price_band_pct) VALUES ($1, 'SYM', 'USD', 0.01, 0.001, 0.001, 1000000, 10) RETURNING id",
            symbol,
        )
        out.append(ListedInstrument(instrument_id, symbol, Decimal("0.01"), Decimal("0.001")))
    return out


def build_ticks(instruments: list[ListedInstrument], n: int, rate: int | None, seed: int) -> list[Tick]:
    walks = [
        SimulatedInstrument(InstrumentGrid(i.symbol, i.tick_size), Decimal("100.00"), trade_percent=70)
        for i in instruments
    ]
    return SimulatedFeed(walks, seed=seed, rate=rate, start_ns=T0, paced=False).next_ticks(n)


def record_rows(ticks: list[Tick], instruments: list[ListedInstrument]) -> list[tuple[object, ...]]:
    by_symbol = {i.symbol: i for i in instruments}
    rows: list[tuple[object, ...]] = []
    for t in ticks:
        i = by_symbol[t.symbol]
        rows.append(
            (
                sql.ns_to_datetime(t.ts_ns),
                i.instrument_id,
                None if t.bid is None else i.price(t.bid),
                None if t.ask is None else i.price(t.ask),
                None if t.bid is None else i.quantity(t.bid_size),
                None if t.ask is None else i.quantity(t.ask_size),
                None if t.last is None else i.price(t.last),
                None if t.last is None else i.quantity(t.volume),
            )
        )
    return rows


async def reset(conn: asyncpg.Connection) -> None:
    await conn.execute("TRUNCATE ticks, candles, spreads")
    await conn.execute("CHECKPOINT")


async def best_of(repeat: int, prepare: Callable[[], Awaitable[None]], run: Callable[[], Awaitable[int]]) -> float:
    best = float("inf")
    for _ in range(repeat):
        await prepare()
        started = time.perf_counter()
        await run()
        best = min(best, time.perf_counter() - started)
    return best


async def bench(args: argparse.Namespace, server_url: str) -> dict[str, object]:
    admin = await asyncpg.connect(with_database(server_url, "postgres"))
    name = f"tp_bench_{os.getpid()}"
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = with_database(server_url, name)
    try:
        await asyncio.to_thread(upgrade, url)
        db = Database(url, min_size=2, max_size=4)
        await db.connect()
        cache = Cache(args.redis_url) if args.redis_url else None
        if cache is not None:
            await cache.connect()
        try:
            async with db.connection("bench") as conn:
                instruments = await list_instruments(conn, args.symbols)
            ticks = build_ticks(instruments, args.ticks, None, seed=20240305)
            batches = [ticks[i : i + args.batch] for i in range(0, len(ticks), args.batch)]
            records = record_rows(ticks, instruments)
            record_batches = [records[i : i + args.batch] for i in range(0, len(records), args.batch)]
            encoder = TickCopyEncoder(instruments)
            encoded = [encoder.encode(encoder.columns(batch)) for batch in batches]
            days = sorted({sql.ns_to_datetime(t.ts_ns).date() for t in (ticks[0], ticks[-1])})
            n = len(ticks)

            async def prepare() -> None:
                async with db.connection("bench.reset") as conn:
                    await reset(conn)

            async def run_pipeline() -> int:
                pipeline = MarketDataPipeline(db, instruments, cache=cache)
                await pipeline.start()
                await pipeline.ensure_days(days)  # as a live worker has: partitions are made ahead
                try:
                    started = time.perf_counter()
                    for batch in batches:
                        await pipeline.submit(batch)
                    await pipeline.flush()
                    run_pipeline.elapsed = time.perf_counter() - started  # type: ignore[attr-defined]
                finally:
                    await pipeline.close()
                assert pipeline.stats.stored == n, pipeline.stats
                run_pipeline.stats = pipeline.stats  # type: ignore[attr-defined]
                return n

            async def run_records() -> int:
                async with db.connection("bench.copy") as conn:
                    for rows in record_batches:
                        async with conn.transaction():
                            await conn.copy_records_to_table("ticks", records=rows, columns=list(sql.TICK_COLUMNS))
                return n

            async def run_binary() -> int:
                async with db.connection("bench.copy") as conn:
                    for body in encoded:
                        async with conn.transaction():
                            await sql.copy_tick_rows(conn, sql.COPY_HEADER + body + sql.COPY_TRAILER)
                return n

            # the pipeline's own timing excludes start() (storage probe, partitions), like the COPY loops
            pipeline_best = float("inf")
            records_best = float("inf")
            binary_best = float("inf")
            for _ in range(args.repeat):
                await prepare()
                await run_pipeline()
                pipeline_best = min(pipeline_best, run_pipeline.elapsed)  # type: ignore[attr-defined]
                records_best = min(records_best, await best_of(1, prepare, run_records))
                binary_best = min(binary_best, await best_of(1, prepare, run_binary))
            async with db.connection("bench.check") as conn:
                await reset(conn)

            # 1,000 M1 candles of one symbol: ingest a long span (one trade every 3 s for ~20 hours)
            long_ticks = build_ticks(instruments[:1], 25_000, 1, seed=7)
            long_ticks = [Tick(T0 + i * 3_000_000_000, *_rest(t)) for i, t in enumerate(long_ticks)]
            pipeline = MarketDataPipeline(db, instruments[:1])
            async with pipeline:
                for i in range(0, len(long_ticks), 5000):
                    await pipeline.submit(long_ticks[i : i + 5000])
                await pipeline.flush()
            start = sql.ns_to_datetime(T0)
            end = start + timedelta(minutes=1000)
            timings, body_timings = [], []
            async with db.connection("bench.query") as conn:
                count = len(await sql.fetch_candles(conn, instruments[0].instrument_id, Timeframe.M1, start, end, 1000))
                for _ in range(args.queries):
                    began = time.perf_counter()
                    rows = await sql.fetch_candles(conn, instruments[0].instrument_id, Timeframe.M1, start, end, 1000)
                    timings.append(time.perf_counter() - began)
                    candle_series_json(instruments[0].symbol, Timeframe.M1, candle_items(rows))  # the API's body
                    body_timings.append(time.perf_counter() - began)
            timings.sort()
            body_timings.sort()
        finally:
            if cache is not None:
                await cache.close()
            await db.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    stats = run_pipeline.stats  # type: ignore[attr-defined]
    return {
        "bench": "ingest",
        "ticks": n,
        "symbols": args.symbols,
        "batch": args.batch,
        "repeat": args.repeat,
        "redis": bool(args.redis_url),
        "pipeline_ticks_per_s": round(n / pipeline_best),
        "raw_copy_records_ticks_per_s": round(n / records_best),
        "raw_copy_binary_ticks_per_s": round(n / binary_best),
        "ratio_to_records_copy": round(records_best / pipeline_best, 3),
        "ratio_to_binary_copy": round(binary_best / pipeline_best, 3),
        "candle_upserts": stats.candles_written,
        "commits": stats.commits,
        "candles_1000_m1_rows": count,
        "candles_1000_m1_p50_ms": round(statistics.median(timings) * 1000, 3),
        "candles_1000_m1_p99_ms": round(timings[int(len(timings) * 0.99) - 1] * 1000, 3),
        "candles_1000_m1_with_json_body_p50_ms": round(statistics.median(body_timings) * 1000, 3),
        "postgres": (await _server_version(server_url)),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _rest(t: Tick) -> tuple[str, int | None, int | None, int, int, int | None, int]:
    return (t.symbol, t.bid, t.ask, t.bid_size, t.ask_size, t.last if t.last is not None else t.bid, t.volume or 1)


async def _server_version(url: str) -> str:
    conn = await asyncpg.connect(with_database(url, "postgres"))
    try:
        return str(await conn.fetchval("SHOW server_version"))
    finally:
        await conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--ticks", type=int, default=1_000_000)
    parser.add_argument("--symbols", type=int, default=20)
    parser.add_argument("--batch", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--database-url", default=os.environ.get("TRADEPLANE_TEST_DATABASE_URL"))
    parser.add_argument("--redis-url", default=os.environ.get("TRADEPLANE_TEST_REDIS_URL"))
    args = parser.parse_args(argv)

    stack = None
    server_url = args.database_url
    if server_url is None:
        from tradeplane.adapters.embedded import EmbeddedStack

        stack = EmbeddedStack(Path(tempfile.mkdtemp(prefix="tradeplane-bench-")))
        server_url = str(stack.start("postgres"))
    try:
        figures = asyncio.run(bench(args, server_url))
    finally:
        if stack is not None:
            stack.stop()
    print(f"ticks: {figures['ticks']:,} over {args.symbols} symbols, batches of {args.batch:,}, best of {args.repeat}")
    print(f"pipeline end to end (candles on)     {figures['pipeline_ticks_per_s']:>12,} ticks/s")
    print(f"raw COPY, asyncpg records             {figures['raw_copy_records_ticks_per_s']:>12,} ticks/s")
    print(f"raw COPY, pre-encoded binary          {figures['raw_copy_binary_ticks_per_s']:>12,} ticks/s")
    print(f"pipeline / raw records COPY           {figures['ratio_to_records_copy']:>12}")
    print(f"pipeline / raw binary COPY            {figures['ratio_to_binary_copy']:>12}")
    p50, p99 = figures["candles_1000_m1_p50_ms"], figures["candles_1000_m1_p99_ms"]
    print(f"1,000 M1 candles query p50 / p99      {p50} / {p99} ms")
    print(f"  + the API's JSON body, p50          {figures['candles_1000_m1_with_json_body_p50_ms']} ms")
    print(json.dumps(figures, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
