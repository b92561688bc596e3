"""Seed 000's RabbitMQ order-entry queues: other services place, modify and cancel orders by message.

Queues (exchange `trading`, declared by `tradeplane setup` / `MessageBus.setup`, namespaced like the bus):

    order_placement     (order.place)     {"api_key" | "user", "account_id", "symbol", "side", "type",
                                           "quantity", "price"?, "stop_price"?, "time_in_force"?, "expire_at"?,
                                           "post_only"?, "reduce_only"?, "stp"?, "client_order_id"?}
    order_modification  (order.modify)    {"api_key" | "user", "order_id", "quantity"?, "price"?}
    order_cancellation  (order.cancel)    {"api_key" | "user", "order_id"}
                                          or {"api_key" | "user", "account_id", "symbol"?}  (cancel-all)
    position_updates    (position.update) out: {"user_id", "channel": "positions", "symbol", "data"} for every
                                          position change the engine reports (one message per change, also
                                          when the engine groups a batch's reports into one Redis message)

Fields are those of the REST bodies, and each command runs through the same service functions as REST
(services.orders), so validation, pre-trade risk, idempotency and the transaction are identical. `api_key`
authenticates like a bearer key; `user` (a username) is for trusted internal services: whoever may publish to
these queues is trusted as that user, so guard the RabbitMQ credentials accordingly.

Replies: when a message has `reply_to`, the result goes there (default exchange, the message's
`correlation_id`) as the REST status and body: {"status": 201, "order": {...}},
{"status": 422, "error": "risk_rejected", "reason": ..., "detail": ..., "order": {...}},
{"status": 404, "error": "order_not_found", "detail": ...}, {"status": 200, "orders": [...]} for cancel-all.
A message is acked once its result is committed (and replied). Each queue is consumed in order. Modifications
and cancellations run one message at a time; placements are decoded in delivery order and placed in groups
that share a transaction, one group after the other (group commit, as for REST), so a burst costs a few
statements per group rather than per order.

Outages recover by themselves. When PostgreSQL or Redis fails a command, that queue's consumer stops taking
messages, answers what was committed before the failure and closes its channel, which hands the failed
message and every later one it had not acked back to RabbitMQ in queue order; it consumes again RETRY_DELAY_S
later. Nothing delivered after the failed message is applied before it (see _PlacementFlow). When RabbitMQ
goes away, aio-pika's robust connection reconnects and resumes the consumers; a reply or ack lost with the
connection is logged, and a consumer that ends for any reason starts again on a new channel.

Redelivery: RabbitMQ delivers at least once, and a message whose ack was lost comes again. A placement
without a client_order_id gets `amqp-<message_id>` as one when the message has a message_id (aio-pika and
aiormq publishers always set one; one that is not printable ASCII is replaced by its digest), so a second
copy returns the original order instead of placing another. A modification or cancellation with a
message_id is recorded in the audit log (entity `amqp.<queue>`, its reply in the details) in the
transaction that applies it, so a second copy gets the first one's reply and changes nothing. Copies
delivered before a reconnection that aio-pika still holds are dropped: RabbitMQ has taken them back and
delivers them again. A message with no message_id (and, for a placement, no
client_order_id) whose ack is lost after its commit is applied again: give one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any, TypeVar

import aio_pika
import asyncpg
import orjson
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError

from tradeplane.adapters.bus.rabbitmq import RabbitMqBus
from tradeplane.adapters.pubsub import PubSubFanout
from tradeplane.bootstrap import Platform
from tradeplane.domain.risk import RiskRejection
from tradeplane.entrypoints.api.schemas import OrderAmend, OrderCreate, RowId, Symbol
from tradeplane.errors import AuthenticationFailed, ConfigError, InfrastructureUnavailable, TradeplaneError
from tradeplane.services import queries
from tradeplane.services.identity import Principal, Role
from tradeplane.services.orders import (
    MAX_BATCH,
    OrderRequest,
    Placement,
    PlacementOutcome,
    PlacementQueue,
    order_entry,
)
from tradeplane.services.queries import OrderRecord

log = logging.getLogger("tradeplane.order_queues")

PLACEMENT_QUEUE = "order_placement"
MODIFICATION_QUEUE = "order_modification"
CANCELLATION_QUEUE = "order_cancellation"
POSITION_UPDATES_QUEUE = "position_updates"
PREFETCH = 16
PLACEMENT_PREFETCH = 256
"""Placements in flight per consumer: up to this many share one transaction when they arrive in a burst."""
RETRY_DELAY_S = 1.0
POSITION_BACKLOG = 10_000
"""Position updates waiting for RabbitMQ; beyond this the oldest are dropped (and logged), never the process."""

Reply = dict[str, Any]
Handler = Callable[[Principal, dict[str, Any], str], Awaitable[Reply]]
Placing = asyncio.Future[Placement]
_T = TypeVar("_T")


class _Identity(BaseModel):
    """Who a command acts for: an API key, or (trusted services) a username (never NUL: PostgreSQL refuses it)."""

    model_config = ConfigDict(extra="ignore")

    api_key: str | None = None
    user: Annotated[str, Field(max_length=50, pattern=r"^[^\x00]*$")] | None = None


class _Modify(OrderAmend):
    """OrderAmend plus the order it amends. Ids are strict: JSON true is not order 1."""

    order_id: Annotated[RowId, Strict()]


class _Cancel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    order_id: Annotated[RowId, Strict()] | None = None
    account_id: Annotated[RowId, Strict()] | None = None
    symbol: Symbol | None = None


def _fail(status: int, code: str, detail: object) -> Reply:
    return {"status": status, "error": code, "detail": detail}


def _risk_rejected(rejection: RiskRejection, order: OrderRecord) -> Reply:
    return {
        "status": 422,
        "error": "risk_rejected",
        "reason": rejection.reason.value,
        "detail": rejection.detail,
        "order": order.to_json(),
    }


def _placement_reply(placement: Placement) -> Reply:
    if placement.rejection is not None:
        return _risk_rejected(placement.rejection, placement.order)
    status = 201 if placement.outcome is PlacementOutcome.ACCEPTED else 200
    return {"status": status, "order": placement.order.to_json()}


class OrderQueueWorker:
    """Consumes the three order-entry queues and publishes position changes to `position_updates`."""

    def __init__(
        self, platform: Platform, *, prefetch: int = PREFETCH, placement_prefetch: int = PLACEMENT_PREFETCH
    ) -> None:
        if not isinstance(platform.bus, RabbitMqBus):
            raise ConfigError("the seed order queues exist on RabbitMQ only (TRADEPLANE_BUS_URL=amqp://...)")
        self.platform = platform
        self.bus: RabbitMqBus = platform.bus
        self.prefetch = prefetch
        self.placement_prefetch = placement_prefetch
        self.placements = PlacementQueue(platform.db, order_entry(platform), max_inflight=1)
        """Group commit for order_placement, one transaction at a time so they commit in delivery order."""
        self.handled = 0
        self.positions_published = 0
        self._positions: asyncio.Queue[tuple[int, dict[str, Any]]] = asyncio.Queue(POSITION_BACKLOG)
        self.ready = asyncio.Event()
        """Set once position events are subscribed to (commands wait in their queues until consumed anyway)."""

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set. The bus topology must exist (`setup`)."""
        fanout = PubSubFanout(self.platform.cache.client, confirm_timeout=self.platform.settings.connect_timeout_s)
        await fanout.psubscribe("tp:user:*", self._on_user_event)
        self.ready.set()
        tasks = [
            asyncio.create_task(self._keep_consuming(PLACEMENT_QUEUE, self._consume_placements)),
            asyncio.create_task(
                self._keep_consuming(MODIFICATION_QUEUE, lambda: self._consume(MODIFICATION_QUEUE, self.modify))
            ),
            asyncio.create_task(
                self._keep_consuming(CANCELLATION_QUEUE, lambda: self._consume(CANCELLATION_QUEUE, self.cancel))
            ),
            asyncio.create_task(self._publish_positions()),
        ]
        log.info("consuming %s, %s, %s", PLACEMENT_QUEUE, MODIFICATION_QUEUE, CANCELLATION_QUEUE)
        stopping = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait([stopping, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stopping:
                    task.result()  # they run until cancelled: a bug, raise it
        finally:
            stopping.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await fanout.close()

    # --- consuming -------------------------------------------------------------------------------------

    async def _keep_consuming(self, queue_name: str, consume: Callable[[], Awaitable[None]]) -> None:
        """Run `consume` again whenever it ends, until cancelled: RabbitMQ, PostgreSQL or Redis failing ends
        one round (its channel closes, handing back in queue order every message it had not acked), and the next
        starts RETRY_DELAY_S later, on a new channel, once RabbitMQ takes one."""
        while True:
            try:
                await consume()
                log.warning("%s: consuming stopped (RabbitMQ gone); starting again", queue_name)
            except _Outage as outage:
                log.warning("%s: %s; its messages go back to the queue, consuming again shortly", queue_name, outage)
            except InfrastructureUnavailable as exc:
                log.warning("%s: %s; consuming again shortly", queue_name, exc.detail)
            except (AMQPError, ChannelInvalidStateError, ConnectionError, TimeoutError) as exc:
                log.warning(
                    "%s: RabbitMQ failed (%s: %s); consuming again shortly", queue_name, type(exc).__name__, exc
                )
            except Exception:  # a bug, or aio-pika's way of saying the connection closed: log it, go on serving
                log.exception("%s: consuming failed; consuming again shortly", queue_name)
            await asyncio.sleep(RETRY_DELAY_S)

    @contextlib.asynccontextmanager
    async def _channel(self, queue_name: str, prefetch: int) -> AsyncIterator[tuple[AbstractChannel, AbstractQueue]]:
        """A channel of its own for one round of consuming `queue_name`; closing it requeues what it has not
        acked, in queue order."""
        channel = await self.bus.connection.channel()
        try:
            await channel.set_qos(prefetch_count=prefetch)
            yield channel, await channel.get_queue(self.bus.name(queue_name), ensure=True)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(channel.close(), self.platform.settings.connect_timeout_s)

    async def _consume(self, queue_name: str, handle: Handler) -> None:
        """One message at a time, in delivery order. A message that meets an outage ends the round unacked, so
        it comes back ahead of the ones after it (a requeue with those already delivered would reorder them)."""
        async with self._channel(queue_name, self.prefetch) as (channel, queue), queue.iterator() as messages:
            async for message in messages:
                if _stale(message):
                    continue
                reply = await self._replying(message, self._execute(message, handle))
                if reply is None:
                    raise _Outage("PostgreSQL or Redis is unavailable")
                await self._finish(channel, queue_name, message, reply)

    async def _consume_placements(self) -> None:
        """`order_placement`: each message is decoded and authenticated in delivery order and handed to a
        _PlacementFlow, which places them in groups that share a transaction and answers each message once its
        own order is committed. An outage ends the round once the groups before it are answered."""
        async with self._channel(PLACEMENT_QUEUE, self.placement_prefetch) as (channel, queue):
            flow = _PlacementFlow(self, channel)
            reading = asyncio.create_task(self._read_placements(queue, flow))
            outage = asyncio.create_task(flow.outage.wait())
            try:
                done, _ = await asyncio.wait({reading, outage}, return_when=asyncio.FIRST_COMPLETED)
                if reading in done:
                    reading.result()
            finally:
                for task in (reading, outage):
                    task.cancel()
                await asyncio.gather(reading, outage, return_exceptions=True)
                await flow.settle()  # placements under way commit: answer them before the channel closes
            if flow.outage.is_set():
                raise _Outage("PostgreSQL or Redis is unavailable")

    async def _read_placements(self, queue: AbstractQueue, flow: _PlacementFlow) -> None:
        async with queue.iterator() as messages:
            async for message in messages:
                if _stale(message):
                    continue
                decoded = await self._replying(message, self._execute(message, self._decode_placement))
                if decoded is None:
                    flow.outage.set()
                    return
                if isinstance(decoded, dict):
                    flow.answer(message, decoded)
                else:
                    flow.add(message, *decoded)

    async def _finish(
        self, channel: AbstractChannel, queue_name: str, message: AbstractIncomingMessage, reply: Reply
    ) -> None:
        """Reply (if asked) and ack. Either may be lost with the connection: RabbitMQ then delivers the message
        again, and applying it again changes nothing (see the module docstring)."""
        self.handled += 1
        if message.reply_to:
            try:
                await channel.default_exchange.publish(
                    aio_pika.Message(
                        orjson.dumps(reply), correlation_id=message.correlation_id, content_type="application/json"
                    ),
                    routing_key=message.reply_to,
                )
            except Exception as exc:  # the requester went away, or the connection: the command itself is done
                log.warning("%s: could not reply to %s: %s", queue_name, message.reply_to, exc)
        elif reply["status"] >= 400:
            log.info("%s: command refused (%s): %s", queue_name, reply.get("error"), reply.get("detail"))
        try:
            await message.ack()
        except Exception as exc:
            log.warning(
                "%s: the ack was lost (%s: %s); RabbitMQ delivers the message again",
                queue_name,
                type(exc).__name__,
                exc,
            )

    async def _replying(self, message: AbstractIncomingMessage, work: Awaitable[_T]) -> _T | Reply | None:
        """`work`'s result; a refused command as its reply; None when PostgreSQL or Redis is unavailable."""
        try:
            return await work
        except ValidationError as exc:
            detail = [{"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]} for e in exc.errors()]
            return _fail(422, "validation_error", detail)
        except InfrastructureUnavailable as exc:
            log.warning("%s; the message goes back to the queue", exc.detail)
            return None
        except TradeplaneError as exc:
            return _fail(exc.status_code, exc.code, exc.detail)
        except Exception:  # a bug: answer and ack, so one message cannot wedge the queue by redelivery
            log.exception("command failed: %.500r", message.body)
            return _fail(500, "internal", "the command failed; see the platform log")

    async def _execute(self, message: AbstractIncomingMessage, handle: Callable[..., Awaitable[_T]]) -> _T | Reply:
        try:
            command = orjson.loads(message.body)
        except orjson.JSONDecodeError:
            return _fail(400, "bad_json", "the message body must be one JSON object")
        if not isinstance(command, dict):
            return _fail(400, "bad_json", "the message body must be one JSON object")
        principal = await self._principal(_Identity.model_validate(command))
        body = {k: v for k, v in command.items() if k not in ("api_key", "user")}
        return await handle(principal, body, _message_key(message.message_id or ""))

    async def _principal(self, identity: _Identity) -> Principal:
        if identity.api_key:
            return await self.platform.authenticator.authenticate(self.platform.db.pool, identity.api_key)
        if identity.user:
            async with self.platform.db.connection("order_queues.user") as conn:
                row = await conn.fetchrow(
                    "SELECT id, username, role FROM users WHERE username = $1 AND is_active", identity.user
                )
            if row is None:
                raise AuthenticationFailed(f"no active user {identity.user!r}", code="unknown_user")
            return Principal(user_id=row["id"], username=row["username"], role=Role(row["role"]))
        raise AuthenticationFailed('a command needs "api_key" or "user"', code="missing_identity")

    # --- the commands: the same service calls as the REST handlers ----------------------------------------

    async def _decode_placement(
        self, principal: Principal, body: dict[str, Any], message_id: str
    ) -> tuple[Principal, OrderRequest]:
        return principal, self._request(body, message_id)

    @staticmethod
    async def _placed(placing: Placing) -> Reply:
        return _placement_reply(await placing)  # PlacementQueue has dropped the caches and woken the relay

    @staticmethod
    def _request(body: dict[str, Any], message_id: str) -> OrderRequest:
        order = OrderCreate.model_validate(body)
        client_order_id = order.client_order_id
        if client_order_id is None and message_id:
            client_order_id = f"amqp-{message_id}"[:64]
        return OrderRequest(order.account_id, order.symbol, order.terms(), client_order_id)

    async def modify(self, principal: Principal, body: dict[str, Any], message_id: str) -> Reply:
        amend = _Modify.model_validate(body)
        entry = order_entry(self.platform)
        async with self.platform.db.transaction("orders.modify") as conn:
            earlier = await _reply_to_copy(conn, MODIFICATION_QUEUE, message_id)
            if earlier is not None:
                return earlier
            amendment = await entry.modify_order(
                conn, principal, amend.order_id, quantity=amend.quantity, price=amend.price
            )
            if amendment.rejection is not None:
                reply = _risk_rejected(amendment.rejection, amendment.order)
            else:
                reply = {"status": 200, "order": amendment.order.to_json()}
            await _record_reply(conn, principal, MODIFICATION_QUEUE, message_id, reply)
        if amendment.rejection is None:
            await queries.after_order_commit(self.platform.cache, amendment.owner_user_id)
        return reply

    async def cancel(self, principal: Principal, body: dict[str, Any], message_id: str) -> Reply:
        target = _Cancel.model_validate(body)
        entry = order_entry(self.platform)
        if target.order_id is None and target.account_id is None:
            return _fail(422, "validation_error", "give order_id, or account_id to cancel all its orders")
        operation = "orders.cancel" if target.order_id is not None else "orders.cancel_all"
        async with self.platform.db.transaction(operation) as conn:
            earlier = await _reply_to_copy(conn, CANCELLATION_QUEUE, message_id)
            if earlier is not None:
                return earlier
            reply: Reply
            if target.order_id is not None:
                order = await entry.cancel_order(conn, principal, target.order_id)
                owner = await conn.fetchval("SELECT user_id FROM accounts WHERE id = $1", order.account_id)
                reply, changed = {"status": 200, "order": order.to_json()}, True
            else:
                assert target.account_id is not None
                orders = await entry.cancel_all(conn, principal, target.account_id, target.symbol)
                owner = await conn.fetchval("SELECT user_id FROM accounts WHERE id = $1", target.account_id)
                reply, changed = {"status": 200, "orders": [o.to_json() for o in orders]}, bool(orders)
            await _record_reply(conn, principal, CANCELLATION_QUEUE, message_id, reply)
        if changed:
            await queries.after_order_commit(self.platform.cache, owner)
        return reply

    # --- position updates --------------------------------------------------------------------------------

    def _on_user_event(self, channel: str, payload: bytes) -> None:
        """From the engine's private events (one envelope, or a batch's JSON array of them; see workers.engine)
        keep the position changes, in order; publishing happens in its own task."""
        if b'"positions"' not in payload:
            return
        try:
            user_id = int(channel.rsplit(":", 1)[1])
            decoded = orjson.loads(payload)
        except (orjson.JSONDecodeError, ValueError):
            log.warning("ignoring a malformed private event on %s", channel)
            return
        for envelope in decoded if isinstance(decoded, list) else [decoded]:
            if not isinstance(envelope, dict) or envelope.get("channel") != "positions":
                continue
            try:
                self._positions.put_nowait((user_id, envelope))
            except asyncio.QueueFull:
                self._positions.get_nowait()
                log.warning("position_updates backlog full; dropped the oldest update")
                self._positions.put_nowait((user_id, envelope))

    async def _publish_positions(self) -> None:
        while True:
            user_id, envelope = await self._positions.get()
            message = orjson.dumps({"user_id": user_id, **envelope})
            while True:
                try:
                    await self.bus.publish(POSITION_UPDATES_QUEUE, message, f"position-{uuid.uuid4().hex}")
                    self.positions_published += 1
                    break
                except InfrastructureUnavailable as exc:
                    log.warning("position_updates: %s; retrying", exc.detail)
                    await asyncio.sleep(RETRY_DELAY_S)


async def _reply_to_copy(conn: asyncpg.Connection, queue_name: str, message_id: str) -> Reply | None:
    """The reply recorded for message `message_id` of `queue_name` if it was applied already, else None; from
    here to the end of the transaction no other copy of the message gets past this (an advisory lock)."""
    if not message_id:
        return None
    await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"{queue_name}/{message_id}")
    recorded = await conn.fetchval(
        "SELECT details->'reply' FROM audit_log WHERE entity = $1 AND entity_id = $2 LIMIT 1",
        f"amqp.{queue_name}",
        message_id,
    )
    return None if recorded is None else dict(orjson.loads(recorded))


async def _record_reply(
    conn: asyncpg.Connection, principal: Principal, queue_name: str, message_id: str, reply: Reply
) -> None:
    """Note in the audit log, in the transaction that applied it, that message `message_id` was applied."""
    if message_id:
        await conn.execute(
            "INSERT INTO audit_log (actor_user_id, action, entity, entity_id, details)"
            " VALUES ($1, 'amqp.command', $2, $3, jsonb_build_object('reply', $4::text::jsonb))",
            principal.user_id,
            f"amqp.{queue_name}",
            message_id,
            orjson.dumps(reply).decode(),
        )


def _message_key(message_id: str) -> str:
    """What identifies a message's copies (in `amqp-<key>` client_order_ids, the audit log, advisory locks): its
    message_id when that is printable ASCII, as a client_order_id must be, else a digest of it, since PostgreSQL
    refuses some characters (NUL) that an AMQP message_id may hold."""
    if message_id.isascii() and message_id.isprintable():
        return message_id
    return "sha256:" + hashlib.sha256(message_id.encode("utf-8", "surrogatepass")).hexdigest()


class _Outage(Exception):
    """PostgreSQL or Redis failed a command: this round of consuming its queue ends (_keep_consuming)."""


def _stale(message: AbstractIncomingMessage) -> bool:
    """Delivered on a channel that has closed since (aio-pika may still hold such copies after it reconnects):
    RabbitMQ has requeued the message and delivers it again, so this copy is not to be applied."""
    try:
        message.channel  # noqa: B018 - raises once the channel it came on is closed
    except ChannelInvalidStateError:
        return True
    return False


class _PlacementFlow:
    """order_placement's messages from decoding to ack, on one channel.

    Placements go to the PlacementQueue one group at a time: the messages that arrive while a group is being
    placed wait here and make up the next group once that one is settled (the PlacementQueue would have grouped
    them so anyway). When a group fails for want of PostgreSQL, nothing delivered after it has been placed: the
    round ends (`outage`), the groups before it are answered, and closing the channel hands the failed group and
    everything after it back to RabbitMQ in queue order. Had the later ones been placed meanwhile, the failed
    ones would come back after them: an account's orders committed out of the order they were sent in (time
    priority, funds taken by the later order).
    """

    def __init__(self, worker: OrderQueueWorker, channel: AbstractChannel) -> None:
        self.worker = worker
        self.channel = channel
        self.waiting: list[tuple[AbstractIncomingMessage, Principal, OrderRequest]] = []
        self.outage = asyncio.Event()
        self._placing: asyncio.Task[None] | None = None
        self._finishing: set[asyncio.Task[None]] = set()
        self._closed = False

    def answer(self, message: AbstractIncomingMessage, reply: Reply) -> None:
        self._spawn(self.worker._finish(self.channel, PLACEMENT_QUEUE, message, reply))

    def add(self, message: AbstractIncomingMessage, principal: Principal, request: OrderRequest) -> None:
        self.waiting.append((message, principal, request))
        if self._placing is None or self._placing.done():
            self._placing = asyncio.create_task(self._place())

    async def _place(self) -> None:
        while self.waiting and not self.outage.is_set() and not self._closed:
            group, self.waiting = self.waiting[:MAX_BATCH], self.waiting[MAX_BATCH:]
            submitted: list[Placing] = []
            for message, principal, request in group:
                if _stale(message):  # its channel closed while it waited: the copy delivered again is placed
                    continue
                try:
                    placing = self.worker.placements.submit(principal, request)
                except TradeplaneError as exc:  # refused before it was queued (a role that may not trade)
                    self.answer(message, _fail(exc.status_code, exc.code, exc.detail))
                    continue
                submitted.append(placing)
                self._spawn(self._finish_placement(message, placing))
            if submitted:
                await asyncio.wait(submitted)
                if any(not p.cancelled() and isinstance(p.exception(), InfrastructureUnavailable) for p in submitted):
                    self.outage.set()

    async def _finish_placement(self, message: AbstractIncomingMessage, placing: Placing) -> None:
        reply = await self.worker._replying(message, self.worker._placed(placing))
        if reply is None:
            self.outage.set()  # left unacked: it goes back to the queue with the channel
            return
        await self.worker._finish(self.channel, PLACEMENT_QUEUE, message, reply)

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)

    async def settle(self) -> None:
        """Place no more groups; wait (a while) for the one under way and the answers being sent."""
        self._closed = True
        pending: set[asyncio.Future[None]] = set(self._finishing)
        if self._placing is not None:
            pending.add(self._placing)
        if pending:
            _, late = await asyncio.wait(pending, timeout=RETRY_DELAY_S * 5)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)


async def run_order_queues(platform: Platform, stop: asyncio.Event) -> None:
    """Entry point for `tradeplane up` / `run order-queues` when the bus is RabbitMQ."""
    await OrderQueueWorker(platform).run(stop)
