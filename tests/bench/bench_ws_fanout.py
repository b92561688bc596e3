"""Tick to WebSocket client: latency of a quote published on Redis until each of N subscribers has it.

Run: ``.venv/bin/python tests/bench/bench_ws_fanout.py [--subscribers 500] [--ticks 200] [--awake 50]
[--client-procs 2] [--api-workers 1] [--client lean|websockets]``

Starts embedded PostgreSQL and Redis (or uses TRADEPLANE_TEST_DATABASE_URL / TRADEPLANE_TEST_REDIS_URL when
set) and `tradeplane run api` in its own process, connects N clients subscribed to `quotes` for BTC-USD, and
publishes --ticks quotes on `tp:quotes:BTC-USD` (the market data worker's envelope and fields) on a fixed
schedule, --rate per second, each stamped with its publish time and numbered. Every client must receive every
quote exactly once and in order, or the run fails.

What is timed, from the publisher's clock just before PUBLISH:

- arrival, all N clients: until the frame is in the client's socket, the kernel's receive timestamp of the
  packet (SO_TIMESTAMPNS, the same clock). That is the client machine having the frame.
- read, the --awake clients: until the client's process has read it off the socket. These wait in epoll for
  every frame and take the time right after `recvmsg`, so the figure includes waking the client up.

The clients run on the same 2 cores as the API; a client on its own machine would cost those cores nothing.
So the N - --awake other clients do not wake up for each frame: their process drains them once per tick,
halfway between two quotes (the schedule is known), when the fan-out of the previous quote is long over. If a
fan-out still runs then, the drain competes with it and that shows as latency. The awake clients are spread
evenly over the connections, so over the server's order of writing too. Clients use plain sockets with a
handshake, masked requests and frame parsing written out here, split over --client-procs processes; payloads are
decoded after the run. `--client websockets` instead puts every client, all awake, in one process on the
`websockets` library (costlier per message than the server). Both print the CPU per tick the API, the
generator and the rest of the machine spent (the last shows when someone else was using the cores).
A benchmark, not a test: it prints figures and a one-line JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import json
import multiprocessing
import os
import select
import shutil
import signal
import socket
import struct
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
import redis
from websockets.asyncio.client import connect
from websockets.frames import Frame, Opcode

from tradeplane.adapters.db.migrate import upgrade
from tradeplane.adapters.embedded import EmbeddedStack
from tradeplane.services import demo, identity

SECRET = "bench-secret-not-for-production"
SYMBOL = "BTC-USD"
CHANNEL = f"tp:quotes:{SYMBOL}"
SO_TIMESTAMPNS = 35  # Linux (asm-generic/socket.h); the socket module does not name it
TIMESPEC = struct.Struct("qq")
ANCILLARY_SIZE = socket.CMSG_SPACE(TIMESPEC.size)
READ_SIZE = 1 << 16


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


# --- lean clients -------------------------------------------------------------------------------------------


def split_frames(buffer: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """The complete (opcode, payload) server frames at the start of `buffer`, and what follows them.

    Server frames are unmasked, and these (quotes, replies) unfragmented."""
    frames = []
    while len(buffer) >= 2:
        length, offset = buffer[1] & 0x7F, 2
        if length == 126:
            length, offset = int.from_bytes(buffer[2:4], "big"), 4
        elif length == 127:
            length, offset = int.from_bytes(buffer[2:10], "big"), 10
        if len(buffer) < offset + length:
            break
        frames.append((buffer[0] & 0x0F, buffer[offset : offset + length]))
        buffer = buffer[offset + length :]
    return frames, buffer


def request_frame(request: dict[str, object]) -> bytes:
    return Frame(Opcode.TEXT, orjson.dumps(request)).serialize(mask=True)


def open_subscriber(port: int, key: str) -> socket.socket:
    """A connected, authenticated client subscribed to the quotes, with nothing left unread; non-blocking from
    then on, the kernel stamping every packet it receives."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    challenge = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {challenge}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(4096)
        if not chunk:
            raise RuntimeError("the server closed the connection during the handshake")
        buffer += chunk
    head, _, buffer = buffer.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        raise RuntimeError(f"handshake refused: {head[:80]!r}")
    for request, event in (
        ({"op": "auth", "key": key}, "authenticated"),
        ({"op": "subscribe", "channel": "quotes", "symbol": SYMBOL}, "subscribed"),
    ):
        sock.sendall(request_frame(request))
        frames: list[tuple[int, bytes]] = []
        while not frames:
            frames, buffer = split_frames(buffer)
            if not frames:
                buffer += sock.recv(4096)
        reply = orjson.loads(frames[0][1])
        if len(frames) > 1 or reply.get("event") != event:
            raise RuntimeError(f"expected {event}, got {[payload for _, payload in frames]!r}")
    if buffer:
        raise RuntimeError(f"unexpected bytes before the first quote: {buffer[:80]!r}")
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    sock.setblocking(False)
    return sock


class Receipts:
    """Every frame one generator process received while measuring, in flat lists kept in step (lists of ints
    and bytes, which the garbage collector does not track)."""

    def __init__(self) -> None:
        self.client: list[int] = []
        self.read_ns: list[int] = []  # after recvmsg, awake clients only (0 for the others)
        self.arrived_ns: list[int] = []  # the kernel's receive timestamp of the read's last packet
        self.payloads: list[bytes] = []
        self.shared = 0  # frames that came in one read with a later one: stamped with the later one's arrival


def read_subscriber(index: int, sock: socket.socket, pending: list[bytes], receipts: Receipts, *, awake: bool) -> None:
    """Everything that is in `sock` now, parsed into frames; answers pings."""
    while True:
        try:
            data, ancillary, _, _ = sock.recvmsg(READ_SIZE, ANCILLARY_SIZE)
        except BlockingIOError:
            return
        read_ns = time_ns() if awake else 0
        if not data:
            raise RuntimeError(f"the server closed subscriber {index}")
        arrived_ns = 0
        for level, kind, value in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                seconds, nanoseconds = TIMESPEC.unpack(value)
                arrived_ns = seconds * 1_000_000_000 + nanoseconds
        if pending[index]:
            data = pending[index] + data
        frames, pending[index] = split_frames(data)
        texts = 0
        for opcode, payload in frames:
            if opcode == Opcode.TEXT.value:
                receipts.client.append(index)
                receipts.read_ns.append(read_ns)
                receipts.arrived_ns.append(arrived_ns)
                receipts.payloads.append(payload)
                texts += 1
            elif opcode == Opcode.PING.value:
                sock.sendall(Frame(Opcode.PONG, payload).serialize(mask=True))
            elif opcode == Opcode.CLOSE.value:
                raise RuntimeError(f"the server closed subscriber {index}: {payload[2:]!r}")
        receipts.shared += max(texts - 1, 0)
        if len(data) < READ_SIZE:
            return  # all there was (one read is one syscall fewer than reading until EAGAIN)


def evenly_spread(count: int, picks: int) -> set[int]:
    return {i * count // picks for i in range(picks)} if picks else set()


def run_subscribers(port: int, key: str, count: int, awake: int, ticks: int, conn: Connection) -> None:
    """One generator process: `count` clients, `awake` of them read each frame as it comes, the rest are drained
    once per tick between quotes. Reports ready, then its CPU time over the window, then its delays."""
    gc.disable()  # nothing here makes cycles; a collection pass over 500 clients' state would stall receipt
    sockets = [open_subscriber(port, key) for _ in range(count)]
    awake_clients = evenly_spread(count, awake)
    drained = [i for i in range(count) if i not in awake_clients]
    poller = select.epoll()
    by_fd = {}
    for i in awake_clients:
        poller.register(sockets[i].fileno(), select.EPOLLIN)
        by_fd[sockets[i].fileno()] = i
    pending = [b""] * count
    receipts = Receipts()
    conn.send("ready")
    start_ns, interval_ns = conn.recv()
    cpu = time.process_time()
    expected = count * ticks
    next_drain = start_ns + interval_ns // 2
    give_up = start_ns + ticks * interval_ns + 30_000_000_000
    while len(receipts.payloads) < expected:
        now = time_ns()
        if now >= next_drain:
            for i in drained:
                read_subscriber(i, sockets[i], pending, receipts, awake=False)
            next_drain += interval_ns
            if now > give_up:
                raise RuntimeError(f"{expected - len(receipts.payloads)} quotes never arrived")
            continue
        for fd, _ in poller.poll((next_drain - now) / 1e9):
            i = by_fd[fd]
            read_subscriber(i, sockets[i], pending, receipts, awake=True)
    conn.send(time.process_time() - cpu)  # the window: from the first quote to the last, decoding not included
    conn.send(delays(receipts, count, ticks, awake_clients))
    for sock in sockets:
        sock.close()


def delays(receipts: Receipts, count: int, ticks: int, awake: set[int]) -> dict[str, object]:
    """Nanoseconds from publication to arrival (every client) and to read (awake clients); checks that every
    client got every quote once, in order, and nothing else."""
    next_seq = [0] * count
    arrival, read, awake_arrival = [], [], []
    first = [1 << 62] * ticks  # per quote, the earliest and latest arrival in this process
    last = [0] * ticks
    for client, read_ns, arrived_ns, payload in zip(
        receipts.client, receipts.read_ns, receipts.arrived_ns, receipts.payloads, strict=True
    ):
        message = orjson.loads(payload)
        if message.get("channel") != "quotes":
            raise RuntimeError(f"a client received {message!r} while measuring")
        data = message["data"]
        if data["seq"] != next_seq[client]:
            raise RuntimeError(f"client {client} received quote {data['seq']} after {next_seq[client] - 1}")
        next_seq[client] += 1
        if not arrived_ns:
            raise RuntimeError("a read came without the kernel's receive timestamp")
        delay = arrived_ns - data["published_ns"]
        arrival.append(delay)
        first[data["seq"]] = min(first[data["seq"]], delay)
        last[data["seq"]] = max(last[data["seq"]], delay)
        if client in awake:
            awake_arrival.append(arrived_ns - data["published_ns"])
            read.append(read_ns - data["published_ns"])
    if any(seq != ticks for seq in next_seq):
        raise RuntimeError("a client is missing quotes")
    return {
        "arrival": arrival,
        "read": read,
        "awake_arrival": awake_arrival,
        "first": first,
        "last": last,
        "shared": receipts.shared,
    }


def generator_process(
    port: int, key: str, count: int, awake: int, ticks: int, cpus: set[int] | None, conn: Connection
) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)
    try:
        run_subscribers(port, key, count, awake, ticks, conn)
    except BaseException as exc:
        conn.send(f"failed: {exc!r}")
        raise


# --- the websockets library's client ------------------------------------------------------------------------


async def websockets_subscribers(port: int, key: str, subscribers: int, ticks: int, delays: list[int]) -> list[object]:
    """The `websockets` library's client, all subscribers in this process, every one awake (the heavier,
    original generator)."""
    clients = []
    for _ in range(subscribers):
        ws = await connect(f"ws://127.0.0.1:{port}/ws", compression=None, max_queue=None)
        await ws.send(orjson.dumps({"op": "auth", "key": key}).decode())
        await ws.recv()
        await ws.send(orjson.dumps({"op": "subscribe", "channel": "quotes", "symbol": SYMBOL}).decode())
        await ws.recv()
        clients.append(ws)

    async def reader(ws: object) -> None:
        for seq in range(ticks):
            message = orjson.loads(await ws.recv())  # type: ignore[attr-defined]
            if message["data"]["seq"] != seq:
                raise RuntimeError(f"received quote {message['data']['seq']}, expected {seq}")
            delays.append(time.time_ns() - int(message["data"]["published_ns"]))

    return [asyncio.create_task(reader(ws)) for ws in clients]


# --- the publisher and the measurement ----------------------------------------------------------------------


def publish(redis_url: str, ticks: int, start_ns: int, interval_ns: int) -> None:
    """Quote `seq` at start_ns + seq * interval_ns, the fields of the market data worker's quote plus the number
    and the publish time."""
    client = redis.Redis.from_url(redis_url)
    client.ping()  # connected now: the first quote's delay must not include the publisher's connection set-up
    for seq in range(ticks):
        pause = (start_ns + seq * interval_ns - time_ns()) / 1e9
        if pause > 0:
            time.sleep(pause)
        data = {
            "symbol": SYMBOL,
            "ts": "2026-11-21T12:00:00.000000Z",
            "bid": "65000.00",
            "ask": "65000.50",
            "bid_size": "1.25",
            "ask_size": "0.8",
            "last": "65000.25",
            "seq": seq,
            "published_ns": time_ns(),
        }
        client.publish(CHANNEL, orjson.dumps({"channel": "quotes", "symbol": SYMBOL, "data": data}))
    client.close()


def client_cpus(spec: str) -> set[int] | None:
    """The CPUs the lean clients may run on: `last` (the machine's last CPU, when it has more than one), `all`,
    or a comma-separated list."""
    if spec == "all":
        return None
    if spec == "last":
        available = sorted(os.sched_getaffinity(0))
        return {available[-1]} if len(available) > 1 else None
    return {int(cpu) for cpu in spec.split(",")}


def machine_busy() -> float:
    """CPU seconds the whole machine spent busy so far (all cores, every process, the kernel's own work)."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0) - getattr(times, "steal", 0.0)


def process_tree_cpu(pid: int) -> float:
    """CPU seconds of `pid` and its children (the workers of `run api --workers N`)."""
    root = psutil.Process(pid)
    return sum(sum(p.cpu_times()[:2]) for p in [root, *root.children(recursive=True)])


def receive_from(parent: Connection, timeout: float, what: str) -> object:
    if not parent.poll(timeout):
        raise RuntimeError(f"a generator process did not {what}")
    value = parent.recv()
    if isinstance(value, str) and value.startswith("failed"):
        raise RuntimeError(f"a generator process {value}")
    return value


def measure(args: argparse.Namespace, port: int, redis_url: str, key: str, api_pid: int) -> dict[str, object]:
    interval_ns = int(1e9 / args.rate)
    arrival: list[int] = []
    read: list[int] = []
    awake_arrival: list[int] = []
    first = [1 << 62] * args.ticks  # per quote: the first client's arrival, the last client's
    last = [0] * args.ticks
    shared = 0
    if args.client == "websockets":

        async def run() -> tuple[float, float, float]:
            readers = await websockets_subscribers(port, key, args.subscribers, args.ticks, read)
            await asyncio.sleep(0.5)
            cpu, api_cpu, busy = time.process_time(), process_tree_cpu(api_pid), machine_busy()
            start_ns = time_ns() + 100_000_000
            await asyncio.to_thread(publish, redis_url, args.ticks, start_ns, interval_ns)
            await asyncio.wait_for(asyncio.gather(*readers), 60)
            return time.process_time() - cpu, process_tree_cpu(api_pid) - api_cpu, machine_busy() - busy

        generator_cpu, api_cpu, machine_cpu = asyncio.run(run())
        awake = args.subscribers
    else:
        awake = min(args.awake, args.subscribers)
        context = multiprocessing.get_context("spawn")
        shares = [
            args.subscribers // args.client_procs + (i < args.subscribers % args.client_procs)
            for i in range(args.client_procs)
        ]
        awake_shares = [awake // args.client_procs + (i < awake % args.client_procs) for i in range(args.client_procs)]
        workers = []
        for share, awake_share in zip(shares, awake_shares, strict=True):
            parent, child = context.Pipe()
            process = context.Process(
                target=generator_process,
                args=(port, key, share, awake_share, args.ticks, client_cpus(args.client_cpus), child),
                daemon=True,
            )
            process.start()
            workers.append((process, parent))
        for _, parent in workers:
            if receive_from(parent, 300, "connect its clients") != "ready":
                raise RuntimeError("a generator process failed to connect its clients")
        start_ns = time_ns() + 500_000_000
        for _, parent in workers:
            parent.send((start_ns, interval_ns))
        time.sleep(0.25)
        api_cpu_start, cpu, busy = process_tree_cpu(api_pid), time.process_time(), machine_busy()
        publish(redis_url, args.ticks, start_ns, interval_ns)
        generator_cpu = time.process_time() - cpu
        for _, parent in workers:
            generator_cpu += float(receive_from(parent, 60, "receive every quote"))  # type: ignore[arg-type]
        api_cpu = process_tree_cpu(api_pid) - api_cpu_start
        machine_cpu = machine_busy() - busy
        for process, parent in workers:  # each decodes what it received once the window has closed
            found: dict[str, list[int]] = receive_from(parent, 60, "report its delays")  # type: ignore[assignment]
            arrival.extend(found["arrival"])
            read.extend(found["read"])
            awake_arrival.extend(found["awake_arrival"])
            first = [min(a, b) for a, b in zip(first, found["first"], strict=True)]
            last = [max(a, b) for a, b in zip(last, found["last"], strict=True)]
            shared += int(found["shared"])  # type: ignore[call-overload]
            process.join(10)

    def quantiles(values: list[int]) -> dict[str, float | None]:
        values = sorted(values)

        def q(p: float) -> float | None:
            return round(values[int(p * (len(values) - 1))] / 1e6, 3) if values else None

        return {"p50_ms": q(0.5), "p99_ms": q(0.99), "max_ms": q(1.0)}

    return {
        "benchmark": "ws_fanout",
        "client": args.client,
        "client_procs": 1 if args.client == "websockets" else args.client_procs,
        "client_cpus": args.client_cpus,
        "api_workers": args.api_workers,
        "subscribers": args.subscribers,
        "awake": awake,
        "ticks": args.ticks,
        "rate": args.rate,
        "messages": max(len(arrival), len(read)),
        # publish -> read by an awake client's process (every client with --client websockets)
        "read": quantiles(read),
        # publish -> the frame in the socket of every client (kernel receive timestamp); lean clients only
        "arrival": quantiles(arrival),
        "awake_arrival": quantiles(awake_arrival),  # the same for the awake sample: is it representative?
        # where a quote's time goes: until the first client has it (Redis, the API's reader: the hops), until
        # the last one has it (that plus the whole fan-out), and the difference, quote by quote
        "first_arrival": quantiles(first if args.client == "lean" else []),
        "last_arrival": quantiles(last if args.client == "lean" else []),
        "fan_out_spread": quantiles([b - a for a, b in zip(first, last, strict=True)] if args.client == "lean" else []),
        "shared_timestamps": shared,
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
        "--awake",
        type=int,
        default=50,
        help="lean clients, spread evenly over the connections, that read every frame as it arrives; the others "
        "are drained once per tick, between quotes (--awake N makes every client wake for every frame)",
    )
    parser.add_argument(
        "--client",
        choices=("lean", "websockets"),
        default="lean",
        help="lean: plain sockets and a minimal frame parser, split over --client-procs processes; "
        "websockets: the websockets library's client, every subscriber in this one process",
    )
    parser.add_argument("--client-procs", type=int, default=2, help="generator processes for --client lean")
    parser.add_argument(
        "--client-cpus",
        default="all",
        help="CPUs the lean clients' processes run on: all, last (the last CPU) or a list such as 1 or 0,1",
    )
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
        read, arrival = result["read"], result["arrival"]
        assert isinstance(read, dict) and isinstance(arrival, dict)
        print(
            f"{args.subscribers} subscribers ({args.client} client), {result['messages']} quotes delivered, "
            "each client every quote in order"
        )
        if args.client == "lean":
            print(
                f"  publish -> in the client's socket, all {args.subscribers}: p50 {arrival['p50_ms']} ms, "
                f"p99 {arrival['p99_ms']} ms, max {arrival['max_ms']} ms"
            )
            spans = [result[name] for name in ("first_arrival", "last_arrival", "fan_out_spread")]
            assert all(isinstance(span, dict) for span in spans)
            print(
                "  per quote (p50 / p99): first client {} / {} ms, last client {} / {} ms, "
                "last minus first {} / {} ms".format(*(span[q] for span in spans for q in ("p50_ms", "p99_ms")))  # type: ignore[index]
            )
        if result["awake"]:
            print(
                f"  publish -> read by the client, {result['awake']} awake: p50 {read['p50_ms']} ms, "
                f"p99 {read['p99_ms']} ms, max {read['max_ms']} ms"
            )
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
