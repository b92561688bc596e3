"""The durable message bus between the outbox relay, the engine shards and market data publishers.

`create_bus(url)` picks the adapter by URL scheme: `nats://` (NATS JetStream, the embedded default) or
`amqp://` / `amqps://` (RabbitMQ). Both implement `MessageBus`; see base.py for the guarantees they share.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from tradeplane.adapters.bus.base import (
    DUPLICATE_WINDOW_S,
    MD_TICKS_ALL,
    MD_TICKS_PREFIX,
    MD_TICKS_ROUTING_PREFIX,
    ORDER_STREAM_PREFIX,
    ORDERS_EXCHANGE,
    SEED_EXCHANGES,
    SEED_QUEUES,
    SEQUENCE_HEADER,
    Delivery,
    ExchangeSpec,
    MessageBus,
    QueueSpec,
    Subscription,
    md_ticks_stream,
    order_shard,
    order_stream,
    rabbitmq_topology,
    shard_queue,
)
from tradeplane.errors import ConfigError

NATS_SCHEMES = frozenset({"nats", "tls"})
AMQP_SCHEMES = frozenset({"amqp", "amqps"})


def create_bus(url: str, *, namespace: str = "", connect_timeout: float = 5.0, **options: Any) -> MessageBus:
    """An unconnected bus for `url`; call `connect()` (or use `async with`) before anything else.

    `namespace` prefixes every server-side stream, exchange and queue name so that tests, or several
    platforms, can share one server. Extra `options` go to the adapter (e.g. NATS `ack_wait`, `replicas`).
    """
    scheme = urlsplit(url).scheme
    if scheme in NATS_SCHEMES:
        from tradeplane.adapters.bus.nats import NatsBus

        return NatsBus(url, namespace=namespace, connect_timeout=connect_timeout, **options)
    if scheme in AMQP_SCHEMES:
        from tradeplane.adapters.bus.rabbitmq import RabbitMqBus

        return RabbitMqBus(url, namespace=namespace, connect_timeout=connect_timeout, **options)
    raise ConfigError(f"bus URL must start with nats:// or amqp:// (got scheme {scheme!r})")


__all__ = [
    "AMQP_SCHEMES",
    "DUPLICATE_WINDOW_S",
    "MD_TICKS_ALL",
    "MD_TICKS_PREFIX",
    "MD_TICKS_ROUTING_PREFIX",
    "NATS_SCHEMES",
    "ORDERS_EXCHANGE",
    "ORDER_STREAM_PREFIX",
    "SEED_EXCHANGES",
    "SEED_QUEUES",
    "SEQUENCE_HEADER",
    "Delivery",
    "ExchangeSpec",
    "MessageBus",
    "QueueSpec",
    "Subscription",
    "create_bus",
    "md_ticks_stream",
    "order_shard",
    "order_stream",
    "rabbitmq_topology",
    "shard_queue",
]
