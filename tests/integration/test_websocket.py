"""The WebSocket hub over a real uvicorn server, real Redis pub/sub and the `websockets` client.

Redis is shared with other test sessions, so every test trades its own freshly made instrument and its users get
ids from a random range: nothing another session publishes can reach these clients.
"""

from __future__ import annotations

import asyncio
import random
import re
import secrets
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import httpx
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.integration.conftest import Actor, make_actor
from tests.integration.live_server import serving
from tradeplane.bootstrap import Platform
from tradeplane.entrypoints.api.app import create_app
from tradeplane.entrypoints.api.websocket import WebSocketHub
from tradeplane.entrypoints.api.ws_protocol import FanoutWebSocketProtocol
from tradeplane.services import demo
from tradeplane.services.identity import Role

WAIT_S = 20.0  # how long a test waits for something that must arrive (a hang guard, not a timing assertion)
SLOW_TEST_QUEUE_LIMIT = 64


@dataclass
class Server:
    url: str  # ws://.../ws
    http: str
    hub: WebSocketHub
    platform: Platform


# How `tradeplane run api` serves (frames encoded once per message and written straight to idle clients), and
# uvicorn's default protocol, where every message goes through ASGI `send`: the hub must behave the same on both.
SERVED_AS = {
    "prepared_frames": {"ws": FanoutWebSocketProtocol, "ws_per_message_deflate": False},
    "asgi_send": {},
}


@pytest.fixture(params=sorted(SERVED_AS))
async def server(platform: Platform, request: pytest.FixtureRequest) -> AsyncIterator[Server]:
    """The real app on a real port, with a small send queue so a slow consumer is quick to provoke."""
    app = create_app(platform)
    hub = WebSocketHub(platform, send_queue_limit=SLOW_TEST_QUEUE_LIMIT)
    app.state.websocket_hub = hub
    async with platform.db.transaction("test.ids") as conn:
        # Users get ids no other concurrently running test database hands out, so tp:user:<id> is ours alone.
        await conn.execute(f"ALTER TABLE users ALTER COLUMN id RESTART WITH {random.randrange(10**9, 2 * 10**9)}")
    async with serving(platform, app, **SERVED_AS[request.param]) as base_url:
        yield Server(base_url.replace("http://", "ws://") + "/ws", base_url, hub, platform)


async def make_symbol(platform: Platform) -> str:
    symbol = f"WS{uuid.uuid4().hex[:8].upper()}-USD"
    async with platform.db.transaction("test.instrument") as conn:
        await demo.load_reference_data(conn)
        await conn.execute(
            "INSERT INTO instruments (symbol, base_asset, quote_asset, tick_size, lot_size, min_qty, max_qty,"
            " price_band_pct, reference_price) VALUES ($1, 'BTC', 'USD', 0.01, 0.0001, 0.0001, 100, 10, 100)",
            symbol,
        )
    return symbol


async def receive(ws: ClientConnection) -> dict[str, Any]:
    message: dict[str, Any] = orjson.loads(await asyncio.wait_for(ws.recv(), WAIT_S))
    return message


async def request(ws: ClientConnection, **body: Any) -> dict[str, Any]:
    """Send one request and return the next message (the reply, when nothing else is flowing)."""
    await ws.send(orjson.dumps(body).decode())
    return await receive(ws)


async def receive_until(ws: ClientConnection, done: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    """Every message up to and including the first one for which `done` holds."""
    messages = []
    while True:
        message = await receive(ws)
        messages.append(message)
        if done(message):
            return messages


@pytest.fixture
async def alice(server: Server) -> Actor:
    return await make_actor(server.platform, "alice", Role.TRADER, with_account=True)


@pytest.fixture
async def bob(server: Server) -> Actor:
    return await make_actor(server.platform, "bob", Role.TRADER, with_account=True)


async def authenticated(server: Server, actor: Actor, **options: Any) -> ClientConnection:
    ws = await connect(server.url, **options)
    reply = await request(ws, op="auth", key=actor.key, id=1)
    assert reply == {"event": "authenticated", "user_id": actor.user_id, "role": "trader", "id": 1}
    return ws


async def publish(platform: Platform, channel: str, envelope: dict[str, Any]) -> None:
    await platform.cache.client.publish(channel, orjson.dumps(envelope))


# --- authentication ---------------------------------------------------------------------------------------


async def test_subscribing_needs_authentication(server: Server, alice: Actor) -> None:
    symbol = await make_symbol(server.platform)
    async with connect(server.url) as ws:
        reply = await request(ws, op="subscribe", channel="trades", symbol=symbol)
        assert reply["event"] == "error" and reply["error"] == "not_authenticated"
        reply = await request(ws, op="subscribe", channel="orders")
        assert reply["error"] == "not_authenticated"
        assert await request(ws, op="ping", id="p") == {"event": "pong", "id": "p"}
        # nothing published to the channel reaches an unauthenticated connection
        await publish(server.platform, f"tp:trades:{symbol}", {"channel": "trades", "symbol": symbol, "data": {}})
        assert await request(ws, op="ping") == {"event": "pong"}

    async with connect(server.url) as ws:
        reply = await request(ws, op="auth", key="tp_nope_" + secrets.token_urlsafe(32))
        assert reply["event"] == "error" and reply["error"] == "invalid_api_key"
        with pytest.raises(ConnectionClosed) as closed:
            await receive(ws)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001


async def test_api_key_in_the_upgrade_header(server: Server, alice: Actor) -> None:
    async with connect(server.url, additional_headers={"Authorization": f"Bearer {alice.key}"}) as ws:
        assert await receive(ws) == {"event": "authenticated", "user_id": alice.user_id, "role": "trader"}
        assert (await request(ws, op="subscribe", channel="fills"))["event"] == "subscribed"
        assert (await request(ws, op="auth", key=alice.key))["error"] == "already_authenticated"


async def test_malformed_requests_get_errors_and_the_connection_stays_usable(server: Server, alice: Actor) -> None:
    symbol = await make_symbol(server.platform)
    async with await authenticated(server, alice) as ws:
        await ws.send("{not json")
        assert (await receive(ws))["error"] == "bad_json"
        await ws.send("[1, 2]")
        assert (await receive(ws))["error"] == "bad_json"
        assert (await request(ws, op="dance"))["error"] == "unknown_op"
        assert (await request(ws, op="subscribe", channel="gossip", symbol=symbol))["error"] == "unknown_channel"
        assert (await request(ws, op="subscribe", channel="candles:M7", symbol=symbol))["error"] == "unknown_channel"
        assert (await request(ws, op="subscribe", channel="trades"))["error"] == "invalid_symbol"
        assert (await request(ws, op="subscribe", channel="trades", symbol="NOPE-USD"))["error"] == "unknown_symbol"
        assert (await request(ws, op="subscribe", channel="candles:M1", symbol=symbol))["event"] == "subscribed"


# --- private channels -------------------------------------------------------------------------------------


async def test_users_receive_only_their_own_private_events(server: Server, alice: Actor, bob: Actor) -> None:
    async with await authenticated(server, alice) as a, await authenticated(server, bob) as b:
        for channel in ("orders", "fills"):
            assert (await request(a, op="subscribe", channel=channel))["event"] == "subscribed"
        assert (await request(b, op="subscribe", channel="orders"))["event"] == "subscribed"
        # Bob tries to reach Alice's stream through the request: there is no way to name another user.
        assert (await request(b, op="subscribe", channel="orders", user_id=alice.user_id))["event"] == "subscribed"

        def event(channel: str, owner: Actor, n: int) -> dict[str, Any]:
            return {"channel": channel, "symbol": "BTC-USD", "data": {"account_id": owner.account_id, "n": n}}

        for n in range(5):
            await publish(server.platform, f"tp:user:{alice.user_id}", event("orders", alice, n))
            await publish(server.platform, f"tp:user:{alice.user_id}", event("fills", alice, n))
            await publish(server.platform, f"tp:user:{alice.user_id}", event("positions", alice, n))
            await publish(server.platform, f"tp:user:{bob.user_id}", event("orders", bob, n))
            await publish(server.platform, f"tp:user:{bob.user_id}", event("fills", bob, n))
        await publish(server.platform, f"tp:user:{alice.user_id}", event("orders", alice, 99))
        await publish(server.platform, f"tp:user:{bob.user_id}", event("orders", bob, 99))

        got_a = await receive_until(a, lambda m: m["data"]["n"] == 99)
        got_b = await receive_until(b, lambda m: m["data"]["n"] == 99)
        assert got_a == [event(c, alice, n) for n in range(5) for c in ("orders", "fills")] + [
            event("orders", alice, 99)
        ]
        assert got_b == [event("orders", bob, n) for n in range(5)] + [event("orders", bob, 99)]


# --- public channels ----------------------------------------------------------------------------------------


async def test_trades_fan_out_to_every_subscriber_over_one_redis_subscription(server: Server, alice: Actor) -> None:
    symbol = await make_symbol(server.platform)
    channel = f"tp:trades:{symbol}"
    clients = [await authenticated(server, alice) for _ in range(25)]
    try:
        for ws in clients:
            assert (await request(ws, op="subscribe", channel="trades", symbol=symbol))["event"] == "subscribed"
        assert await server.platform.cache.client.pubsub_numsub(channel) == [(channel.encode(), 1)]

        trades = [
            {"channel": "trades", "symbol": symbol, "data": {"trade_id": f"T{i}", "price": f"{100 + i}.00", "qty": "1"}}
            for i in range(40)
        ]
        for trade in trades:
            await publish(server.platform, channel, trade)
        for ws in clients:
            assert [await receive(ws) for _ in trades] == trades
    finally:
        for ws in clients:
            await ws.close()


async def test_unsubscribe_stops_delivery_and_the_last_one_out_leaves_redis(server: Server, alice: Actor) -> None:
    symbol = await make_symbol(server.platform)
    trades, quotes = f"tp:trades:{symbol}", f"tp:quotes:{symbol}"
    async with await authenticated(server, alice) as ws:
        await request(ws, op="subscribe", channel="trades", symbol=symbol)
        await request(ws, op="subscribe", channel="quotes", symbol=symbol)
        await publish(server.platform, trades, {"channel": "trades", "symbol": symbol, "data": {"n": 1}})
        assert (await receive(ws))["data"] == {"n": 1}

        reply = await request(ws, op="unsubscribe", channel="trades", symbol=symbol, id=7)
        assert reply == {"event": "unsubscribed", "channel": "trades", "symbol": symbol, "id": 7}
        await publish(server.platform, trades, {"channel": "trades", "symbol": symbol, "data": {"n": 2}})
        await publish(server.platform, quotes, {"channel": "quotes", "symbol": symbol, "data": {"n": 3}})
        assert await receive(ws) == {"channel": "quotes", "symbol": symbol, "data": {"n": 3}}
        assert trades not in server.hub.fanout.channels
        assert await server.platform.cache.client.pubsub_numsub(trades) == [(trades.encode(), 0)]
    # a client that disconnects gives up its subscriptions too
    for _ in range(200):
        if quotes not in server.hub.fanout.channels:
            break
        await asyncio.sleep(0.05)
    assert quotes not in server.hub.fanout.channels


# --- the book -----------------------------------------------------------------------------------------------


class BookPublisher:
    """Stands in for the engine: a random L2 book, each change published with seq + 1 and stored as snapshot."""

    def __init__(self, platform: Platform, symbol: str, *, atomic: bool) -> None:
        self.redis = platform.cache.client
        self.symbol = symbol
        self.atomic = atomic
        self.seq = 0
        self.bids: dict[str, str] = {}
        self.asks: dict[str, str] = {}
        self.rng = random.Random(7)

    def snapshot(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "bids": sorted(([p, q] for p, q in self.bids.items()), key=lambda lvl: -Decimal(lvl[0])),
            "asks": sorted(([p, q] for p, q in self.asks.items()), key=lambda lvl: Decimal(lvl[0])),
        }

    async def step(self, *, publish: bool = True) -> None:
        self.seq += 1
        side, book = (("bids", self.bids), ("asks", self.asks))[self.rng.randrange(2)]
        base = 99 if side == "bids" else 101
        price = f"{base + self.rng.randrange(-5, 6) / 10:.2f}"
        qty = "0" if price in book and self.rng.random() < 0.3 else str(self.rng.randrange(1, 50))
        if qty == "0":
            del book[price]
        else:
            book[price] = qty
        update = {"seq": self.seq, "bids": [], "asks": [], side: [[price, qty]]}
        pipe = self.redis.pipeline(transaction=self.atomic)
        envelope = orjson.dumps({"channel": "book", "symbol": self.symbol, "data": update})
        if self.atomic:
            pipe.set(f"tp:book:{self.symbol}:snapshot", orjson.dumps(self.snapshot()))
            if publish:
                pipe.publish(f"tp:book:{self.symbol}", envelope)
        else:
            # The worst order for a subscriber: the update is out before the snapshot that includes it.
            if publish:
                pipe.publish(f"tp:book:{self.symbol}", envelope)
            pipe.set(f"tp:book:{self.symbol}:snapshot", orjson.dumps(self.snapshot()))
        await pipe.execute()


class BookMirror:
    """A client's book, built only from what the hub sends; fails on a gap or a repeat."""

    def __init__(self) -> None:
        self.seq: int | None = None
        self.levels: dict[str, dict[str, str]] = {"bids": {}, "asks": {}}
        self.snapshots = 0

    def apply(self, message: dict[str, Any]) -> None:
        assert message["channel"] == "book"
        data = message["data"]
        if message["type"] == "snapshot":
            self.snapshots += 1
            self.seq = data["seq"]
            self.levels = {side: {p: q for p, q in data[side]} for side in ("bids", "asks")}
            return
        assert message["type"] == "update"
        assert self.seq is not None, "an update before the snapshot"
        assert data["seq"] == self.seq + 1, f"update {data['seq']} after {self.seq}"
        self.seq = data["seq"]
        for side in ("bids", "asks"):
            for price, qty in data[side]:
                if qty == "0":
                    self.levels[side].pop(price, None)
                else:
                    self.levels[side][price] = qty


@pytest.mark.parametrize("atomic", [True, False], ids=["set-and-publish-atomic", "publish-before-set"])
async def test_book_snapshot_then_increments_without_gap_under_concurrent_publishing(
    server: Server, alice: Actor, atomic: bool
) -> None:
    symbol = await make_symbol(server.platform)
    publisher = BookPublisher(server.platform, symbol, atomic=atomic)
    updates = 600

    async def publish_all() -> None:
        for _ in range(updates):
            await publisher.step()
            await asyncio.sleep(0)

    async def follow(delay: float) -> BookMirror:
        await asyncio.sleep(delay)
        mirror = BookMirror()
        async with await authenticated(server, alice) as ws:
            assert (await request(ws, op="subscribe", channel="book", symbol=symbol))["event"] == "subscribed"
            while mirror.seq != updates:
                mirror.apply(await receive(ws))
        return mirror

    publishing = asyncio.create_task(publish_all())
    mirrors = await asyncio.gather(*(follow(i * 0.03) for i in range(10)))
    await publishing
    final = publisher.snapshot()
    expected = {side: {p: q for p, q in final[side]} for side in ("bids", "asks")}
    for mirror in mirrors:
        assert mirror.levels == expected
        assert mirror.snapshots == 1  # nothing was lost, so no client needed a second snapshot


async def test_book_sends_a_fresh_snapshot_when_updates_have_a_gap(server: Server, alice: Actor) -> None:
    symbol = await make_symbol(server.platform)
    publisher = BookPublisher(server.platform, symbol, atomic=True)
    async with await authenticated(server, alice) as ws:
        assert (await request(ws, op="subscribe", channel="book", symbol=symbol))["event"] == "subscribed"
        first = await receive(ws)  # no book yet: an empty snapshot at seq 0
        assert first == {
            "channel": "book",
            "symbol": symbol,
            "type": "snapshot",
            "data": {"seq": 0, "bids": [], "asks": []},
        }
        mirror = BookMirror()
        mirror.apply(first)
        for _ in range(5):
            await publisher.step()
        await publisher.step(publish=False)  # seq 6 never reaches Redis subscribers: a lost message
        await publisher.step()
        await publisher.step()
        messages = []
        while mirror.seq != 8:
            messages.append(await receive(ws))
            mirror.apply(messages[-1])
        # updates 1-5, then (6 being lost) a snapshot at 7, or at 8 if the publisher got there first
        kinds = [(m["type"], m["data"]["seq"]) for m in messages]
        assert kinds in (
            [*(("update", n) for n in range(1, 6)), ("snapshot", 7), ("update", 8)],
            [*(("update", n) for n in range(1, 6)), ("snapshot", 8)],
        )
        final = publisher.snapshot()
        assert mirror.levels == {side: {p: q for p, q in final[side]} for side in ("bids", "asks")}


async def test_prepared_frames_go_only_to_connections_without_compression(platform: Platform) -> None:
    """Served as `run api` serves but with compression allowed: a client that negotiates permessage-deflate
    cannot take a frame encoded once for everyone and gets its messages through ASGI send; a plain client gets
    the shared frame. Both receive the same messages, in order."""
    app = create_app(platform)
    hub = WebSocketHub(platform)
    app.state.websocket_hub = hub
    actor = await make_actor(platform, "carol", Role.TRADER)
    symbol = await make_symbol(platform)
    async with serving(platform, app, ws=FanoutWebSocketProtocol, ws_per_message_deflate=True) as base_url:
        url = base_url.replace("http://", "ws://") + "/ws"
        deflating = await connect(url, compression="deflate")
        plain = await connect(url, compression=None)
        try:
            for ws in (deflating, plain):
                assert (await request(ws, op="auth", key=actor.key))["event"] == "authenticated"
                assert (await request(ws, op="subscribe", channel="trades", symbol=symbol))["event"] == "subscribed"
            by_port = {client.websocket.client.port: client for client in hub.clients if client.websocket.client}
            assert by_port[deflating.local_address[1]].write_prepared is None
            assert by_port[plain.local_address[1]].write_prepared is not None

            trades = [{"channel": "trades", "symbol": symbol, "data": {"n": i}} for i in range(30)]
            for trade in trades:
                await publish(platform, f"tp:trades:{symbol}", trade)
            for ws in (deflating, plain):
                assert [await receive(ws) for _ in trades] == trades
        finally:
            await deflating.close()
            await plain.close()


# --- back-pressure and metrics ------------------------------------------------------------------------------


async def test_a_slow_consumer_is_dropped_and_the_others_keep_receiving(server: Server, alice: Actor) -> None:
    symbol = await make_symbol(server.platform)
    channel = f"tp:trades:{symbol}"
    fast = await authenticated(server, alice, compression=None)
    # The slow client reads nothing: a tiny socket buffer and a one-message client queue make it back up quickly.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", int(server.url.split(":")[2].split("/")[0])))
    sock.setblocking(False)
    slow = await authenticated(server, alice, sock=sock, compression=None, max_queue=1, ping_interval=None)
    try:
        for ws in (fast, slow):
            assert (await request(ws, op="subscribe", channel="trades", symbol=symbol))["event"] == "subscribed"
        total = 3000
        filler = secrets.token_hex(2048)  # incompressible, 4 KiB

        async def publish_all() -> None:
            for i in range(total):
                await publish(
                    server.platform, channel, {"channel": "trades", "symbol": symbol, "data": {"n": i, "x": filler}}
                )
                if i % 50 == 0:
                    await asyncio.sleep(0)

        publishing = asyncio.create_task(publish_all())
        received = [(await receive(fast))["data"]["n"] for _ in range(total)]
        await publishing
        assert received == list(range(total))
        assert server.hub.slow_consumers_dropped == 1

        # The slow client, reading again, gets what was already on its way and then the close.
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await receive(slow)
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4008, "slow consumer")
        assert await request(fast, op="ping") == {"event": "pong"}
    finally:
        await fast.close()
        await slow.close()


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


async def test_websocket_metrics(server: Server, alice: Actor) -> None:
    symbol = await make_symbol(server.platform)

    async def scrape() -> str:
        async with httpx.AsyncClient() as http:
            return (await http.get(f"{server.http}/metrics")).text

    before = await scrape()
    a = await authenticated(server, alice)
    b = await authenticated(server, alice)
    await request(a, op="subscribe", channel="trades", symbol=symbol)
    await publish(server.platform, f"tp:trades:{symbol}", {"channel": "trades", "symbol": symbol, "data": {}})
    await receive(a)
    during = await scrape()
    assert metric(during, "websocket_connections") == metric(before, "websocket_connections") + 2
    # received: 2 auth + 1 subscribe; sent: 2 authenticated + 1 subscribed + 1 trade
    assert (
        metric(during, "websocket_messages_received_total") == metric(before, "websocket_messages_received_total") + 3
    )
    assert metric(during, "websocket_messages_sent_total") == metric(before, "websocket_messages_sent_total") + 4
    await a.close()
    await b.close()
    for _ in range(200):
        if metric(await scrape(), "websocket_connections") == metric(before, "websocket_connections"):
            break
        await asyncio.sleep(0.05)
    assert metric(await scrape(), "websocket_connections") == metric(before, "websocket_connections")
