"""Memory of the market data worker over a long simulated run: its RSS must stay flat while ticks flow.

Run: ``.venv/bin/python tests/bench/bench_md_memory.py [--minutes 10] [--rate 20000] [--interval 30]``

Starts embedded PostgreSQL, Redis and NATS in a temporary folder, runs `tradeplane setup` (migrations), loads
the demo instruments, then runs the real worker, `tradeplane run marketdata --simulate-rate RATE`, as its own
process. Every --interval seconds it prints the worker's RSS and the ticks stored so far; at the end, the first
and last RSS, the growth over the whole run and after the first minute (allocator and caches warming up), and
the ticks stored. A benchmark, not a test: it prints figures and a one-line JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
import psutil

from tradeplane.adapters.embedded import EmbeddedStack
from tradeplane.services import demo

MIB = 1024 * 1024
WARM_UP_S = 60.0


async def load_instruments(database_url: str) -> int:
    """The demo instruments (what `tradeplane up` lists); the simulated feed walks every open one."""
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction():
            await demo.load_reference_data(conn)
        return int(await conn.fetchval("SELECT count(*) FROM instruments WHERE status = 'open'"))
    finally:
        await conn.close()


async def ticks_stored(database_url: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM ticks"))
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=int, default=20_000, help="simulated ticks per second")
    parser.add_argument("--interval", type=float, default=30.0, help="seconds between RSS samples")
    args = parser.parse_args()

    data_dir = Path(tempfile.mkdtemp(prefix="tpmdmem"))
    stack = EmbeddedStack(data_dir / "data")
    urls = stack.start_all()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRADEPLANE_")}
    env.update(
        TRADEPLANE_DATA_DIR=str(data_dir / "data"),
        TRADEPLANE_DATABASE_URL=urls["database_url"],
        TRADEPLANE_REDIS_URL=urls["redis_url"],
        TRADEPLANE_BUS_URL=urls["bus_url"],
        TRADEPLANE_LOG_LEVEL="WARNING",
        TRADEPLANE_SECRET_KEY="bench-secret-not-for-production",
    )
    cli = [sys.executable, "-m", "tradeplane.entrypoints.cli"]
    log_path = data_dir / "marketdata.log"
    log = log_path.open("w")
    worker: subprocess.Popen[bytes] | None = None
    try:
        subprocess.run([*cli, "setup"], env=env, check=True, capture_output=True)
        instruments = asyncio.run(load_instruments(urls["database_url"]))
        worker = subprocess.Popen(
            [*cli, "run", "marketdata", "--simulate-rate", str(args.rate)], env=env, stdout=log, stderr=log
        )
        process = psutil.Process(worker.pid)
        database_url = urls["database_url"]
        began = time.monotonic()
        while asyncio.run(ticks_stored(database_url)) == 0:
            if worker.poll() is not None or time.monotonic() - began > 120:
                raise SystemExit(f"the worker stored nothing; see {log_path}:\n{log_path.read_text()[-2000:]}")
            time.sleep(0.5)
        print(
            f"worker pid {worker.pid}: {instruments} instruments at --simulate-rate {args.rate}; "
            f"sampling every {args.interval:g} s"
        )

        samples: list[dict[str, float]] = []
        start = time.monotonic()
        end = start + args.minutes * 60
        cpu_start = sum(process.cpu_times()[:2])
        while True:
            now = time.monotonic()
            rss = process.memory_info().rss
            stored = asyncio.run(ticks_stored(database_url))
            sample = {"t_s": round(now - start, 1), "rss_mib": round(rss / MIB, 1), "ticks_stored": stored}
            samples.append(sample)
            print(f"  t={sample['t_s']:6.0f} s  RSS {sample['rss_mib']:7.1f} MiB  ticks stored {stored:>11,}")
            if worker.poll() is not None:
                raise SystemExit(f"the worker exited with {worker.returncode}; see {log_path}")
            if now >= end:
                break
            time.sleep(max(0.0, min(args.interval, end - time.monotonic())))
        elapsed = time.monotonic() - start
        cpu = sum(process.cpu_times()[:2]) - cpu_start

        first, last = samples[0], samples[-1]
        warm = next((s for s in samples if s["t_s"] >= WARM_UP_S), first)
        stored_in_run = last["ticks_stored"] - first["ticks_stored"]
        result = {
            "benchmark": "md_memory",
            "minutes": args.minutes,
            "simulate_rate": args.rate,
            "samples": len(samples),
            "start_rss_mib": first["rss_mib"],
            "end_rss_mib": last["rss_mib"],
            "growth_mib": round(last["rss_mib"] - first["rss_mib"], 1),
            "growth_after_warm_up_mib": round(last["rss_mib"] - warm["rss_mib"], 1),
            "peak_rss_mib": max(s["rss_mib"] for s in samples),
            "ticks_stored": int(last["ticks_stored"]),
            "ticks_per_s": round(stored_in_run / elapsed),
            "worker_cpu_percent": round(100 * cpu / elapsed),
        }
        print(
            f"RSS start {result['start_rss_mib']} MiB, end {result['end_rss_mib']} MiB: growth "
            f"{result['growth_mib']} MiB ({result['growth_after_warm_up_mib']} MiB after the first minute), "
            f"peak {result['peak_rss_mib']} MiB"
        )
        print(
            f"ticks stored {result['ticks_stored']:,} ({result['ticks_per_s']:,}/s over the run); "
            f"worker CPU {result['worker_cpu_percent']} %"
        )
        print(json.dumps(result))
    finally:
        if worker is not None and worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                worker.kill()
        log.close()
        stack.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
