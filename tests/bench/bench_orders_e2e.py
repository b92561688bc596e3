"""End-to-end order benchmark on the embedded default: the whole platform as `tradeplane up` runs it.

Run: ``.venv/bin/python tests/bench/bench_orders_e2e.py [--rate 500] [--seconds 20] [--concurrency 32] [--pairs 16]
[--warmup 2] [--batch 200] [--shards 1] [--api-workers 1] [--skip-open-loop]``

It starts the embedded servers (PostgreSQL, Redis, NATS, as `tradeplane up` does) in a temporary data folder and
the platform as separate processes, `tradeplane run api`, `run relay` and `run engine` (one process each, so
the two cores are shared as in a deployment; `tradeplane up` runs them all in one process), creates --pairs makers and
takers (margin accounts, funded, with a high order-rate limit), and measures, on AAPL (maker sells 1 @ 190.00,
taker buys 1 @ 190.00, so every pair trades):

1. open loop at --rate orders/s for --seconds: POST acknowledgement latency of every order, and order-to-fill
   latency (POST sent -> the taker's fill report received on a WebSocket subscribed to `fills`), after
   --warmup seconds at the same rate that are not measured (new HTTP connections, statements prepared on each
   pooled database connection: the first 150 ms of a cold start took 70-170 ms an order), and the CPU each process spent
   per order while offering (as in 3): at a rate the machine cannot absorb, the latency is queueing;
2. ``GET /api/v1/accounts/{id}`` latency, 2,000 sequential requests;
3. sustained closed-loop throughput with --concurrency clients: orders placed, matched and persisted per
   second (until the last order of the run is filled in PostgreSQL), and the CPU each process spent per order
   (api, relay, engine, PostgreSQL with its backends, NATS, Redis, this generator): where the 2 cores go.
   With --batch N each client sends N orders per ``POST /orders/batch`` from its own maker/taker pair of one
   firm's accounts; without it, one order per ``POST /orders``.

The load generator runs on the same 2-core machine as the platform, so it competes with it for CPU. This is a
benchmark, not a test: it prints figures and a one-line JSON summary and asserts nothing about time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform as host
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import psutil
import websockets
from lean_http import LeanHTTPConnection  # type: ignore[import-not-found]

from tradeplane.adapters.embedded import EmbeddedStack
from tradeplane.services import accounts, demo, identity
from tradeplane.services.identity import Role

SYMBOL = "AAPL"
PRICE = "190.00"
# --shards 2: the second engine shard trades ETH-USD (shard_for puts AAPL on shard 0 and ETH-USD on shard 1)
SHARD_SYMBOLS = (("AAPL", "190.00"), ("ETH-USD", "3200.00"))
SECRET = "bench-secret-not-for-production"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def summary(name: str, values_ms: list[float]) -> dict[str, float]:
    result = {
        "n": len(values_ms),
        "p50_ms": round(pct(values_ms, 0.50), 3),
        "p99_ms": round(pct(values_ms, 0.99), 3),
        "max_ms": round(max(values_ms), 3) if values_ms else float("nan"),
        "mean_ms": round(statistics.fmean(values_ms), 3) if values_ms else float("nan"),
    }
    print(f"  {name:<28} n={result['n']:>6}  p50 {result['p50_ms']:>8.3f} ms  p99 {result['p99_ms']:>8.3f} ms")
    return result


async def create_participants(database_url: str, pairs: int) -> list[dict[str, Any]]:
    """`pairs` maker/taker pairs: placements of one account are serialised (its funds are locked while an
    order is checked), so throughput comes from many accounts, as it would in production."""
    return [await create_pair(database_url, i) for i in range(pairs)]


async def create_pair(database_url: str, index: int) -> dict[str, Any]:
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction():
            await demo.load_reference_data(conn)
            out: dict[str, Any] = {}
            for name in ("bench-maker", "bench-taker"):
                user_id = await identity.create_user(conn, f"{name}-{index}", Role.TRADER)
                key = (await identity.issue_api_key(conn, SECRET, user_id, "bench")).key
                account_id = await accounts.create_account(conn, user_id, "bench", "margin", "USD")
                await accounts.deposit(conn, account_id, Decimal("1000000000.00"))
                await conn.execute(
                    "INSERT INTO risk_limits (account_id, instrument_id, max_open_orders, max_orders_per_second)"
                    " VALUES ($1, NULL, 1000000, 1000000)",
                    account_id,
                )
                out[name] = {"user_id": user_id, "key": key, "account_id": account_id}
            return out
    finally:
        await conn.close()


async def create_firm(database_url: str, pairs: int) -> dict[str, Any]:
    """One trading user owning `pairs` maker/taker account pairs, as a firm placing batches would."""
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction():
            user_id = await identity.create_user(conn, "bench-firm", Role.TRADER)
            key = (await identity.issue_api_key(conn, SECRET, user_id, "bench")).key
            account_pairs = []
            for index in range(pairs):
                pair = []
                for name in ("maker", "taker"):
                    account_id = await accounts.create_account(conn, user_id, f"{name}-{index}", "margin", "USD")
                    await accounts.deposit(conn, account_id, Decimal("1000000000.00"))
                    await conn.execute(
                        "INSERT INTO risk_limits (account_id, instrument_id, max_open_orders, max_orders_per_second)"
                        " VALUES ($1, NULL, 1000000, 1000000)",
                        account_id,
                    )
                    pair.append(account_id)
                account_pairs.append(tuple(pair))
            return {"user_id": user_id, "key": key, "pairs": account_pairs}
    finally:
        await conn.close()


def order(account_id: int, side: str, symbol: str = SYMBOL, price: str = PRICE) -> dict[str, Any]:
    return {"account_id": account_id, "symbol": symbol, "side": side, "type": "limit", "quantity": "1", "price": price}


def auth(who: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {who['key']}"}


async def watch_fills(base: str, taker: dict[str, Any], seen: dict[int, float]) -> None:
    """Record when each of the taker's fill reports arrives over the WebSocket."""
    async with websockets.connect(base.replace("http://", "ws://") + "/ws", max_size=None, ping_interval=None) as ws:
        await ws.send(json.dumps({"op": "auth", "key": taker["key"]}))
        await ws.recv()
        await ws.send(json.dumps({"op": "subscribe", "channel": "fills"}))
        await ws.recv()
        taker["ws_ready"].set()
        async for raw in ws:
            message = json.loads(raw)
            if message.get("channel") == "fills":
                seen.setdefault(int(message["data"]["order_id"]), time.perf_counter())


async def connection_pool(base: str, size: int) -> asyncio.Queue[LeanHTTPConnection]:
    host, port = base.removeprefix("http://").split(":")
    pool: asyncio.Queue[LeanHTTPConnection] = asyncio.Queue()
    for _ in range(size):
        conn = LeanHTTPConnection(host, int(port))
        await conn.connect()
        pool.put_nowait(conn)
    return pool


async def close_pool(pool: asyncio.Queue[LeanHTTPConnection]) -> None:
    while not pool.empty():
        await pool.get_nowait().close()


async def open_loop(
    base: str,
    pairs: list[dict[str, Any]],
    rate: int,
    seconds: float,
    warmup: float,
    cpu: Callable[[], dict[str, float]],
) -> dict[str, Any]:
    ack_ms: list[float] = []
    sent_at: dict[int, float] = {}
    fills_seen: dict[int, float] = {}
    errors = 0
    for pair in pairs:
        pair["bench-taker"]["ws_ready"] = asyncio.Event()
    watchers = [asyncio.create_task(watch_fills(base, p["bench-taker"], fills_seen)) for p in pairs]
    await asyncio.gather(*(p["bench-taker"]["ws_ready"].wait() for p in pairs))
    pool = await connection_pool(base, 256)
    template = await pool.get()
    pool.put_nowait(template)

    async def send(who: dict[str, Any], side: str) -> None:
        nonlocal errors
        request = template.build("POST", "/api/v1/orders", order(who["account_id"], side), auth(who))
        conn = await pool.get()  # a connection per request in flight, as a browser pool would
        started = time.perf_counter()
        try:
            status, body = await conn.send(request)
        except (OSError, asyncio.IncompleteReadError):
            errors += 1
            return
        finally:
            pool.put_nowait(conn)
        ack_ms.append((time.perf_counter() - started) * 1000)
        if status != 201:
            errors += 1
        elif side == "buy":
            sent_at[int(json.loads(body)["id"])] = started

    async def offer(total: int) -> float:
        interval = 1.0 / rate
        start = time.perf_counter()
        tasks = []
        for i in range(total):
            delay = start + i * interval - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            pair = pairs[(i // 2) % len(pairs)]
            who, side = (pair["bench-taker"], "buy") if i % 2 else (pair["bench-maker"], "sell")
            tasks.append(asyncio.create_task(send(who, side)))
        await asyncio.gather(*tasks)
        return time.perf_counter() - start

    if warmup > 0:
        await offer(int(rate * warmup))
        ack_ms.clear()
        sent_at.clear()
        errors = 0
    total = int(rate * seconds)
    cpu_before = cpu()
    offered_s = await offer(total)
    cpu_after = cpu()
    await close_pool(pool)
    deadline = time.perf_counter() + 30
    while time.perf_counter() < deadline and not set(sent_at) <= set(fills_seen):  # noqa: ASYNC110
        await asyncio.sleep(0.1)
    for watcher in watchers:
        watcher.cancel()
    await asyncio.gather(*watchers, return_exceptions=True)
    fill_ms = [(fills_seen[oid] - t) * 1000 for oid, t in sent_at.items() if oid in fills_seen]
    print(f"open loop: offered {total} orders in {offered_s:.1f} s ({total / offered_s:.0f}/s), {errors} errors")
    per_order = {role: round((cpu_after[role] - cpu_before.get(role, 0.0)) * 1000 / total, 3) for role in cpu_after}
    busy = (sum(cpu_after.values()) - sum(cpu_before.values())) / offered_s / (os.cpu_count() or 1)
    print(f"  CPU per order (ms): {per_order}")
    print(f"  machine busy: {busy:.0%} of {os.cpu_count()} cpus while offering")
    return {
        "offered_rate": rate,
        "warmup_s": warmup,
        "orders": total,
        "errors": errors,
        "ack": summary("POST ack", ack_ms),
        "order_to_fill": summary("order -> fill over WS", fill_ms),
        "fills_missing": len(set(sent_at) - set(fills_seen)),
        "cpu_ms_per_order": per_order,
        "machine_busy": round(busy, 2),
    }


async def account_reads(base: str, pairs: list[dict[str, Any]], n: int = 2000) -> dict[str, Any]:
    taker = pairs[0]["bench-taker"]
    latencies = []
    pool = await connection_pool(base, 1)
    conn = pool.get_nowait()
    request = conn.build("GET", f"/api/v1/accounts/{taker['account_id']}", headers=auth(taker))
    for _ in range(n):
        started = time.perf_counter()
        status, _ = await conn.send(request)
        latencies.append((time.perf_counter() - started) * 1000)
        assert status == 200, status
    await conn.close()
    return summary("GET /accounts/{id}", latencies)


def cpu_seconds(data_dir: Path, workers: list[tuple[str, int]]) -> dict[str, float]:
    """CPU time (user + system) so far of every process of the run, by role: the platform's processes, the
    embedded servers (PostgreSQL with all its backends) and this load generator."""
    roles: dict[int, str] = {pid: role for role, pid in workers}
    for role, pid in workers:  # `run api --workers N` serves from its children
        with contextlib.suppress(psutil.NoSuchProcess):
            roles.update((child.pid, role) for child in psutil.Process(pid).children(recursive=True))
    roles[os.getpid()] = "load generator"
    for proc in psutil.process_iter(["cmdline", "name"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if str(data_dir) not in cmdline:
            continue
        name = proc.info["name"] or ""
        if "postgres" in name:
            roles[proc.pid] = "postgres"
            for child in proc.children():
                roles[child.pid] = "postgres"
        elif "nats" in name:
            roles[proc.pid] = "nats"
        elif "redis" in name:
            roles[proc.pid] = "redis"
    # redis-server rewrites its command line ("redis-server 127.0.0.1:port"): find it by its pid file
    with contextlib.suppress(OSError, ValueError):
        roles[int((data_dir / "data" / "redis" / "redis.pid").read_text().split()[0])] = "redis"
    totals: dict[str, float] = {}
    for pid, role in roles.items():
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.NoSuchProcess:
            continue
        totals[role] = totals.get(role, 0.0) + times.user + times.system
    return totals


async def sustained(
    base: str,
    database_url: str,
    pairs: list[dict[str, Any]],
    concurrency: int,
    seconds: float,
    cpu: Callable[[], dict[str, float]],
    batch: int = 0,
    shards: int = 1,
) -> dict[str, Any]:
    cpu_before = cpu()
    conn = await asyncpg.connect(database_url)
    filled_before = await conn.fetchval("SELECT count(*) FROM orders WHERE status = 'filled'")
    placed = 0
    stop_at = time.perf_counter() + seconds
    pool = await connection_pool(base, concurrency)

    async def client_loop(pair: dict[str, Any]) -> None:
        nonlocal placed
        conn = await pool.get()
        requests = [
            conn.build("POST", "/api/v1/orders", order(who["account_id"], side), auth(who))
            for who, side in ((pair["bench-maker"], "sell"), (pair["bench-taker"], "buy"))
        ]
        while time.perf_counter() < stop_at:
            for request in requests:
                status, _ = await conn.send(request)
                if status == 201:
                    placed += 1
        await conn.close()

    async def batch_loop(firm: dict[str, Any], maker: int, taker: int, symbol: str, price: str) -> None:
        """Batches of `batch` orders from one firm's maker/taker pair: sell, buy, sell, buy..."""
        nonlocal placed
        conn = await pool.get()
        orders = [order(taker if k % 2 else maker, "buy" if k % 2 else "sell", symbol, price) for k in range(batch)]
        request = conn.build("POST", "/api/v1/orders/batch", {"orders": orders}, auth(firm))
        while time.perf_counter() < stop_at:
            status, body = await conn.send(request)
            if status == 200:
                placed += sum(1 for result in json.loads(body)["results"] if result["status"] == 201)
        await conn.close()

    if batch:
        firm = await create_firm(database_url, concurrency)
        loops = [
            batch_loop(firm, maker, taker, *SHARD_SYMBOLS[k % shards]) for k, (maker, taker) in enumerate(firm["pairs"])
        ]
    else:
        loops = [client_loop(pairs[i % len(pairs)]) for i in range(concurrency)]
    start = time.perf_counter()
    await asyncio.gather(*loops)
    placing_s = time.perf_counter() - start
    target = filled_before + placed
    while await conn.fetchval("SELECT count(*) FROM orders WHERE status = 'filled'") < target:
        if time.perf_counter() - start > seconds + 120:
            break
        await asyncio.sleep(0.2)  # the count scans the orders: polling often would load the database measured
    done_s = time.perf_counter() - start
    filled = await conn.fetchval("SELECT count(*) FROM orders WHERE status = 'filled'") - filled_before
    await conn.close()
    cpu_after = cpu()
    per_order = {role: round((cpu_after[role] - cpu_before.get(role, 0.0)) * 1000 / filled, 3) for role in cpu_after}
    busy = sum(cpu_after.values()) - sum(cpu_before.values())
    print(f"  CPU per order (ms): {per_order}")
    print(f"  machine busy: {busy / done_s / (os.cpu_count() or 1):.0%} of {os.cpu_count()} cpus over the run")
    result = {
        "concurrency": concurrency,
        "batch": batch,
        "shards": shards,
        "placed": placed,
        "filled": filled,
        "placed_per_s": round(placed / placing_s),
        "placed_matched_persisted_per_s": round(filled / done_s),
        "cpu_ms_per_order": per_order,
    }
    print(
        f"sustained: {placed} orders placed in {placing_s:.1f} s ({result['placed_per_s']}/s); "
        f"all {filled} filled and persisted after {done_s:.1f} s ({result['placed_matched_persisted_per_s']}/s)"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--warmup", type=float, default=2, help="open loop: unmeasured seconds at --rate first")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--pairs", type=int, default=16, help="maker/taker account pairs")
    parser.add_argument("--api-workers", type=int, default=1, help="API processes (`run api --workers N`)")
    parser.add_argument(
        "--batch", type=int, default=0, help="sustained phase: orders per POST /orders/batch (0: one order per POST)"
    )
    parser.add_argument("--skip-open-loop", action="store_true", help="only the account reads and sustained phase")
    parser.add_argument(
        "--shards",
        type=int,
        default=1,
        choices=(1, 2),
        help="engine shards (processes); with 2, --batch clients"
        " alternate between AAPL (shard 0) and ETH-USD (shard 1)",
    )
    args = parser.parse_args()

    data_dir = Path(tempfile.mkdtemp(prefix="tpbench"))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRADEPLANE_")}
    env.update(
        TRADEPLANE_DATA_DIR=str(data_dir / "data"),
        TRADEPLANE_API_PORT=str(port),
        TRADEPLANE_LOG_LEVEL="WARNING",
        TRADEPLANE_SECRET_KEY=SECRET,
        TRADEPLANE_ENGINE_SHARDS=str(args.shards),
    )
    stack = EmbeddedStack(data_dir / "data")
    urls = stack.start_all()
    env.update(
        TRADEPLANE_DATABASE_URL=urls["database_url"],
        TRADEPLANE_REDIS_URL=urls["redis_url"],
        TRADEPLANE_BUS_URL=urls["bus_url"],
    )
    cli = [sys.executable, "-m", "tradeplane.entrypoints.cli"]
    subprocess.run([*cli, "setup"], env=env, check=True, capture_output=True)
    log = (data_dir / "platform.log").open("w")
    processes = [
        subprocess.Popen([*cli, "run", *worker], env=env, stdout=log, stderr=subprocess.STDOUT)
        for worker in (
            ["api", "--workers", str(args.api_workers)],
            ["relay"],
            *(["engine", "--shard", str(k)] for k in range(args.shards)),
        )
    ]
    try:
        print(f"starting the platform in {data_dir} ...", flush=True)
        for _ in range(600):
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            raise SystemExit(f"the platform did not start; see {data_dir / 'platform.log'}")
        database_url = urls["database_url"]
        parts = asyncio.run(create_participants(database_url, args.pairs))
        results: dict[str, Any] = {"benchmark": "orders_e2e", "machine": f"{host.machine()} {os.cpu_count()} cpus"}
        roles = ("api", "relay", *["engine"] * args.shards)
        workers = [(name, process.pid) for name, process in zip(roles, processes, strict=True)]
        cpu = lambda: cpu_seconds(data_dir, workers)  # noqa: E731
        if not args.skip_open_loop:
            results["open_loop"] = asyncio.run(open_loop(base, parts, args.rate, args.seconds, args.warmup, cpu))
        results["account_reads"] = asyncio.run(account_reads(base, parts))
        results["sustained"] = asyncio.run(
            sustained(base, database_url, parts, args.concurrency, args.seconds, cpu, args.batch, args.shards)
        )
        print(json.dumps(results))
    except BaseException:
        log.flush()
        print("platform log tail:\n" + "".join((data_dir / "platform.log").read_text().splitlines(True)[-20:]))
        raise
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
        stack.stop()
        log.close()
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
