"""Tick to WebSocket client: latency of a quote published on Redis until each of N subscribers has it.

Run: ``.venv/bin/python tests/bench/bench_ws_fanout.py [--subscribers 500] [--ticks 200]``

Starts embedded PostgreSQL and Redis (or uses TRADEPLANE_TEST_DATABASE_URL / TRADEPLANE_TEST_REDIS_URL when
set) and `tradeplane run api` in its own process, connects N clients subscribed to `quotes` for BTC-USD in this
process, and publishes --ticks quotes on `tp:quotes:BTC-USD` (as the market data worker does) 50 per second, each
stamped with its publish time. Every client records the delay of every quote. Server and clients share the
2-core machine. A benchmark, not a test: it prints figures and a one-line JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
import httpx
import orjson
import redis.asyncio as aioredis
from websockets.asyncio.client import connect

from tradeplane.adapters.db.migrate import upgrade
from tradeplane.adapters.embedded import EmbeddedStack
from tradeplane.services import demo, identity

SECRET = "bench-secret-not-for-production"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def prepare(database_url: str) -> str:
    await asyncio.to_thread(upgrade, database_url)
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction():
            await demo.load_reference_data(conn)
            user_id = await identity.create_user(conn, f"ws-bench-{uuid.uuid4().hex[:6]}", identity.Role.TRADER)
            return (await identity.issue_api_key(conn, SECRET, user_id, "bench")).key
    finally:
        await conn.close()


async def measure(port: int, redis_url: str, key: str, subscribers: int, ticks: int) -> list[int]:
    url = f"ws://127.0.0.1:{port}/ws"
    delays: list[int] = []
    clients = []
    for _ in range(subscribers):
        ws = await connect(url, compression=None, max_queue=None)
        await ws.send(orjson.dumps({"op": "auth", "key": key}).decode())
        await ws.recv()
        await ws.send(orjson.dumps({"op": "subscribe", "channel": "quotes", "symbol": "BTC-USD"}).decode())
        await ws.recv()
        clients.append(ws)

    async def reader(ws: object) -> None:
        for _ in range(ticks):
            message = orjson.loads(await ws.recv())  # type: ignore[attr-defined]
            delays.append(time.time_ns() - int(message["data"]["published_ns"]))

    readers = [asyncio.create_task(reader(ws)) for ws in clients]
    redis = aioredis.Redis.from_url(redis_url)
    await asyncio.sleep(0.5)
    for _ in range(ticks):
        payload = {"bid": "65000.00", "ask": "65000.50", "published_ns": time.time_ns()}
        await redis.publish(
            "tp:quotes:BTC-USD", orjson.dumps({"channel": "quotes", "symbol": "BTC-USD", "data": payload})
        )
        await asyncio.sleep(0.02)
    await asyncio.wait_for(asyncio.gather(*readers), 60)
    await redis.aclose()
    for ws in clients:
        await ws.close()
    return delays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subscribers", type=int, default=500)
    parser.add_argument("--ticks", type=int, default=200)
    args = parser.parse_args()

    data_dir = Path(tempfile.mkdtemp(prefix="tpws"))
    stack = EmbeddedStack(data_dir)
    database_url = os.environ.get("TRADEPLANE_TEST_DATABASE_URL")
    if database_url:
        name = f"tp_bench_{uuid.uuid4().hex[:8]}"
        subprocess.run(["psql", database_url, "-qc", f'CREATE DATABASE "{name}"'], check=True)
        database_url = database_url.rsplit("/", 1)[0] + "/" + name
    else:
        database_url = stack.start("postgres")
    redis_url = os.environ.get("TRADEPLANE_TEST_REDIS_URL") or stack.start("redis")
    bus_url = os.environ.get("TRADEPLANE_TEST_NATS_URL") or stack.start("nats")
    port = free_port()
    key = asyncio.run(prepare(database_url))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRADEPLANE_")}
    env.update(
        TRADEPLANE_DATABASE_URL=database_url,
        TRADEPLANE_REDIS_URL=redis_url,
        TRADEPLANE_BUS_URL=bus_url,
        TRADEPLANE_SECRET_KEY=SECRET,
        TRADEPLANE_API_PORT=str(port),
        TRADEPLANE_LOG_LEVEL="WARNING",
    )
    api = subprocess.Popen([sys.executable, "-m", "tradeplane.entrypoints.cli", "run", "api"], env=env)
    try:
        for _ in range(300):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code in (200, 503):
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        delays = sorted(asyncio.run(measure(port, redis_url, key, args.subscribers, args.ticks)))

        def q(p: float) -> float:
            return delays[int(p * (len(delays) - 1))] / 1e6

        result = {
            "benchmark": "ws_fanout",
            "subscribers": args.subscribers,
            "ticks": args.ticks,
            "messages": len(delays),
            "p50_ms": round(q(0.5), 3),
            "p99_ms": round(q(0.99), 3),
            "max_ms": round(delays[-1] / 1e6, 3),
        }
        counts = f"{args.subscribers} subscribers, {len(delays)} messages"
        print(f"{counts}: p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms")
        print(json.dumps(result))
    finally:
        api.send_signal(signal.SIGTERM)
        api.wait(timeout=30)
        stack.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
