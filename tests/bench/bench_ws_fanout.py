"""Tick to WebSocket client: latency of a quote published on Redis until each of N subscribers has it.

Run: ``.venv/bin/python tests/bench/bench_ws_fanout.py [--subscribers 500] [--ticks 200] [--client lean|websockets]``

Starts embedded PostgreSQL and Redis (or uses TRADEPLANE_TEST_DATABASE_URL / TRADEPLANE_TEST_REDIS_URL when
set) and `tradeplane run api` in its own process, connects N clients subscribed to `quotes` for BTC-USD, and
publishes --ticks quotes on `tp:quotes:BTC-USD` (as the market data worker does) 50 per second, each stamped with
its publish time. Every client records the delay of every quote.

The load generator shares the 2-core machine with the API and costs CPU of its own, which shows up as latency.
By default the clients are lean (handshake, masked requests and frame parsing written out here, on uvloop) and
split over --client-procs processes; `--client websockets` puts every client in this process on the
`websockets` library, which costs more per message than the server does. Both print the CPU per tick the API,
the generator and the rest of the machine spent (the last shows when someone else was using the cores).
A benchmark, not a test: it prints figures and a one-line JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from multiprocessing.connection import Connection
from pathlib import Path
from time import time_ns

import asyncpg
import httpx
import orjson
import psutil
import redis.asyncio as aioredis
import uvloop
from websockets.asyncio.client import connect
from websockets.frames import Frame, Opcode

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


class LeanClient(asyncio.Protocol):
    """A WebSocket client cut to what the measurement needs: handshake, masked requests, frame parsing.

    Server frames are unmasked and, for these messages, unfragmented. The receive time is taken once per read
    from the socket, before anything else. While measuring, a read that is exactly one small text frame (every
    quote, as the server writes one frame per write) is only stamped and kept; anything else goes through the
    general frame parser, which keeps its text frames the same way. The JSON is decoded after the last quote
    arrived (`delays`), so neither parsing nor decoding competes with the server for the two cores.
    """

    def __init__(self, host: str, port: int, receipts: Receipts, expected: int, done: asyncio.Event) -> None:
        self.host, self.port = host, port
        # Shared by the process's clients: receipt times and payloads, in two lists of untracked objects so the
        # garbage collector has nothing to walk (a list of tuples made full collections, stalling receipt).
        self.times, self.payloads = receipts.times, receipts.payloads
        self.expected, self.done = expected, done
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.handshake_done = False
        self.measuring = False  # set once the subscription is confirmed: text frames are quotes from then on
        self.replies: asyncio.Queue[dict[str, object]] = asyncio.Queue()
        self.opened = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio subclasses
        key = base64.b64encode(os.urandom(16)).decode()
        self.transport.write(
            f"GET /ws HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )

    def send(self, request: dict[str, object]) -> None:
        assert self.transport is not None
        self.transport.write(Frame(Opcode.TEXT, orjson.dumps(request)).serialize(mask=True))

    def data_received(self, data: bytes) -> None:
        now = time_ns()
        # Fast path: one whole unmasked text frame of under 126 bytes, nothing left over from an earlier read.
        if self.measuring and not self.buffer and 2 < len(data) < 128 and data[0] == 0x81 and data[1] + 2 == len(data):
            self.times.append(now)
            self.payloads.append(data[2:])
            if len(self.times) >= self.expected:
                self.done.set()
            return
        buffer = self.buffer + data
        if not self.handshake_done:
            head, sep, buffer = buffer.partition(b"\r\n\r\n")
            if not sep:
                self.buffer = head
                return
            if not head.startswith(b"HTTP/1.1 101"):
                raise RuntimeError(f"handshake refused: {head[:80]!r}")
            self.handshake_done = True
            self.opened.set_result(None)
        while len(buffer) >= 2:
            opcode, length, offset = buffer[0] & 0x0F, buffer[1] & 0x7F, 2
            if length == 126:
                length, offset = int.from_bytes(buffer[2:4], "big"), 4
            elif length == 127:
                length, offset = int.from_bytes(buffer[2:10], "big"), 10
            if len(buffer) < offset + length:
                break
            payload, buffer = buffer[offset : offset + length], buffer[offset + length :]
            if opcode == Opcode.TEXT.value:
                if self.measuring:
                    self.times.append(now)
                    self.payloads.append(payload)
                    if len(self.times) >= self.expected:
                        self.done.set()
                else:
                    self.replies.put_nowait(orjson.loads(payload))
            elif opcode == Opcode.PING.value and self.transport is not None:
                self.transport.write(Frame(Opcode.PONG, payload).serialize(mask=True))
        self.buffer = buffer


class Receipts:
    """What one generator process received while measuring: receipt times and payloads, in step."""

    def __init__(self) -> None:
        self.times: list[int] = []
        self.payloads: list[bytes] = []

    def delays(self) -> list[int]:
        """Nanoseconds from each quote's publication to its receipt; anything but a quote is an error."""
        result = []
        for received_ns, payload in zip(self.times, self.payloads, strict=True):
            message = orjson.loads(payload)
            if message.get("channel") != "quotes":
                raise RuntimeError(f"a client received {message!r} while measuring")
            result.append(received_ns - message["data"]["published_ns"])
        return result


async def lean_subscribers(port: int, key: str, count: int, ticks: int, conn: Connection) -> None:
    """One generator process: `count` lean clients; reports ready, then its delays and CPU time."""
    receipts = Receipts()
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    clients = []
    for _ in range(count):
        _, client = await loop.create_connection(
            lambda: LeanClient("127.0.0.1", port, receipts, count * ticks, done), "127.0.0.1", port
        )
        await client.opened
        client.send({"op": "auth", "key": key})
        await client.replies.get()
        client.send({"op": "subscribe", "channel": "quotes", "symbol": "BTC-USD"})
        await client.replies.get()
        client.measuring = True
        clients.append(client)
    conn.send("ready")
    cpu = time.process_time()
    await done.wait()
    conn.send(time.process_time() - cpu)  # the window: from ready to the last quote, decoding not included
    conn.send(receipts.delays())
    for client in clients:
        assert client.transport is not None
        client.transport.close()


def lean_process(port: int, key: str, count: int, ticks: int, conn: Connection) -> None:
    uvloop.run(lean_subscribers(port, key, count, ticks, conn))


async def websockets_subscribers(port: int, key: str, subscribers: int, ticks: int, delays: list[int]) -> list[object]:
    """The `websockets` library's client, all subscribers in this process (the heavier, original generator)."""
    clients = []
    for _ in range(subscribers):
        ws = await connect(f"ws://127.0.0.1:{port}/ws", compression=None, max_queue=None)
        await ws.send(orjson.dumps({"op": "auth", "key": key}).decode())
        await ws.recv()
        await ws.send(orjson.dumps({"op": "subscribe", "channel": "quotes", "symbol": "BTC-USD"}).decode())
        await ws.recv()
        clients.append(ws)

    async def reader(ws: object) -> None:
        for _ in range(ticks):
            message = orjson.loads(await ws.recv())  # type: ignore[attr-defined]
            delays.append(time.time_ns() - int(message["data"]["published_ns"]))

    return [asyncio.create_task(reader(ws)) for ws in clients]


async def publish(redis_url: str, ticks: int, rate: float) -> None:
    redis = aioredis.Redis.from_url(redis_url)
    await redis.ping()  # connect now: the first quote's delay must not include the publisher's connection set-up
    for _ in range(ticks):
        payload = {"bid": "65000.00", "ask": "65000.50", "published_ns": time.time_ns()}
        await redis.publish(
            "tp:quotes:BTC-USD", orjson.dumps({"channel": "quotes", "symbol": "BTC-USD", "data": payload})
        )
        await asyncio.sleep(1 / rate)
    await redis.aclose()


def machine_busy() -> float:
    """CPU seconds the whole machine spent busy so far (all cores, every process, the kernel's own work)."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0) - getattr(times, "steal", 0.0)


def process_tree_cpu(pid: int) -> float:
    """CPU seconds of `pid` and its children (the workers of `run api --workers N`)."""
    root = psutil.Process(pid)
    return sum(sum(p.cpu_times()[:2]) for p in [root, *root.children(recursive=True)])


def measure(args: argparse.Namespace, port: int, redis_url: str, key: str, api_pid: int) -> dict[str, object]:
    delays: list[int] = []
    generator_cpu = machine_cpu = 0.0
    if args.client == "websockets":

        async def run() -> float:
            readers = await websockets_subscribers(port, key, args.subscribers, args.ticks, delays)
            await asyncio.sleep(0.5)
            cpu, api_cpu, busy = time.process_time(), process_tree_cpu(api_pid), machine_busy()
            await publish(redis_url, args.ticks, args.rate)
            await asyncio.wait_for(asyncio.gather(*readers), 60)
            nonlocal generator_cpu, machine_cpu
            generator_cpu = time.process_time() - cpu
            machine_cpu = machine_busy() - busy
            return process_tree_cpu(api_pid) - api_cpu

        api_cpu = asyncio.run(run())
    else:
        context = multiprocessing.get_context("spawn")
        shares = [
            args.subscribers // args.client_procs + (i < args.subscribers % args.client_procs)
            for i in range(args.client_procs)
        ]
        workers = []
        for share in shares:
            parent, child = context.Pipe()
            process = context.Process(target=lean_process, args=(port, key, share, args.ticks, child), daemon=True)
            process.start()
            workers.append((process, parent))
        for _, parent in workers:
            if not parent.poll(120) or parent.recv() != "ready":
                raise RuntimeError("a generator process failed to connect its clients")
        time.sleep(0.5)
        api_cpu_start, cpu, busy = process_tree_cpu(api_pid), time.process_time(), machine_busy()
        uvloop.run(publish(redis_url, args.ticks, args.rate))
        generator_cpu = time.process_time() - cpu
        for _, parent in workers:
            if not parent.poll(60):
                raise RuntimeError("a generator process did not receive every tick")
            generator_cpu += parent.recv()
        api_cpu = process_tree_cpu(api_pid) - api_cpu_start
        machine_cpu = machine_busy() - busy
        for process, parent in workers:  # each decodes what it received once the window has closed
            if not parent.poll(60):
                raise RuntimeError("a generator process did not report its delays")
            delays.extend(parent.recv())
            process.join(10)
    delays.sort()

    def q(p: float) -> float:
        return round(delays[int(p * (len(delays) - 1))] / 1e6, 3)

    return {
        "benchmark": "ws_fanout",
        "client": args.client,
        "client_procs": 1 if args.client == "websockets" else args.client_procs,
        "api_workers": args.api_workers,
        "subscribers": args.subscribers,
        "ticks": args.ticks,
        "messages": len(delays),
        "p50_ms": q(0.5),
        "p99_ms": q(0.99),
        "max_ms": q(1.0),
        # CPU per tick over the publishing window: what the API and the load generator (publisher included)
        # each spent, and everything else on the machine (Redis, the kernel's own work, other people's jobs).
        "api_cpu_ms_per_tick": round(1000 * api_cpu / args.ticks, 2),
        "generator_cpu_ms_per_tick": round(1000 * generator_cpu / args.ticks, 2),
        "other_cpu_ms_per_tick": round(1000 * (machine_cpu - api_cpu - generator_cpu) / args.ticks, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subscribers", type=int, default=500)
    parser.add_argument("--ticks", type=int, default=200)
    parser.add_argument("--rate", type=float, default=50.0, help="quotes published per second")
    parser.add_argument(
        "--client",
        choices=("lean", "websockets"),
        default="lean",
        help="lean: a minimal frame-parsing client on uvloop, split over --client-procs processes; "
        "websockets: the websockets library's client, every subscriber in this one process",
    )
    parser.add_argument("--client-procs", type=int, default=2, help="generator processes for --client lean")
    parser.add_argument(
        "--api-workers", type=int, default=1, help="API processes sharing the port (`run api --workers N`)"
    )
    args = parser.parse_args()

    data_dir = Path(tempfile.mkdtemp(prefix="tpws"))
    stack = EmbeddedStack(data_dir)
    server_url = os.environ.get("TRADEPLANE_TEST_DATABASE_URL")
    database_url = server_url
    if server_url:
        name = f"tp_bench_{uuid.uuid4().hex[:8]}"
        subprocess.run(["psql", server_url, "-qc", f'CREATE DATABASE "{name}"'], check=True)
        database_url = server_url.rsplit("/", 1)[0] + "/" + name
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
    api = subprocess.Popen(
        [sys.executable, "-m", "tradeplane.entrypoints.cli", "run", "api", "--workers", str(args.api_workers)], env=env
    )
    try:
        for _ in range(300):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code in (200, 503):
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        result = measure(args, port, redis_url, key, api.pid)
        counts = f"{args.subscribers} subscribers ({args.client} client), {result['messages']} messages"
        print(f"{counts}: p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms, max {result['max_ms']} ms")
        print(
            f"CPU per tick: API {result['api_cpu_ms_per_tick']} ms, "
            f"load generator {result['generator_cpu_ms_per_tick']} ms, "
            f"rest of the machine {result['other_cpu_ms_per_tick']} ms"
        )
        print(json.dumps(result))
    finally:
        api.send_signal(signal.SIGTERM)
        api.wait(timeout=30)
        if server_url:
            subprocess.run(["psql", server_url, "-qc", f'DROP DATABASE IF EXISTS "{name}"'], check=False)
        stack.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
