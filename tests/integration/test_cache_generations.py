"""The order_book: and positions: read-through caches never keep rows that predate a committed change.

A read that misses the cache reads PostgreSQL and then fills the cache. If a writer commits and drops the key in
between, the fill would put the old rows back for the whole 30 s TTL; the generation next to each key stops it.
"""

from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal
from typing import Any

import asyncpg

from tests.integration.test_order_batch import make_book
from tradeplane.adapters.cache import TTL_ORDER_BOOK, invalidate
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
