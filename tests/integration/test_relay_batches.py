"""The outbox relay publishes its batches with `publish_many`, on NATS JetStream and RabbitMQ: a backlog reaches
every shard stream complete and in outbox order, and a batch that fails is left unpublished as a whole and is
published in order by a later attempt."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator

import pytest

from tradeplane.adapters.bus import Delivery, MessageBus, create_bus, order_stream
from tradeplane.adapters.bus.nats import NatsBus
from tradeplane.adapters.postgres import Database
from tradeplane.errors import InfrastructureUnavailable
from tradeplane.services.relay import OutboxRelay, outbox_message_id

SHARDS = 4


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    db = Database(database_url, min_size=1, max_size=2)
    await db.connect()
    yield db
    await db.close()


@pytest.fixture
async def bare_bus(bus_url: str) -> AsyncIterator[MessageBus]:
    """Connected, in a namespace of its own, with no streams or queues yet."""
    bus = create_bus(bus_url, namespace=f"t{uuid.uuid4().hex[:10]}")
    await bus.connect()
    yield bus
    await bus.destroy(SHARDS + 6)
    await bus.close()


async def insert_orders(db: Database, count: int, *, big_at: int | None = None) -> dict[str, list[int]]:
    """`count` outbox rows over the shard streams, interleaved irregularly; row `big_at` (0-based) carries a 4 KiB
    payload. Returns each stream's outbox ids in id order."""
    async with db.transaction("test.outbox") as conn:
        rows = await conn.fetch(
            "INSERT INTO outbox (stream, key, payload)"
            " SELECT 'orders.' || ((n / 3 + n * n) % $2), 'BTC-USD',"
            "        jsonb_build_object('n', n, 'pad', CASE WHEN n = $3 THEN repeat('x', 4096) ELSE '' END)"
            " FROM generate_series(0, $1 - 1) AS n ORDER BY n RETURNING id, stream",
            count,
            SHARDS,
            -1 if big_at is None else big_at,
        )
    by_stream: dict[str, list[int]] = {order_stream(k): [] for k in range(SHARDS)}
    for row in rows:
        by_stream[row["stream"]].append(row["id"])
    return by_stream


async def unpublished(db: Database) -> int:
    async with db.connection("test") as conn:
        return int(await conn.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL"))


async def consume_all(bus: MessageBus, stream: str) -> list[Delivery]:
    got: list[Delivery] = []
    async with await bus.subscribe(stream, "engine") as sub:
        while fetched := await sub.fetch(200, timeout=1.0):
            for delivery in fetched:
                await delivery.ack()
            got += fetched
    return got


def first_copies(deliveries: list[Delivery]) -> list[str]:
    """The msg_ids in delivery order with repeats dropped, as a consumer that remembers msg_ids applies them."""
    seen: set[str] = set()
    return [d.msg_id for d in deliveries if not (d.msg_id in seen or seen.add(d.msg_id))]


async def test_a_backlog_reaches_every_stream_complete_and_in_outbox_order(db: Database, bare_bus: MessageBus) -> None:
    await bare_bus.setup(SHARDS)
    expected = await insert_orders(db, 1200)
    relay = OutboxRelay(db, bare_bus, batch_size=500)
    assert [await relay.publish_pending() for _ in range(4)] == [500, 500, 200, 0]
    assert await unpublished(db) == 0

    for stream, ids in expected.items():
        got = await consume_all(bare_bus, stream)
        assert [d.msg_id for d in got] == [outbox_message_id(i) for i in ids], f"{stream} out of outbox order"
        numbers = [json.loads(d.data)["n"] for d in got]
        assert numbers == sorted(numbers)


async def test_a_batch_on_a_bus_without_setup_stays_unpublished(db: Database, bare_bus: MessageBus) -> None:
    expected = await insert_orders(db, 300)
    relay = OutboxRelay(db, bare_bus, batch_size=500)
    with pytest.raises(InfrastructureUnavailable, match="run setup"):
        await relay.publish_pending()
    assert await unpublished(db) == 300

    await bare_bus.setup(SHARDS)
    assert await relay.publish_pending() == 300
    for stream, ids in expected.items():
        assert [d.msg_id for d in await consume_all(bare_bus, stream)] == [outbox_message_id(i) for i in ids]


async def test_a_batch_that_fails_midway_is_published_again_in_order(db: Database, bare_bus: MessageBus) -> None:
    """Row #150 of a 400-row batch cannot be published: on RabbitMQ its shard has no queue yet, on JetStream it is
    larger than the stream allows. The relay marks none of the batch; once the cause is gone, the next attempt
    publishes it, and each stream's consumer sees its rows in outbox order, without repeats on JetStream (which
    drops the copies of rows the first attempt stored) and with repeats to drop by msg_id on RabbitMQ."""
    await bare_bus.setup(SHARDS)
    relay = OutboxRelay(db, bare_bus, batch_size=500)
    if isinstance(bare_bus, NatsBus):
        expected = await insert_orders(db, 400, big_at=150)
        info = await bare_bus.js.stream_info(bare_bus.orders_stream_name)
        info.config.max_msg_size = 1024
        await bare_bus.js.update_stream(info.config)
    else:
        expected = await insert_orders(db, 400)
        async with db.transaction("test.move") as conn:
            moved = await conn.fetchval(
                "UPDATE outbox SET stream = $1 WHERE id = (SELECT id FROM outbox ORDER BY id OFFSET 150 LIMIT 1)"
                " RETURNING id",
                order_stream(SHARDS + 5),
            )
        expected = {stream: [i for i in ids if i != moved] for stream, ids in expected.items()}
        expected[order_stream(SHARDS + 5)] = [moved]

    with pytest.raises(InfrastructureUnavailable):
        await relay.publish_pending()
    assert await unpublished(db) == 400, "a failed batch is unpublished as a whole"

    if isinstance(bare_bus, NatsBus):
        info.config.max_msg_size = -1
        await bare_bus.js.update_stream(info.config)
    else:
        await bare_bus.setup(SHARDS + 6)
    assert await relay.publish_pending() == 400
    assert await unpublished(db) == 0

    for stream, ids in expected.items():
        got = await consume_all(bare_bus, stream)
        assert first_copies(got) == [outbox_message_id(i) for i in ids], f"{stream} out of outbox order"
        if bare_bus.kind == "nats":
            assert len(got) == len(ids), "JetStream dropped the copies of the rows stored the first time"
        sequences = [d.sequence for d in got]
        assert sequences == sorted(set(sequences))
