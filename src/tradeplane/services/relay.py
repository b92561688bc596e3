"""The outbox relay: publishes committed outbox rows to the bus, in id order, at least once.

Rows are read and marked published in one transaction that holds an advisory lock, so any number of relay
processes may run and exactly one is active. Each message carries `outbox-<id>` as its de-duplication id:
if the relay dies after publishing but before its transaction commits, the rows are published again and the
bus (JetStream Nats-Msg-Id) or the consumer (RabbitMQ message_id, engine offsets) drops the copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from tradeplane.adapters.bus import MessageBus
from tradeplane.adapters.postgres import Database
from tradeplane.errors import InfrastructureUnavailable

log = logging.getLogger("tradeplane.relay")

RELAY_LOCK_ID = 0x7472_6164_6572  # "trader": one active relay per database


def outbox_message_id(outbox_id: int) -> str:
    return f"outbox-{outbox_id}"


class OutboxRelay:
    def __init__(self, db: Database, bus: MessageBus, *, batch_size: int = 500, idle_sleep_s: float = 0.02) -> None:
        self.db = db
        self.bus = bus
        self.batch_size = batch_size
        self.idle_sleep_s = idle_sleep_s

    async def publish_pending(self) -> int:
        """Publish one batch; returns how many rows were published (0 if idle or another relay is active)."""
        async with self.db.transaction("relay.batch") as conn:
            if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", RELAY_LOCK_ID):
                return 0
            rows = await conn.fetch(
                "SELECT id, stream, payload::text AS payload FROM outbox"
                " WHERE published_at IS NULL ORDER BY id LIMIT $1",
                self.batch_size,
            )
            for row in rows:
                await self.bus.publish(row["stream"], row["payload"].encode(), outbox_message_id(row["id"]))
            if rows:
                await conn.execute(
                    "UPDATE outbox SET published_at = now() WHERE id = ANY($1::bigint[])",
                    [r["id"] for r in rows],
                )
        return len(rows)

    async def run(self, stop: asyncio.Event) -> None:
        """Relay until `stop` is set; outages of PostgreSQL or the bus are waited out, never fatal."""
        backoff = 0.1
        while not stop.is_set():
            try:
                published = await self.publish_pending()
                backoff = 0.1
            except InfrastructureUnavailable as exc:
                log.warning("relay waiting for infrastructure: %s", exc.detail)
                published = 0
                await _sleep_or_stop(stop, backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            if published == 0:
                await _sleep_or_stop(stop, self.idle_sleep_s)


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
