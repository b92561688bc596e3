"""Execution reports grouped per Redis channel per batch, end to end: real engine, Redis, hub and RabbitMQ.

The engine sends one Redis message per channel per settled batch (workers.engine). What subscribers make of it
must not change: a WebSocket client gets one message per report, byte for byte and in the order separate
PUBLISHes used to give, only of the kinds it subscribed to; ``position_updates`` gets one message per position
change. The reference is computed here from each batch's settled result, the way the engine published before
grouping: one envelope per report, trades, then fills, then orders, then positions, each in result order.
Back-pressure holds too: a client that keeps up takes a batch larger than its send queue, one that falls behind
is still dropped as a slow consumer.

Redis is shared with other test sessions: every test lists its own instrument and its users get ids from a
random range, so nothing another session publishes reaches these subscribers.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import aio_pika
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests.integration.conftest import TEST_SECRET
from tests.integration.live_server import serving
from tests.integration.test_websocket import assert_dropped_as_slow, make_symbol, server_port, small_buffer_socket
from tradeplane.adapters.bus import create_bus
from tradeplane.adapters.bus.rabbitmq import RabbitMqBus
from tradeplane.bootstrap import Platform, build_platform
from tradeplane.config import Settings
from tradeplane.domain.orders import OrderType, Side
from tradeplane.domain.risk import OrderTerms
from tradeplane.entrypoints.api.app import create_app
from tradeplane.entrypoints.api.websocket import WebSocketHub
from tradeplane.entrypoints.api.ws_protocol import FanoutWebSocketProtocol
from tradeplane.entrypoints.workers.engine import EngineWorker, book_snapshot_key
from tradeplane.entrypoints.workers.order_queues import OrderQueueWorker
from tradeplane.services import accounts, identity
from tradeplane.services.identity import Principal, Role
from tradeplane.services.orders import OrderRequest, Placement, order_entry, submit_orders
from tradeplane.services.relay import OutboxRelay
from tradeplane.services.settlement import SettledBatch

WAIT_S = 20.0  # a hang guard for what must arrive, not a timing assertion
SEND_QUEUE_LIMIT = 8  # the hub's smallest: batches of reports larger than a client's whole send queue
D = Decimal
Report = tuple[str, bytes]  # (Redis channel, one envelope as the engine encodes it)


# --------------------------------------------------------------------------------------------- harness


def separate_reports(result: SettledBatch) -> list[Report]:
    """The batch's reports as the engine published them before grouping: one PUBLISH per report."""

    def envelope(kind: str, symbol: str, data: dict[str, Any]) -> bytes:
        return orjson.dumps({"channel": kind, "symbol": symbol, "data": data})

    reports = [(f"tp:trades:{t.symbol}", envelope("trades", t.symbol, t.to_public())) for t in result.trades]
    reports += [(f"tp:user:{f.user_id}", envelope("fills", f.symbol, f.to_public())) for f in result.fills]
    reports += [(f"tp:user:{o.user_id}", envelope("orders", o.symbol, o.to_public())) for o in result.orders]
    reports += [(f"tp:user:{p.user_id}", envelope("positions", p.symbol, p.to_public())) for p in result.positions]
    return [(channel, payload) for channel, payload in reports if channel != "tp:user:None"]


class RecordingEngine(EngineWorker):
    """The real engine worker; before publishing a batch it notes that batch's reports in the old form."""

    batches: list[list[Report]]

    async def _publish(self, result: SettledBatch) -> None:
        self.batches.append(separate_reports(result))
        await super()._publish(result)


@dataclass(frozen=True)
class Trader:
    principal: Principal
    key: str
    account_ids: tuple[int, ...]

    @property
    def channel(self) -> str:
        return f"tp:user:{self.principal.user_id}"


@dataclass
class Market:
    """One test's instrument, its traders, and the relay and engine that settle their orders."""

    platform: Platform
    symbol: str
    relay: OutboxRelay
    engine: RecordingEngine
    published: int = 0
    consumed: int = 0

    @property
    def trades_channel(self) -> str:
        return f"tp:trades:{self.symbol}"

    async def trader(self, name: str, accounts_n: int) -> Trader:
        async with self.platform.db.transaction("test.trader") as conn:
            user_id = await identity.create_user(conn, f"{name}-{uuid.uuid4().hex[:6]}", Role.TRADER)
            key = (await identity.issue_api_key(conn, TEST_SECRET, user_id, "test")).key
            ids = []
            for n in range(accounts_n):
                account_id = await accounts.create_account(conn, user_id, f"a{n}", "margin")
                await accounts.deposit(conn, account_id, D("100000"))
                ids.append(account_id)
        return Trader(Principal(user_id, name, Role.TRADER), key, tuple(ids))

    async def place(self, trader: Trader, orders: list[tuple[int, str, str, str]]) -> None:
        """One batch placement, as POST /orders/batch does it: (account index, side, quantity, price) each."""
        requests = [
            OrderRequest(
                trader.account_ids[k],
                self.symbol,
                OrderTerms(side=Side(side), order_type=OrderType.LIMIT, quantity=D(qty), price=D(price)),
            )
            for k, side, qty, price in orders
        ]
        outcomes = await submit_orders(self.platform.db, order_entry(self.platform), trader.principal, requests)
        assert all(isinstance(o, Placement) and o.rejection is None for o in outcomes), outcomes

    async def settle(self) -> None:
        """Relay every outbox row, then let the engine apply them all."""
        while published := await self.relay.publish_pending():
            self.published += published
        while self.consumed < self.published:
            self.consumed += await self.engine.step()

    async def trade(self) -> tuple[Trader, Trader]:
        """A maker rests four asks in one batch; a taker with two accounts sweeps them in the next one. The sweep
        gives four trades on the symbol and, on each user's channel, several fills, orders and positions."""
        maker = await self.trader("maker", 1)
        taker = await self.trader("taker", 2)
        await self.place(maker, [(0, "sell", "0.1", price) for price in ("100.00", "100.01", "100.02", "100.03")])
        await self.settle()
        await self.place(taker, [(0, "buy", "0.2", "100.03"), (1, "buy", "0.2", "100.03")])
        await self.settle()
        return maker, taker

    def reports(self, channel: str) -> list[bytes]:
        return [payload for batch in self.engine.batches for ch, payload in batch if ch == channel]


@asynccontextmanager
async def open_market(platform: Platform) -> AsyncIterator[Market]:
    symbol = await make_symbol(platform)
    async with platform.db.transaction("test.setup") as conn:
        # Users get ids no other concurrently running test database hands out, so tp:user:<id> is ours alone.
        await conn.execute(f"ALTER TABLE users ALTER COLUMN id RESTART WITH {random.randrange(10**9, 2 * 10**9)}")
    engine = RecordingEngine(platform.db, platform.cache, platform.bus, fetch_timeout=0.5)
    engine.batches = []
    await engine.rebuild()
    try:
        yield Market(platform, symbol, OutboxRelay(platform.db, platform.bus), engine)
    finally:
        await engine.close()
        await platform.cache.client.delete(book_snapshot_key(symbol))


@asynccontextmanager
async def platform_on(settings: Settings, bus_url: str) -> AsyncIterator[Platform]:
    """A started platform whose bus is `bus_url`, in a namespace of its own."""
    platform = build_platform(settings)
    platform.bus = create_bus(bus_url, namespace=f"rg{uuid.uuid4().hex[:10]}")
    await platform.start()
    await platform.bus.setup(1)
    yield platform
    await platform.bus.destroy(1)
    await platform.stop()


@pytest.fixture
async def nats_platform(settings: Settings, nats_url: str) -> AsyncIterator[Platform]:
    async with platform_on(settings, nats_url) as platform:
        yield platform


@pytest.fixture
async def market(nats_platform: Platform) -> AsyncIterator[Market]:
    async with open_market(nats_platform) as market:
        yield market


# How `tradeplane run api` serves (trades frames encoded once and written straight to idle clients), and
# uvicorn's default protocol (every message through ASGI send).
SERVED_AS = {
    "prepared_frames": {"ws": FanoutWebSocketProtocol, "ws_per_message_deflate": False},
    "asgi_send": {},
}


@dataclass
class Server:
    url: str
    hub: WebSocketHub


@pytest.fixture(params=sorted(SERVED_AS))
async def server(nats_platform: Platform, request: pytest.FixtureRequest) -> AsyncIterator[Server]:
    app = create_app(nats_platform)
    hub = WebSocketHub(nats_platform, send_queue_limit=SEND_QUEUE_LIMIT)
    app.state.websocket_hub = hub
    async with serving(nats_platform, app, **SERVED_AS[request.param]) as base_url:
        yield Server(base_url.replace("http://", "ws://") + "/ws", hub)


async def receive(ws: ClientConnection) -> str:
    text = await asyncio.wait_for(ws.recv(), WAIT_S)
    assert isinstance(text, str)
    return text


async def subscriber(
    server: Server, trader: Trader, *subscriptions: tuple[str, str | None], **options: Any
) -> ClientConnection:
    ws = await connect(server.url, additional_headers={"Authorization": f"Bearer {trader.key}"}, **options)
    assert orjson.loads(await receive(ws))["event"] == "authenticated"
    for channel, symbol in subscriptions:
        await ws.send(orjson.dumps({"op": "subscribe", "channel": channel, "symbol": symbol}).decode())
        assert orjson.loads(await receive(ws)) == {"event": "subscribed", "channel": channel, "symbol": symbol}
    return ws


async def everything_sent(server: Server, ws: ClientConnection) -> list[str]:
    """Every data message the hub sent `ws` so far: once the hub has taken all that Redis published (barrier),
    a ping's pong comes after whatever the hub wrote or queued for this client."""
    await server.hub.fanout.barrier()
    await ws.send('{"op": "ping"}')
    got = []
    while (text := await receive(ws)) != '{"event":"pong"}':
        got.append(text)
    return got


def envelopes(payload: bytes) -> list[bytes]:
    """The envelopes of one Redis message, each as the engine encodes a single one."""
    decoded = orjson.loads(payload)
    return [orjson.dumps(e) for e in decoded] if isinstance(decoded, list) else [payload]


def kinds(reports: list[bytes]) -> list[str]:
    return [orjson.loads(r)["channel"] for r in reports]


# ----------------------------------------------------------------------------------------------- tests


async def test_the_engine_sends_one_message_per_channel_per_batch(market: Market) -> None:
    redis = market.platform.cache.client
    marker = f"tp:test:{uuid.uuid4().hex}"
    pubsub = redis.pubsub()
    await pubsub.psubscribe("tp:user:*")
    await pubsub.subscribe(market.trades_channel, marker)
    try:
        maker, taker = await market.trade()
        await redis.publish(marker, b"end")
        messages: dict[str, list[bytes]] = {}
        deadline = asyncio.get_running_loop().time() + WAIT_S
        while True:
            assert asyncio.get_running_loop().time() < deadline, f"Redis did not deliver the marker; got {messages}"
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
            if message is None:  # nothing yet, or a subscription confirmation
                continue
            channel = message["channel"].decode()
            if channel == marker:
                break
            messages.setdefault(channel, []).append(message["data"])
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]

    # The sweep's batch: 4 trades, the taker's 4 fills + 2 orders + 2 positions, the maker's 4 + 4 + 1.
    assert kinds(market.reports(market.trades_channel)) == ["trades"] * 4
    assert kinds(market.reports(taker.channel)) == ["fills"] * 4 + ["orders"] * 2 + ["positions"] * 2
    assert kinds(market.reports(maker.channel)) == ["orders"] * 4 + ["fills"] * 4 + ["orders"] * 4 + ["positions"]
    for channel in (market.trades_channel, taker.channel, maker.channel):
        batches_with_reports = sum(any(ch == channel for ch, _ in batch) for batch in market.engine.batches)
        assert len(messages[channel]) == batches_with_reports, f"{channel}: one message per batch"
        assert [e for m in messages[channel] for e in envelopes(m)] == market.reports(channel)
    assert messages[market.trades_channel][-1].startswith(b"[")  # the grouped form was on the wire


async def test_websocket_clients_get_every_report_once_in_order_as_before(server: Server, market: Market) -> None:
    trades_only = await subscriber(server, await market.trader("watcher", 0), ("trades", market.symbol))
    taker = await market.trader("taker", 2)
    maker = await market.trader("maker", 1)
    everything = await subscriber(
        server, taker, ("trades", market.symbol), ("orders", None), ("fills", None), ("positions", None)
    )
    fills_only = await subscriber(server, taker, ("fills", None))
    maker_private = await subscriber(server, maker, ("positions", None), ("orders", None))
    try:
        await market.place(maker, [(0, "sell", "0.1", price) for price in ("100.00", "100.01", "100.02", "100.03")])
        await market.settle()
        await market.place(taker, [(0, "buy", "0.2", "100.03"), (1, "buy", "0.2", "100.03")])
        await market.settle()

        def old_sequence(channels: set[str], wanted: set[str]) -> list[str]:
            """What separate PUBLISHes delivered to a client of `channels` subscribed to the kinds `wanted`."""
            return [
                payload.decode()
                for batch in market.engine.batches
                for channel, payload in batch
                if channel in channels and orjson.loads(payload)["channel"] in wanted
            ]

        # A client of trades and every private kind got the batch's trades first, then its own reports.
        all_kinds = {"trades", "orders", "fills", "positions"}
        trades_then_private = old_sequence({market.trades_channel, taker.channel}, all_kinds)
        assert kinds([t.encode() for t in trades_then_private]) == (
            ["trades"] * 4 + ["fills"] * 4 + ["orders"] * 2 + ["positions"] * 2
        )
        assert await everything_sent(server, everything) == trades_then_private
        only_fills = await everything_sent(server, fills_only)
        assert only_fills == old_sequence({taker.channel}, {"fills"})
        assert kinds([t.encode() for t in only_fills]) == ["fills"] * 4
        assert await everything_sent(server, maker_private) == old_sequence({maker.channel}, {"orders", "positions"})
        assert await everything_sent(server, trades_only) == old_sequence({market.trades_channel}, {"trades"})
    finally:
        for ws in (trades_only, everything, fills_only, maker_private):
            await ws.close()


async def test_malformed_grouped_payloads_are_logged_and_dropped(
    server: Server, market: Market, caplog: pytest.LogCaptureFixture
) -> None:
    trader = await market.trader("alice", 1)
    ws = await subscriber(server, trader, ("fills", None), ("orders", None), ("trades", market.symbol))
    redis = market.platform.cache.client
    fill = {"channel": "fills", "symbol": market.symbol, "data": {"fill_id": "f-1", "price": "100.00"}}
    order = {"channel": "orders", "symbol": market.symbol, "data": {"id": 7, "status": "filled"}}
    trade = {"channel": "trades", "symbol": market.symbol, "data": {"trade_id": "t-1", "price": "100.00"}}
    try:
        with caplog.at_level(logging.WARNING, logger="tradeplane.websocket"):
            await redis.publish(trader.channel, b"[not json")
            await redis.publish(trader.channel, orjson.dumps([1, fill, {"data": {}}, order, "orders"]))
            await redis.publish(trader.channel, b'{"no": "channel"}')
            await redis.publish(market.trades_channel, b"[{]")
            await redis.publish(market.trades_channel, orjson.dumps([trade, None]))
            await redis.publish(trader.channel, orjson.dumps(fill))
            got = await everything_sent(server, ws)
        assert got == [orjson.dumps(e).decode() for e in (fill, order, trade, fill)]
        warnings = [r.getMessage() for r in caplog.records if r.name == "tradeplane.websocket"]
        assert len(warnings) == 5, warnings  # two undecodable, two arrays with bad elements, one non-envelope
    finally:
        await ws.close()


async def test_a_client_that_keeps_up_takes_a_batch_larger_than_its_send_queue(server: Server, market: Market) -> None:
    """The hub's bound is checked once per Redis message: a batch of reports bigger than the whole send queue
    reaches a client that keeps up, as the same reports did one message each."""
    trader = await market.trader("alice", 1)
    ws = await subscriber(server, trader, ("fills", None), ("trades", market.symbol))
    fills = [{"channel": "fills", "symbol": market.symbol, "data": {"n": n}} for n in range(6 * SEND_QUEUE_LIMIT)]
    trades = [{"channel": "trades", "symbol": market.symbol, "data": {"n": n}} for n in range(6 * SEND_QUEUE_LIMIT)]
    try:
        await market.platform.cache.client.publish(trader.channel, orjson.dumps(fills))
        await market.platform.cache.client.publish(market.trades_channel, orjson.dumps(trades))
        got = await everything_sent(server, ws)
        assert got == [orjson.dumps(e).decode() for e in fills + trades]
        assert server.hub.slow_consumers_dropped == 0
    finally:
        await ws.close()


async def test_a_client_that_falls_behind_is_dropped_and_the_others_keep_receiving(
    server: Server, market: Market
) -> None:
    trader = await market.trader("alice", 1)
    fast = await subscriber(server, trader, ("fills", None), compression=None)
    # The slow client reads nothing: a tiny socket buffer and a one-message client queue make it back up quickly.
    sock = small_buffer_socket(server_port(server))
    slow = await subscriber(
        server, trader, ("fills", None), sock=sock, compression=None, max_queue=1, ping_interval=None
    )
    filler = secrets.token_hex(2048)  # incompressible, 4 KiB
    size = 2 * SEND_QUEUE_LIMIT
    try:
        # In step with the fast client, which so keeps up by construction, until the slow one is dropped.
        for batch in range(1000):
            group = [{"channel": "fills", "data": {"n": batch * size + i, "x": filler}} for i in range(size)]
            await market.platform.cache.client.publish(trader.channel, orjson.dumps(group))
            received = [orjson.loads(await receive(fast))["data"]["n"] for _ in range(size)]
            assert received == [batch * size + i for i in range(size)]
            if server.hub.slow_consumers_dropped:
                break
        assert server.hub.slow_consumers_dropped == 1
        await assert_dropped_as_slow(slow)
        assert await everything_sent(server, fast) == []  # still served, nothing left over
    finally:
        await fast.close()
        await slow.close()


# ---------------------------------------------------------------------------------------- position_updates


@pytest.fixture
async def amqp_platform(settings: Settings, amqp_url: str) -> AsyncIterator[Platform]:
    async with platform_on(settings.with_urls(bus_url=amqp_url), amqp_url) as platform:
        yield platform


async def test_position_updates_get_one_message_per_position_change_in_order(
    amqp_platform: Platform, amqp_url: str
) -> None:
    worker = OrderQueueWorker(amqp_platform)
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    connection = await aio_pika.connect_robust(amqp_url)
    try:
        await asyncio.wait_for(worker.ready.wait(), WAIT_S)
        async with open_market(amqp_platform) as market:
            maker, taker = await market.trade()
            # The worker handles events in order: once this marker is out, every earlier position is too.
            marker = {"channel": "positions", "symbol": "MARKER", "data": {}}
            await amqp_platform.cache.client.publish(taker.channel, orjson.dumps(marker))
            channel = await connection.channel()
            assert isinstance(amqp_platform.bus, RabbitMqBus)
            queue = await channel.get_queue(amqp_platform.bus.name("position_updates"))
            ours: list[bytes] = []
            for _ in range(int(WAIT_S / 0.05)):
                message = await queue.get(no_ack=True, fail=False)
                if message is None:
                    await asyncio.sleep(0.05)
                    continue
                body = orjson.loads(message.body)
                if body["symbol"] == "MARKER" and body["user_id"] == taker.principal.user_id:
                    break
                if body["user_id"] in (maker.principal.user_id, taker.principal.user_id):
                    ours.append(message.body)
            else:
                raise AssertionError(f"position_updates did not deliver the marker; got {ours}")
            expected = [
                orjson.dumps({"user_id": int(ch.rsplit(":", 1)[1]), **orjson.loads(payload)})
                for batch in market.engine.batches
                for ch, payload in batch
                if ch in (maker.channel, taker.channel) and orjson.loads(payload)["channel"] == "positions"
            ]
            assert len(expected) == 3  # the taker's two accounts and the maker's one
            assert ours == expected
    finally:
        await connection.close()
        stop.set()
        await running
