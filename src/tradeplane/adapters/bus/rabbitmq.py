"""The message bus on RabbitMQ (AMQP 0-9-1, aio-pika).

Topology, declared by `setup(shards)` (names prefixed `<ns>.` when the bus has a namespace):

    exchange trading      direct, durable  -> order_placement (order.place), order_modification
                                              (order.modify), order_cancellation (order.cancel),
                                              position_updates (position.update); all durable
    exchange market_data  topic, durable   -> market_data (market.#), NOT durable, as seed 000 says
    exchange orders       direct, durable  -> orders.<k> (orders.<k>), durable classic queues with a
                                              single active consumer, k = 0 .. shards-1

Publishing uses publisher confirms, persistent messages and `mandatory`, so a message that no queue takes
raises instead of vanishing. `orders.<k>` goes to the `orders` exchange, `md.ticks.<symbol>` to
`market_data` as `market.ticks.<symbol>`, and a seed queue's name to `trading` with that queue's key.

Sequences: RabbitMQ numbers nothing per queue, so the publisher stamps each message with the header
`x-tradeplane-seq` = max(previous + 1, wall clock in microseconds), taken under a per-queue lock that is held
until the confirm. That value rises with publish order within one publisher and across its restarts, and a
redelivery carries it unchanged. It relies on one publisher per stream at a time (the outbox relay) and a
wall clock that does not step back across a relay restart.

Pipelining: `publish_many` holds the locks of all the queues it publishes to (taken in name order, so two
calls cannot deadlock), numbers and writes every message in list order on the one publishing channel without
waiting, then awaits all the confirms. A channel is delivered in order, and a broker that loses the connection
or closes the channel has received a prefix of what was written, so a failure leaves no later message of a
queue stored ahead of a lost one; the exception is a nack of a single message, which RabbitMQ sends only on an
internal error of the queue.

De-duplication: the msg_id travels as the AMQP `message_id` property; RabbitMQ does not drop duplicates,
so consumers of these queues drop a msg_id they have already applied (see base.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence

import aio_pika
import aio_pika.exceptions as amqp_errors
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from aiormq.abc import ConfirmationFrameType

from tradeplane.adapters.bus.base import (
    MD_TICKS_ALL,
    MD_TICKS_PREFIX,
    MD_TICKS_ROUTING_PREFIX,
    ORDERS_EXCHANGE,
    SEED_QUEUES,
    SEQUENCE_HEADER,
    Delivery,
    ExchangeSpec,
    MessageBus,
    QueueSpec,
    Subscription,
    check_offset,
    is_md_ticks_stream,
    order_shard,
    rabbitmq_topology,
    scrub_password,
    shard_queue,
)
from tradeplane.errors import ConfigError, InfrastructureUnavailable

_SEED_BY_NAME = {q.name: q for q in SEED_QUEUES}
_MARKET_DATA_QUEUE = _SEED_BY_NAME["market_data"]
_FAILURES = (amqp_errors.AMQPError, amqp_errors.ChannelInvalidStateError, OSError)

_Routed = tuple[str, bytes, str, str, str, str]
"""A message to publish: (stream, data, msg_id, exchange, routing key, queue), names before namespacing."""


@contextlib.contextmanager
def _unavailable(what: str) -> Iterator[None]:
    """Turn a lost or refusing broker into the platform's InfrastructureUnavailable."""
    try:
        yield
    except _FAILURES as exc:
        raise InfrastructureUnavailable(f"{what}: {type(exc).__name__} {exc}".rstrip()) from exc


class RabbitMqSubscription(Subscription):
    """A consumer on one queue, on its own channel with prefetch = the first fetch's batch size.

    The consumer starts on the first fetch, so a subscription that has not fetched yet holds no messages.
    Closing the channel returns every unacked message to the queue, flagged redelivered, in its original
    position (classic queue), ready for the next subscriber.
    """

    def __init__(self, bus: RabbitMqBus, stream: str, durable: str, channel: AbstractChannel, queue: AbstractQueue):
        self._bus = bus
        self._stream = stream
        self._durable = durable
        self._channel = channel
        self._queue = queue
        self._buffer: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self._consumer_tag: str | None = None
        self._delayed_naks: set[asyncio.Task[None]] = set()
        self._closed = False

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        await self._buffer.put(message)

    async def fetch(self, batch: int, timeout: float) -> list[Delivery]:  # noqa: ASYNC109 - the pull's expiry
        if self._closed:
            raise RuntimeError("fetch on a closed subscription")
        if batch < 1 or timeout <= 0:
            raise ValueError("batch must be >= 1 and timeout > 0")
        if self._consumer_tag is None:
            with _unavailable(f"RabbitMQ at {self._bus.endpoint}: consuming {self._queue.name}"):
                await self._channel.set_qos(prefetch_count=batch)
                self._consumer_tag = await self._queue.consume(
                    self._on_message, consumer_tag=f"{self._durable}-{uuid.uuid4().hex[:8]}"
                )
        if self._buffer.empty() and self._channel.is_closed:
            raise InfrastructureUnavailable(f"RabbitMQ at {self._bus.endpoint}: channel of {self._stream} closed")
        try:
            first = await asyncio.wait_for(self._buffer.get(), timeout)
        except TimeoutError:
            return []
        messages = [first]
        await asyncio.sleep(0)  # let frames already read from the socket join this batch
        while len(messages) < batch and not self._buffer.empty():
            messages.append(self._buffer.get_nowait())
        return [self._delivery(m) for m in messages]

    def _delivery(self, message: AbstractIncomingMessage) -> Delivery:
        headers = message.headers or {}
        raw_sequence = headers.get(SEQUENCE_HEADER)
        sequence = int(raw_sequence) if isinstance(raw_sequence, int | str) else 0
        what = f"RabbitMQ at {self._bus.endpoint}: settling {self._stream} #{sequence}"

        async def on_ack() -> None:
            with _unavailable(what):
                await message.ack()

        async def on_nak(delay: float | None) -> None:
            if not delay:
                with _unavailable(what):
                    await message.nack(requeue=True)
                return

            # RabbitMQ has no delayed requeue: hold the message (it keeps its prefetch slot) and return it
            # later. If the channel closes first, the broker requeues it anyway.
            async def later() -> None:
                await asyncio.sleep(delay)
                with contextlib.suppress(*_FAILURES):
                    await message.nack(requeue=True)

            task = asyncio.create_task(later())
            self._delayed_naks.add(task)
            task.add_done_callback(self._delayed_naks.discard)

        return Delivery(
            stream=self._stream,
            data=message.body,
            msg_id=message.message_id or "",
            sequence=sequence,
            redelivered=bool(message.redelivered),
            on_ack=on_ack,
            on_nak=on_nak,
        )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in list(self._delayed_naks):
            task.cancel()
        with contextlib.suppress(*_FAILURES):
            if self._consumer_tag is not None:
                await self._queue.cancel(self._consumer_tag)
            await self._channel.close()


class RabbitMqBus(MessageBus):
    kind = "amqp"

    def __init__(self, url: str, *, namespace: str = "", connect_timeout: float = 5.0) -> None:
        super().__init__(url, namespace=namespace, connect_timeout=connect_timeout)
        self._connection: AbstractRobustConnection | None = None
        self._publish_channel: AbstractChannel | None = None
        self._last_sequence: dict[str, int] = {}
        self._queue_locks: dict[str, asyncio.Lock] = {}
        self._exchanges_seen: set[str] = set()  # exchanges publish_many has found to exist on this connection

    # --- names -------------------------------------------------------------------------------------------

    def name(self, base: str) -> str:
        """The server-side name of exchange or queue `base` in this bus's namespace."""
        return f"{self.namespace}.{base}" if self.namespace else base

    def _route(self, stream: str) -> tuple[str, str, str]:
        """(exchange, routing key, queue) of a logical stream, before namespacing the names."""
        shard = order_shard(stream)
        if shard is not None:
            spec = shard_queue(shard)
            return spec.exchange, spec.routing_key, spec.name
        if is_md_ticks_stream(stream):
            symbol = stream[len(MD_TICKS_PREFIX) :]
            return _MARKET_DATA_QUEUE.exchange, MD_TICKS_ROUTING_PREFIX + symbol, _MARKET_DATA_QUEUE.name
        seed = _SEED_BY_NAME.get(stream)
        if seed is not None and seed is not _MARKET_DATA_QUEUE:
            return seed.exchange, seed.routing_key, seed.name
        raise ValueError(
            f"unknown stream {stream!r}: use order_stream(shard), md_ticks_stream(symbol) or a seed queue name"
        )

    # --- connection --------------------------------------------------------------------------------------

    @property
    def connection(self) -> AbstractRobustConnection:
        if self._connection is None or self._connection.is_closed:
            raise InfrastructureUnavailable(f"RabbitMQ at {self.endpoint}: not connected")
        return self._connection

    async def connect(self) -> None:
        """Connect, or raise InfrastructureUnavailable. Once connected, aio-pika's robust connection
        reconnects by itself and restores channels and consumers; ping() reports an outage meanwhile."""
        if self._connection is not None and not self._connection.is_closed:
            return
        try:
            connection = await asyncio.wait_for(
                aio_pika.connect_robust(
                    self.url,
                    timeout=self.connect_timeout,
                    client_properties={"connection_name": "tradeplane"},
                ),
                self.connect_timeout,
            )
        except (*_FAILURES, TimeoutError) as exc:
            raise InfrastructureUnavailable(
                f"RabbitMQ at {self.endpoint} is unreachable: {type(exc).__name__} {self._scrub(str(exc))}"
            ) from exc
        self._connection = connection
        with _unavailable(f"RabbitMQ at {self.endpoint}: opening the publishing channel"):
            self._publish_channel = await connection.channel(publisher_confirms=True, on_return_raises=True)

    def _scrub(self, text: str) -> str:
        return scrub_password(self.url, text)

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        self._publish_channel = None
        self._exchanges_seen.clear()
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()

    @contextlib.asynccontextmanager
    async def _scratch_channel(self, publisher_confirms: bool = False) -> AsyncIterator[AbstractChannel]:
        """A short-lived channel: a failed passive declare closes its channel, so never use a shared one."""
        channel = await self.connection.channel(publisher_confirms=publisher_confirms)
        try:
            yield channel
        finally:
            if not channel.is_closed:
                with contextlib.suppress(*_FAILURES):
                    await channel.close()

    # --- topology ----------------------------------------------------------------------------------------

    async def _declare_exchange(self, channel: AbstractChannel, spec: ExchangeSpec) -> AbstractExchange:
        return await channel.declare_exchange(self.name(spec.name), spec.type, durable=spec.durable)

    async def _declare_queue(self, channel: AbstractChannel, spec: QueueSpec) -> AbstractQueue:
        queue = await channel.declare_queue(
            self.name(spec.name),
            durable=spec.durable,
            auto_delete=spec.auto_delete,
            arguments=dict(spec.arguments) or None,
        )
        await queue.bind(self.name(spec.exchange), spec.routing_key)
        return queue

    async def setup(self, shards: int) -> None:
        exchanges, queues = rabbitmq_topology(shards)
        where = f"RabbitMQ at {self.endpoint}: setup"
        with _unavailable(where):
            async with self._scratch_channel() as channel:
                try:
                    for exchange in exchanges:
                        await self._declare_exchange(channel, exchange)
                    for queue in queues:
                        await self._declare_queue(channel, queue)
                except amqp_errors.ChannelPreconditionFailed as exc:
                    raise ConfigError(
                        f"{where}: an exchange or queue exists with other settings than seed 000 / "
                        f"tradeplane declare ({exc}); delete it or use another namespace"
                    ) from exc

    async def destroy(self, shards: int) -> None:
        if not self.namespace:
            raise ConfigError("destroy() needs a namespace; it never deletes un-namespaced queues")
        exchanges, queues = rabbitmq_topology(shards)
        with _unavailable(f"RabbitMQ at {self.endpoint}: destroy"):
            async with self._scratch_channel() as channel:
                for queue in queues:
                    await channel.queue_delete(self.name(queue.name))
                for exchange in exchanges:
                    await channel.exchange_delete(self.name(exchange.name))
        self._exchanges_seen.clear()

    # --- messages ----------------------------------------------------------------------------------------

    def _next_sequence(self, queue: str) -> int:
        sequence = max(self._last_sequence.get(queue, 0) + 1, time.time_ns() // 1_000)
        # Recorded before the publish: a publish whose confirm was lost may still be in the queue, and
        # the next message must not reuse its number.
        self._last_sequence[queue] = sequence
        return sequence

    async def publish_many(self, messages: Sequence[tuple[str, bytes, str]]) -> None:
        """See MessageBus.publish_many and the module docstring ("Pipelining")."""
        routed: list[_Routed] = []
        for stream, data, msg_id in messages:
            if stream == MD_TICKS_ALL:
                raise ValueError(f"{MD_TICKS_ALL} is a wildcard for subscribers; publish to md_ticks_stream(symbol)")
            routed.append((stream, data, msg_id, *self._route(stream)))
        if not routed:
            return
        await self._check_exchanges(routed)
        async with contextlib.AsyncExitStack() as locks:
            for queue in sorted({r[5] for r in routed}):
                await locks.enter_async_context(self._queue_locks.setdefault(queue, asyncio.Lock()))
            outcomes = await self._send(routed)
        failed = next((k for k, outcome in enumerate(outcomes) if isinstance(outcome, BaseException)), None)
        if failed is None:
            return
        self._exchanges_seen.clear()
        stream, exchange_name, error = routed[failed][0], routed[failed][3], outcomes[failed]
        assert isinstance(error, BaseException)
        where = f"RabbitMQ at {self.endpoint}: publish to {stream}"
        if isinstance(error, amqp_errors.PublishError):
            raise InfrastructureUnavailable(f"{where}: no queue takes it; run setup") from error
        if isinstance(error, amqp_errors.ChannelNotFoundEntity):
            raise InfrastructureUnavailable(f"{where}: exchange {exchange_name} missing; run setup") from error
        # Whatever ended a publish task (a lost connection, a closed channel, a timeout, a nack; aiormq may also
        # cancel it), it is the broker's failure and never this caller's cancellation.
        raise InfrastructureUnavailable(f"{where}: {type(error).__name__} {error}".rstrip()) from error

    async def _check_exchanges(self, routed: list[_Routed]) -> None:
        """Make sure the batch's exchanges exist (once per connection, and again after a failed batch).

        A publish to a missing exchange makes the broker close the channel, and the frames pipelined after it
        then arrive on a closed channel, for which the broker closes the whole connection (504 CHANNEL_ERROR),
        consumers included. A passive declare on a scratch channel finds out without that."""
        for stream, _, _, exchange_name, _, _ in routed:
            name = self.name(exchange_name)
            if name in self._exchanges_seen:
                continue
            where = f"RabbitMQ at {self.endpoint}: publish to {stream}"
            with _unavailable(where):
                async with self._scratch_channel() as channel:
                    try:
                        await channel.get_exchange(name, ensure=True)
                    except amqp_errors.ChannelNotFoundEntity as exc:
                        raise InfrastructureUnavailable(
                            f"{where}: exchange {exchange_name} missing; run setup"
                        ) from exc
            self._exchanges_seen.add(name)

    async def _send(self, routed: list[_Routed]) -> list[ConfirmationFrameType | BaseException | None]:
        """Number and write every message in list order, then wait for all the confirms: each one's outcome.

        aiormq's basic_publish takes the channel's lock and queues its frames under it; the tasks start in
        creation order and the lock is fair, so the frames go out in list order. `wait=False`: it does not
        wait for a frame to reach the socket before the next message may be queued."""
        with _unavailable(f"RabbitMQ at {self.endpoint}: publish to {routed[0][0]}"):
            if self._publish_channel is None:
                raise InfrastructureUnavailable(f"RabbitMQ at {self.endpoint}: not connected")
            channel = await self._publish_channel.get_underlay_channel()
        assert isinstance(channel, aiormq.Channel)  # the concrete channel: its basic_publish takes `wait`
        publishes = []
        for _, data, msg_id, exchange_name, routing_key, queue in routed:
            message = aio_pika.Message(
                data,
                message_id=msg_id,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                headers={SEQUENCE_HEADER: self._next_sequence(queue)},
            )
            publish = channel.basic_publish(
                data,
                exchange=self.name(exchange_name),
                routing_key=routing_key,
                properties=message.properties,
                mandatory=True,
                timeout=self.connect_timeout,
                wait=False,
            )
            publishes.append(asyncio.ensure_future(publish))
        return await asyncio.gather(*publishes, return_exceptions=True)

    async def subscribe(self, stream: str, durable: str, *, start_after: int | None = None) -> Subscription:
        """Consume the stream's queue. RabbitMQ keeps the position in the queue itself, so `durable` only
        names the consumer (its tag) for the operator. An order stream's queue is declared on the way,
        so an engine for a shard added after setup still finds its queue.

        `start_after` is accepted for the interface and changes nothing: a queue has no replay and cannot be
        repositioned, and it already resumes in order because unacked messages are requeued in place. The
        ones at or below the caller's offset come back flagged `redelivered` for the caller to skip."""
        check_offset(start_after)
        _, _, queue_base = self._route(stream)
        shard = order_shard(stream)
        where = f"RabbitMQ at {self.endpoint}: subscribe to {stream}"
        with _unavailable(where):
            channel = await self.connection.channel(publisher_confirms=False)
            try:
                if shard is not None:
                    await self._declare_exchange(channel, ORDERS_EXCHANGE)
                    queue = await self._declare_queue(channel, shard_queue(shard))
                else:
                    queue = await channel.get_queue(self.name(queue_base), ensure=True)
            except amqp_errors.ChannelNotFoundEntity as exc:
                raise InfrastructureUnavailable(f"{where}: queue {queue_base} does not exist; run setup") from exc
            except BaseException:
                with contextlib.suppress(*_FAILURES):
                    await channel.close()
                raise
        return RabbitMqSubscription(self, stream, durable, channel, queue)

    # --- operations --------------------------------------------------------------------------------------

    async def ping(self) -> float:
        """Time to open a channel and passively declare a built-in exchange: two broker round trips."""
        where = f"RabbitMQ at {self.endpoint}: ping"
        connection = self.connection
        if getattr(connection, "reconnecting", False):
            raise InfrastructureUnavailable(f"{where}: reconnecting")
        started = time.perf_counter()
        with _unavailable(where):
            async with asyncio.timeout(self.connect_timeout), self._scratch_channel() as channel:
                await channel.get_exchange("amq.topic", ensure=True)
        return time.perf_counter() - started

    async def queue_length(self, stream: str) -> int:
        """Messages ready in the stream's queue: not yet sent to a consumer (RabbitMQ's message_count)."""
        _, _, queue_base = self._route(stream)
        where = f"RabbitMQ at {self.endpoint}: queue length of {stream}"
        with _unavailable(where):
            async with self._scratch_channel() as channel:
                try:
                    queue = await channel.get_queue(self.name(queue_base), ensure=True)
                except amqp_errors.ChannelNotFoundEntity as exc:
                    raise InfrastructureUnavailable(f"{where}: queue does not exist; run setup") from exc
                result = queue.declaration_result
                return int(result.message_count or 0)

    async def roundtrip_test(self) -> None:
        token = uuid.uuid4().hex[:12]
        queue_name = self.name(f"tradeplane.probe.{token}")
        payload = f"probe {token}".encode()
        where = f"RabbitMQ at {self.endpoint}: round-trip test"
        with _unavailable(where):
            async with self._scratch_channel(publisher_confirms=True) as channel:
                queue = await channel.declare_queue(queue_name, exclusive=True)
                try:
                    await channel.default_exchange.publish(
                        aio_pika.Message(payload, message_id=token, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                        queue_name,
                        mandatory=True,
                        timeout=self.connect_timeout,
                    )
                    message = await queue.get(no_ack=False, fail=False, timeout=self.connect_timeout)
                    if message is None or message.body != payload:
                        raise InfrastructureUnavailable(f"{where}: read back something else than was written")
                    await message.ack()
                finally:
                    await queue.delete(if_unused=False, if_empty=False)
