"""What one engine batch costs PostgreSQL in statements: at low rates a batch holds an order or two, so its fixed
statements are most of the engine's (and much of PostgreSQL's) work per order. Each statement is a round trip
the batch waits for while it holds its order, position and balance locks."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal

import asyncpg

from tests.integration import test_engine
from tests.integration.test_engine import Desk
from tradeplane.adapters.postgres import Database

desk = test_engine.desk  # the engine tests' fixture: database, Redis, a namespaced bus, relay and engine

D = Decimal


class StatementLog(Database):
    """The real pool; every statement run on a connection it hands out is written down (asyncpg's query logger)."""

    def __init__(self, db: Database) -> None:
        super().__init__(db.url)
        self._pool = db.pool
        self.statements: list[str] = []

    @asynccontextmanager
    async def connection(self, operation: str) -> AsyncIterator[asyncpg.Connection]:
        async with super().connection(operation) as conn:
            conn.add_query_logger(self._record)
            try:
                yield conn
            finally:
                conn.remove_query_logger(self._record)

    def _record(self, record: asyncpg.connection.LoggedQuery) -> None:
        self.statements.append(record.query)


async def batch_statements(desk: Desk) -> list[str]:
    """The statements of the engine's next batch (everything on the bus now)."""
    log = StatementLog(desk.db)
    desk.worker.db = log
    try:
        await desk.pump()
    finally:
        desk.worker.db = desk.db
    return log.statements


async def test_a_batch_that_fills_a_resting_order_settles_in_ten_statements(desk: Desk) -> None:
    seller = await desk.trader("seller", base="5")
    buyer = await desk.trader("buyer")
    resting = await seller.place("sell", "1", "100.00")
    await desk.pump()  # the first batch also makes sure the trade tape's partitions exist
    await buyer.place("buy", "0.2", "100.00")
    await desk.pump()  # and the first fill has asyncpg look up the types of its statements, once per connection

    crossing = await buyer.place("buy", "0.4", "100.00")
    statements = await batch_statements(desk)

    # BEGIN; the instrument's rates; the buy's row; the resting sell's row, which the fill touches; both positions;
    # fills, trade and last price; the positions; orders, holds and offsets; the ledger; COMMIT. The house fee
    # account is known from the rebuild.
    assert len(statements) == 10, statements
    assert (await desk.order(crossing))["status"] == "filled"
    assert (await desk.order(resting))["filled_quantity"] == D("0.6")
    assert await desk.value("SELECT last_price FROM instruments WHERE id = $1", desk.instrument_id) == D("100")
    assert (
        await desk.value("SELECT last_sequence FROM engine_offsets WHERE consumer = $1", desk.worker.consumer)
        == desk.worker.bus_offset
    )
    assert (
        await desk.value("SELECT last_sequence FROM engine_offsets WHERE consumer = $1", desk.worker.counter)
        == desk.worker.command_seq
        == 3
    )
    await desk.check()


async def test_a_batch_that_only_rests_an_order_settles_in_five_statements(desk: Desk) -> None:
    seller = await desk.trader("seller", base="5")
    await seller.place("sell", "1", "101.00")
    await desk.pump()

    resting = await seller.place("sell", "1", "100.00")
    statements = await batch_statements(desk)

    # BEGIN; the instrument's rates; the order's row; the order, its hold and the offsets; COMMIT
    assert len(statements) == 5, statements
    assert (await desk.order(resting))["status"] == "new"
    assert (
        await desk.value("SELECT last_sequence FROM engine_offsets WHERE consumer = $1", desk.worker.counter)
        == desk.worker.command_seq
        == 2
    )


async def test_a_batch_of_a_command_already_applied_still_records_its_offset(desk: Desk) -> None:
    """A re-published "new" (RabbitMQ may hand it over again under a new sequence) changes no order row; the
    batch still moves the shard's offset past it, so a restart does not fetch it again."""
    seller = await desk.trader("seller", base="5")
    order_id = await seller.place("sell", "1", "100.00")
    await desk.pump()
    before = desk.worker.bus_offset
    async with desk.db.transaction("test.duplicate") as conn:
        payload = {"type": "new", "order_id": order_id, "account_id": seller.account_id, "symbol": desk.symbol}
        await test_engine.add_outbox(conn, desk.symbol, payload)
    await desk.pump()

    assert desk.worker.bus_offset > before
    assert (
        await desk.value("SELECT last_sequence FROM engine_offsets WHERE consumer = $1", desk.worker.consumer)
        == desk.worker.bus_offset
    )
    assert (await desk.order(order_id))["status"] == "new"
