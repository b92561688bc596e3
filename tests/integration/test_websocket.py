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
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

from tests.integration.conftest import Actor, make_actor
from tests.integration.live_server import serving
from tradeplane.bootstrap import Platform
from tradeplane.entrypoints.api import websocket as hub_module
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


def small_buffer_socket(port: int) -> socket.socket:
    """A non-blocking socket connected to the server with a 4 KiB receive buffer: a WebSocket client on it that
    stops reading backs up quickly (the tests also give it a one-message client queue)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


def server_port(server: Server) -> int:
    return int(server.url.split(":")[2].split("/")[0])


async def assert_dropped_as_slow(ws: ClientConnection) -> None:
    """Reading again, a dropped client gets what was already on its way and then the slow-consumer close."""
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            await receive(ws)
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4008, "slow consumer")


def hub_side(hub: WebSocketHub, local_port: int) -> hub_module.ClientConnection:
    """The hub's record of the client connected from `local_port`."""
    (found,) = [c for c in hub.clients if c.websocket.client and c.websocket.client.port == local_port]
    return found


class HandDrivenClient:
    """A WebSocket client that does only what the test says: websockets' sans-I/O protocol over a plain socket.

    It reads from the socket only when asked, answers a ping or a close only when the test flushes, and shows
    every frame the server sends."""

    def __init__(self, url: str, *, receive_buffer: int | None = None) -> None:
        self.url = url
        self.protocol = ClientProtocol(parse_uri(url))
        self.pending: list[Frame] = []
        self.received = bytearray()  # every byte from the server: the parser ignores what follows a close frame
        self.sock = socket.socket()
        if receive_buffer is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.setblocking(False)

    async def connect(self) -> None:
        host, port = self.url.split("/")[2].split(":")
        await asyncio.get_running_loop().sock_connect(self.sock, (host, int(port)))
        self.protocol.send_request(self.protocol.connect())
        await self.flush()
        while True:
            events = await self._read()
            assert events is not None, "the server closed the connection during the handshake"
            if any(isinstance(event, Response) for event in events):
                return

    @property
    def local_port(self) -> int:
        return int(self.sock.getsockname()[1])

    async def flush(self) -> None:
        for data in self.protocol.data_to_send():
            if data:
                await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def request(self, **body: Any) -> dict[str, Any]:
        self.protocol.send_text(orjson.dumps(body))
        await self.flush()
        frame = await self.frame()
        assert frame is not None and frame.opcode is Opcode.TEXT
        reply: dict[str, Any] = orjson.loads(frame.data)
        return reply

    async def frame(self) -> Frame | None:
        """The next frame from the server; None once the server has closed the TCP connection."""
        while not self.pending:
            events = await self._read()
            if events is None:
                return None
            self.pending.extend(event for event in events if isinstance(event, Frame))
        return self.pending.pop(0)

    async def _read(self) -> list[object] | None:
        data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(self.sock, 65536), WAIT_S)
        if not data:
            return None
        self.received += data
        self.protocol.receive_data(data)
        return list(self.protocol.events_received())

    def close(self) -> None:
        self.sock.close()


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
            assert by_port[deflating.local_address[1]].write_frame is None
            assert by_port[plain.local_address[1]].write_frame is not None

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
    sock = small_buffer_socket(server_port(server))
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

        await assert_dropped_as_slow(slow)
        assert await request(fast, op="ping") == {"event": "pong"}
    finally:
        await fast.close()
        await slow.close()


async def test_a_client_that_stops_reading_for_a_while_gets_every_message_in_order(
    server: Server, alice: Actor
) -> None:
    """A client whose socket fills up is written to through its queue until it catches up, then straight to the
    socket again (prepared frames); nothing is lost, repeated or reordered on the way, and it is not dropped."""
    symbol = await make_symbol(server.platform)
    channel = f"tp:trades:{symbol}"
    fast = await authenticated(server, alice, compression=None)
    sock = small_buffer_socket(server_port(server))
    paused = await authenticated(server, alice, sock=sock, compression=None, max_queue=1, ping_interval=None)
    try:
        for ws in (fast, paused):
            assert (await request(ws, op="subscribe", channel="trades", symbol=symbol))["event"] == "subscribed"
        on_hub = hub_side(server.hub, paused.local_address[1])
        prepared = on_hub.write_frame is not None
        filler = secrets.token_hex(8192)  # 16 KiB

        def trade(n: int) -> dict[str, Any]:
            return {"channel": "trades", "symbol": symbol, "data": {"n": n, "x": filler}}

        # `paused` reads one message and then nothing: publish until the hub has to queue for it.
        published = 0
        while on_hub.outbox.empty():
            assert published < 2000, "the paused client's socket never filled up"
            await publish(server.platform, channel, trade(published))
            assert (await receive(fast))["data"]["n"] == published  # the hub has handed it out
            published += 1
        if prepared:
            assert not on_hub.link_ready and not on_hub.direct  # flow control told the hub to stop writing
        for _ in range(10):  # and a few more behind the queued ones
            await publish(server.platform, channel, trade(published))
            assert (await receive(fast))["data"]["n"] == published
            published += 1
        assert server.hub.slow_consumers_dropped == 0

        assert [(await receive(paused))["data"]["n"] for _ in range(published)] == list(range(published))
        await publish(server.platform, channel, {"channel": "trades", "symbol": symbol, "data": {"n": "after"}})
        for ws in (fast, paused):
            assert (await receive(ws))["data"] == {"n": "after"}
        if prepared:
            for _ in range(int(WAIT_S / 0.01)):  # caught up: back to writing straight to the socket
                if on_hub.direct:
                    break
                await asyncio.sleep(0.01)
            assert on_hub.direct and on_hub.link_ready
        assert server.hub.slow_consumers_dropped == 0
    finally:
        await fast.close()
        await paused.close()


async def test_order_holds_for_a_client_whose_socket_keeps_filling_and_draining(platform: Platform) -> None:
    """A client that reads in fits and starts: its socket fills (the hub queues), drains (the hub writes straight
    to it again), over and over while messages keep coming. Every switch between the two paths keeps the order."""
    app = create_app(platform)
    hub = WebSocketHub(platform, send_queue_limit=100_000)
    app.state.websocket_hub = hub
    actor = await make_actor(platform, "frank", Role.TRADER)
    symbol = await make_symbol(platform)
    channel = f"tp:trades:{symbol}"
    total = 3000
    async with serving(platform, app, ws=FanoutWebSocketProtocol, ws_per_message_deflate=False) as base_url:
        sock = small_buffer_socket(int(base_url.rsplit(":", 1)[1]))
        url = base_url.replace("http://", "ws://") + "/ws"
        ws = await connect(url, sock=sock, compression=None, max_queue=1, ping_interval=None)
        try:
            assert (await request(ws, op="auth", key=actor.key))["event"] == "authenticated"
            assert (await request(ws, op="subscribe", channel="trades", symbol=symbol))["event"] == "subscribed"
            filler = secrets.token_hex(4096)

            async def publish_all() -> None:
                for start in range(0, total, 25):
                    pipe = platform.cache.client.pipeline(transaction=False)
                    for n in range(start, start + 25):
                        pipe.publish(channel, orjson.dumps({"channel": "trades", "data": {"n": n, "x": filler}}))
                    await pipe.execute()
                    await asyncio.sleep(0.001)

            publishing = asyncio.create_task(publish_all())
            received = []
            for i in range(total):
                received.append((await receive(ws))["data"]["n"])
                if i % 40 == 0:
                    await asyncio.sleep(0.005)  # stop reading for a moment: the socket fills up
            await publishing
            assert received == list(range(total))
        finally:
            await ws.close()


@pytest.mark.parametrize("ending", ["client_closes", "keepalive_timeout"])
async def test_no_data_frame_follows_the_close_frame_while_frames_are_still_in_flight(
    platform: Platform, ending: str
) -> None:
    """The connection starts closing (the client sends a close, or misses the keepalive pong) while the server
    still has frames for it in its write buffer: the close frame goes out after those, and the hub must stop
    writing straight to the socket at once, or a message fanned out meanwhile would follow the close frame."""
    app = create_app(platform)
    hub = WebSocketHub(platform)
    app.state.websocket_hub = hub
    actor = await make_actor(platform, "erin", Role.TRADER)
    symbol = await make_symbol(platform)
    channel = f"tp:trades:{symbol}"
    keepalive = {"ws_ping_interval": 2.0, "ws_ping_timeout": 2.0} if ending == "keepalive_timeout" else {}
    async with serving(platform, app, ws=FanoutWebSocketProtocol, ws_per_message_deflate=False, **keepalive) as base:
        url = base.replace("http://", "ws://") + "/ws"
        watcher = await connect(url)  # gets every message too: once it has one, the hub has handed it out
        client = HandDrivenClient(url, receive_buffer=4096)
        await client.connect()
        try:
            assert (await request(watcher, op="auth", key=actor.key))["event"] == "authenticated"
            assert (await client.request(op="auth", key=actor.key))["event"] == "authenticated"
            assert (await request(watcher, op="subscribe", channel="trades", symbol=symbol))["event"] == "subscribed"
            assert (await client.request(op="subscribe", channel="trades", symbol=symbol))["event"] == "subscribed"
            on_hub = hub_side(hub, client.local_port)
            assert on_hub.direct and on_hub.write_frame is not None
            transport = on_hub.write_frame.__self__  # type: ignore[attr-defined]

            filler = secrets.token_hex(1024)
            published = 0
            while not transport.get_write_buffer_size():  # the client reads nothing: its socket fills up
                assert published < 5000, "the client's socket never filled up"
                trade = {"channel": "trades", "symbol": symbol, "data": {"n": published, "x": filler}}
                await publish(platform, channel, trade)
                assert (await receive(watcher))["data"]["n"] == published
                published += 1
            # Bytes waiting in the transport: the hub queues from now on, a write to the socket would overtake them.
            assert not on_hub.direct

            if ending == "client_closes":
                client.protocol.send_close(1000, "bye")
                await client.flush()
            # else: never flushed, so no pong goes back and the server gives up after the ping timeout
            # Checked on every turn of the event loop, so before the hub's own clean-up when the client leaves.
            deadline = asyncio.get_running_loop().time() + WAIT_S
            while not transport.is_closing():  # then the close frame is queued behind the buffered ones
                assert asyncio.get_running_loop().time() < deadline, "the connection never started closing"
                await asyncio.sleep(0)
            assert not on_hub.link_ready and not on_hub.direct
            await publish(platform, channel, {"channel": "trades", "symbol": symbol, "data": {"n": "late"}})
            assert (await receive(watcher))["data"]["n"] == "late"

            frames = []
            while (frame := await client.frame()) is not None:
                if frame.opcode is not Opcode.PING:
                    frames.append(frame)
            assert frames and frames[-1].opcode is Opcode.CLOSE
            assert int.from_bytes(frames[-1].data[:2], "big") == (1000 if ending == "client_closes" else 1011)
            assert client.received.endswith(frames[-1].serialize(mask=False))  # nothing after the close frame
            assert [orjson.loads(f.data)["data"]["n"] for f in frames[:-1]] == list(range(published))
        finally:
            client.close()
            await watcher.close()


async def test_messages_sent_counts_every_client_a_fanned_out_message_reached(server: Server, alice: Actor) -> None:
    symbol = await make_symbol(server.platform)
    clients = [await authenticated(server, alice) for _ in range(5)]
    try:
        for ws in clients:
            assert (await request(ws, op="subscribe", channel="quotes", symbol=symbol))["event"] == "subscribed"
        async with httpx.AsyncClient() as http:
            before = metric((await http.get(f"{server.http}/metrics")).text, "websocket_messages_sent_total")
            for n in range(7):
                await publish(server.platform, f"tp:quotes:{symbol}", {"channel": "quotes", "data": {"n": n}})
            for ws in clients:
                assert [(await receive(ws))["data"]["n"] for _ in range(7)] == list(range(7))
            after = metric((await http.get(f"{server.http}/metrics")).text, "websocket_messages_sent_total")
        assert after - before == 5 * 7
    finally:
        for ws in clients:
            await ws.close()


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
