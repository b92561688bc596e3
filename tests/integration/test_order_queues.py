"""Seed 000's RabbitMQ order queues against real RabbitMQ, PostgreSQL and Redis (namespaced bus per test)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import aio_pika
import orjson
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection

from tests.integration.conftest import Actor, make_actor
from tradeplane.adapters.bus import create_bus
from tradeplane.adapters.bus.rabbitmq import RabbitMqBus
from tradeplane.bootstrap import Platform, build_platform
from tradeplane.config import Settings
from tradeplane.entrypoints.workers.order_queues import OrderQueueWorker
from tradeplane.services import accounts
from tradeplane.services.identity import Role

WAIT_S = 20.0  # a hang guard for replies, not a timing assertion


@pytest.fixture
async def amqp_platform(settings: Settings, amqp_url: str) -> AsyncIterator[Platform]:
    platform = build_platform(settings.with_urls(bus_url=amqp_url))
    platform.bus = create_bus(amqp_url, namespace=f"tq{uuid.uuid4().hex[:10]}")
    await platform.start()
    await platform.bus.setup(1)
    async with platform.db.transaction("test.ids") as conn:
        # user ids no concurrently running test database hands out: tp:user:<id> on the shared Redis is ours
        await conn.execute(f"ALTER TABLE users ALTER COLUMN id RESTART WITH {random.randrange(10**9, 2 * 10**9)}")
    yield platform
    await platform.bus.destroy(1)
    await platform.stop()


@dataclass
class Requester:
    """Another service: publishes commands to the `trading` exchange and waits for the replies."""

    bus: RabbitMqBus
    connection: AbstractRobustConnection
    channel: AbstractChannel
    replies: AbstractQueue
    pending: dict[str, asyncio.Future[dict[str, Any]]]

    async def on_reply(self, message: AbstractIncomingMessage) -> None:
        async with message.process():
            future = self.pending.pop(message.correlation_id or "", None)
            if future is not None:
                future.set_result(orjson.loads(message.body))

    async def call(self, routing_key: str, command: dict[str, Any], *, message_id: str | None = None) -> dict[str, Any]:
        correlation_id = uuid.uuid4().hex
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[correlation_id] = future
        await self.send(routing_key, command, message_id=message_id, correlation_id=correlation_id)
        return await asyncio.wait_for(future, WAIT_S)

    async def send(
        self,
        routing_key: str,
        command: dict[str, Any] | bytes,
        *,
        message_id: str | None = None,
        correlation_id: str | None = None,
    ) -> None:
        exchange = await self.channel.get_exchange(self.bus.name("trading"))
        await exchange.publish(
            aio_pika.Message(
                command if isinstance(command, bytes) else orjson.dumps(command),
                message_id=message_id,
                correlation_id=correlation_id,
                reply_to=self.replies.name if correlation_id else None,
            ),
            routing_key,
        )


@pytest.fixture
async def worker(amqp_platform: Platform) -> AsyncIterator[OrderQueueWorker]:
    worker = OrderQueueWorker(amqp_platform)
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    await asyncio.wait_for(worker.ready.wait(), WAIT_S)
    yield worker
    stop.set()
    await running


@contextlib.asynccontextmanager
async def open_requester(platform: Platform, amqp_url: str) -> AsyncIterator[Requester]:
    assert isinstance(platform.bus, RabbitMqBus)
    connection = await aio_pika.connect_robust(amqp_url)
    channel = await connection.channel()
    replies = await channel.declare_queue(exclusive=True)
    requester = Requester(platform.bus, connection, channel, replies, {})
    await replies.consume(requester.on_reply)
    try:
        yield requester
    finally:
        await connection.close()


@pytest.fixture
async def requester(amqp_platform: Platform, amqp_url: str, worker: OrderQueueWorker) -> AsyncIterator[Requester]:
    async with open_requester(amqp_platform, amqp_url) as requester:
        yield requester


@pytest.fixture
async def trader(amqp_platform: Platform) -> Actor:
    actor = await make_actor(amqp_platform, "carol", Role.TRADER, with_account=True)
    assert actor.account_id is not None
    async with amqp_platform.db.transaction("test.deposit") as conn:
        await accounts.deposit(conn, actor.account_id, Decimal("100000.00"))
    return actor


def placement(actor: Actor, **overrides: Any) -> dict[str, Any]:
    return {
        "api_key": actor.key,
        "account_id": actor.account_id,
        "symbol": "BTC-USD",
        "side": "buy",
        "type": "limit",
        "quantity": "0.5",
        "price": "65000.00",
        **overrides,
    }


async def order_rows(platform: Platform) -> list[dict[str, Any]]:
    async with platform.db.connection("test.orders") as conn:
        rows = await conn.fetch(
            "SELECT id, status, quantity, price, client_order_id, reject_reason FROM orders ORDER BY id"
        )
    return [dict(r) for r in rows]


async def test_a_placement_message_becomes_an_order_like_a_post(
    amqp_platform: Platform, requester: Requester, trader: Actor
) -> None:
    reply = await requester.call("order.place", placement(trader, client_order_id="q-1"))
    assert reply["status"] == 201
    order = reply["order"]
    assert (order["status"], order["quantity"], order["price"], order["client_order_id"]) == (
        "pending_new",
        "0.5",
        "65000",
        "q-1",
    )
    rows = await order_rows(amqp_platform)
    assert [(r["id"], r["status"], r["client_order_id"]) for r in rows] == [(order["id"], "pending_new", "q-1")]
    async with amqp_platform.db.connection("test.outbox") as conn:
        outbox = await conn.fetch("SELECT payload::text AS payload FROM outbox")
        hold = await conn.fetchval("SELECT amount FROM holds WHERE order_id = $1 AND released_at IS NULL", order["id"])
    assert [orjson.loads(r["payload"])["order_id"] for r in outbox] == [order["id"]]
    assert hold > Decimal("32500")  # 0.5 x 65000 plus the taker fee reserve

    # the same risk checks as REST: a stored rejection, answered with the reason
    reply = await requester.call("order.place", placement(trader, quantity="100", price="65000.00"))
    assert reply["status"] == 422 and reply["error"] == "risk_rejected"
    assert reply["order"]["status"] == "rejected"
    assert len(await order_rows(amqp_platform)) == 2

    # the same validation as REST, and no identity means no order
    reply = await requester.call("order.place", placement(trader, side="sideways"))
    assert (reply["status"], reply["error"]) == (422, "validation_error")
    reply = await requester.call("order.place", {k: v for k, v in placement(trader).items() if k != "api_key"})
    assert (reply["status"], reply["error"]) == (401, "missing_identity")
    reply = await requester.call("order.place", placement(trader, api_key="tp_bogus_" + "x" * 43))
    assert (reply["status"], reply["error"]) == (401, "invalid_api_key")
    assert len(await order_rows(amqp_platform)) == 2


async def test_a_redelivered_placement_places_one_order(
    amqp_platform: Platform, requester: Requester, trader: Actor
) -> None:
    first = await requester.call("order.place", placement(trader), message_id="msg-42")
    again = await requester.call("order.place", placement(trader), message_id="msg-42")
    assert (first["status"], again["status"]) == (201, 200)
    assert first["order"]["id"] == again["order"]["id"]
    assert [r["client_order_id"] for r in await order_rows(amqp_platform)] == ["amqp-msg-42"]


async def placed_together(
    platform: Platform, amqp_url: str, commands: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], OrderQueueWorker]:
    """Send every command to order_placement, then start the worker: they all wait in the queue, so it places
    them together. The replies, in the commands' order, and the worker."""
    async with open_requester(platform, amqp_url) as requester:
        calls = [asyncio.ensure_future(requester.call("order.place", command)) for command in commands]
        await asyncio.sleep(0.5)
        worker = OrderQueueWorker(platform)
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        try:
            replies: list[dict[str, Any]] = await asyncio.gather(*calls)
        finally:
            stop.set()
            await running
    return replies, worker


async def test_a_burst_of_placements_shares_transactions_with_one_by_one_answers(
    amqp_platform: Platform, amqp_url: str
) -> None:
    """Messages waiting in order_placement are placed together, yet each gets the answer it would have had
    alone, in delivery order: funds run out at the same message, and replays and conflicts see earlier ones."""
    trader = await make_actor(amqp_platform, "dave", Role.TRADER, with_account=True)
    async with amqp_platform.db.transaction("test.funds") as conn:
        await accounts.deposit(conn, trader.account_id, Decimal("13000.00"))  # 0.01 BTC at 65,000: 20 less fees
        await conn.execute(
            "INSERT INTO risk_limits (account_id, instrument_id, max_orders_per_second) VALUES ($1, NULL, 1000)",
            trader.account_id,
        )
    commands = [placement(trader, quantity="0.01", price="65000.00", client_order_id=f"b-{k}") for k in range(30)]
    commands[5] = placement(trader, side="sideways")  # refused before it is queued
    commands[9] = placement(trader, quantity="0.01", price="65000.00", client_order_id="b-3")  # the same order
    commands[12] = placement(trader, quantity="0.02", price="65000.00", client_order_id="b-3")  # other terms
    replies, worker = await placed_together(amqp_platform, amqp_url, commands)
    statuses = [reply["status"] for reply in replies]
    assert statuses[5] == 422 and replies[5]["error"] == "validation_error"
    assert (statuses[9], replies[9]["order"]["id"]) == (200, replies[3]["order"]["id"])
    assert (statuses[12], replies[12]["error"]) == (409, "duplicate_client_order_id")
    placed = [k for k in range(30) if k not in (5, 9, 12)]
    accepted = [k for k in placed if statuses[k] == 201]
    refused = [k for k in placed if statuses[k] != 201]
    assert accepted == placed[: len(accepted)] and 0 < len(accepted) < len(placed)  # funds ran out once, in order
    assert {replies[k].get("reason") for k in refused} == {"insufficient_funds"}
    stored = [replies[k]["order"]["id"] for k in placed]
    assert stored == sorted(stored)  # stored in delivery order
    assert worker.placements.placements < len(placed) // 2  # shared transactions, not one per message


async def test_modify_and_cancel_messages(amqp_platform: Platform, requester: Requester, trader: Actor) -> None:
    order_id = (await requester.call("order.place", placement(trader)))["order"]["id"]
    other = await make_actor(amqp_platform, "mallory", Role.TRADER, with_account=True)

    reply = await requester.call("order.modify", {"api_key": other.key, "order_id": order_id, "price": "1.00"})
    assert (reply["status"], reply["error"]) == (404, "order_not_found")  # not yours: as if it did not exist
    reply = await requester.call("order.modify", {"user": "carol", "order_id": order_id, "price": "64000.00"})
    assert reply["status"] == 200 and reply["order"]["id"] == order_id

    reply = await requester.call("order.cancel", {"api_key": trader.key, "order_id": order_id})
    assert reply["status"] == 200 and reply["order"]["status"] == "pending_cancel"
    reply = await requester.call("order.cancel", {"api_key": trader.key, "account_id": trader.account_id})
    assert reply == {"status": 200, "orders": []}  # nothing else open
    async with amqp_platform.db.connection("test.outbox") as conn:
        kinds = [r["kind"] for r in await conn.fetch("SELECT payload->>'type' AS kind FROM outbox ORDER BY id")]
    assert kinds == ["new", "modify", "cancel"]


async def test_commands_without_reply_to_are_executed_too(
    amqp_platform: Platform, requester: Requester, worker: OrderQueueWorker, trader: Actor
) -> None:
    await requester.send("order.place", placement(trader, client_order_id="fire-and-forget"))
    await requester.send("order.place", b"not json")
    for _ in range(200):
        if worker.handled >= 2:
            break
        await asyncio.sleep(0.05)
    assert [r["client_order_id"] for r in await order_rows(amqp_platform)] == ["fire-and-forget"]


async def test_position_changes_are_published_to_position_updates(
    amqp_platform: Platform, amqp_url: str, worker: OrderQueueWorker, trader: Actor
) -> None:
    assert isinstance(amqp_platform.bus, RabbitMqBus)
    event = {
        "channel": "positions",
        "symbol": "BTC-USD",
        "data": {"account_id": trader.account_id, "symbol": "BTC-USD", "net_quantity": "0.5"},
    }
    # Only position events go out; orders and fills stay private to the WebSocket.
    redis = amqp_platform.cache.client
    await redis.publish(f"tp:user:{trader.user_id}", orjson.dumps({"channel": "orders", "data": {"n": 1}}))
    await redis.publish(f"tp:user:{trader.user_id}", orjson.dumps(event))

    connection = await aio_pika.connect_robust(amqp_url)
    try:
        channel = await connection.channel()
        queue = await channel.get_queue(amqp_platform.bus.name("position_updates"))
        ours: list[dict[str, Any]] = []
        for _ in range(400):
            message = await queue.get(no_ack=True, fail=False)
            if message is None:
                await asyncio.sleep(0.05)
                continue
            body = orjson.loads(message.body)
            if body.get("user_id") == trader.user_id:  # the shared Redis may carry other sessions' positions
                ours.append(body)
                break
        assert ours == [{"user_id": trader.user_id, **event}]
    finally:
        await connection.close()


async def test_bad_placements_in_a_burst_refuse_only_themselves(amqp_platform: Platform, amqp_url: str) -> None:
    """A message whose numbers the database cannot hold is refused alone; the placements it shares a
    transaction with are placed."""
    trader = await make_actor(amqp_platform, "erin", Role.TRADER, with_account=True)
    async with amqp_platform.db.transaction("test.funds") as conn:
        await accounts.deposit(conn, trader.account_id, Decimal("100000.00"))
    commands: list[dict[str, Any]] = [placement(trader, quantity="0.01", client_order_id=f"ok-{k}") for k in range(6)]
    commands[1] = placement(trader, quantity="1e40", client_order_id="huge")
    commands[3] = placement(trader, type="stop_limit", stop_price="1e25", client_order_id="huge-stop")
    commands[4] = placement(trader, quantity="0.01000000000000000001", client_order_id="too-fine")
    replies, _ = await placed_together(amqp_platform, amqp_url, commands)
    assert [r["status"] for r in replies] == [201, 422, 201, 422, 422, 201]
    assert {replies[k]["error"] for k in (1, 3, 4)} == {"validation_error"}
    stored = [r["client_order_id"] for r in await order_rows(amqp_platform)]
    assert stored == ["ok-0", "ok-2", "ok-5"]
