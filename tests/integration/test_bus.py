"""The message bus against real servers: NATS JetStream (external and embedded) and RabbitMQ.

Every test works in its own namespace (a prefix on every stream, exchange and queue) and deletes it after.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import aio_pika.exceptions
import pytest

from tradeplane.adapters.bus import (
    DUPLICATE_WINDOW_S,
    MD_TICKS_ALL,
    SEED_EXCHANGES,
    SEED_QUEUES,
    Delivery,
    MessageBus,
    Subscription,
    create_bus,
    md_ticks_stream,
    order_stream,
    rabbitmq_topology,
)
from tradeplane.adapters.bus.nats import NatsBus
from tradeplane.errors import InfrastructureUnavailable

SHARDS = 2


@pytest.fixture(params=["nats", "amqp", "embedded_nats"])
def bus_url(request: pytest.FixtureRequest) -> str:
    """The conftest's bus_url (external NATS and RabbitMQ) plus the embedded, pip-packaged NATS server."""
    return str(request.getfixturevalue(f"{request.param}_url"))


def new_namespace() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def namespace() -> str:
    return new_namespace()


@pytest.fixture
async def bus(bus_url: str, namespace: str) -> AsyncIterator[MessageBus]:
    bus = create_bus(bus_url, namespace=namespace)
    await bus.connect()
    await bus.setup(SHARDS)
    yield bus
    if not await _usable(bus):
        await bus.close()
        await bus.connect()
    await bus.destroy(SHARDS)
    await bus.close()


async def _usable(bus: MessageBus) -> bool:
    try:
        await bus.ping()
    except InfrastructureUnavailable:
        return False
    return True


async def fetch_exactly(sub: Subscription, count: int, batch: int = 10, ack: bool = False) -> list[Delivery]:
    """Fetch until `count` deliveries arrived; a bounded number of empty polls means they never came.

    With `ack`, each batch is acked before the next fetch, as an engine does (RabbitMQ sends no more than
    one batch of unacked messages)."""
    got: list[Delivery] = []
    empty_polls = 0
    while len(got) < count:
        fetched = await sub.fetch(min(batch, count - len(got)), timeout=2.0)
        if not fetched:
            empty_polls += 1
            assert empty_polls < 10, f"only {len(got)} of {count} messages arrived"
        got.extend(fetched)
        if ack:
            for delivery in fetched:
                await delivery.ack()
    return got


async def publish_orders(bus: MessageBus, stream: str, count: int, tag: str = "o") -> list[str]:
    ids = [f"{tag}-{stream}-{i}" for i in range(count)]
    for msg_id in ids:
        await bus.publish(stream, msg_id.encode(), msg_id)
    return ids


async def test_messages_arrive_in_publish_order_with_rising_sequences(bus: MessageBus) -> None:
    shard0, shard1 = order_stream(0), order_stream(1)
    sent0: list[str] = []
    sent1: list[str] = []
    for i in range(20):
        sent0 += await publish_orders(bus, shard0, 1, tag=f"a{i}")
        if i % 4 == 0:
            sent1 += await publish_orders(bus, shard1, 1, tag=f"b{i}")

    async with await bus.subscribe(shard0, "engine") as sub0:
        got0 = await fetch_exactly(sub0, 20, batch=7, ack=True)
        assert await sub0.fetch(10, timeout=0.5) == []
    async with await bus.subscribe(shard1, "engine") as sub1:
        got1 = await fetch_exactly(sub1, 5)
        for delivery in got1:
            await delivery.ack()

    assert [d.msg_id for d in got0] == sent0
    assert [d.data for d in got0] == [m.encode() for m in sent0]
    assert [d.msg_id for d in got1] == sent1, "a shard's consumer sees only its own shard"
    for got in (got0, got1):
        sequences = [d.sequence for d in got]
        assert all(s > 0 for s in sequences)
        assert sequences == sorted(set(sequences)), "sequences rise strictly with publish order"
        assert not any(d.redelivered for d in got)


async def test_acked_messages_are_not_redelivered_after_reconnect(bus: MessageBus, bus_url: str) -> None:
    stream = order_stream(0)
    await publish_orders(bus, stream, 3, tag="first")
    async with await bus.subscribe(stream, "engine") as sub:
        for delivery in await fetch_exactly(sub, 3):
            await delivery.ack()

    async with create_bus(bus_url, namespace=bus.namespace) as again:
        later = await publish_orders(again, stream, 1, tag="later")
        async with await again.subscribe(stream, "engine") as sub:
            got = await fetch_exactly(sub, 1)
            await got[0].ack()
            assert await sub.fetch(10, timeout=0.5) == []
    assert [d.msg_id for d in got] == later


async def test_unacked_messages_come_back_flagged_after_resubscribe(bus: MessageBus) -> None:
    stream = order_stream(0)
    sent = await publish_orders(bus, stream, 3)
    sub = await bus.subscribe(stream, "engine")
    first = await fetch_exactly(sub, 3)
    await first[0].ack()
    await sub.close()

    async with await bus.subscribe(stream, "engine") as sub:
        again = await fetch_exactly(sub, 2)
        for delivery in again:
            await delivery.ack()
    assert [d.msg_id for d in again] == sent[1:]
    assert [d.sequence for d in again] == [d.sequence for d in first[1:]], "a redelivery keeps its sequence"
    assert all(d.redelivered for d in again)


async def test_unacked_messages_of_a_dead_consumer_come_back(bus_url: str, namespace: str) -> None:
    """A consumer process that dies without closing anything does not lose its messages."""
    options: dict[str, Any] = {"ack_wait": 1.0} if bus_url.startswith("nats") else {}
    async with create_bus(bus_url, namespace=namespace, **options) as bus:
        await bus.setup(SHARDS)
        try:
            stream = order_stream(1)
            sent = await publish_orders(bus, stream, 2)
            async with create_bus(bus_url, namespace=namespace, **options) as doomed:
                sub = await doomed.subscribe(stream, "engine")
                assert len(await fetch_exactly(sub, 2)) == 2
            # `doomed` is closed with its subscription still open and nothing acked.
            async with await bus.subscribe(stream, "engine") as sub:
                again = await fetch_exactly(sub, 2)
                for delivery in again:
                    await delivery.ack()
            assert [d.msg_id for d in again] == sent
            assert all(d.redelivered for d in again)
        finally:
            await bus.destroy(SHARDS)


async def test_nak_redelivers_the_message(bus: MessageBus) -> None:
    stream = order_stream(0)
    sent = await publish_orders(bus, stream, 2)
    async with await bus.subscribe(stream, "engine") as sub:
        (first,) = await fetch_exactly(sub, 1, batch=1)
        assert first.msg_id == sent[0] and not first.redelivered
        await first.nak()

        (again,) = await fetch_exactly(sub, 1, batch=1)
        assert (again.msg_id, again.sequence, again.redelivered) == (sent[0], first.sequence, True)

        await again.nak(delay=0.2)
        seen: list[Delivery] = []
        while not any(d.msg_id == sent[0] for d in seen):
            (delivery,) = await fetch_exactly(sub, 1, batch=1)
            seen.append(delivery)
            if delivery.msg_id != sent[0]:
                await delivery.ack()
        comeback = next(d for d in seen if d.msg_id == sent[0])
        assert comeback.redelivered and comeback.sequence == first.sequence
        await comeback.ack()


async def test_start_after_resumes_in_order_right_after_the_callers_offset(bus_url: str, namespace: str) -> None:
    """A consumer died holding #1-#5 unacked after committing #1-#3 (acking only #1 and #2); #6 came meanwhile.
    Resubscribing at offset #3 hands out #4, #5, #6 in that order at once. (Without it JetStream keeps #4 and
    #5 for ack_wait, 30 s here, and hands #6 out first: a cancel could overtake its order.)"""
    async with create_bus(bus_url, namespace=namespace) as bus:
        await bus.setup(SHARDS)
        try:
            stream = order_stream(0)
            sent = await publish_orders(bus, stream, 5)
            async with create_bus(bus_url, namespace=namespace) as doomed:
                held = await fetch_exactly(await doomed.subscribe(stream, "engine"), 5)
                for delivery in held[:2]:
                    await delivery.ack()
            # `doomed` is gone with its subscription open and #3-#5 unacked.
            offset = held[2].sequence
            later = await publish_orders(bus, stream, 1, tag="later")

            got: list[Delivery] = []
            async with await bus.subscribe(stream, "engine", start_after=offset) as sub:
                while sum(d.sequence > offset for d in got) < 3:
                    got += await fetch_exactly(sub, 1, ack=True)
                assert await sub.fetch(10, timeout=0.5) == []
            assert [d.msg_id for d in got if d.sequence > offset] == sent[3:] + later
            stale = [(d.msg_id, d.redelivered) for d in got if d.sequence <= offset]
            if bus.kind == "nats":
                assert stale == [], "the consumer restarts after the offset"
            else:
                assert stale == [(sent[2], True)], "RabbitMQ cannot reposition: the caller skips #3 by sequence"
        finally:
            await bus.destroy(SHARDS)


async def test_start_after_replays_acked_messages_on_jetstream_only(bus: MessageBus) -> None:
    """The caller's database went back to a backup that had applied only #2 of four acked messages.
    JetStream keeps messages and replays #3 and #4; a RabbitMQ queue forgot them when they were acked."""
    stream = order_stream(1)
    sent = await publish_orders(bus, stream, 4)
    async with await bus.subscribe(stream, "engine") as sub:
        acked = await fetch_exactly(sub, 4, ack=True)
    with pytest.raises(ValueError):
        await bus.subscribe(stream, "engine", start_after=-1)
    async with await bus.subscribe(stream, "engine", start_after=acked[1].sequence) as sub:
        if bus.kind == "nats":
            replayed = await fetch_exactly(sub, 2, ack=True)
            assert [(d.msg_id, d.sequence) for d in replayed] == [(d.msg_id, d.sequence) for d in acked[2:]]
            assert [d.msg_id for d in replayed] == sent[2:]
        assert await sub.fetch(10, timeout=0.5) == []


async def test_republished_msg_id(bus: MessageBus) -> None:
    """JetStream drops a re-publish inside its window; RabbitMQ delivers it again with the same msg_id, for
    the consumer to drop (documented in base.py)."""
    stream = order_stream(0)
    await bus.publish(stream, b"fill me", "outbox-41")
    await bus.publish(stream, b"fill me", "outbox-41")
    await bus.publish(stream, b"next", "outbox-42")
    async with await bus.subscribe(stream, "engine") as sub:
        expected = 2 if bus.kind == "nats" else 3
        got = await fetch_exactly(sub, expected)
        for delivery in got:
            await delivery.ack()
        assert await sub.fetch(10, timeout=0.5) == []
    if bus.kind == "nats":
        assert [d.msg_id for d in got] == ["outbox-41", "outbox-42"]
    else:
        assert [d.msg_id for d in got] == ["outbox-41", "outbox-41", "outbox-42"]
        assert got[0].sequence < got[1].sequence < got[2].sequence


async def test_setup_is_idempotent(bus: MessageBus) -> None:
    stream = order_stream(1)
    sent = await publish_orders(bus, stream, 2)
    await bus.setup(SHARDS)
    await bus.setup(SHARDS)
    assert await bus.queue_length(stream) == 2, "setting up again keeps the messages already there"
    async with await bus.subscribe(stream, "engine") as sub:
        got = await fetch_exactly(sub, 2)
        for delivery in got:
            await delivery.ack()
    assert [d.msg_id for d in got] == sent


async def test_queue_length_counts_unconsumed_messages(bus: MessageBus) -> None:
    stream = order_stream(0)
    assert await bus.queue_length(stream) == 0
    await publish_orders(bus, stream, 4)
    assert await bus.queue_length(stream) == 4
    assert await bus.queue_length(order_stream(1)) == 0
    async with await bus.subscribe(stream, "engine") as sub:
        assert await bus.queue_length(stream) == 4, "subscribing alone consumes nothing"
        for delivery in await fetch_exactly(sub, 4, batch=4):
            await delivery.ack()
        assert await bus.queue_length(stream) == 0


async def test_market_data_ticks_reach_a_wildcard_subscriber(bus: MessageBus) -> None:
    await bus.publish(md_ticks_stream("AAPL"), b"aapl 187.12", "t1")
    await bus.publish(md_ticks_stream("EURUSD"), b"eurusd 1.0841", "t2")
    async with await bus.subscribe(MD_TICKS_ALL, "marketdata") as sub:
        got = await fetch_exactly(sub, 2)
        for delivery in got:
            await delivery.ack()
    assert [d.data for d in got] == [b"aapl 187.12", b"eurusd 1.0841"]
    with pytest.raises(ValueError):
        await bus.publish(MD_TICKS_ALL, b"x", "t3")
    with pytest.raises(ValueError):
        await bus.publish("no.such.stream", b"x", "t4")


async def test_ping_and_roundtrip_test(bus: MessageBus) -> None:
    assert await bus.ping() >= 0.0
    await bus.roundtrip_test()
    await bus.roundtrip_test()
    await bus.close()
    with pytest.raises(InfrastructureUnavailable):
        await bus.ping()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("scheme", ["nats", "amqp"])
async def test_connect_to_a_closed_port_raises_unavailable(scheme: str) -> None:
    port = _closed_port()
    bus = create_bus(f"{scheme}://trader:s3cret-pw@127.0.0.1:{port}/", connect_timeout=3.0)
    with pytest.raises(InfrastructureUnavailable) as raised:
        await bus.connect()
    assert f"127.0.0.1:{port}" in raised.value.detail
    assert "s3cret-pw" not in raised.value.detail
    assert raised.value.status_code == 503


# --- RabbitMQ topology (seed 000) ---------------------------------------------------------------------------


@pytest.fixture
async def amqp_bus(amqp_url: str) -> AsyncIterator[MessageBus]:
    bus = create_bus(amqp_url, namespace=new_namespace())
    await bus.connect()
    await bus.setup(SHARDS)
    yield bus
    await bus.destroy(SHARDS)
    await bus.close()


async def _refused(connection: aio_pika.abc.AbstractConnection, declare: str, **kwargs: Any) -> bool:
    """True when the broker refuses a declaration as inequivalent to what exists (406)."""
    channel = await connection.channel()
    try:
        if declare == "exchange":
            await channel.declare_exchange(**kwargs)
        else:
            await channel.declare_queue(**kwargs)
    except aio_pika.exceptions.ChannelPreconditionFailed:
        return True
    await channel.close()
    return False


async def test_rabbitmq_topology_is_seed_000(amqp_bus: MessageBus, amqp_url: str) -> None:
    ns = amqp_bus.namespace
    assert {(e.name, e.type, e.durable) for e in SEED_EXCHANGES} == {
        ("trading", "direct", True),
        ("market_data", "topic", True),
    }
    assert {(q.name, q.exchange, q.routing_key, q.durable, q.auto_delete) for q in SEED_QUEUES} == {
        ("order_placement", "trading", "order.place", True, False),
        ("order_modification", "trading", "order.modify", True, False),
        ("order_cancellation", "trading", "order.cancel", True, False),
        ("position_updates", "trading", "position.update", True, False),
        ("market_data", "market_data", "market.#", False, False),
    }
    exchanges, queues = rabbitmq_topology(SHARDS)
    connection = await aio_pika.connect(amqp_url)
    try:
        for ex in exchanges:
            name = f"{ns}.{ex.name}"
            # The same declaration is accepted; one differing in durability or type is refused: so the
            # exchange exists with exactly this type and durability.
            assert not await _refused(connection, "exchange", name=name, type=ex.type, durable=ex.durable)
            assert await _refused(connection, "exchange", name=name, type=ex.type, durable=not ex.durable)
            other_type = "fanout"
            assert await _refused(connection, "exchange", name=name, type=other_type, durable=ex.durable)
        for q in queues:
            name = f"{ns}.{q.name}"
            same = {
                "name": name,
                "durable": q.durable,
                "auto_delete": q.auto_delete,
                "arguments": q.arguments,
            }
            assert not await _refused(connection, "queue", **same)
            assert await _refused(connection, "queue", **{**same, "durable": not q.durable})
            if q.arguments:
                assert await _refused(connection, "queue", **{**same, "arguments": None})

        # Bindings: a message published with the binding's key reaches exactly that queue.
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        probes = [(q, q.routing_key.replace("#", "quote.AAPL")) for q in queues]
        for q, key in probes:
            exchange = await channel.get_exchange(f"{ns}.{q.exchange}")
            await exchange.publish(aio_pika.Message(f"to {q.name}".encode()), key)
        for q, _ in probes:
            queue = await channel.get_queue(f"{ns}.{q.name}")
            message = await queue.get(no_ack=True, fail=False)
            assert message is not None and message.body == f"to {q.name}".encode()
            assert await queue.get(no_ack=True, fail=False) is None
        await channel.close()
    finally:
        await connection.close()


async def test_rabbitmq_seed_queue_streams(amqp_bus: MessageBus) -> None:
    """The seed's order-entry queues are reachable as streams on RabbitMQ, routed through `trading`."""
    await amqp_bus.publish("order_cancellation", b'{"order_id": "o-1"}', "cancel-1")
    assert await amqp_bus.queue_length("order_cancellation") == 1
    assert await amqp_bus.queue_length("order_placement") == 0
    async with await amqp_bus.subscribe("order_cancellation", "gateway") as sub:
        (delivery,) = await fetch_exactly(sub, 1)
        await delivery.ack()
    assert (delivery.msg_id, delivery.data) == ("cancel-1", b'{"order_id": "o-1"}')


async def test_rabbitmq_shard_queue_has_a_single_active_consumer(amqp_bus: MessageBus) -> None:
    """A second engine on the same shard is a standby: it receives nothing while the first is attached."""
    stream = order_stream(0)
    sent = await publish_orders(amqp_bus, stream, 4)
    active = await amqp_bus.subscribe(stream, "engine")
    standby = await amqp_bus.subscribe(stream, "engine")
    got = await fetch_exactly(active, 2, batch=2)
    assert await standby.fetch(4, timeout=1.0) == []
    for delivery in got:
        await delivery.ack()
    await active.close()
    rest = await fetch_exactly(standby, 2, batch=2)
    for delivery in rest:
        await delivery.ack()
    await standby.close()
    assert [d.msg_id for d in got + rest] == sent


async def test_rabbitmq_refuses_a_message_no_queue_takes(amqp_bus: MessageBus) -> None:
    """Publishing to a shard that setup did not create raises, so the relay never marks it sent."""
    with pytest.raises(InfrastructureUnavailable, match="run setup"):
        await amqp_bus.publish(order_stream(SHARDS + 3), b"lost?", "o-9")


async def test_nats_setup_applies_changed_stream_settings(nats_url: str, namespace: str) -> None:
    async with create_bus(nats_url, namespace=namespace) as bus:
        await bus.setup(SHARDS)
        try:
            sent = await publish_orders(bus, order_stream(0), 2)
            async with create_bus(nats_url, namespace=namespace, orders_max_age=3600.0) as changed:
                assert isinstance(changed, NatsBus)
                await changed.setup(SHARDS)
                info = await changed.js.stream_info(changed.orders_stream_name)
                assert info.config.max_age == 3600.0
                assert info.config.duplicate_window == DUPLICATE_WINDOW_S
                assert await changed.queue_length(order_stream(0)) == len(sent)
        finally:
            await bus.destroy(SHARDS)
