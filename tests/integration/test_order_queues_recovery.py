"""The RabbitMQ order-entry worker outlives the broker connection: when the connection drops while a command is
being applied (so its ack is lost) the worker reconnects, the command comes back and is not applied twice, and
later commands are served. Real RabbitMQ, PostgreSQL and Redis; the worker reaches RabbitMQ through a TCP proxy
that the test cuts, as a lost network path or a broker restart would."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from tests.integration.conftest import Actor, make_actor
from tests.integration.tcp_proxy import TcpProxy, tcp_proxy
from tests.integration.test_order_queues import WAIT_S, Requester, open_requester, order_rows, placement
from tradeplane.adapters.bus import create_bus
from tradeplane.bootstrap import Platform, build_platform
from tradeplane.config import Settings
from tradeplane.entrypoints.workers.order_queues import OrderQueueWorker
from tradeplane.services import accounts
from tradeplane.services.identity import Role


def through(proxy: TcpProxy, amqp_url: str) -> str:
    """`amqp_url` by way of the proxy, reconnecting quickly (aio-pika waits 5 s between attempts by default)."""
    parts = urlsplit(amqp_url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@127.0.0.1:{proxy.port}" if userinfo else f"127.0.0.1:{proxy.port}"
    return urlunsplit((parts.scheme, netloc, parts.path or "/", "reconnect_interval=0.2", ""))


@dataclass
class Rig:
    platform: Platform
    proxy: TcpProxy
    worker: OrderQueueWorker
    running: asyncio.Task[None]
    requester: Requester
    trader: Actor


@pytest.fixture
async def s(settings: Settings, amqp_url: str) -> AsyncIterator[Rig]:
    parts = urlsplit(amqp_url)
    async with tcp_proxy(parts.hostname or "127.0.0.1", parts.port or 5672) as proxy:
        url = through(proxy, amqp_url)
        platform = build_platform(settings.with_urls(bus_url=url))
        platform.bus = create_bus(url, namespace=f"tq{uuid.uuid4().hex[:10]}")
        await platform.start()
        await platform.bus.setup(1)
        async with platform.db.transaction("test.ids") as conn:
            await conn.execute(f"ALTER TABLE users ALTER COLUMN id RESTART WITH {random.randrange(10**9, 2 * 10**9)}")
        trader = await make_actor(platform, "carol", Role.TRADER, with_account=True)
        assert trader.account_id is not None
        async with platform.db.transaction("test.deposit") as conn:
            await accounts.deposit(conn, trader.account_id, Decimal("100000.00"))
        worker = OrderQueueWorker(platform)
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        await asyncio.wait_for(worker.ready.wait(), WAIT_S)
        try:
            async with open_requester(platform, amqp_url) as requester:  # straight to RabbitMQ, not cut
                yield Rig(platform, proxy, worker, running, requester, trader)
        finally:
            stop.set()
            await asyncio.gather(running, return_exceptions=True)
            await platform.bus.destroy(1)
            await platform.stop()


async def held(platform: Platform, lock: str, *args: Any) -> tuple[asyncpg.Connection, Any]:
    """A connection in a transaction holding `lock` (a statement); roll back to let the worker through."""
    conn = await asyncpg.connect(platform.db.url)
    tx = conn.transaction()
    await tx.start()
    await conn.execute(lock, *args)
    return conn, tx


async def until_blocked(platform: Platform) -> None:
    """Until a session of this test's database waits for a lock: the worker is applying the command."""
    async with asyncio.timeout(WAIT_S):
        while True:
            async with platform.db.connection("test.locks") as conn:
                waiting = await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE wait_event_type = 'Lock' AND datname = current_database()"
                )
            if waiting:
                return
            await asyncio.sleep(0.5)


async def answer_after_lost_ack(s: Rig, routing_key: str, command: dict[str, Any], lock: str, *args: Any) -> Any:
    """Send `command` while `lock` keeps it from committing, drop the worker's connection, then let it commit:
        its ack is lost with the connection, and RabbitMQ delivers it again. The reply the requester gets (the reply
    to the first copy may be lost too), once the worker has answered both copies."""
    handled = s.worker.handled
    conn = await asyncpg.connect(s.platform.db.url)
    try:
        async with conn.transaction():
            await conn.execute(lock, *args)
            call = asyncio.ensure_future(s.requester.call(routing_key, command, message_id=uuid.uuid4().hex))
            await until_blocked(s.platform)
            s.proxy.cut()
    finally:
        await conn.close()
    reply = await call
    for _ in range(int(WAIT_S / 0.02)):  # the copy whose ack was lost and the one RabbitMQ delivered again
        if s.worker.handled >= handled + 2:
            break
        await asyncio.sleep(0.02)
    assert s.worker.handled >= handled + 2
    return reply


async def test_a_placement_whose_ack_is_lost_is_placed_once_and_the_worker_goes_on(s: Rig) -> None:
    lock = "LOCK TABLE orders IN SHARE MODE"
    reply = await answer_after_lost_ack(s, "order.place", placement(s.trader), lock)
    # the redelivered message's answer: the order placed before the connection dropped
    assert reply["status"] == 200, reply
    assert [r["id"] for r in await order_rows(s.platform)] == [reply["order"]["id"]]
    assert s.proxy.connections >= 2  # it did reconnect

    after = await s.requester.call("order.place", placement(s.trader, client_order_id="after"))
    assert after["status"] == 201
    assert not s.running.done()


ROW_LOCK = "SELECT 1 FROM orders WHERE id = $1 FOR UPDATE"


async def outbox_kinds(platform: Platform) -> list[str]:
    async with platform.db.connection("test.outbox") as conn:
        return [r["kind"] for r in await conn.fetch("SELECT payload->>'type' AS kind FROM outbox ORDER BY id")]


async def test_a_modification_whose_ack_is_lost_is_applied_once_and_the_worker_goes_on(s: Rig) -> None:
    order_id = (await s.requester.call("order.place", placement(s.trader)))["order"]["id"]
    modify = {"api_key": s.trader.key, "order_id": order_id, "price": "64000.00"}
    reply = await answer_after_lost_ack(s, "order.modify", modify, ROW_LOCK, order_id)
    assert reply["status"] == 200 and reply["order"]["id"] == order_id, reply
    assert await outbox_kinds(s.platform) == ["new", "modify"]  # the engine is asked once
    assert s.proxy.connections >= 2

    again = await s.requester.call("order.modify", {**modify, "price": "63000.00"})
    assert again["status"] == 200
    assert not s.running.done()


async def test_a_cancellation_whose_ack_is_lost_is_applied_once_and_the_worker_goes_on(s: Rig) -> None:
    order_id = (await s.requester.call("order.place", placement(s.trader)))["order"]["id"]
    cancel = {"api_key": s.trader.key, "order_id": order_id}
    reply = await answer_after_lost_ack(s, "order.cancel", cancel, ROW_LOCK, order_id)
    assert reply["status"] == 200 and reply["order"]["status"] == "pending_cancel", reply
    assert await outbox_kinds(s.platform) == ["new", "cancel"]
    assert s.proxy.connections >= 2

    second = (await s.requester.call("order.place", placement(s.trader)))["order"]["id"]
    again = await s.requester.call("order.cancel", {**cancel, "order_id": second})
    assert again["status"] == 200
    assert not s.running.done()


async def test_placements_after_one_that_met_an_outage_wait_for_it(s: Rig) -> None:
    """A placement fails for want of PostgreSQL while later ones are already delivered: those must not be
    placed ahead of it. Each order is placed once, in the order the messages were sent."""
    conn = await asyncpg.connect(s.platform.db.url)
    try:
        async with conn.transaction():
            await conn.execute("LOCK TABLE orders IN SHARE MODE")
            calls = [asyncio.ensure_future(s.requester.call("order.place", placement(s.trader, client_order_id="a")))]
            await until_blocked(s.platform)  # "a" is being placed
            calls += [
                asyncio.ensure_future(s.requester.call("order.place", placement(s.trader, client_order_id=cid)))
                for cid in ("b", "c")
            ]
            # Refusals are answered at once and messages are decoded in delivery order: once this one is
            # answered, the worker has taken "b" and "c" too.
            refused = await s.requester.call("order.place", placement(s.trader, side="sideways"))
            assert refused["status"] == 422
            # PostgreSQL drops the connection placing "a" (as in a failover): "a" fails with 503 inside.
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
    finally:
        await conn.close()

    replies = await asyncio.gather(*calls)
    assert [r["status"] for r in replies] == [201, 201, 201], replies
    rows = await order_rows(s.platform)
    assert [r["client_order_id"] for r in rows] == ["a", "b", "c"]  # ids in the order the messages were sent
    assert not s.running.done()


async def test_modifications_after_one_that_met_an_outage_wait_for_it(s: Rig) -> None:
    """Two modifications of one order, the first meeting a dropped PostgreSQL connection: the second must not
    be applied before it, or the order ends at the price the client changed away from."""
    order_id = (await s.requester.call("order.place", placement(s.trader)))["order"]["id"]
    conn = await asyncpg.connect(s.platform.db.url)
    try:
        async with conn.transaction():
            await conn.execute(ROW_LOCK, order_id)
            calls = [
                asyncio.ensure_future(
                    s.requester.call("order.modify", {"api_key": s.trader.key, "order_id": order_id, "price": price})
                )
                for price in ("64000.00", "63000.00")
            ]
            await until_blocked(s.platform)  # the first is being applied
            async with asyncio.timeout(WAIT_S):  # and the second delivered to the worker, waiting behind it
                while True:
                    queue = await s.requester.channel.declare_queue(
                        s.platform.bus.name("order_modification"), passive=True
                    )
                    if queue.declaration_result.message_count == 0:
                        break
                    await asyncio.sleep(0.02)
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
    finally:
        await conn.close()

    replies = await asyncio.gather(*calls)
    assert [r["status"] for r in replies] == [200, 200], replies
    async with s.platform.db.connection("test.modifies") as db:
        prices = [
            r["price"]
            for r in await db.fetch(
                "SELECT payload->>'new_price' AS price FROM outbox WHERE payload->>'type' = 'modify' ORDER BY id"
            )
        ]
        target = await db.fetchval("SELECT target_price FROM orders WHERE id = $1", order_id)
    assert prices == ["64000", "63000"]  # asked of the engine in the order the client sent them
    assert target == Decimal("63000")
    assert not s.running.done()


async def test_commands_sent_while_rabbitmq_is_away_are_served_when_it_is_back(s: Rig) -> None:
    s.proxy.accepting.clear()
    s.proxy.cut()
    commands = [
        asyncio.ensure_future(s.requester.call("order.place", placement(s.trader, client_order_id="during"))),
    ]
    for _ in range(int(WAIT_S / 0.05)):  # the worker keeps trying to reconnect
        if s.proxy.refused >= 3:
            break
        await asyncio.sleep(0.05)
    assert s.proxy.refused >= 3
    s.proxy.accepting.set()
    [placed] = await asyncio.gather(*commands)
    assert placed["status"] == 201
    cancel = {"api_key": s.trader.key, "order_id": placed["order"]["id"]}
    assert (await s.requester.call("order.cancel", cancel))["status"] == 200
    assert not s.running.done()
