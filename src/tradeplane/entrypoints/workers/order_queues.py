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
A message is acked once its result is committed (and replied); an outage of PostgreSQL or Redis naks it for
redelivery instead. Each queue is consumed in order. Modifications and cancellations run one message at a time;
placements are queued in delivery order and the prefetched ones share a transaction, committed one after the
other (group commit, as for REST), so a burst costs a few statements per batch rather than per order.

Redelivery: RabbitMQ delivers at least once. A placement without a client_order_id gets
`amqp-<message_id>` as one when the message has a message_id, so a redelivered placement returns the
original order instead of placing a second one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import aio_pika
import orjson
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from pydantic import BaseModel, ConfigDict, Strict, ValidationError

from tradeplane.adapters.bus.rabbitmq import RabbitMqBus
from tradeplane.adapters.pubsub import PubSubFanout
from tradeplane.bootstrap import Platform
from tradeplane.domain.risk import RiskRejection
from tradeplane.entrypoints.api.schemas import OrderAmend, OrderCreate, RowId
from tradeplane.errors import AuthenticationFailed, ConfigError, InfrastructureUnavailable, TradeplaneError
from tradeplane.services import queries
from tradeplane.services.identity import Principal, Role
from tradeplane.services.orders import (
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
    """Who a command acts for: an API key, or (trusted services) a username."""

    model_config = ConfigDict(extra="ignore")

    api_key: str | None = None
    user: str | None = None


class _Modify(OrderAmend):
    """OrderAmend plus the order it amends. Ids are strict: JSON true is not order 1."""

    order_id: Annotated[RowId, Strict()]


class _Cancel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    order_id: Annotated[RowId, Strict()] | None = None
    account_id: Annotated[RowId, Strict()] | None = None
    symbol: str | None = None


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
        self._channels: list[AbstractChannel] = []
        self.ready = asyncio.Event()
        """Set once position events are subscribed to (commands wait in their queues until consumed anyway)."""

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set. The bus topology must exist (`setup`)."""
        fanout = PubSubFanout(self.platform.cache.client, confirm_timeout=self.platform.settings.connect_timeout_s)
        await fanout.psubscribe("tp:user:*", self._on_user_event)
        self.ready.set()
        tasks = [
            asyncio.create_task(self._consume_placements()),
            asyncio.create_task(self._consume(MODIFICATION_QUEUE, self.modify)),
            asyncio.create_task(self._consume(CANCELLATION_QUEUE, self.cancel)),
            asyncio.create_task(self._publish_positions()),
        ]
        log.info("consuming %s, %s, %s", PLACEMENT_QUEUE, MODIFICATION_QUEUE, CANCELLATION_QUEUE)
        stopping = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait([stopping, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stopping:
                    task.result()  # a consumer died: raise its error
        finally:
            stopping.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await fanout.close()
            for channel in self._channels:
                with contextlib.suppress(Exception):
                    await channel.close()

    # --- consuming -------------------------------------------------------------------------------------

    async def _consume(self, queue_name: str, handle: Handler) -> None:
        channel, queue = await self._open(queue_name, self.prefetch)
        async with queue.iterator() as messages:
            async for message in messages:
                reply = await self._replying(message, self._execute(message, handle))
                await self._finish(channel, queue_name, message, reply)

    async def _consume_placements(self) -> None:
        """`order_placement`: each message is decoded, authenticated and queued in delivery order without
        waiting for the one before it to commit, so the prefetched ones share a transaction
        (PlacementQueue, one placement at a time: they also commit in delivery order). Each message is replied
        to and acked once its own order is committed."""
        channel, queue = await self._open(PLACEMENT_QUEUE, self.placement_prefetch)
        finishing: set[asyncio.Task[None]] = set()
        try:
            async with queue.iterator() as messages:
                async for message in messages:
                    queueing = self._execute(message, self._queue_placement)
                    queued = await self._replying(message, queueing)
                    task = asyncio.create_task(self._finish_placement(channel, message, queued))
                    finishing.add(task)
                    task.add_done_callback(finishing.discard)
        finally:  # placements under way commit: answer them before the channel closes
            if finishing:
                _, late = await asyncio.wait(finishing, timeout=RETRY_DELAY_S * 5)
                for task in late:
                    task.cancel()

    async def _open(self, queue_name: str, prefetch: int) -> tuple[AbstractChannel, AbstractQueue]:
        channel = await self.bus.connection.channel()
        self._channels.append(channel)
        await channel.set_qos(prefetch_count=prefetch)
        return channel, await channel.get_queue(self.bus.name(queue_name), ensure=True)

    async def _finish_placement(
        self, channel: AbstractChannel, message: AbstractIncomingMessage, queued: Placing | Reply | None
    ) -> None:
        reply = await self._replying(message, self._placed(queued)) if isinstance(queued, asyncio.Future) else queued
        await self._finish(channel, PLACEMENT_QUEUE, message, reply)

    async def _finish(
        self, channel: AbstractChannel, queue_name: str, message: AbstractIncomingMessage, reply: Reply | None
    ) -> None:
        """Reply (if asked) and ack; None (PostgreSQL or Redis is down) sends the message back to its queue."""
        if reply is None:
            await asyncio.sleep(RETRY_DELAY_S)
            await message.nack(requeue=True)
            return
        self.handled += 1
        if message.reply_to:
            try:
                await channel.default_exchange.publish(
                    aio_pika.Message(
                        orjson.dumps(reply), correlation_id=message.correlation_id, content_type="application/json"
                    ),
                    routing_key=message.reply_to,
                )
            except Exception as exc:  # the requester went away: the command itself is done
                log.warning("%s: could not reply to %s: %s", queue_name, message.reply_to, exc)
        elif reply["status"] >= 400:
            log.info("%s: command refused (%s): %s", queue_name, reply.get("error"), reply.get("detail"))
        await message.ack()

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
        return await handle(principal, body, message.message_id or "")

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

    async def _queue_placement(self, principal: Principal, body: dict[str, Any], message_id: str) -> Placing:
        return self.placements.submit(principal, self._request(body, message_id))

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
            amendment = await entry.modify_order(
                conn, principal, amend.order_id, quantity=amend.quantity, price=amend.price
            )
        if amendment.rejection is not None:
            return _risk_rejected(amendment.rejection, amendment.order)
        await queries.after_order_commit(self.platform.cache, amendment.owner_user_id)
        return {"status": 200, "order": amendment.order.to_json()}

    async def cancel(self, principal: Principal, body: dict[str, Any], message_id: str) -> Reply:
        target = _Cancel.model_validate(body)
        entry = order_entry(self.platform)
        if target.order_id is not None:
            async with self.platform.db.transaction("orders.cancel") as conn:
                order = await entry.cancel_order(conn, principal, target.order_id)
                owner = await conn.fetchval("SELECT user_id FROM accounts WHERE id = $1", order.account_id)
            await queries.after_order_commit(self.platform.cache, owner)
            return {"status": 200, "order": order.to_json()}
        if target.account_id is None:
            return _fail(422, "validation_error", "give order_id, or account_id to cancel all its orders")
        async with self.platform.db.transaction("orders.cancel_all") as conn:
            orders = await entry.cancel_all(conn, principal, target.account_id, target.symbol)
            owner = await conn.fetchval("SELECT user_id FROM accounts WHERE id = $1", target.account_id)
        if orders:
            await queries.after_order_commit(self.platform.cache, owner)
        return {"status": 200, "orders": [o.to_json() for o in orders]}

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


async def run_order_queues(platform: Platform, stop: asyncio.Event) -> None:
    """Entry point for `tradeplane up` / `run order-queues` when the bus is RabbitMQ."""
    await OrderQueueWorker(platform).run(stop)
