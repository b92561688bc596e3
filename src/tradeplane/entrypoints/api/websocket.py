"""The WebSocket hub at `/ws`: private execution reports and public market data, pushed as they happen.

Protocol (JSON text frames; every reply to a request echoes the request's optional `"id"`):

    client -> server                                      server -> client
    {"op": "auth", "key": "<API key>"}                    {"event": "authenticated", "user_id": 7, "role": "trader"}
        (or send `Authorization: Bearer <key>` on the upgrade request: the server then sends
         {"event": "authenticated", ...} first, unprompted)
    {"op": "subscribe", "channel": "orders"}              {"event": "subscribed", "channel": "orders", "symbol": null}
    {"op": "subscribe", "channel": "trades", "symbol": "BTC-USD"}
                                                          {"event": "subscribed", "channel": "trades", "symbol": ..}
    {"op": "unsubscribe", "channel": .., "symbol": ..}    {"event": "unsubscribed", "channel": .., "symbol": ..}
    {"op": "ping"}                                        {"event": "pong"}

Channels:
    private  `orders`, `fills`, `positions`: the authenticated user's own events, whatever account they concern
             (from Redis `tp:user:<user_id>`). Nobody can subscribe to another user's events, admins included.
    public   `trades`, `quotes`, `book`, `candles:<timeframe>` (M1 M5 M15 H1 H4 D1), each with a `symbol`
             (from Redis `tp:trades:<symbol>`, `tp:quotes:<symbol>`, `tp:book:<symbol>`, `tp:candles:<tf>:<symbol>`).
Every channel needs an authenticated connection.

Data messages are the publishers' envelope, `{"channel": "trades", "symbol": "BTC-USD", "data": {...}}`, with
decimals as strings, one envelope per WebSocket message.

On Redis (internal, see workers.engine) the engine sends one message per channel per settled batch: on
`tp:user:<id>` and `tp:trades:<symbol>` a message is either one envelope or a JSON array of envelopes in the
order they happened. The hub unpacks an array into one WebSocket message per envelope, in array order, each
the `orjson` encoding of that envelope, byte for byte what the engine would have sent as a single envelope;
the private channels still go only to a client subscribed to that envelope's kind. A payload that is not
JSON (or an array element that is not an envelope) is logged and dropped; the rest of an array is delivered.

The `book` channel is an L2 book kept in step by sequence numbers:

    {"channel": "book", "symbol": "BTC-USD", "type": "snapshot",
     "data": {"seq": 41, "bids": [["64999.00", "1.5"], ...], "asks": [...]}}
    {"channel": "book", "symbol": "BTC-USD", "type": "update",
     "data": {"seq": 42, "bids": [["64999.00", "0"]], "asks": []}}

after `subscribed` comes one snapshot, then updates with seq = previous seq + 1, never a gap or a repeat. A level
whose quantity is "0" is removed. The hub re-sends a snapshot whenever it cannot guarantee that (a gap in what
Redis delivered, or a restarted engine numbering anew): a client replaces its book on every snapshot.

Errors are `{"event": "error", "error": <code>, "detail": <text>}`, codes: `bad_json`, `unknown_op`,
`not_authenticated`, `invalid_api_key`, `already_authenticated`, `unknown_channel`, `invalid_symbol`,
`unknown_symbol`, `too_many_subscriptions`, `message_too_large`, `unavailable`, `credentials_revoked`. A failed
`auth` closes the connection with code 4001, as does not authenticating within AUTH_TIMEOUT_S.

Credentials are checked again while the connection lasts: every CREDENTIAL_CHECK_S (the REST principal cache's
lifetime, services.identity.AUTH_CACHE_SECONDS) the hub looks up the keys of all its authenticated connections in
one query. A connection whose key no longer authenticates (revoked, its user disabled or deleted) loses whatever
is still queued for it, gets `{"event": "error", "error": "credentials_revoked", ...}` and is closed with code
4401, reason "credentials revoked". While PostgreSQL cannot be asked, connections stay open and the next period
asks again.

Back-pressure: each connection has a bounded send queue and one writer task. Fan-out never waits for a client:
when a client's queue is full it is closed with code 4008 and reason "slow consumer", and everyone else goes on
receiving. The bound counts the messages the client's writer has had a turn to send, so a client that keeps up
is never dropped for the size of one batch of execution reports (see `ClientConnection.offer`). One Redis
subscription per channel per process (adapters.pubsub), however many clients share it.

Fan-out cost: a public message is encoded into a WebSocket frame once and, for every client whose queue is
empty and whose socket is not flow-controlled, written straight to the connection's socket with `os.write`
(ws_protocol says when that is safe; what the socket does not take goes to the transport, ahead of anything
else); only the others go through their queue and writer task. That takes the per-client ASGI send and task
wake-up off the common path, which is what bounded tick-to-client latency with hundreds of subscribers.
Whether a client can take the frame straight away (`ClientConnection.direct`) is kept up to date when its
queue, its writer or its connection changes state, never worked out per message, and each topic keeps the
sockets of its direct clients in one tuple, rebuilt only when one of them changes: per client and message
there is one `write` system call and nothing else, and metrics are counted once per message.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import orjson
from fastapi import APIRouter, FastAPI, WebSocket
from starlette.websockets import WebSocketDisconnect

from tradeplane.adapters.cache import REDIS_ERRORS
from tradeplane.adapters.pubsub import PubSubFanout
from tradeplane.bootstrap import Platform
from tradeplane.domain.candles import Timeframe
from tradeplane.entrypoints.api.ws_protocol import (
    PREPARED_FRAMES_EXTENSION,
    FrameWriter,
    PreparedFramesAttach,
    encode_text_frame,
)
from tradeplane.errors import AuthenticationFailed, InfrastructureUnavailable
from tradeplane.metrics import WEBSOCKET_CONNECTIONS, WEBSOCKET_MESSAGES_RECEIVED, WEBSOCKET_MESSAGES_SENT
from tradeplane.services.identity import AUTH_CACHE_SECONDS, Principal

log = logging.getLogger("tradeplane.websocket")

SEND_QUEUE_LIMIT = 1024
"""Messages waiting for one client before it counts as a slow consumer and is dropped."""
MAX_SUBSCRIPTIONS = 100
MAX_REQUEST_BYTES = 4096
AUTH_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 10.0
"""How long a dropped client gets to take its close frame before the hub lets go of it."""
BOOK_RESYNC_BACKOFF_S = 0.05
CREDENTIAL_CHECK_S = AUTH_CACHE_SECONDS
"""How often the keys of open connections are checked again: a revoked key stops on WS about when on REST."""

CLOSE_UNAUTHENTICATED = 4001
CLOSE_SLOW_CONSUMER = 4008
CLOSE_CREDENTIALS_REVOKED = 4401

PRIVATE_CHANNELS = frozenset({"orders", "fills", "positions"})
SYMBOL_CHANNELS = frozenset({"trades", "quotes", "book"} | {f"candles:{tf.value}" for tf in Timeframe})
_SYMBOL = re.compile(r"^[A-Za-z0-9._\-]{1,32}$")


def user_channel(user_id: int) -> str:
    return f"tp:user:{user_id}"


def public_channel(channel: str, symbol: str) -> str:
    """The Redis channel behind public channel `channel` of `symbol` (`candles:M1` -> `tp:candles:M1:<sym>`)."""
    return f"tp:{channel}:{symbol}"


def book_snapshot_key(symbol: str) -> str:
    return f"tp:book:{symbol}:snapshot"


def _dumps(message: dict[str, Any]) -> str:
    return orjson.dumps(message).decode()


class _Close:
    """Queued after the last message a client gets: the writer closes the connection with this code."""

    __slots__ = ("code", "reason")

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason


class ClientConnection:
    """One WebSocket client: its principal, subscriptions and bounded send queue.

    `direct` is True exactly while a message encoded once for many clients may be written straight to this
    connection: the protocol offers prepared frames and reports it can take one now, nothing is queued, the
    writer task is not in the middle of a send and the client is not closing. Everything that changes one of
    those updates it (and has the client's public topics make their plans again), so fan-out never re-derives it.
    """

    def __init__(self, hub: WebSocketHub, websocket: WebSocket, send_queue_limit: int) -> None:
        self.hub = hub
        self.websocket = websocket
        self.principal: Principal | None = None
        self.key_digest: str | None = None  # of the key it authenticated with, to check it again
        self.queue_limit = send_queue_limit
        self.outbox: asyncio.Queue[str | _Close] = asyncio.Queue()  # `offer` applies the limit (see there)
        self._fresh = 0  # messages queued since the event loop last ran other tasks, the writer among them
        self.closing = asyncio.Event()
        self.sending = False  # the writer has taken a message off the outbox and not finished sending it
        self.private_channels: set[str] = set()
        self.public: dict[tuple[str, str], BookSubscription | None] = {}  # (channel, symbol) -> book state
        self.direct = False  # changed through _set_direct only
        self.link_ready = False  # the protocol's last word: a prepared frame would go out now
        self.public_topics: set[_PublicTopic] = set()  # whose plans list this client, direct or not
        extension = websocket.scope.get("extensions", {}).get(PREPARED_FRAMES_EXTENSION)
        attach: PreparedFramesAttach | None = extension["attach"] if extension else None
        self.write_frame: FrameWriter | None = attach(self._link_readiness) if attach is not None else None
        # The socket, for os.write while `direct` (ws_protocol says when that is safe); None: use write_frame.
        self.fileno: int | None = extension.get("fileno") if extension else None

    def __repr__(self) -> str:
        who = self.principal.username if self.principal else "anonymous"
        return f"ClientConnection({who}, {self.websocket.client})"

    @property
    def subscription_count(self) -> int:
        return len(self.private_channels) + len(self.public)

    def _link_readiness(self, ready: bool) -> None:
        self.link_ready = ready
        self.update_direct()

    def update_direct(self) -> None:
        self._set_direct(self.link_ready and not self.sending and self.outbox.empty() and not self.closing.is_set())

    def _set_direct(self, direct: bool) -> None:
        if direct is not self.direct:
            self.direct = direct
            for topic in self.public_topics:
                topic.replan()

    def offer(self, text: str) -> None:
        """Queue `text` for this client without waiting; a full queue drops the client as a slow consumer.

        Full means `queue_limit` messages waiting that the writer has had a turn to send: the messages queued
        since the event loop last ran other tasks (`_fresh`) do not count. The engine sends a batch's reports to
        one channel as one Redis message, which the hub hands out in one go, so a client that keeps up takes a
        batch of any size; when each report came alone the pub/sub reader let the writers drain in between
        (adapters.pubsub YIELD_EVERY). The queue so holds at most the limit plus what one turn of the reader
        brings.
        """
        if self.closing.is_set():
            return
        if self.direct:
            self._set_direct(False)  # from now on everything queues behind `text`, until the writer has sent it
        if self.outbox.qsize() - self._fresh >= self.queue_limit:
            self.hub.drop_slow_consumer(self)
            return
        if not self._fresh:
            asyncio.get_running_loop().call_soon(self._turn_over)
        self._fresh += 1
        self.outbox.put_nowait(text)

    def _turn_over(self) -> None:
        self._fresh = 0

    def offer_prepared(self, text: str, frame: bytes) -> bool:
        """`offer` for a message encoded once for many clients (`frame` is `text` as a WebSocket frame).

        Written to the socket at once when `direct` (nothing ahead of it, the connection can take it without
        waiting); otherwise queued like any message. True when written here, so the caller counts it as sent.
        (_PublicTopic.deliver does the same through its plan, without looking at the direct clients.)
        """
        if self.direct:
            try:
                self.write_frame(frame)  # type: ignore[misc]  # direct implies a writer
                return True
            except Exception as exc:
                self.direct_write_failed(text, exc)
                return False
        self.offer(text)
        return False

    def finish_frame(self, frame: bytes, written: int, text: str) -> bool:
        """`os.write` took only the first `written` bytes of `frame` (`text` encoded once for many clients), maybe
        none: the transport takes the rest, ahead of anything else. Holding unsent bytes now, it pauses the
        connection, which takes it off the direct path until it has drained. True when the frame is on its way.
        """
        try:
            self.write_frame(frame[written:] if written else frame)  # type: ignore[misc]  # a fileno has a writer
            return True
        except Exception as exc:  # the transport is gone while its socket is open: not expected to happen
            if not written:
                self.direct_write_failed(text, exc)
            else:  # part of a frame went out: nothing can follow it on this connection
                log.warning("%r: could not finish a frame (%s); closing", self, exc)
                self.link_ready = False
                self.close(1011, "internal error", discard_pending=True)
            return False

    def direct_write_failed(self, text: str, exc: Exception) -> None:
        """The transport refused a frame in a state the protocol did not report: queue it; the writer decides.

        Not expected to happen, except that a peer may reset the connection at any time; the connection stays on the
        queue path until the protocol next reports it ready.
        """
        level = logging.DEBUG if isinstance(exc, ConnectionError) else logging.WARNING
        log.log(level, "%r: writing a prepared frame failed (%s); queueing it instead", self, exc)
        self.link_ready = False
        self._set_direct(False)
        self.offer(text)

    def close(self, code: int, reason: str, *, discard_pending: bool = False, last: str | None = None) -> None:
        """Close after the queued messages (or instead of them) and `last`; nothing more is queued after this."""
        if self.closing.is_set():
            return
        self.closing.set()
        self._set_direct(False)
        # A full queue, even when not discarding: it is a slow consumer after all.
        if discard_pending or self.outbox.qsize() - self._fresh >= self.queue_limit:
            while not self.outbox.empty():
                self.outbox.get_nowait()
        if last is not None:
            self.outbox.put_nowait(last)
        self.outbox.put_nowait(_Close(code, reason))

    async def write(self) -> None:
        """The only sender on this connection, so messages go out in the order they were queued."""
        websocket = self.websocket
        while True:
            message = await self.outbox.get()
            if isinstance(message, _Close):
                await websocket.close(code=message.code, reason=message.reason)
                return
            self.sending = True
            await websocket.send_text(message)
            self.sending = False
            WEBSOCKET_MESSAGES_SENT.inc()
            if self.link_ready and self.outbox.empty():
                self.update_direct()  # caught up: fan-out may write to the socket again


class BookSubscription:
    """One client's view of one symbol's book: snapshot first, then contiguous updates.

    While synchronising (live is False) updates from Redis are buffered. The snapshot is read from Redis, then a
    pub/sub barrier makes sure every update published before that read has arrived; buffered updates at or
    below the snapshot's seq are dropped and the rest must continue it without a gap. Live, an update must carry
    last_seq + 1; anything else (Redis lost messages, or the engine restarted its numbering) starts a new
    synchronisation, which ends in a new snapshot.
    """

    def __init__(self, hub: WebSocketHub, client: ClientConnection, symbol: str) -> None:
        self.hub = hub
        self.client = client
        self.symbol = symbol
        self.live = False
        self.last_seq = 0
        self.buffer: list[tuple[int, str]] = []
        self.resync: asyncio.Task[None] | None = None
        self.active = True

    def on_update(self, seq: int, text: str, frame: bytes) -> bool:
        """Take one update; True when it was written to the client directly (see ClientConnection.offer_prepared)."""
        if not self.active:
            return False
        if self.live:
            if seq == self.last_seq + 1:
                self.last_seq = seq
                return self.client.offer_prepared(text, frame)
            log.info("book %s: update %d after %d, resynchronising %r", self.symbol, seq, self.last_seq, self.client)
            self.live = False
            self.buffer = [(seq, text)]
            self.resync = asyncio.create_task(self._resynchronise())
            return False
        self.buffer.append((seq, text))
        if len(self.buffer) > self.client.queue_limit:
            self.hub.drop_slow_consumer(self.client)
        return False

    async def _resynchronise(self) -> None:
        try:
            await self.synchronise()
        except (InfrastructureUnavailable, *REDIS_ERRORS) as exc:
            self.client.offer(_error("unavailable", f"book {self.symbol}: {exc}", channel="book", symbol=self.symbol))

    async def synchronise(self) -> None:
        """Send a snapshot consistent with the buffered updates, then those updates, then go live."""
        attempt = 0
        while self.active:
            raw = await self.hub.redis_get(book_snapshot_key(self.symbol))
            await self.hub.fanout.barrier()
            # No await from here to the end of the iteration: no update can slip in between.
            if not self.active:
                return
            snapshot = _parse_snapshot(raw)
            last = int(snapshot["seq"])
            pending = [(seq, text) for seq, text in self.buffer if seq > last]
            if all(seq == last + 1 + i for i, (seq, _) in enumerate(pending)):
                message = {"channel": "book", "symbol": self.symbol, "type": "snapshot", "data": snapshot}
                self.client.offer(_dumps(message))
                for _, text in pending:
                    self.client.offer(text)
                self.last_seq = pending[-1][0] if pending else last
                self.buffer = []
                self.live = True
                return
            # A gap right after the snapshot (Redis lost messages, or the numbering restarted): read a newer one.
            self.buffer = pending
            attempt += 1
            await asyncio.sleep(min(BOOK_RESYNC_BACKOFF_S * attempt, 1.0))

    def cancel(self) -> None:
        self.active = False
        if self.resync is not None:
            self.resync.cancel()


def _parse_snapshot(raw: bytes | None) -> dict[str, Any]:
    """The stored snapshot, or an empty book at seq 0 when the engine has not written one yet."""
    if raw is None:
        return {"seq": 0, "bids": [], "asks": []}
    snapshot = orjson.loads(raw)
    if not isinstance(snapshot, dict) or not isinstance(snapshot.get("seq"), int):
        raise InfrastructureUnavailable("malformed book snapshot in Redis")
    return {"seq": snapshot["seq"], "bids": snapshot.get("bids", []), "asks": snapshot.get("asks", [])}


def _error(code: str, detail: str, **extra: Any) -> str:
    return _dumps({"event": "error", "error": code, "detail": detail, **extra})


# --- topics: the local audience of one Redis channel --------------------------------------------------------


class _Topic(ABC):
    """Receives one Redis channel's messages (once per process) and hands them to its members."""

    def __init__(self, redis_channel: str) -> None:
        self.redis_channel = redis_channel
        self.members: set[Any] = set()
        self._audience: tuple[Any, ...] | None = ()

    @property
    def audience(self) -> tuple[Any, ...]:
        """The members as a tuple to iterate over, rebuilt after a join or leave rather than for every message."""
        if self._audience is None:
            self._audience = tuple(self.members)
        return self._audience

    def add(self, member: object) -> None:
        self.members.add(member)
        self._audience = None

    def discard(self, member: object) -> None:
        self.members.discard(member)
        self._audience = None

    @abstractmethod
    def deliver(self, channel: str, payload: bytes) -> None: ...


_Plan = tuple[tuple[int, ...], dict[int, ClientConnection], tuple[FrameWriter, ...], tuple[ClientConnection, ...]]
"""The direct clients' sockets (and who each is), the writers of direct clients without one, everyone else."""


class _PublicTopic(_Topic):
    """trades, quotes, candles: the publisher's envelope goes to every member unchanged.

    The plan splits the members into those that are `direct` (their sockets, or their frame writers where the
    protocol offers no socket) and the others; it is made again when one of them joins, leaves or changes
    sides, which in a steady stream is never. Delivering then touches no client object at all for the direct
    ones (with 500 clients, reading each client's attributes was mostly cache misses): one `os.write` each.
    """

    members: set[ClientConnection]

    def __init__(self, redis_channel: str) -> None:
        super().__init__(redis_channel)
        self._plan: _Plan | None = None

    def add(self, member: object) -> None:
        assert isinstance(member, ClientConnection)
        super().add(member)
        member.public_topics.add(self)
        self._plan = None

    def discard(self, member: object) -> None:
        assert isinstance(member, ClientConnection)
        super().discard(member)
        member.public_topics.discard(self)
        self._plan = None

    def replan(self) -> None:
        self._plan = None

    def _make_plan(self) -> _Plan:
        direct = [c for c in self.members if c.direct and c.write_frame is not None]
        by_fileno = {c.fileno: c for c in direct if c.fileno is not None}
        writers = tuple(write for c in direct if c.fileno is None and (write := c.write_frame) is not None)
        others = tuple(c for c in self.members if not (c.direct and c.write_frame is not None))
        plan: _Plan = tuple(by_fileno), by_fileno, writers, others
        self._plan = plan
        return plan

    def deliver(self, channel: str, payload: bytes) -> None:
        sent = self._fan_out(payload)
        if sent:
            WEBSOCKET_MESSAGES_SENT.inc(sent)

    def _fan_out(self, payload: bytes) -> int:
        """One message to every member; returns how many it was written to straight away (the writers of the
        others count theirs when they send)."""
        text = payload.decode()  # also refuses a payload that is not UTF-8, which a text frame must be
        frame = encode_text_frame(payload)
        size = len(frame)
        # Fetched per message: a direct write may have just moved a client to the queue path (replan).
        filenos, by_fileno, writers, others = self._plan or self._make_plan()
        sent = len(filenos) + len(writers)
        write_fd = os.write
        pending = iter(filenos)
        while True:
            try:
                for fileno in pending:
                    written = write_fd(fileno, frame)
                    if written != size:  # the socket took part of it: the transport takes the rest
                        sent -= not by_fileno[fileno].finish_frame(frame, written, text)
                break
            except BlockingIOError:  # the socket took none of it
                sent -= not by_fileno[fileno].finish_frame(frame, 0, text)
            except Exception as exc:  # then carry on with the next client
                sent -= 1
                by_fileno[fileno].direct_write_failed(text, exc)
        remaining = iter(writers)
        while True:
            try:
                for write in remaining:
                    write(frame)
                break
            except Exception as exc:  # then carry on with the next writer
                sent -= 1
                self._write_failed(write, text, exc)
        for client in others:
            sent += client.offer_prepared(text, frame)
        return sent

    def _write_failed(self, write: FrameWriter, text: str, exc: Exception) -> None:
        for client in self.members:
            if client.write_frame is write:
                client.direct_write_failed(text, exc)
                return


class _TradesTopic(_PublicTopic):
    """trades: like any public channel, except that the engine sends a batch's trades of a symbol as one JSON
    array of envelopes, which goes out as one WebSocket message per envelope, in order."""

    def deliver(self, channel: str, payload: bytes) -> None:
        if not payload.startswith(b"["):
            super().deliver(channel, payload)  # one envelope, passed on untouched
            return
        sent = 0
        for envelope in _envelopes(channel, payload):
            sent += self._fan_out(orjson.dumps(envelope))
        if sent:
            WEBSOCKET_MESSAGES_SENT.inc(sent)


class _BookTopic(_Topic):
    """book: parsed once per message for its seq, then each member's BookSubscription decides."""

    def __init__(self, redis_channel: str, symbol: str) -> None:
        super().__init__(redis_channel)
        self.symbol = symbol

    def deliver(self, channel: str, payload: bytes) -> None:
        try:
            envelope = orjson.loads(payload)
            data = envelope["data"] if isinstance(envelope, dict) and "data" in envelope else envelope
            seq = int(data["seq"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            log.warning("dropping malformed book update on %s: %.200r", channel, payload)
            return
        encoded = orjson.dumps({"channel": "book", "symbol": self.symbol, "type": "update", "data": data})
        text, frame = encoded.decode(), encode_text_frame(encoded)
        sent = 0
        subscription: BookSubscription
        for subscription in self.audience:
            sent += subscription.on_update(seq, text, frame)
        if sent:
            WEBSOCKET_MESSAGES_SENT.inc(sent)


class _UserTopic(_Topic):
    """tp:user:<id>: each member gets the event kinds (orders, fills, positions) it subscribed to, one message per
    envelope of a grouped payload, in order."""

    def deliver(self, channel: str, payload: bytes) -> None:
        client: ClientConnection
        if payload.startswith(b"["):
            for envelope in _envelopes(channel, payload):
                kind = envelope["channel"]
                text: str | None = None  # encoded only if someone takes this kind
                for client in self.audience:
                    if kind in client.private_channels:
                        if text is None:
                            text = orjson.dumps(envelope).decode()
                        client.offer(text)
            return
        try:
            kind = _kind_of(orjson.loads(payload))
        except orjson.JSONDecodeError:
            kind = None
        if kind is None:
            log.warning("dropping malformed private event on %s: %.200r", channel, payload)
            return
        single = payload.decode()
        for client in self.audience:
            if kind in client.private_channels:
                client.offer(single)


def _kind_of(envelope: object) -> str | None:
    """The `channel` of an engine envelope (`fills`, `trades`, ...), or None when it is not one."""
    if isinstance(envelope, dict):
        kind = envelope.get("channel")
        if isinstance(kind, str):
            return kind
    return None


def _envelopes(channel: str, payload: bytes) -> list[dict[str, Any]]:
    """The envelopes of a grouped engine message (a JSON array), in order; what is malformed is logged and left
    out."""
    try:
        decoded = orjson.loads(payload)
    except orjson.JSONDecodeError:
        decoded = None
    if not isinstance(decoded, list):
        log.warning("dropping malformed grouped event on %s: %.200r", channel, payload)
        return []
    envelopes = [e for e in decoded if _kind_of(e) is not None]
    if len(envelopes) < len(decoded):
        log.warning("dropping %d malformed events grouped on %s", len(decoded) - len(envelopes), channel)
    return envelopes


# --- the hub ------------------------------------------------------------------------------------------------


class WebSocketHub:
    """Every WebSocket connection of one api process, and the Redis subscriptions they share."""

    def __init__(
        self,
        platform: Platform,
        *,
        send_queue_limit: int = SEND_QUEUE_LIMIT,
        max_subscriptions: int = MAX_SUBSCRIPTIONS,
        credential_check_s: float = CREDENTIAL_CHECK_S,
    ) -> None:
        if send_queue_limit < 8:
            raise ValueError("send_queue_limit must be at least 8")
        if credential_check_s <= 0:
            raise ValueError("credential_check_s must be positive")
        self.platform = platform
        self.credential_check_s = credential_check_s
        self.credential_checks = 0  # completed checks, for tests and the curious
        self._credential_watch: asyncio.Task[None] | None = None
        self.send_queue_limit = send_queue_limit
        self.max_subscriptions = max_subscriptions
        self.fanout = PubSubFanout(platform.cache.client, confirm_timeout=platform.settings.connect_timeout_s)
        self.clients: set[ClientConnection] = set()
        self.slow_consumers_dropped = 0
        self._topics: dict[str, _Topic] = {}
        self._known_symbols: set[str] = set()

    async def close(self) -> None:
        if self._credential_watch is not None:
            self._credential_watch.cancel()
            await asyncio.gather(self._credential_watch, return_exceptions=True)
            self._credential_watch = None
        for client in tuple(self.clients):
            client.close(1001, "server shutting down")
        await self.fanout.close()

    async def redis_get(self, key: str) -> bytes | None:
        try:
            value = await self.platform.cache.client.get(key)
        except REDIS_ERRORS as exc:
            raise InfrastructureUnavailable(f"Redis unavailable: {exc}") from exc
        return value.encode() if isinstance(value, str) else value

    def drop_slow_consumer(self, client: ClientConnection) -> None:
        if client.closing.is_set():
            return
        self.slow_consumers_dropped += 1
        log.warning("dropping slow consumer %r: %d messages unsent", client, client.outbox.qsize())
        client.close(CLOSE_SLOW_CONSUMER, "slow consumer", discard_pending=True)

    # --- one connection ---------------------------------------------------------------------------------

    async def serve(self, websocket: WebSocket) -> None:
        """Run one connection from accept to close; returns when the client leaves or is dropped."""
        await websocket.accept()
        if self._credential_watch is None or self._credential_watch.done():
            self._credential_watch = asyncio.create_task(self._watch_credentials())
        client = ClientConnection(self, websocket, self.send_queue_limit)
        self.clients.add(client)
        WEBSOCKET_CONNECTIONS.inc()
        writer = asyncio.create_task(self._run_writer(client))
        reader = asyncio.create_task(self._read(client))
        closing = asyncio.create_task(client.closing.wait())
        try:
            await asyncio.wait({writer, reader, closing}, return_when=asyncio.FIRST_COMPLETED)
            if client.closing.is_set() and not writer.done():
                # Give the writer time to deliver what is queued and the close frame (it ends early if the
                # peer disconnects); a peer that reads nothing at all does not hold the hub longer than this.
                await asyncio.wait({writer}, timeout=CLOSE_TIMEOUT_S)
        finally:
            client.closing.set()
            client.update_direct()  # closing: False, and out of every topic's plan
            for task in (reader, writer, closing):
                task.cancel()
            await asyncio.gather(reader, writer, closing, return_exceptions=True)
            self.clients.discard(client)
            WEBSOCKET_CONNECTIONS.dec()
            await self._leave_all(client)

    async def _run_writer(self, client: ClientConnection) -> None:
        try:
            await client.write()
        except (WebSocketDisconnect, RuntimeError, OSError) as exc:
            log.debug("%r went away while sending: %s", client, exc)

    async def _read(self, client: ClientConnection) -> None:
        websocket = client.websocket
        header = websocket.headers.get("authorization")
        if header:
            scheme, _, key = header.partition(" ")
            if scheme.lower() != "bearer" or not key.strip():
                client.offer(_error("invalid_api_key", "send the API key as 'Authorization: Bearer <key>'"))
                client.close(CLOSE_UNAUTHENTICATED, "authentication failed")
                return
            await self._authenticate(client, key.strip(), None)
        while not client.closing.is_set():
            try:
                if client.principal is None:
                    message = await asyncio.wait_for(websocket.receive(), AUTH_TIMEOUT_S)
                else:
                    message = await websocket.receive()
            except TimeoutError:
                client.offer(_error("not_authenticated", f"no auth within {AUTH_TIMEOUT_S:g} s"))
                client.close(CLOSE_UNAUTHENTICATED, "authentication timeout")
                return
            if message["type"] == "websocket.disconnect":
                return
            WEBSOCKET_MESSAGES_RECEIVED.inc()
            text = message.get("text")
            if not isinstance(text, str):
                raw = message.get("bytes")
                text = raw.decode(errors="replace") if isinstance(raw, bytes) else ""
            await self._handle(client, text)

    async def _handle(self, client: ClientConnection, text: str) -> None:
        if len(text) > MAX_REQUEST_BYTES:
            client.offer(_error("message_too_large", f"requests are at most {MAX_REQUEST_BYTES} bytes"))
            return
        try:
            request = orjson.loads(text)
        except orjson.JSONDecodeError:
            client.offer(_error("bad_json", "send one JSON object per message"))
            return
        if not isinstance(request, dict):
            client.offer(_error("bad_json", "send one JSON object per message"))
            return
        request_id = request.get("id")
        echo: dict[str, Any] = {"id": request_id} if isinstance(request_id, int | str) else {}
        op = request.get("op")
        if op == "ping":
            client.offer(_dumps({"event": "pong", **echo}))
        elif op == "auth":
            key = request.get("key")
            if client.principal is not None:
                client.offer(_error("already_authenticated", "this connection is already authenticated", **echo))
            elif not isinstance(key, str) or not key:
                client.offer(_error("invalid_api_key", 'auth needs a "key"', **echo))
                client.close(CLOSE_UNAUTHENTICATED, "authentication failed")
            else:
                await self._authenticate(client, key, request_id)
        elif op in ("subscribe", "unsubscribe"):
            if client.principal is None:
                client.offer(_error("not_authenticated", 'authenticate first: {"op": "auth", "key": ...}', **echo))
                return
            try:
                if op == "subscribe":
                    await self._subscribe(client, request, echo)
                else:
                    await self._unsubscribe(client, request, echo)
            except (InfrastructureUnavailable, *REDIS_ERRORS) as exc:
                client.offer(_error("unavailable", str(exc), **echo))
        else:
            client.offer(_error("unknown_op", "op must be auth, subscribe, unsubscribe or ping", **echo))

    async def _authenticate(self, client: ClientConnection, key: str, request_id: object) -> None:
        echo: dict[str, Any] = {"id": request_id} if isinstance(request_id, int | str) else {}
        try:
            principal = await self.platform.authenticator.authenticate(self.platform.db.pool, key)
        except AuthenticationFailed as exc:
            client.offer(_error(exc.code, exc.detail, **echo))
            client.close(CLOSE_UNAUTHENTICATED, "authentication failed")
            return
        except InfrastructureUnavailable as exc:
            client.offer(_error("unavailable", exc.detail, **echo))
            return
        client.principal = principal
        client.key_digest = self.platform.authenticator.digest(key)
        client.offer(
            _dumps({"event": "authenticated", "user_id": principal.user_id, "role": principal.role.value, **echo})
        )

    # --- credentials, checked again while connections last -----------------------------------------------

    async def _watch_credentials(self) -> None:
        while True:
            await asyncio.sleep(self.credential_check_s)
            try:
                await self.check_credentials()
            except (InfrastructureUnavailable, asyncpg.PostgresError) as exc:
                log.warning("could not check the credentials of WebSocket connections (%s); trying again", exc)
            except Exception:  # a bug: keep watching, the next period may do better
                log.exception("checking the credentials of WebSocket connections failed")

    async def check_credentials(self) -> None:
        """Close every authenticated connection whose key no longer authenticates; one query for all of them."""
        watched: list[tuple[ClientConnection, str]] = [
            (client, client.key_digest)
            for client in self.clients
            if client.key_digest is not None and not client.closing.is_set()
        ]
        if watched:
            async with self.platform.db.connection("websocket.credentials") as conn:
                valid = await self.platform.authenticator.still_valid(conn, {digest for _, digest in watched})
            for client, digest in watched:
                principal = valid.get(digest)
                if principal is None:
                    log.info("closing %r: its API key no longer authenticates", client)
                    revoked = _error("credentials_revoked", "the API key was revoked or its user disabled")
                    client.close(CLOSE_CREDENTIALS_REVOKED, "credentials revoked", discard_pending=True, last=revoked)
                else:
                    client.principal = principal  # the same user (a key never changes hands); maybe a new role
        self.credential_checks += 1

    # --- subscriptions ----------------------------------------------------------------------------------

    def _target(self, request: dict[str, Any], echo: dict[str, Any]) -> tuple[str, str | None]:
        """(channel, symbol) named by a request; raises _Refused with the error to send."""
        channel = request.get("channel")
        if channel in PRIVATE_CHANNELS:
            return channel, None
        if channel not in SYMBOL_CHANNELS:
            raise _Refused(
                _error(
                    "unknown_channel",
                    "channel must be orders, fills, positions, trades, quotes, book or candles:<M1|M5|M15|H1|H4|D1>",
                    **echo,
                )
            )
        symbol = request.get("symbol")
        if not isinstance(symbol, str) or not _SYMBOL.match(symbol):
            raise _Refused(_error("invalid_symbol", f'channel {channel} needs a "symbol" such as BTC-USD', **echo))
        assert isinstance(channel, str)
        return channel, symbol

    async def _subscribe(self, client: ClientConnection, request: dict[str, Any], echo: dict[str, Any]) -> None:
        try:
            channel, symbol = self._target(request, echo)
        except _Refused as refusal:
            client.offer(refusal.message)
            return
        subscribed = _dumps({"event": "subscribed", "channel": channel, "symbol": symbol, **echo})
        if channel in client.private_channels or (symbol is not None and (channel, symbol) in client.public):
            client.offer(subscribed)
            return
        if client.subscription_count >= self.max_subscriptions:
            client.offer(_error("too_many_subscriptions", f"at most {self.max_subscriptions} per connection", **echo))
            return
        assert client.principal is not None
        if symbol is None:
            first = not client.private_channels
            client.private_channels.add(channel)
            if first:
                try:
                    await self._join(user_channel(client.principal.user_id), _UserTopic, client)
                except BaseException:
                    client.private_channels.discard(channel)
                    raise
            client.offer(subscribed)
            return
        if not await self._symbol_exists(symbol):
            client.offer(_error("unknown_symbol", f"no instrument {symbol!r}", **echo))
            return
        if channel == "book":
            book = BookSubscription(self, client, symbol)
            client.public[(channel, symbol)] = book
            try:
                await self._join(public_channel("book", symbol), lambda key: _BookTopic(key, symbol), book)
                client.offer(subscribed)
                await book.synchronise()
            except BaseException:
                await self._drop_public(client, channel, symbol)
                raise
            return
        client.public[(channel, symbol)] = None
        try:
            topic = _TradesTopic if channel == "trades" else _PublicTopic
            await self._join(public_channel(channel, symbol), topic, client)
        except BaseException:
            client.public.pop((channel, symbol), None)
            raise
        client.offer(subscribed)

    async def _unsubscribe(self, client: ClientConnection, request: dict[str, Any], echo: dict[str, Any]) -> None:
        try:
            channel, symbol = self._target(request, echo)
        except _Refused as refusal:
            client.offer(refusal.message)
            return
        # Confirm first: once the client reads this, nothing more arrives for the channel.
        if symbol is None:
            was_subscribed = bool(client.private_channels)
            client.private_channels.discard(channel)
            client.offer(_dumps({"event": "unsubscribed", "channel": channel, "symbol": None, **echo}))
            if was_subscribed and not client.private_channels:
                assert client.principal is not None
                await self._leave(user_channel(client.principal.user_id), client)
            return
        book = client.public.get((channel, symbol))
        if book is not None:
            book.cancel()
        client.offer(_dumps({"event": "unsubscribed", "channel": channel, "symbol": symbol, **echo}))
        await self._drop_public(client, channel, symbol)

    async def _drop_public(self, client: ClientConnection, channel: str, symbol: str) -> None:
        if (channel, symbol) not in client.public:
            return
        book = client.public.pop((channel, symbol))
        if book is not None:
            book.cancel()
            await self._leave(public_channel("book", symbol), book)
        else:
            await self._leave(public_channel(channel, symbol), client)

    async def _leave_all(self, client: ClientConnection) -> None:
        if client.private_channels and client.principal is not None:
            client.private_channels.clear()
            await self._leave(user_channel(client.principal.user_id), client)
        for channel, symbol in list(client.public):
            await self._drop_public(client, channel, symbol)

    async def _join(self, key: str, make_topic: Callable[[str], _Topic], member: object) -> None:
        topic = self._topics.get(key)
        if topic is None:
            topic = self._topics[key] = make_topic(key)
        topic.add(member)
        try:
            await self.fanout.subscribe(key, topic.deliver)
        except BaseException:
            await self._leave(key, member)
            raise

    async def _leave(self, key: str, member: object) -> None:
        topic = self._topics.get(key)
        if topic is None:
            return
        topic.discard(member)
        if not topic.members:
            del self._topics[key]
            await self.fanout.unsubscribe(key, topic.deliver)

    async def _symbol_exists(self, symbol: str) -> bool:
        if symbol in self._known_symbols:
            return True
        async with self.platform.db.connection("websocket.symbol") as conn:
            found = await conn.fetchval("SELECT 1 FROM instruments WHERE symbol = $1", symbol)
        if found:
            self._known_symbols.add(symbol)
        return bool(found)


class _Refused(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# --- the router ---------------------------------------------------------------------------------------------


def hub_of(app: FastAPI) -> WebSocketHub:
    """The app's hub, made on first use (tests may install one with other limits beforehand)."""
    hub: WebSocketHub | None = getattr(app.state, "websocket_hub", None)
    if hub is None:
        hub = WebSocketHub(app.state.platform)
        app.state.websocket_hub = hub
    return hub


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    hub_of(app)
    try:
        yield
    finally:
        await hub_of(app).close()


router = APIRouter(lifespan=_lifespan)


@router.websocket("/ws")
async def websocket_endpoint(websocket: WebSocket) -> None:
    await hub_of(websocket.app).serve(websocket)
