"""The message bus interface that the relay, the engines and the market data ingester code against.

Two adapters implement it: NATS JetStream (`nats.py`) and RabbitMQ (`rabbitmq.py`). Both give the same
guarantees to a caller:

- `publish` returns only once the server has persisted the message (JetStream PubAck, RabbitMQ publisher
  confirm), so the outbox relay may mark an outbox row as sent when it returns. `publish_many` does the same
  for a list of messages without a round trip per message: it sends them all, in list order, then waits for
  every acknowledgement; if it raises, none of them may be taken as persisted.
- Messages of one stream are delivered in publish order to the single consumer of that stream, each with a
  `sequence` that increases with publish order. An engine records the last sequence it applied in the same
  PostgreSQL transaction as the batch's results; a redelivered message whose sequence is at or below that
  mark has already been applied and is acked without effect.
- Delivery is at least once. A re-publish of the same `msg_id` (the relay crashed between publish and
  marking the row sent) is dropped by JetStream inside its duplicate window; RabbitMQ has no server-side
  de-duplication, so a consumer of a RabbitMQ stream must also drop a `msg_id` it has already applied
  (the relay's msg_id is the outbox id, which the engine can remember alongside the sequence mark).

Stream names are logical and the same on both buses: `orders.<shard>` for the engine shards and
`md.ticks.<symbol>` for external market data publishers. Every server-side name can be prefixed by a
namespace so tests and several platforms can share one server without colliding.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal, Self
from urllib.parse import urlsplit

ORDER_STREAM_PREFIX = "orders."
MD_TICKS_PREFIX = "md.ticks."
MD_TICKS_ALL = "md.ticks.>"
"""Subscribe to this stream to receive ticks of every symbol (a wildcard: never publish to it)."""

DUPLICATE_WINDOW_S = 120.0
"""How long JetStream remembers a msg_id to drop a re-publish of it."""

SEQUENCE_HEADER = "x-tradeplane-seq"
"""RabbitMQ header carrying the publisher-assigned stream sequence (JetStream assigns its own)."""

_SYMBOL = re.compile(r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*$")
_NAMESPACE = re.compile(r"^[A-Za-z0-9_\-]{0,32}$")


def order_stream(shard: int) -> str:
    """The stream carrying order commands for one engine shard."""
    if shard < 0:
        raise ValueError(f"shard must be >= 0 (got {shard})")
    return f"{ORDER_STREAM_PREFIX}{shard}"


def order_shard(stream: str) -> int | None:
    """The shard number of an order stream name, or None when `stream` is not one."""
    if not stream.startswith(ORDER_STREAM_PREFIX):
        return None
    suffix = stream[len(ORDER_STREAM_PREFIX) :]
    return int(suffix) if suffix.isdigit() else None


def md_ticks_stream(symbol: str) -> str:
    """The stream an external market data publisher sends ticks of `symbol` to."""
    if not _SYMBOL.match(symbol):
        raise ValueError(f"symbol {symbol!r} cannot be part of a stream name")
    return f"{MD_TICKS_PREFIX}{symbol}"


def is_md_ticks_stream(stream: str) -> bool:
    return stream == MD_TICKS_ALL or (
        stream.startswith(MD_TICKS_PREFIX) and bool(_SYMBOL.match(stream[len(MD_TICKS_PREFIX) :]))
    )


def check_namespace(namespace: str) -> str:
    if not _NAMESPACE.match(namespace):
        raise ValueError(f"namespace must be 0-32 letters, digits, '_' or '-' (got {namespace!r})")
    return namespace


def check_offset(start_after: int | None) -> int | None:
    if start_after is not None and start_after < 0:
        raise ValueError(f"start_after must be a sequence >= 0 (got {start_after})")
    return start_after


def endpoint(url: str) -> str:
    """`host:port` of a bus URL: safe for messages and logs because it never carries the password."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    host = parts.hostname or "?"
    return f"{host}:{port}" if port else host


def scrub_password(url: str, text: str) -> str:
    """`text` (say, a client library's error) with the password of `url` masked."""
    password = urlsplit(url).password
    return text.replace(password, "***") if password else text


# --- RabbitMQ topology (seed 000 "Message Queue Setup", plus the per-shard order queues) -------------------


@dataclass(frozen=True, slots=True)
class ExchangeSpec:
    name: str
    type: Literal["direct", "topic"]
    durable: bool


@dataclass(frozen=True, slots=True)
class QueueSpec:
    """A queue and the one binding that feeds it."""

    name: str
    exchange: str
    routing_key: str
    durable: bool
    auto_delete: bool = False
    arguments: dict[str, str | int | bool] = field(default_factory=dict)


TRADING_EXCHANGE = ExchangeSpec("trading", "direct", durable=True)
MARKET_DATA_EXCHANGE = ExchangeSpec("market_data", "topic", durable=True)
ORDERS_EXCHANGE = ExchangeSpec("orders", "direct", durable=True)

SEED_EXCHANGES: tuple[ExchangeSpec, ...] = (TRADING_EXCHANGE, MARKET_DATA_EXCHANGE)

SEED_QUEUES: tuple[QueueSpec, ...] = (
    QueueSpec("order_placement", "trading", "order.place", durable=True),
    QueueSpec("order_modification", "trading", "order.modify", durable=True),
    QueueSpec("order_cancellation", "trading", "order.cancel", durable=True),
    QueueSpec("position_updates", "trading", "position.update", durable=True),
    # The seed makes market data transient: quotes are superseded within seconds, so a broker restart
    # may drop them rather than replay stale prices.
    QueueSpec("market_data", "market_data", "market.#", durable=False),
)
"""Seed 000's queues with its durability, exactly; other services publish and consume on them."""

MD_TICKS_ROUTING_PREFIX = "market.ticks."
"""On RabbitMQ `md.ticks.<symbol>` is published to `market_data` as `market.ticks.<symbol>`."""


def shard_queue(shard: int) -> QueueSpec:
    """The durable queue of one engine shard.

    Classic durable rather than quorum: a classic queue puts a requeued message back at its original
    position, which keeps per-shard order across a nak; quorum queues (the choice for a replicated
    production cluster, see DESIGN.md) also need three nodes to be worth their cost. Single active consumer
    makes a second engine for the same shard a hot standby instead of an out-of-order competitor.
    """
    stream = order_stream(shard)
    return QueueSpec(
        stream,
        ORDERS_EXCHANGE.name,
        stream,
        durable=True,
        arguments={"x-queue-type": "classic", "x-single-active-consumer": True},
    )


def rabbitmq_topology(shards: int) -> tuple[tuple[ExchangeSpec, ...], tuple[QueueSpec, ...]]:
    """Every exchange and queue `setup(shards)` declares on RabbitMQ (before namespacing)."""
    if shards < 1:
        raise ValueError(f"shards must be >= 1 (got {shards})")
    return (
        (*SEED_EXCHANGES, ORDERS_EXCHANGE),
        (*SEED_QUEUES, *(shard_queue(k) for k in range(shards))),
    )


# --- deliveries, subscriptions, the bus ------------------------------------------------------------------


class Delivery:
    """One message handed to a consumer; settle it with exactly one `ack` or `nak`.

    `sequence` increases with publish order within a stream and is the same on every redelivery of a
    message, so "sequence <= last applied" identifies a message already applied. It is 0 only for a
    message published outside tradeplane (no sequence header), which must not be skipped by sequence.
    `redelivered` is True when the server may have handed this message out before.
    A second settle call is ignored: the first one decides the message's fate.
    """

    __slots__ = ("_on_ack", "_on_nak", "_settled", "data", "msg_id", "redelivered", "sequence", "stream")

    def __init__(
        self,
        *,
        stream: str,
        data: bytes,
        msg_id: str,
        sequence: int,
        redelivered: bool,
        on_ack: Callable[[], Awaitable[None]],
        on_nak: Callable[[float | None], Awaitable[None]],
    ) -> None:
        self.stream = stream
        self.data = data
        self.msg_id = msg_id
        self.sequence = sequence
        self.redelivered = redelivered
        self._on_ack = on_ack
        self._on_nak = on_nak
        self._settled = False

    @property
    def settled(self) -> bool:
        return self._settled

    async def ack(self) -> None:
        """The message is applied: never deliver it again."""
        if self._settled:
            return
        self._settled = True
        await self._on_ack()

    async def nak(self, delay: float | None = None) -> None:
        """The message was not applied: deliver it again, after `delay` seconds when given."""
        if self._settled:
            return
        self._settled = True
        await self._on_nak(delay)

    def __repr__(self) -> str:
        return (
            f"Delivery(stream={self.stream!r}, sequence={self.sequence}, msg_id={self.msg_id!r}, "
            f"redelivered={self.redelivered}, {len(self.data)} bytes)"
        )


class Subscription(ABC):
    """A durable consumer's view of one stream. Closing it hands un-settled deliveries back for redelivery."""

    @abstractmethod
    async def fetch(self, batch: int, timeout: float) -> list[Delivery]:  # noqa: ASYNC109 - the pull's expiry
        """Up to `batch` deliveries in stream order; waits up to `timeout` s for the first; [] when none.

        Settle a batch before fetching the next: RabbitMQ's prefetch is the first fetch's batch size, so
        it sends nothing more while that many deliveries are unacked (JetStream allows max_ack_pending).
        """

    @abstractmethod
    async def close(self) -> None: ...

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


class MessageBus(ABC):
    """A durable, ordered, at-least-once message bus. Failures to reach it raise InfrastructureUnavailable."""

    kind: str

    def __init__(self, url: str, *, namespace: str = "", connect_timeout: float = 5.0) -> None:
        self.url = url
        self.namespace = check_namespace(namespace)
        self.connect_timeout = connect_timeout

    @property
    def endpoint(self) -> str:
        """Where the bus is, without credentials (for health output and error messages)."""
        return endpoint(self.url)

    @abstractmethod
    async def connect(self) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def setup(self, shards: int) -> None:
        """Create the streams (JetStream) or exchanges and queues (RabbitMQ). Safe to run again."""

    async def publish(self, stream: str, data: bytes, msg_id: str) -> None:
        """Append `data` to `stream`; returns once the server has persisted it. `msg_id` de-duplicates."""
        await self.publish_many(((stream, data, msg_id),))

    @abstractmethod
    async def publish_many(self, messages: Sequence[tuple[str, bytes, str]]) -> None:
        """Append each `(stream, data, msg_id)` to its stream, pipelined; returns once the server has persisted
        every one of them.

        The server receives the messages in list order, so each stream gets its messages in list order, with
        rising sequences. Streams are checked before anything is sent (ValueError for an unknown stream).
        If any message fails, InfrastructureUnavailable is raised and the caller must treat the whole list as
        unpublished; some may have been persisted, so publishing the list again is the way to recover (the
        msg_ids de-duplicate, see the module docstring). A failure never leaves a later message of a stream
        persisted behind an earlier one that was lost (JetStream: see NatsBus.publish_many); on RabbitMQ that
        holds unless the broker nacks a single message, which it does only on an internal error of a queue.
        """

    @abstractmethod
    async def subscribe(self, stream: str, durable: str, *, start_after: int | None = None) -> Subscription:
        """Attach to the durable consumer `durable` of `stream`, which resumes where it was left.

        `start_after` is the caller's committed offset: the sequence of the last message of `stream` it has
        applied (0 for none), as recorded in its own database. With it, the subscription delivers the
        messages after that offset in publish order, with no later message overtaking an earlier one,
        whatever the durable consumer had handed out before:

        - NATS JetStream recreates the consumer to start at `start_after + 1`. JetStream gives a dead
          subscriber's unacked messages back only after `ack_wait` and meanwhile hands later ones to the next
          subscriber, so without this a restarted engine could apply a cancel before its order. Messages after
          the offset are replayed even if they were acked (say, the database was restored from a backup);
          messages at or below it are not delivered again.
        - RabbitMQ cannot reposition a queue and forgets a message once it is acked: there is no replay, and
          `start_after` changes nothing about what is delivered. Order holds anyway, because the broker puts
          unacked messages back at their original place; those at or below the offset come back flagged
          `redelivered`, and messages acked after the offset are gone.

        Either way a caller still skips deliveries whose sequence is at or below its offset (see the module
        docstring); `start_after` only guarantees that what follows the offset arrives, in order.
        """

    @abstractmethod
    async def ping(self) -> float:
        """Round-trip latency to the server in seconds."""

    @abstractmethod
    async def queue_length(self, stream: str) -> int:
        """Messages of `stream` not yet handed to a consumer (the `message_queue_length` metric)."""

    @abstractmethod
    async def roundtrip_test(self) -> None:
        """Publish a probe to a scratch stream, read it back, ack it and remove the scratch stream."""

    @abstractmethod
    async def destroy(self, shards: int) -> None:
        """Delete everything `setup(shards)` created in this bus's namespace, messages included.

        Refused without a namespace so that it cannot wipe a running platform's streams by accident.
        """

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
