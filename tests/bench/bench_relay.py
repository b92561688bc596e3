"""Outbox relay: committed outbox rows drained to the bus, rows per second and relay CPU per row.

Run:  .venv/bin/python tests/bench/bench_relay.py [--rows 20000] [--shards 4] [--batch 500] [--repeat 3]
          [--database-url URL] [--bus-url nats://... | amqp://...]

The servers are --database-url / --bus-url, else TRADEPLANE_TEST_DATABASE_URL / TRADEPLANE_TEST_NATS_URL, else
embedded PostgreSQL and NATS started here. A fresh database is built by the real migrations and dropped at the
end; the bus streams live in a namespace of their own, deleted at the end. Each round commits --rows order-shaped
outbox rows (the relay's real input: `new` commands as `PlaceOrder` writes them, round-robin over --shards shard
streams), then times `OutboxRelay.publish_pending` in a loop until the outbox is empty: wall time, and the CPU of
this process, which is the relay's CPU (PostgreSQL and the bus server run elsewhere and are not counted). The bus
is checked afterwards to hold every row. Prints one line per round, the best round and a one-line JSON summary.
Not a test: no assertions on the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg

from tradeplane.adapters.bus import MessageBus, create_bus, order_stream
from tradeplane.adapters.db.migrate import upgrade
from tradeplane.adapters.postgres import Database
from tradeplane.services.relay import OutboxRelay

SYMBOLS = 16

# A `new` limit order command as services/orders.py writes it, spread over the shard streams.
_FILL_OUTBOX = """
INSERT INTO outbox (stream, key, payload)
SELECT 'orders.' || (n % $2), 'SYM' || (n % $3) || '-USD',
       jsonb_build_object(
           'type', 'new', 'account_id', 1000 + n % 97, 'symbol', 'SYM' || (n % $3) || '-USD',
           'side', CASE WHEN n % 2 = 0 THEN 'buy' ELSE 'sell' END, 'order_type', 'limit',
           'qty', '0.0100', 'price', (100 + (n % 50) * 0.01)::text, 'stop_price', NULL,
           'time_in_force', 'gtc', 'expire_at', NULL, 'post_only', false, 'stp', 'cancel_newest',
           'order_id', 5000000 + n)
FROM generate_series(1, $1) AS n
"""


def with_database(url: str, name: str) -> str:
    head, _, _ = url.rpartition("/")
    return f"{head}/{name}"


async def fill(db: Database, rows: int, shards: int) -> None:
    async with db.transaction("bench.fill") as conn:
        await conn.execute(_FILL_OUTBOX, rows, shards, SYMBOLS)
    async with db.connection("bench.analyze") as conn:
        await conn.execute("VACUUM ANALYZE outbox")


async def drain(relay: OutboxRelay) -> tuple[int, float, float]:
    """(rows published, wall seconds, CPU seconds of this process) to empty the outbox."""
    published = 0
    cpu, started = time.process_time(), time.perf_counter()
    while (batch := await relay.publish_pending()) > 0:
        published += batch
    return published, time.perf_counter() - started, time.process_time() - cpu


async def bench(args: argparse.Namespace, pg_url: str, bus_url: str) -> dict[str, object]:
    name = f"tp_bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(with_database(pg_url, "postgres"))
    await admin.execute(f'CREATE DATABASE "{name}"')
    db_url = with_database(pg_url, name)
    db = Database(db_url, min_size=1, max_size=2, timeout=30)
    bus: MessageBus = create_bus(bus_url, namespace=f"bench{uuid.uuid4().hex[:8]}")
    rounds: list[tuple[float, float]] = []
    try:
        await asyncio.to_thread(upgrade, db_url)
        await db.connect()
        await bus.connect()
        await bus.setup(args.shards)
        relay = OutboxRelay(db, bus, batch_size=args.batch)
        for k in range(args.repeat):
            await fill(db, args.rows, args.shards)
            published, wall, cpu = await drain(relay)
            if published != args.rows:
                raise RuntimeError(f"round {k + 1}: the relay published {published} of {args.rows} rows")
            rounds.append((wall, cpu))
            print(
                f"round {k + 1}: {published:,} rows in {wall:.3f} s = {published / wall:,.0f} rows/s;"
                f" relay CPU {cpu:.3f} s = {cpu / published * 1e6:,.1f} us/row"
            )
        on_bus = [await bus.queue_length(order_stream(s)) for s in range(args.shards)]
        if sum(on_bus) != args.rows * args.repeat:
            raise RuntimeError(f"the bus holds {sum(on_bus)} messages, expected {args.rows * args.repeat}")
    finally:
        if bus.namespace:
            try:
                await bus.destroy(args.shards)
            finally:
                await bus.close()
        await db.close()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    wall, cpu = min(rounds)
    print(
        f"best of {args.repeat}: {args.rows / wall:,.0f} rows/s, relay CPU {cpu / args.rows * 1e6:,.1f} us/row"
        f" ({bus.kind}, batches of {args.batch}, {args.shards} shard streams; bus holds {on_bus})"
    )
    return {
        "benchmark": "relay",
        "bus": bus.kind,
        "rows": args.rows,
        "shards": args.shards,
        "batch": args.batch,
        "rows_per_s_best": round(args.rows / wall),
        "relay_cpu_us_per_row_best": round(cpu / args.rows * 1e6, 1),
        "rounds": [{"wall_s": round(w, 4), "cpu_s": round(c, 4)} for w, c in rounds],
        "python": platform.python_version(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--batch", type=int, default=500, help="the relay's batch size (its default is 500)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--database-url", default=os.environ.get("TRADEPLANE_TEST_DATABASE_URL"))
    parser.add_argument("--bus-url", default=os.environ.get("TRADEPLANE_TEST_NATS_URL"))
    args = parser.parse_args()
    stack = None
    pg_url, bus_url = args.database_url, args.bus_url
    if not pg_url or not bus_url:
        from tradeplane.adapters.embedded import EmbeddedStack

        stack = EmbeddedStack(Path(tempfile.mkdtemp(prefix="tradeplane-bench-")))
        pg_url = pg_url or str(stack.start("postgres"))
        bus_url = bus_url or str(stack.start("nats"))
    try:
        summary = asyncio.run(bench(args, pg_url, bus_url))
    finally:
        if stack is not None:
            stack.stop()
    print(json.dumps(summary))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
