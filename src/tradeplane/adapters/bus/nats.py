"""The message bus on NATS JetStream.

Topology (names carry the bus namespace as `<ns>_ORDERS` and subject prefix `<ns>.` when one is set):

    stream ORDERS    subjects orders.*     file storage, limits retention, duplicate window 2 min
    stream MD_TICKS  subjects md.ticks.>   file storage, limits retention (ticks age out after a day)

Each `subscribe(stream, durable)` binds a durable pull consumer named `<durable>-<stream>` filtered to the
stream's subject, with explicit acks: JetStream keeps its position, so a restarted engine resumes where it
stopped; `subscribe(..., start_after=n)` recreates that consumer at stream sequence n + 1 instead.
`Delivery.sequence` is the JetStream stream sequence, increasing in publish order (with gaps, since all
shards share the ORDERS stream). JetStream itself drops a re-published `Nats-Msg-Id` inside the window.

`publish_many` pipelines: it writes up to `publish_window` messages before waiting for their PubAcks, which
come back on one wildcard reply subscription per connection, and chains the messages of one JetStream stream
with `Nats-Expected-Last-Msg-Id` so that a lost message makes the server refuse the ones after it instead of
storing them ahead of it (see `publish_many`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import re
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from tradeplane.adapters.bus.base import (
    DUPLICATE_WINDOW_S,
    MD_TICKS_ALL,
    Delivery,
    MessageBus,
    Subscription,
    check_offset,
    is_md_ticks_stream,
    order_shard,
    scrub_password,
)
from tradeplane.errors import ConfigError, InfrastructureUnavailable

log = logging.getLogger(__name__)

MSG_ID_HEADER = "Nats-Msg-Id"
EXPECTED_STREAM_HEADER = "Nats-Expected-Stream"
EXPECTED_LAST_MSG_ID_HEADER = "Nats-Expected-Last-Msg-Id"
STATUS_HEADER = "Status"  # nats-py's key for the status line of a reply
NO_RESPONDERS = "503"  # the status of a reply when no JetStream stream listens on the subject
_STREAM_EXISTS = 10058  # JetStream API error: stream name already in use with a different configuration
_WRONG_LAST_MSG_ID = 10070  # JetStream API error: Nats-Expected-Last-Msg-Id is not the stream's last msg id
_DURABLE = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")


@contextlib.contextmanager
def _unavailable(what: str) -> Iterator[None]:
    """Turn a lost or refusing NATS server into the platform's InfrastructureUnavailable."""
    try:
        yield
    except (nats.errors.Error, OSError) as exc:
        raise InfrastructureUnavailable(f"{what}: {type(exc).__name__} {exc}".rstrip()) from exc


@dataclass(slots=True)
class _Outgoing:
    """One message of a `publish_many` call, with what the chain needs to know about it."""

    stream: str
    subject: str
    jetstream_stream: str
    data: bytes
    msg_id: str
    predecessor: int | None  # index of the call's previous message to the same JetStream stream
    chained: bool = True  # whether to send it with Nats-Expected-Last-Msg-Id = the predecessor's msg_id


class NatsSubscription(Subscription):
    """A pull subscription on one durable consumer.

    Deliveries handed out but not settled when the subscription closes are nak'd, so the next subscriber
    gets them at once instead of after the ack wait; a crashed consumer's messages come back after ack_wait.
    """

    def __init__(self, bus: NatsBus, stream: str, psub: JetStreamContext.PullSubscription) -> None:
        self._bus = bus
        self._stream = stream
        self._psub = psub
        self._outstanding: dict[str, Msg] = {}
        self._closed = False

    async def fetch(self, batch: int, timeout: float) -> list[Delivery]:  # noqa: ASYNC109 - the pull's expiry
        if self._closed:
            raise RuntimeError("fetch on a closed subscription")
        if batch < 1 or timeout <= 0:
            raise ValueError("batch must be >= 1 and timeout > 0")
        try:
            msgs = await self._psub.fetch(batch, timeout=timeout)
        except (nats.errors.TimeoutError, TimeoutError):
            # nats-py raises the builtin TimeoutError (an OSError!) when the deadline lapses between its
            # no-wait probe and the lingering pull; either way nothing arrived in time
            return []
        except (nats.errors.Error, OSError) as exc:
            raise InfrastructureUnavailable(
                f"NATS at {self._bus.endpoint}: fetch from {self._stream} failed: {exc}"
            ) from exc
        return [self._delivery(msg) for msg in msgs]

    def _delivery(self, msg: Msg) -> Delivery:
        meta = msg.metadata
        reply = msg.reply
        self._outstanding[reply] = msg
        what = f"NATS at {self._bus.endpoint}: settling {self._stream} #{meta.sequence.stream}"

        async def on_ack() -> None:
            self._outstanding.pop(reply, None)
            with _unavailable(what):
                await msg.ack()

        async def on_nak(delay: float | None) -> None:
            self._outstanding.pop(reply, None)
            with _unavailable(what):
                await self._nak(msg, delay)

        headers = msg.headers or {}
        return Delivery(
            stream=self._stream,
            data=msg.data,
            msg_id=headers.get(MSG_ID_HEADER, ""),
            sequence=meta.sequence.stream,
            redelivered=meta.num_delivered > 1,
            on_ack=on_ack,
            on_nak=on_nak,
        )

    async def _nak(self, msg: Msg, delay: float | None) -> None:
        """Nak and wait until JetStream has processed it. A fire-and-forget nak can lose the race with our
        next pull request, and the pull would then get the following message first: out of order.
        (With a delay, later messages do pass the nak'd one, by the nature of a delay.)"""
        payload = Msg.Ack.Nak
        if delay:
            payload += b" " + json.dumps({"delay": int(delay * 1_000_000_000)}).encode()
        await self._bus.client.request(msg.reply, payload, timeout=self._bus.connect_timeout)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        outstanding, self._outstanding = list(self._outstanding.values()), {}
        with contextlib.suppress(nats.errors.Error, OSError):
            for msg in outstanding:
                await self._nak(msg, None)
            await self._psub.unsubscribe()
            await self._bus.client.flush(timeout=max(1, int(self._bus.connect_timeout)))


class NatsBus(MessageBus):
    kind = "nats"

    def __init__(
        self,
        url: str,
        *,
        namespace: str = "",
        connect_timeout: float = 5.0,
        ack_wait: float = 30.0,
        max_ack_pending: int = 1024,
        replicas: int = 1,
        orders_max_age: float = 7 * 24 * 3600.0,
        md_ticks_max_age: float = 24 * 3600.0,
        publish_window: int = 512,
    ) -> None:
        """`ack_wait`: how long an unacked delivery stays with a (possibly dead) consumer before JetStream
        redelivers it. `max_ack_pending` bounds deliveries in flight per consumer. `replicas` is 3 on a
        clustered JetStream. Orders stay in the stream for `orders_max_age` seconds for replay and audit,
        long after they are applied; PostgreSQL is the system of record. `publish_window` bounds the
        messages `publish_many` has sent and not yet seen a PubAck for."""
        if publish_window < 1:
            raise ValueError(f"publish_window must be >= 1 (got {publish_window})")
        super().__init__(url, namespace=namespace, connect_timeout=connect_timeout)
        self.publish_window = publish_window
        self.ack_wait = ack_wait
        self.max_ack_pending = max_ack_pending
        self.replicas = replicas
        self.orders_max_age = orders_max_age
        self.md_ticks_max_age = md_ticks_max_age
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._ack_inbox: str | None = None
        self._ack_waiters: dict[str, asyncio.Future[None]] = {}
        self._ack_tokens = itertools.count()

    # --- names -------------------------------------------------------------------------------------------

    def _stream_name(self, base: str) -> str:
        return f"{self.namespace}_{base}" if self.namespace else base

    def _subject(self, stream: str) -> str:
        return f"{self.namespace}.{stream}" if self.namespace else stream

    @property
    def orders_stream_name(self) -> str:
        return self._stream_name("ORDERS")

    @property
    def md_ticks_stream_name(self) -> str:
        return self._stream_name("MD_TICKS")

    def _jetstream_stream(self, stream: str) -> str:
        """The JetStream stream holding the logical stream `stream`."""
        if order_shard(stream) is not None:
            return self.orders_stream_name
        if is_md_ticks_stream(stream):
            return self.md_ticks_stream_name
        raise ValueError(f"unknown stream {stream!r}: use order_stream(shard) or md_ticks_stream(symbol)")

    # --- connection --------------------------------------------------------------------------------------

    @property
    def client(self) -> Client:
        if self._nc is None or self._nc.is_closed:
            raise InfrastructureUnavailable(f"NATS at {self.endpoint}: not connected")
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        self.client  # noqa: B018 - raises when not connected
        assert self._js is not None
        return self._js

    async def connect(self) -> None:
        """Connect, or raise InfrastructureUnavailable at the first refusal or after `connect_timeout`.

        Once connected the client reconnects by itself for ever: a running engine rides out a server
        restart, and ping() reports the outage meanwhile.
        """
        if self._nc is not None and not self._nc.is_closed:
            return
        nc = Client()
        connecting = True
        first_error: asyncio.Future[Exception] = asyncio.get_running_loop().create_future()

        async def on_error(exc: Exception) -> None:
            if connecting:
                if not first_error.done():
                    first_error.set_result(exc)
            else:
                log.warning("NATS at %s: %s", self.endpoint, self._scrub(str(exc)))

        async def on_disconnected() -> None:
            if self._nc is not nc:  # closed on purpose
                return
            log.warning("NATS at %s: disconnected, reconnecting", self.endpoint)

        async def on_reconnected() -> None:
            log.info("NATS at %s: reconnected", self.endpoint)

        attempt = asyncio.ensure_future(
            nc.connect(
                servers=[self.url],
                name="tradeplane",
                error_cb=on_error,
                disconnected_cb=on_disconnected,
                reconnected_cb=on_reconnected,
                connect_timeout=max(1, int(self.connect_timeout)),
                reconnect_time_wait=1,
                max_reconnect_attempts=-1,
            )
        )
        waiters: set[asyncio.Future[Any]] = {attempt, first_error}
        done, _ = await asyncio.wait(waiters, timeout=self.connect_timeout, return_when=asyncio.FIRST_COMPLETED)
        connecting = False
        failure: BaseException | None = None
        if attempt in done:
            failure = attempt.exception()
        elif first_error in done:
            failure = first_error.result()
        else:
            failure = TimeoutError(f"no answer within {self.connect_timeout:g} s")
        if failure is not None:
            attempt.cancel()
            with contextlib.suppress(BaseException):
                await attempt
            with contextlib.suppress(Exception):
                await nc.close()
            reason = self._scrub(f"{type(failure).__name__} {failure}".rstrip())
            raise InfrastructureUnavailable(f"NATS at {self.endpoint} is unreachable: {reason}") from failure
        self._nc = nc
        self._js = nc.jetstream(timeout=self.connect_timeout)
        try:
            await self._js.account_info()
        except (nats.errors.Error, OSError) as exc:
            await self.close()
            raise InfrastructureUnavailable(
                f"NATS at {self.endpoint} has no JetStream (start nats-server with -js): {exc}"
            ) from exc
        # The PubAcks of publish_many come back to `<inbox>.<n>`; nats-py restores this after a reconnect.
        inbox = nc.new_inbox()
        try:
            await nc.subscribe(f"{inbox}.*", cb=self._on_pub_ack)
        except (nats.errors.Error, OSError) as exc:
            await self.close()
            raise InfrastructureUnavailable(f"NATS at {self.endpoint}: subscribing to PubAcks: {exc}") from exc
        self._ack_inbox = inbox

    def _scrub(self, text: str) -> str:
        return scrub_password(self.url, text)

    async def close(self) -> None:
        nc, self._nc, self._js, self._ack_inbox = self._nc, None, None, None
        if nc is not None and not nc.is_closed:
            with contextlib.suppress(Exception):
                await nc.drain()
            with contextlib.suppress(Exception):
                await nc.close()

    # --- topology ----------------------------------------------------------------------------------------

    def _stream_configs(self) -> list[StreamConfig]:
        common: dict[str, Any] = {
            "retention": RetentionPolicy.LIMITS,
            "storage": StorageType.FILE,
            "discard": DiscardPolicy.OLD,
            "num_replicas": self.replicas,
            "duplicate_window": DUPLICATE_WINDOW_S,
        }
        return [
            StreamConfig(
                name=self.orders_stream_name,
                description="tradeplane order commands, one subject per engine shard",
                subjects=[self._subject("orders.*")],
                max_age=self.orders_max_age,
                **common,
            ),
            StreamConfig(
                name=self.md_ticks_stream_name,
                description="tradeplane market data ticks from external publishers",
                subjects=[self._subject(MD_TICKS_ALL)],
                max_age=self.md_ticks_max_age,
                **common,
            ),
        ]

    async def setup(self, shards: int) -> None:
        """Create or update the streams. `shards` needs no server object here: one stream has all shards."""
        if shards < 1:
            raise ValueError(f"shards must be >= 1 (got {shards})")
        jsm = self.js
        for config in self._stream_configs():
            with _unavailable(f"NATS at {self.endpoint}: creating stream {config.name}"):
                try:
                    await jsm.add_stream(config)
                except nats.js.errors.BadRequestError as exc:
                    if exc.err_code != _STREAM_EXISTS:
                        raise ConfigError(f"JetStream refused stream {config.name}: {exc.description}") from exc
                    try:
                        await jsm.update_stream(config)
                    except nats.js.errors.BadRequestError as update_exc:
                        raise ConfigError(
                            f"stream {config.name} exists with settings that cannot be changed in place: "
                            f"{update_exc.description}"
                        ) from update_exc

    async def destroy(self, shards: int) -> None:
        if not self.namespace:
            raise ConfigError("destroy() needs a namespace; it never deletes un-namespaced streams")
        for name in (self.orders_stream_name, self.md_ticks_stream_name):
            with (
                _unavailable(f"NATS at {self.endpoint}: deleting stream {name}"),
                contextlib.suppress(nats.js.errors.NotFoundError),
            ):
                await self.js.delete_stream(name)

    # --- messages ----------------------------------------------------------------------------------------

    async def publish_many(self, messages: Sequence[tuple[str, bytes, str]]) -> None:
        """See MessageBus.publish_many. Writes up to `publish_window` messages, in list order on the socket,
        before waiting for their PubAcks, then the next window.

        Pipelining alone could reorder a stream after a failure: if the connection drops, messages already in
        the socket are lost while those still in the client's buffer go out after the reconnect, so message
        k + 1 is stored and k is not, and the retry appends k after it. So each message goes with
        `Nats-Expected-Last-Msg-Id` = the msg_id of the list's previous message to the same JetStream stream:
        the server refuses it unless that one is the last stored, and the refusal runs down the chain.
        JetStream checks a msg_id for duplicates before the expectation, so a retried list passes over the
        messages stored the first time.

        When the first failure is such a refusal, its predecessor was acknowledged and nothing was lost: the
        stream's last message is one this list did not put there (another publisher, or outbox rows committed
        out of id order whose later rows an earlier attempt stored). The list is then sent again from that
        message on, that message without the expectation, since its predecessor is known to be stored.
        """
        outgoing = self._outgoing(messages)
        start = 0
        while start < len(outgoing):
            end = min(start + self.publish_window, len(outgoing))
            outcomes = await self._send(outgoing, start, end)
            failed = next((k for k, outcome in enumerate(outcomes) if isinstance(outcome, BaseException)), None)
            if failed is None:
                start = end
                continue
            message, error = outgoing[start + failed], outcomes[failed]
            assert isinstance(error, BaseException)
            if not (isinstance(error, nats.js.errors.APIError) and error.err_code == _WRONG_LAST_MSG_ID):
                raise self._publish_failure(message, error) from error
            message.chained = False
            start += failed

    def _outgoing(self, messages: Sequence[tuple[str, bytes, str]]) -> list[_Outgoing]:
        """The messages with their routes and chain links, all checked before anything is sent."""
        outgoing: list[_Outgoing] = []
        last: dict[str, int] = {}
        for stream, data, msg_id in messages:
            if stream == MD_TICKS_ALL:
                raise ValueError(f"{MD_TICKS_ALL} is a wildcard for subscribers; publish to md_ticks_stream(symbol)")
            jetstream_stream = self._jetstream_stream(stream)
            predecessor = last.get(jetstream_stream)
            last[jetstream_stream] = len(outgoing)
            outgoing.append(_Outgoing(stream, self._subject(stream), jetstream_stream, data, msg_id, predecessor))
        return outgoing

    async def _send(self, outgoing: list[_Outgoing], start: int, end: int) -> list[BaseException | None]:
        """Send `outgoing[start:end]` and wait for every PubAck: each one's failure, or None when stored. A
        PubAck that does not come within `connect_timeout` of the previous one is a TimeoutError.

        nats-py's own `publish_async` is not used: its reply handler raises a JetStream error instead of
        handing it to the message's future (nats-py 2.16), so a refused message would look like a timeout."""
        nc = self.client
        assert self._ack_inbox is not None  # subscribed by connect()
        inbox = self._ack_inbox
        loop = asyncio.get_running_loop()
        tokens: list[str] = []
        futures: list[asyncio.Future[None]] = []
        try:
            for message in outgoing[start:end]:
                headers = {MSG_ID_HEADER: message.msg_id, EXPECTED_STREAM_HEADER: message.jetstream_stream}
                if message.chained and message.predecessor is not None:
                    headers[EXPECTED_LAST_MSG_ID_HEADER] = outgoing[message.predecessor].msg_id
                token = str(next(self._ack_tokens))
                future: asyncio.Future[None] = loop.create_future()
                self._ack_waiters[token] = future
                tokens.append(token)
                futures.append(future)
                try:
                    # One coroutine awaits each write in turn, so the socket carries them in list order.
                    await nc.publish(message.subject, message.data, reply=f"{inbox}.{token}", headers=headers)
                except (nats.errors.Error, OSError) as exc:
                    raise self._publish_failure(message, exc) from exc
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.connect_timeout) as deadline:
                    for future in futures:
                        if not future.done():
                            with contextlib.suppress(Exception):
                                await future  # a timeout cancels it: counted as no PubAck below
                            deadline.reschedule(loop.time() + self.connect_timeout)
            return [
                TimeoutError() if not future.done() or future.cancelled() else future.exception() for future in futures
            ]
        finally:
            for token, future in zip(tokens, futures, strict=True):
                self._ack_waiters.pop(token, None)
                future.cancel()  # a no-op once settled

    async def _on_pub_ack(self, msg: Msg) -> None:
        future = self._ack_waiters.pop(msg.subject.rpartition(".")[2], None)
        if future is None or future.done():
            return  # given up on (timeout) or from before a reconnect
        if msg.headers and msg.headers.get(STATUS_HEADER) == NO_RESPONDERS:
            future.set_exception(nats.js.errors.NoStreamResponseError())
            return
        try:
            response = json.loads(msg.data)
        except ValueError as exc:
            future.set_exception(nats.errors.Error(f"unreadable PubAck: {exc}"))
            return
        error = response.get("error") if isinstance(response, dict) else None
        if error:
            future.set_exception(
                nats.js.errors.APIError(
                    code=error.get("code"), err_code=error.get("err_code"), description=error.get("description")
                )
            )
        else:
            future.set_result(None)

    def _publish_failure(self, message: _Outgoing, error: BaseException) -> InfrastructureUnavailable:
        where = f"NATS at {self.endpoint}: publish to {message.stream}"
        if isinstance(error, nats.js.errors.NoStreamResponseError):
            return InfrastructureUnavailable(f"{where}: no JetStream stream answers; run setup")
        if isinstance(error, nats.js.errors.APIError):
            return InfrastructureUnavailable(f"{where}: {error.description}")
        if isinstance(error, TimeoutError | nats.errors.TimeoutError):
            return InfrastructureUnavailable(f"{where}: no PubAck within {self.connect_timeout:g} s")
        return InfrastructureUnavailable(f"{where}: {type(error).__name__} {error}".rstrip())

    async def subscribe(self, stream: str, durable: str, *, start_after: int | None = None) -> Subscription:
        """See MessageBus.subscribe. With `start_after` the durable consumer is deleted and created again
        at stream sequence `start_after + 1`: JetStream cannot move an existing consumer's position."""
        if not _DURABLE.match(durable):
            raise ValueError(f"durable name must be 1-64 letters, digits, '_' or '-' (got {durable!r})")
        check_offset(start_after)
        jetstream_stream = self._jetstream_stream(stream)
        subject = self._subject(stream)
        consumer = f"{durable}-{stream.replace('.', '_').replace('>', 'all')}"
        config = ConsumerConfig(
            durable_name=consumer,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=self.ack_wait,
            max_ack_pending=self.max_ack_pending,
            max_deliver=-1,  # an order command is never dropped for having been redelivered often
        )
        with _unavailable(f"NATS at {self.endpoint}: subscribing {consumer} to {stream}"):
            try:
                if start_after is None:
                    psub = await self.js.pull_subscribe(
                        subject, durable=consumer, stream=jetstream_stream, config=config
                    )
                else:
                    config.name = consumer
                    config.filter_subject = subject
                    config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
                    config.opt_start_seq = start_after + 1
                    with contextlib.suppress(nats.js.errors.NotFoundError):
                        await self.js.delete_consumer(jetstream_stream, consumer)
                    await self.js.add_consumer(jetstream_stream, config)
                    psub = await self.js.pull_subscribe_bind(consumer, stream=jetstream_stream)
            except nats.js.errors.NotFoundError as exc:
                raise InfrastructureUnavailable(
                    f"NATS at {self.endpoint}: stream {jetstream_stream} does not exist; run setup"
                ) from exc
        return NatsSubscription(self, stream, psub)

    # --- operations --------------------------------------------------------------------------------------

    async def ping(self) -> float:
        nc = self.client
        if not nc.is_connected:
            raise InfrastructureUnavailable(f"NATS at {self.endpoint}: disconnected")
        with _unavailable(f"NATS at {self.endpoint}: ping"):
            return await nc.rtt(timeout=max(1, int(self.connect_timeout)))

    async def queue_length(self, stream: str) -> int:
        """Messages not yet delivered to the stream's durable consumer (the most behind one if several);
        with no consumer yet, every stored message of the stream."""
        jetstream_stream = self._jetstream_stream(stream)
        subject = self._subject(stream)
        with _unavailable(f"NATS at {self.endpoint}: queue length of {stream}"):
            try:
                consumers = await self.js.consumers_info(jetstream_stream)
                pending = [c.num_pending or 0 for c in consumers if c.config.filter_subject == subject]
                if pending:
                    return max(pending)
                info = await self.js.stream_info(jetstream_stream, subjects_filter=subject)
            except nats.js.errors.NotFoundError as exc:
                raise InfrastructureUnavailable(
                    f"NATS at {self.endpoint}: stream {jetstream_stream} does not exist; run setup"
                ) from exc
        return sum((info.state.subjects or {}).values())

    async def roundtrip_test(self) -> None:
        token = uuid.uuid4().hex[:12]
        name = self._stream_name(f"PROBE_{token}")
        subject = self._subject(f"tradeplane.probe.{token}")
        payload = f"probe {token}".encode()
        where = f"NATS at {self.endpoint}: round-trip test"
        with _unavailable(where):
            await self.js.add_stream(StreamConfig(name=name, subjects=[subject], storage=StorageType.FILE, max_msgs=16))
            try:
                await self.js.publish(subject, payload, stream=name, headers={MSG_ID_HEADER: token})
                psub = await self.js.pull_subscribe(subject, durable="probe", stream=name)
                try:
                    msgs = await psub.fetch(1, timeout=self.connect_timeout)
                    if not msgs or msgs[0].data != payload:
                        raise InfrastructureUnavailable(f"{where}: read back something else than was written")
                    await msgs[0].ack_sync(timeout=self.connect_timeout)
                finally:
                    await psub.unsubscribe()
            finally:
                await self.js.delete_stream(name)
