"""The outbox relay: publishes committed outbox rows to the bus, in id order, at least once.

Rows are read and marked published by one statement in a transaction that holds an advisory lock, so any number
of relay processes may run and exactly one is active. Each message carries `outbox-<id>` as its de-duplication id:
if the relay dies after publishing but before its transaction commits, the rows are published again and the
bus (JetStream Nats-Msg-Id) or the consumer (RabbitMQ message_id, engine offsets) drops the copy. A batch goes
out with one `publish_many`, pipelined rather than a round trip per row; if it raises, no row of the batch is
marked, and the next attempt publishes the batch again.

Wake-ups: a writer that commits outbox rows publishes on Redis ``tp:outbox`` (``queries.after_order_commit``);
``relay_wakeups`` turns those into an event the relay waits on, so a committed order is published at once
instead of at the next poll. The poll stays as the fallback (a lost wake-up, Redis down, another writer).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from tradeplane.adapters.bus import MessageBus
from tradeplane.adapters.cache import REDIS_ERRORS, Cache
from tradeplane.adapters.postgres import Database
from tradeplane.errors import InfrastructureUnavailable
from tradeplane.services.queries import OUTBOX_WAKEUP_CHANNEL
from tradeplane.services.stopping import pause

log = logging.getLogger("tradeplane.relay")

RELAY_LOCK_ID = 0x7472_6164_6572  # "trader": one active relay per database


def outbox_message_id(outbox_id: int) -> str:
    return f"outbox-{outbox_id}"


class OutboxRelay:
    def __init__(
        self,
        db: Database,
        bus: MessageBus,
        *,
        batch_size: int = 500,
        idle_sleep_s: float = 0.02,
        wake: asyncio.Event | None = None,
    ) -> None:
        """`wake`, when given (set by ``relay_wakeups``), ends an idle wait early; the poll every
        `idle_sleep_s` remains the fallback."""
        self.db = db
        self.bus = bus
        self.batch_size = batch_size
        self.idle_sleep_s = idle_sleep_s
        self.wake = wake or asyncio.Event()

    async def publish_pending(self) -> int:
        """Publish one batch; returns how many rows were published (0 if idle or another relay is active)."""
        async with self.db.transaction("relay.batch") as conn:
            # One round trip reads and marks the batch: the marks commit only if the publish below returns, as
            # the transaction rolls back when it raises. The lock is a one-time filter of the read: no rows unless
            # this relay holds it. The ids go in as an array, so the marks are primary-key lookups.
            rows = await conn.fetch(
                "UPDATE outbox SET published_at = now() WHERE id = ANY(ARRAY("
                "SELECT id FROM outbox WHERE published_at IS NULL AND (SELECT pg_try_advisory_xact_lock($2))"
                " ORDER BY id LIMIT $1)) RETURNING id, stream, payload::text AS payload",
                self.batch_size,
                RELAY_LOCK_ID,
            )
            if rows:
                rows.sort(key=lambda row: row["id"])  # RETURNING keeps no order: publish in id order
                await self.bus.publish_many(
                    [(row["stream"], row["payload"].encode(), outbox_message_id(row["id"])) for row in rows]
                )
        return len(rows)

    async def run(self, stop: asyncio.Event) -> None:
        """Relay until `stop` is set; outages of PostgreSQL or the bus are waited out, never fatal."""
        backoff = 0.1
        # `stop` ends the idle wait below by setting `wake`: one task for the relay's life, where ``pause`` would
        # start and cancel two on every wake-up (one per committed placement at low rates)
        stopping = asyncio.ensure_future(_set_when_set(stop, self.wake))
        try:
            while not stop.is_set():
                self.wake.clear()  # before reading: a wake-up for a row committed after the read is kept
                try:
                    published = await self.publish_pending()
                    backoff = 0.1
                except InfrastructureUnavailable as exc:
                    log.warning("relay waiting for infrastructure: %s", exc.detail)
                    published = 0
                    await pause(stop, backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                if published < self.batch_size:
                    # Caught up with what the read saw. A row committed since has set `wake` (cleared before the
                    # read), so this returns at once for it; no need for another read to learn the outbox is empty.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self.idle_sleep_s):
                            await self.wake.wait()
        finally:
            stopping.cancel()


async def _set_when_set(source: asyncio.Event, target: asyncio.Event) -> None:
    await source.wait()
    target.set()


async def relay_wakeups(cache: Cache, wake: asyncio.Event, stop: asyncio.Event) -> None:
    """Set `wake` on every message on the outbox wake-up channel until `stop`; a Redis outage is waited out."""
    backoff = 0.1
    while not stop.is_set():
        pubsub = cache.client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(OUTBOX_WAKEUP_CHANNEL)
            backoff = 0.1
            wake.set()  # rows may have been committed while we were not listening
            while not stop.is_set():
                if await pubsub.get_message(timeout=0.5) is not None:
                    wake.set()
        except REDIS_ERRORS as exc:
            log.warning("relay wake-ups unavailable (polling meanwhile): %s", exc)
            await pause(stop, backoff)
            backoff = min(backoff * 2, 5.0)
        finally:
            with contextlib.suppress(*REDIS_ERRORS):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
