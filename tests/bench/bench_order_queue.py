"""Orders placed through seed 000's RabbitMQ queue `order_placement`: messages per second, answered.

Run: ``.venv/bin/python tests/bench/bench_order_queue.py [--messages 3000] [--accounts 8] [--prefetch 256]``

RabbitMQ cannot be embedded, so this uses the servers of the test suite: TRADEPLANE_TEST_AMQP_URL,
TRADEPLANE_TEST_DATABASE_URL (a scratch database is created and dropped) and TRADEPLANE_TEST_REDIS_URL;
without them it says so and exits 0. It runs `OrderQueueWorker` in this process, publishes --messages
placements with `reply_to` at once, spread over --accounts funded accounts, and times them until every reply
(201) is in. ``--prefetch 1`` gives the one-message-per-transaction consumer for comparison. A benchmark, not
a test: it prints figures and asserts nothing about time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import uuid
from typing import Any

import aio_pika
import asyncpg
import orjson
import uvloop
from bench_orders_e2e import SECRET, create_participants  # type: ignore[import-not-found]

from tradeplane.adapters.bus import create_bus
from tradeplane.adapters.db.migrate import upgrade
from tradeplane.bootstrap import build_platform
from tradeplane.config import Settings
from tradeplane.entrypoints.workers.order_queues import OrderQueueWorker


async def traders(database_url: str, count: int) -> list[tuple[str, int]]:
    """`count` funded trading accounts without a practical order-rate limit: (API key, account id); the end to
    end benchmark's maker/taker pairs."""
    pairs = await create_participants(database_url, (count + 1) // 2)
    people = [pair[role] for pair in pairs for role in ("bench-maker", "bench-taker")][:count]
    return [(who["key"], who["account_id"]) for who in people]


async def run(args: argparse.Namespace, server_url: str, redis_url: str, amqp_url: str) -> dict[str, Any]:
    name = f"tpqbench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(server_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    database_url = server_url.rsplit("/", 1)[0] + "/" + name
    try:
        await asyncio.to_thread(upgrade, database_url)
        who = await traders(database_url, args.accounts)
        settings = Settings(database_url=database_url, redis_url=redis_url, bus_url=amqp_url, secret_key=SECRET)
        platform = build_platform(settings)
        platform.bus = create_bus(amqp_url, namespace=name)
        await platform.start()
        await platform.bus.setup(1)
        worker = OrderQueueWorker(platform, placement_prefetch=args.prefetch)
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        connection = await aio_pika.connect_robust(amqp_url)
        try:
            await worker.ready.wait()
            channel = await connection.channel()
            replies = await channel.declare_queue(exclusive=True)
            exchange = await channel.get_exchange(platform.bus.name("trading"))
            waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}

            async def on_reply(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                async with message.process():
                    waiting.pop(message.correlation_id or "").set_result(orjson.loads(message.body))

            await replies.consume(on_reply)

            async def place(index: int) -> dict[str, Any]:
                key, account_id = who[index % len(who)]
                body = {
                    "api_key": key,
                    "account_id": account_id,
                    "symbol": "BTC-USD",
                    "side": "buy",
                    "type": "limit",
                    "quantity": "0.01",
                    "price": "60000.00",
                }
                correlation_id = uuid.uuid4().hex
                waiting[correlation_id] = asyncio.get_running_loop().create_future()
                reply = waiting[correlation_id]
                message = aio_pika.Message(orjson.dumps(body), correlation_id=correlation_id, reply_to=replies.name)
                await exchange.publish(message, "order.place")
                return await reply

            await place(0)  # connections and prepared statements warm
            before = worker.placements.placements
            started = time.perf_counter()
            answers = await asyncio.gather(*(place(i) for i in range(args.messages)))
            elapsed = time.perf_counter() - started
        finally:
            stop.set()
            await running
            await connection.close()
            await platform.bus.destroy(1)
            await platform.stop()
        statuses = {a["status"] for a in answers}
        if statuses != {201}:
            raise SystemExit(f"expected every placement accepted (201), got statuses {sorted(statuses)}")
        result = {
            "benchmark": "order_queue",
            "messages": args.messages,
            "accounts": args.accounts,
            "prefetch": args.prefetch,
            "seconds": round(elapsed, 3),
            "placed_per_s": round(args.messages / elapsed),
            "transactions": worker.placements.placements - before,
        }
        print(
            f"order_placement: {args.messages} messages placed and answered in {elapsed:.2f} s"
            f" ({result['placed_per_s']}/s) in {result['transactions']} transactions (prefetch {args.prefetch})"
        )
        return result
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--accounts", type=int, default=8)
    parser.add_argument("--prefetch", type=int, default=256, help="placement messages in flight (1: one at a time)")
    args = parser.parse_args()
    urls = [os.environ.get(f"TRADEPLANE_TEST_{kind}_URL") for kind in ("DATABASE", "REDIS", "AMQP")]
    if not all(urls):
        print(
            "bench_order_queue: skipped, it needs RabbitMQ, PostgreSQL and Redis servers: set"
            " TRADEPLANE_TEST_AMQP_URL, TRADEPLANE_TEST_DATABASE_URL and TRADEPLANE_TEST_REDIS_URL"
        )
        return
    server_url, redis_url, amqp_url = (url for url in urls if url)
    print(json.dumps(uvloop.run(run(args, server_url, redis_url, amqp_url))))


if __name__ == "__main__":
    main()
