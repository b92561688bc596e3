"""The order_book: and positions: read-through caches never keep rows that predate a committed change.

A read that misses the cache reads PostgreSQL and then fills the cache. If a writer commits and drops the key in
between, the fill would put the old rows back for the whole 30 s TTL; the generation next to each key stops it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import uuid
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from tests.integration.test_order_batch import make_book
from tradeplane.adapters.cache import GENERATION_TTL, TTL_ORDER_BOOK, Cache, generation_key, invalidate
from tradeplane.bootstrap import Platform
from tradeplane.domain.orders import OrderType, Side
from tradeplane.domain.risk import OrderTerms
from tradeplane.services import queries
from tradeplane.services.orders import OrderEntry, OrderRequest, submit_order

D = Decimal
CASH = {"kind": "cash", "cash": D("100000.00"), "positions": {}, "limits": None}
BUY = OrderTerms(side=Side.BUY, order_type=OrderType.LIMIT, quantity=D(1), price=D("190.00"))


class PausedAfterRead:
    """A connection whose reads return only once told to: the window between a reader's query and its fill."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.read_done = asyncio.Event()
        self.go_on = asyncio.Event()

    async def fetch(self, *args: Any) -> list[asyncpg.Record]:
        rows: list[asyncpg.Record] = await self.conn.fetch(*args)
        self.read_done.set()
        await self.go_on.wait()
        return rows


async def test_a_fill_after_an_invalidation_is_not_stored(platform: Platform) -> None:
    cache, key = platform.cache, f"order_book:test-{uuid.uuid4().hex}"
    value, generation = await cache.read_through(key)
    assert value is None
    async with cache.client.pipeline(transaction=False) as pipe:
        invalidate(pipe, key)
        await pipe.execute()
    assert await cache.fill(key, b"old", TTL_ORDER_BOOK, generation) is False
    assert await cache.client.exists(key) == 0

    value, generation = await cache.read_through(key)
    assert await cache.fill(key, b"new", TTL_ORDER_BOOK, generation) is True
    assert await cache.read_through(key) == (b"new", generation)
    assert 0 < await cache.client.ttl(key) <= TTL_ORDER_BOOK


async def test_open_orders_read_before_a_placement_do_not_outlive_it_in_the_cache(platform: Platform) -> None:
    book = await make_book(platform, [CASH])
    user_id = book.principal.user_id
    entry = OrderEntry(platform.cache, shards=platform.settings.engine_shards)
    async with platform.db.connection("test.reader") as conn:
        paused = PausedAfterRead(conn)
        reader = asyncio.create_task(queries.open_orders_of_user(paused, platform.cache, user_id))  # type: ignore[arg-type]
        await paused.read_done.wait()  # it has read: no open order yet

        placement = await submit_order(
            platform.db, entry, book.principal, OrderRequest(book.account_ids[0], "AAPL", BUY)
        )
        await queries.after_order_commit(platform.cache, user_id)  # what every writer does after its commit
        paused.go_on.set()
        assert await reader == []  # its answer predates the order, as any read may

        assert placement.order is not None
        fresh = await queries.open_orders_of_user(conn, platform.cache, user_id)
        assert [o.id for o in fresh] == [placement.order.id]


async def test_a_commit_drops_its_owners_caches_and_wakes_the_relay(platform: Platform) -> None:
    """After an order change commits, one call drops every owner's order_book: and positions: (bumping their
    generations), skips a house account's missing owner, and announces the outbox rows on the relay's channel."""
    cache = platform.cache
    owners = [10**12 + int(uuid.uuid4().int % 10**9) for _ in range(2)]
    keys = [key for uid in owners for key in (queries.order_book_key(uid), queries.positions_key(uid))]
    generations = []
    for key in keys:
        await cache.client.set(key, b"cached", ex=TTL_ORDER_BOOK)
        generations.append((await cache.read_through(key))[1])
    async with cache.client.pubsub() as pubsub:
        await pubsub.subscribe(queries.OUTBOX_WAKEUP_CHANNEL)
        assert (await pubsub.get_message(timeout=5))["type"] == "subscribe"
        await queries.after_order_commit(cache, owners[0], None, owners[1])
        woken = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
    assert woken is not None and (woken["channel"], woken["data"]) == (queries.OUTBOX_WAKEUP_CHANNEL.encode(), b"")
    for key, generation in zip(keys, generations, strict=True):
        value, now = await cache.read_through(key)
        assert value is None, key
        assert now != generation, key
        assert 0 < await cache.client.ttl(generation_key(key)) <= GENERATION_TTL


async def test_a_commit_with_redis_away_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    """The change is committed: a stale cache expires within its TTL and the relay also polls."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens there once closed
    away = Cache(f"redis://127.0.0.1:{port}/0", timeout=0.5)
    try:
        with caplog.at_level(logging.WARNING, logger="tradeplane.queries"):
            await queries.after_order_commit(away, 1)
    finally:
        await away.close()
    assert any("could not drop caches" in r.getMessage() for r in caplog.records)
