"""What the engine's per-batch re-read of fee and margin rates (``settlement.refresh_rates``) costs a batch.

Run:  .venv/bin/python tests/bench/bench_engine_rates.py [--batches N] [--rounds R] [--symbols 1,10]
          [--database-url URL]

The server is --database-url, else TRADEPLANE_TEST_DATABASE_URL, else an embedded PostgreSQL started here. A fresh
database is built by the real migrations and dropped at the end. Each timed transaction stands for a batch that
settles nothing: BEGIN, the ``engine_offsets`` upsert every batch commits, COMMIT; the measured variants add
``refresh_rates`` for 1 (or S) of the shard's instruments, and, as a yardstick, one ``SELECT 1`` round trip.
Variants are interleaved round by round. Figures per batch: wall time, this process's CPU and the PostgreSQL
backend's CPU (from /proc, so the server must run on this machine), medians over the rounds. Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg

from tradeplane.adapters.db.migrate import upgrade
from tradeplane.services import demo
from tradeplane.services.settlement import InstrumentInfo, load_instruments, refresh_rates

TICKS = os.sysconf("SC_CLK_TCK")


def with_database(url: str, name: str) -> str:
    head, _, _ = url.rpartition("/")
    return f"{head}/{name}"


def backend_cpu(pid: int) -> float:
    """Seconds of CPU the PostgreSQL backend ``pid`` has used (user + system)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


async def run_variant(
    conn: asyncpg.Connection, pid: int, variant: str, batches: int, instruments: dict[str, InstrumentInfo]
) -> tuple[float, float, float]:
    symbols = list(instruments)
    width = 0 if variant in ("baseline", "select1") else int(variant.split("-")[1])
    wall, cpu, server = time.perf_counter(), time.process_time(), backend_cpu(pid)
    for n in range(batches):
        async with conn.transaction():
            if variant == "select1":
                await conn.fetchval("SELECT 1")
            elif width:
                await refresh_rates(conn, instruments, symbols[:width])
            await conn.execute(
                "INSERT INTO engine_offsets (consumer, last_sequence, updated_at) VALUES ('bench', $1, now())"
                " ON CONFLICT (consumer) DO UPDATE SET last_sequence = EXCLUDED.last_sequence,"
                " updated_at = EXCLUDED.updated_at",
                n,
            )
    return (
        (time.perf_counter() - wall) / batches * 1e6,
        (time.process_time() - cpu) / batches * 1e6,
        (backend_cpu(pid) - server) / batches * 1e6,
    )


async def bench(url: str, batches: int, rounds: int, widths: list[int]) -> dict[str, object]:
    name = f"tp_bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(with_database(url, "postgres"))
    await admin.execute(f'CREATE DATABASE "{name}"')
    db_url = with_database(url, name)
    try:
        await asyncio.to_thread(upgrade, db_url)
        conn = await asyncpg.connect(db_url)
        try:
            async with conn.transaction():
                await demo.load_reference_data(conn)
                for n in range(max(widths)):
                    await conn.execute(
                        "INSERT INTO instruments (symbol, base_asset, quote_asset, tick_size, lot_size, min_qty,"
                        " max_qty, price_band_pct, maker_fee_rate, taker_fee_rate, margin_rate, status)"
                        " VALUES ($1, 'BTC', 'USD', 0.01, 0.0001, 0.0001, 1000, 10, 0.0002, 0.0005, 0.1, 'open')",
                        f"BENCH{n}-USD",
                    )
            instruments = {s: i for s, i in (await load_instruments(conn)).items() if s.startswith("BENCH")}
            pid: int = await conn.fetchval("SELECT pg_backend_pid()")
            variants = ["baseline", "select1", *(f"refresh-{w}" for w in widths)]
            for variant in variants:  # warm up: prepared statements, caches
                await run_variant(conn, pid, variant, 200, instruments)
            samples: dict[str, list[tuple[float, float, float]]] = {v: [] for v in variants}
            for _ in range(rounds):
                for variant in variants:
                    samples[variant].append(await run_variant(conn, pid, variant, batches, instruments))
        finally:
            await conn.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    summary: dict[str, object] = {"batches": batches, "rounds": rounds}
    base = [statistics.median(s[k] for s in samples["baseline"]) for k in range(3)]
    for variant, runs in samples.items():
        med = [statistics.median(s[k] for s in runs) for k in range(3)]
        added = [m - b for m, b in zip(med, base, strict=True)]
        print(
            f"{variant:>11}: per batch wall {med[0]:7.1f} us, client CPU {med[1]:6.1f} us, server CPU {med[2]:6.1f} us"
            f"  (added: {added[0]:+6.1f} / {added[1]:+6.1f} / {added[2]:+6.1f} us)"
        )
        summary[variant] = {
            "wall_us": round(med[0], 1),
            "client_cpu_us": round(med[1], 1),
            "server_cpu_us": round(med[2], 1),
        }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--batches", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--symbols", default="1,10")
    parser.add_argument("--database-url", default=os.environ.get("TRADEPLANE_TEST_DATABASE_URL"))
    args = parser.parse_args()
    widths = [int(w) for w in args.symbols.split(",")]
    url = args.database_url
    stack = None
    if not url:
        from tradeplane.adapters.embedded import EmbeddedStack

        stack = EmbeddedStack(Path(tempfile.mkdtemp(prefix="tradeplane-bench-")))
        url = stack.start("postgres")
    try:
        summary = asyncio.run(bench(url, args.batches, args.rounds, widths))
    finally:
        if stack is not None:
            stack.stop()
    print(json.dumps(summary))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
