"""Redis pub/sub fan-out: one Redis connection per process, any number of local listeners per channel.

The engine and the market data pipeline publish events on Redis channels (`tp:user:<id>`, `tp:trades:<symbol>`,
`tp:book:<symbol>`, `tp:quotes:<symbol>`, `tp:candles:<tf>:<symbol>`). A process that wants them (the API's
WebSocket hub, the order-queue worker) holds one `PubSubFanout`; it SUBSCRIBEs to a channel when the first local
listener arrives and UNSUBSCRIBEs when the last one leaves, so Redis sends each message to the process once however
many WebSocket clients want it.

Invariants:
- `subscribe` returns only once Redis has confirmed the subscription, so every message published after it
  returns reaches the listener.
- `barrier` returns only once every message Redis published before the call has been handed to the listeners.
  Together they let the WebSocket hub read a book snapshot (on another connection) and know exactly which
  updates it already contains: subscribe, GET the snapshot, barrier; after that, nothing older can arrive.
- Listeners are called synchronously from the one reader task, in Redis order, and must not block: they hand
  the payload on (`put_nowait` into a bounded queue) and return. An exception in a listener is logged and does
  not reach the other listeners or stop the reader.
- After a lost connection the reader reconnects by itself and redis-py re-subscribes every channel and pattern;
  messages published meanwhile are lost (Redis pub/sub keeps nothing), which is why the book carries sequence
  numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub

from tradeplane.adapters.cache import REDIS_ERRORS
from tradeplane.errors import InfrastructureUnavailable

log = logging.getLogger("tradeplane.pubsub")

PubSubListener = Callable[[str, bytes], None]
"""Called with (channel, payload) for each message; must return quickly and never await."""

RECONNECT_DELAY_S = 0.5
YIELD_EVERY = 16
"""Messages dispatched before the reader lets other tasks run: a burst already in the socket buffer is read without
suspending, and the listeners' consumers (WebSocket writers) must get to drain their queues in between."""


@dataclass(eq=False)
class _Interest:
    """The local listeners of one channel or pattern, and whether Redis has confirmed the subscription."""

    listeners: set[PubSubListener] = field(default_factory=set)
    confirmed: asyncio.Event = field(default_factory=asyncio.Event)


class PubSubFanout:
    """Shares one Redis pub/sub connection between the local listeners of many channels and patterns."""

    def __init__(self, client: aioredis.Redis, *, confirm_timeout: float = 5.0) -> None:
        self._client = client
        self._confirm_timeout = confirm_timeout
        self._pubsub: PubSub | None = None
        self._reader: asyncio.Task[None] | None = None
        self._channels: dict[bytes, _Interest] = {}
        self._patterns: dict[bytes, _Interest] = {}
        # (confirmation type, name) -> future, for the one command in flight (commands are serialised).
        self._awaiting: dict[tuple[str, bytes], asyncio.Future[None]] = {}
        self._command_lock = asyncio.Lock()
        self._closed = False
        self._barriers = 0
        self.messages_received = 0

    # --- subscriptions ----------------------------------------------------------------------------------

    @property
    def channels(self) -> frozenset[str]:
        """Channels with at least one local listener (what this process is subscribed to on Redis)."""
        return frozenset(name.decode() for name in self._channels)

    @property
    def patterns(self) -> frozenset[str]:
        return frozenset(name.decode() for name in self._patterns)

    async def subscribe(self, channel: str, listener: PubSubListener) -> None:
        """Add `listener` to `channel`; returns once Redis delivers the channel's messages to this process."""
        await self._add(self._channels, "subscribe", channel.encode(), listener)

    async def unsubscribe(self, channel: str, listener: PubSubListener) -> None:
        """Remove `listener`; the last listener to leave unsubscribes the process from the channel."""
        await self._remove(self._channels, "unsubscribe", channel.encode(), listener)

    async def psubscribe(self, pattern: str, listener: PubSubListener) -> None:
        """Like `subscribe` for a glob pattern (`tp:user:*`); the listener gets the matching channel's name."""
        await self._add(self._patterns, "psubscribe", pattern.encode(), listener)

    async def punsubscribe(self, pattern: str, listener: PubSubListener) -> None:
        await self._remove(self._patterns, "punsubscribe", pattern.encode(), listener)

    async def _add(self, table: dict[bytes, _Interest], command: str, name: bytes, listener: PubSubListener) -> None:
        if self._closed:
            raise RuntimeError("subscribe on a closed PubSubFanout")
        interest = table.get(name)
        if interest is None:
            interest = table[name] = _Interest()
            interest.listeners.add(listener)
            try:
                await self._command(command, name)
            except BaseException:
                interest.listeners.discard(listener)
                if not interest.listeners and table.get(name) is interest:
                    del table[name]
                raise
            interest.confirmed.set()
            return
        interest.listeners.add(listener)
        try:
            # Another listener's SUBSCRIBE may still be in flight: wait for its confirmation too.
            await asyncio.wait_for(interest.confirmed.wait(), self._confirm_timeout)
        except TimeoutError:
            interest.listeners.discard(listener)
            raise InfrastructureUnavailable(f"Redis did not confirm the subscription to {name.decode()}") from None

    async def _remove(self, table: dict[bytes, _Interest], command: str, name: bytes, listener: PubSubListener) -> None:
        interest = table.get(name)
        if interest is None:
            return
        interest.listeners.discard(listener)
        if interest.listeners:
            return
        del table[name]
        if self._closed:
            return
        try:
            await self._command(command, name)
        except (InfrastructureUnavailable, *REDIS_ERRORS) as exc:
            # Harmless: messages for a channel nobody listens to are dropped by the reader.
            log.warning("could not %s %s: %s", command, name.decode(), exc)

    async def barrier(self) -> None:
        """Wait until every message published before this call has been dispatched to the listeners.

        A PING on the subscribed connection: Redis answers it after everything it had already queued for this
        connection, and the reader dispatches in order. Only meaningful while subscribed to something.
        """
        self._barriers += 1
        await self._command("pong", f"barrier-{self._barriers}".encode())

    async def _command(self, command: str, name: bytes) -> None:
        """Send one (P)(UN)SUBSCRIBE (or a barrier PING, confirmed by its "pong") and wait for its confirmation.

        One command in flight at a time, so a confirmation is matched to its command without ambiguity.
        """
        async with self._command_lock:
            if self._closed:
                raise RuntimeError("PubSubFanout is closed")
            if self._pubsub is None:
                self._pubsub = self._client.pubsub()
            confirmation: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._awaiting[(command, name)] = confirmation
            try:
                try:
                    if command == "pong":
                        await self._pubsub.ping(name)
                    else:
                        await getattr(self._pubsub, command)(name)
                except REDIS_ERRORS as exc:
                    raise InfrastructureUnavailable(f"Redis unavailable: {exc}") from exc
                self._ensure_reader()
                try:
                    await asyncio.wait_for(asyncio.shield(confirmation), self._confirm_timeout)
                except TimeoutError:
                    raise InfrastructureUnavailable(
                        f"Redis did not confirm {command} {name.decode()} within {self._confirm_timeout} s"
                    ) from None
            finally:
                self._awaiting.pop((command, name), None)

    # --- the reader -------------------------------------------------------------------------------------

    def _ensure_reader(self) -> None:
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._read(), name="redis-pubsub-reader")

    async def _read(self) -> None:
        pubsub = self._pubsub
        assert pubsub is not None
        failing = False
        while not self._closed:
            try:
                message = await pubsub.get_message(ignore_subscribe_messages=False, timeout=None)
            except asyncio.CancelledError:
                raise
            except REDIS_ERRORS as exc:
                if not failing:
                    log.warning("Redis pub/sub connection lost (%s); reconnecting", exc)
                failing = True
                await asyncio.sleep(RECONNECT_DELAY_S)
                continue
            except Exception:  # a bug in the client library must not end fan-out for the whole process
                log.exception("Redis pub/sub reader failed; continuing")
                await asyncio.sleep(RECONNECT_DELAY_S)
                continue
            if failing:
                log.info("Redis pub/sub connection restored")
                failing = False
            if message is not None:
                self._dispatch(message)
                if self.messages_received % YIELD_EVERY == 0:
                    await asyncio.sleep(0)

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "message":
            interest = self._channels.get(message["channel"])
        elif kind == "pmessage":
            interest = self._patterns.get(message["pattern"])
        else:
            # redis-py puts the pattern of a (p)(un)subscribe confirmation in "channel", a PING's payload in "data"
            name = message["data"] if kind == "pong" else message["channel"]
            confirmation = self._awaiting.get((kind, name))
            if confirmation is not None and not confirmation.done():
                confirmation.set_result(None)
            return
        if interest is None:
            return  # a message that was already in flight when the last listener left
        self.messages_received += 1
        channel: str = message["channel"].decode()
        data: bytes = message["data"]
        for listener in tuple(interest.listeners):
            try:
                listener(channel, data)
            except Exception:
                log.exception("pub/sub listener for %s failed", channel)

    async def close(self) -> None:
        """Stop reading and release the Redis connection; listeners receive nothing more."""
        self._closed = True
        self._channels.clear()
        self._patterns.clear()
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(*REDIS_ERRORS):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
