"""The outbox relay: committed rows reach the bus in order, once, and survive a bus outage."""

from __future__ import annotations

import asyncio
import json
import uuid

from tradeplane.adapters.bus import create_bus
from tradeplane.adapters.cache import Cache
from tradeplane.adapters.postgres import Database
from tradeplane.errors import InfrastructureUnavailable
from tradeplane.services.queries import after_order_commit
from tradeplane.services.relay import OutboxRelay, outbox_message_id, relay_wakeups


async def insert_outbox(db: Database, stream: str, count: int) -> list[int]:
    async with db.transaction("test.outbox") as conn:
        rows = await conn.fetch(
            "INSERT INTO outbox (stream, key, payload)"
            " SELECT $1, 'BTC-USD', jsonb_build_object('n', n) FROM generate_series(1, $2) AS n RETURNING id",
            stream,
            count,
        )
    return [r["id"] for r in rows]


async def test_relay_publishes_in_order_and_marks_rows(database_url: str, bus_url: str) -> None:
    namespace = f"t{uuid.uuid4().hex[:8]}"
    bus = create_bus(bus_url, namespace=namespace)
    db = Database(database_url, min_size=1, max_size=2)
    await db.connect()
    await bus.connect()
    try:
        await bus.setup(1)
        ids = await insert_outbox(db, "orders.0", 25)
        relay = OutboxRelay(db, bus, batch_size=10)
        assert [await relay.publish_pending() for _ in range(4)] == [10, 10, 5, 0]

        subscription = await bus.subscribe("orders.0", "engine")
        received = []
        while len(received) < 25:
            batch = await subscription.fetch(25, timeout=2)
            assert batch, "relay published fewer messages than the outbox held"
            for delivery in batch:
                received.append(delivery)
                await delivery.ack()
        await subscription.close()
        assert [d.msg_id for d in received] == [outbox_message_id(i) for i in ids]
        assert [json.loads(d.data)["n"] for d in received] == list(range(1, 26))
        async with db.connection("test") as conn:
            assert await conn.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL") == 0
    finally:
        await bus.destroy(1)
        await bus.close()
        await db.close()


async def test_only_one_relay_is_active(database_url: str, nats_url: str) -> None:
    bus = create_bus(nats_url, namespace=f"t{uuid.uuid4().hex[:8]}")
    db = Database(database_url, min_size=1, max_size=3)
    await db.connect()
    await bus.connect()
    try:
        await bus.setup(1)
        await insert_outbox(db, "orders.0", 3)
        async with db.transaction("test.lock") as conn:
            await conn.execute("SELECT pg_advisory_xact_lock($1)", 0x7472_6164_6572)
            assert await OutboxRelay(db, bus).publish_pending() == 0  # stands by while another holds the lock
        assert await OutboxRelay(db, bus).publish_pending() == 3
    finally:
        await bus.destroy(1)
        await bus.close()
        await db.close()


async def test_rows_stay_queued_while_the_bus_is_down(database_url: str, nats_url: str) -> None:
    bus = create_bus(nats_url, namespace=f"t{uuid.uuid4().hex[:8]}")
    db = Database(database_url, min_size=1, max_size=2)
    await db.connect()
    await bus.connect()
    await bus.setup(1)
    await bus.destroy(1)  # the stream is gone: publishing fails like an outage would
    try:
        await insert_outbox(db, "orders.0", 2)
        relay = OutboxRelay(db, bus)
        try:
            await relay.publish_pending()
            raise AssertionError("publishing to a missing stream succeeded")
        except InfrastructureUnavailable:
            pass
        async with db.connection("test") as conn:
            assert await conn.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL") == 2
        await bus.setup(1)
        stop = asyncio.Event()
        runner = asyncio.create_task(relay.run(stop))
        for _ in range(100):
            async with db.connection("test") as conn:
                if await conn.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL") == 0:
                    break
            await asyncio.sleep(0.05)
        stop.set()
        await runner
        async with db.connection("test") as conn:
            assert await conn.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL") == 0
    finally:
        await bus.destroy(1)
        await bus.close()
        await db.close()


async def test_a_commit_announcement_wakes_an_idle_relay(database_url: str, nats_url: str, redis_url: str) -> None:
    """The relay polls only every 60 s here: the row must still be published at once, woken through Redis."""
    bus = create_bus(nats_url, namespace=f"t{uuid.uuid4().hex[:8]}")
    db = Database(database_url, min_size=1, max_size=2)
    cache = Cache(redis_url)
    await db.connect()
    await bus.connect()
    await cache.connect()
    stop = asyncio.Event()
    try:
        await bus.setup(1)
        wake = asyncio.Event()
        relay = OutboxRelay(db, bus, idle_sleep_s=60, wake=wake)
        listener = asyncio.create_task(relay_wakeups(cache, wake, stop))
        runner = asyncio.create_task(relay.run(stop))
        await asyncio.sleep(0.5)  # the relay has polled once, found nothing and sleeps; the listener subscribed
        await insert_outbox(db, "orders.0", 1)
        await after_order_commit(cache, None)
        subscription = await bus.subscribe("orders.0", "engine")
        delivered = await subscription.fetch(1, timeout=5)
        assert len(delivered) == 1, "the wake-up did not reach the relay"
        await delivered[0].ack()
        await subscription.close()
        stop.set()
        await asyncio.gather(listener, runner)
    finally:
        stop.set()
        await bus.destroy(1)
        await bus.close()
        await cache.close()
        await db.close()


async def test_stop_ends_an_idle_relay_at_once(database_url: str, nats_url: str) -> None:
    """An idle relay waits for a wake-up or its next poll (an hour here); a stop must not wait for either."""
    bus = create_bus(nats_url, namespace=f"t{uuid.uuid4().hex[:8]}")
    db = Database(database_url, min_size=1, max_size=2)
    await db.connect()
    await bus.connect()
    stop = asyncio.Event()
    try:
        await bus.setup(1)
        relay = OutboxRelay(db, bus, idle_sleep_s=3600)
        runner = asyncio.create_task(relay.run(stop))
        await insert_outbox(db, "orders.0", 1)
        relay.wake.set()
        subscription = await bus.subscribe("orders.0", "engine")
        assert len(await subscription.fetch(1, timeout=5)) == 1  # published: the relay is past its read, idle
        await subscription.close()
        stop.set()
        await asyncio.wait_for(runner, timeout=30)  # TimeoutError if the stop waited for the poll
    finally:
        stop.set()
        await bus.destroy(1)
        await bus.close()
        await db.close()
