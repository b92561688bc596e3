"""Order entry: place, modify, cancel and cancel-all, each inside the caller's transaction.

Placement, in one PostgreSQL transaction that the caller commits::

    shape check (422 validation_error, nothing stored)
    lock the account row (FOR NO KEY UPDATE) ─ serialises every placement of one account, so two concurrent
                                               orders can never both spend the same free cash, and a retry
                                               with the same client_order_id always sees the first one
    read exposure  ‖  Redis rate counter     ─ one statement (fresh snapshot, after the lock) in parallel
                                               with INCR + EXPIRE of ratelimit:orders:{account}:{second}
    idempotency: same client_order_id → the original order (same terms) or 409 (different terms)
    domain.risk.assess → accepted or rejected
    one statement: order row + hold + outbox "new" + audit row   (rejected: order row + audit row only)

The locks are FOR NO KEY UPDATE, not FOR UPDATE: the engine's batch inserts fills and ledger entries that
reference the account and order rows (foreign keys take KEY SHARE locks), and FOR UPDATE would block those
while this transaction waits for an order row the engine holds: a deadlock.

A risk denial is a result (``Placement.rejection``), not an exception: the caller commits so the rejected
order is kept for audit. Exceptions (``InvalidRequest``, ``NotFound``, ``PermissionDenied``, ``Conflict``)
mean nothing is to be stored and the caller rolls back.

Order statuses set here go through ``domain.orders.transition``; the engine finalises everything else.
After commit the caller drops the user's read-through caches and wakes the relay (``queries.after_order_commit``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import asyncpg

from tradeplane.adapters.bus import order_stream
from tradeplane.adapters.cache import REDIS_ERRORS, Cache
from tradeplane.adapters.postgres import Database
from tradeplane.domain.orders import (
    OPEN_STATUSES,
    OrderStatus,
    OrderType,
    SelfTradePrevention,
    Side,
    TimeInForce,
    transition,
)
from tradeplane.domain.reservations import shard_for
from tradeplane.domain.risk import (
    Acceptance,
    Exposure,
    InstrumentRules,
    MarketState,
    OrderTerms,
    RiskLimits,
    RiskReason,
    RiskRejection,
    assess,
    check_band,
    check_funds,
    check_grid,
    check_limits,
    check_reduce_only,
    expiry_for,
    reserve,
    shape_error,
)
from tradeplane.errors import Conflict, InfrastructureUnavailable, InvalidRequest, NotFound
from tradeplane.metrics import ORDER_PLACEMENT_DURATION
from tradeplane.services.identity import Principal, Role
from tradeplane.services.queries import (
    ORDER_COLUMNS,
    InstrumentCatalog,
    OrderRecord,
    decimal_text,
    order_from_row,
    sees_all_accounts,
)

if TYPE_CHECKING:
    from tradeplane.bootstrap import Platform

log = logging.getLogger("tradeplane.orders")

RATE_WINDOW_TTL_S = 2  # a one-second window's counter outlives its second briefly, then Redis drops it
_WRITERS = frozenset({Role.ADMIN, Role.TRADER, Role.SYSTEM})
_OPEN_SQL = "('pending_new', 'new', 'partially_filled', 'pending_cancel')"
_CANCELABLE = (OrderStatus.PENDING_NEW, OrderStatus.NEW, OrderStatus.PARTIALLY_FILLED)
# cancel-all moves these in one UPDATE: make sure the transition table allows every one of them
assert all(transition(s, OrderStatus.PENDING_CANCEL) for s in _CANCELABLE)


def utc_now() -> datetime:
    return datetime.now(UTC)


def rate_limit_key(account_id: int, epoch_second: int) -> str:
    return f"ratelimit:orders:{account_id}:{epoch_second}"


@dataclass(frozen=True, slots=True)
class OrderRequest:
    """A placement as any entrypoint (REST, WebSocket, RabbitMQ ``order_placement``) hands it over."""

    account_id: int
    symbol: str
    terms: OrderTerms
    client_order_id: str | None = None


class PlacementOutcome(StrEnum):
    ACCEPTED = "accepted"  # a new order: 201
    REPLAYED = "replayed"  # same client_order_id and terms as an earlier order: that order, 200 (or 422)
    REJECTED = "rejected"  # risk said no: the rejected order is stored, 422 risk_rejected


@dataclass(frozen=True, slots=True)
class Placement:
    outcome: PlacementOutcome
    order: OrderRecord | None  # None only for an unknown instrument: there is no row to store
    rejection: RiskRejection | None
    owner_user_id: int | None


@dataclass(frozen=True, slots=True)
class Amendment:
    """The result of a modify: the order (unchanged in PostgreSQL until the engine applies the modify)."""

    order: OrderRecord
    rejection: RiskRejection | None
    owner_user_id: int | None


def _require_writer(principal: Principal) -> None:
    principal.require(*sorted(_WRITERS))


def terms_of_row(row: asyncpg.Record) -> OrderTerms:
    """An order row's terms as the client sent them (a DAY order's computed expiry is not one of them)."""
    tif = TimeInForce(row["time_in_force"])
    return OrderTerms(
        side=Side(row["side"]),
        order_type=OrderType(row["type"]),
        quantity=row["quantity"],
        price=row["price"],
        stop_price=row["stop_price"],
        time_in_force=tif,
        expire_at=row["expire_at"] if tif is TimeInForce.GTD else None,
        post_only=row["post_only"],
        reduce_only=row["reduce_only"],
        stp=SelfTradePrevention(row["stp_mode"]),
    )


def _rejection_of(order: OrderRecord) -> RiskRejection | None:
    if order.status != OrderStatus.REJECTED:
        return None
    reason = order.reject_reason or ""
    try:
        return RiskRejection(RiskReason(reason), "the original order was rejected")
    except ValueError:  # an engine reject reason (e.g. post_only_would_take) is not a RiskReason
        return None


_LOCK_ACCOUNT = "SELECT user_id, kind, status FROM accounts WHERE id = $1 FOR NO KEY UPDATE"

# After the account lock, in a new statement (READ COMMITTED: a fresh snapshot that sees every placement that
# committed while we waited for the lock).
_EXPOSURE = f"""
SELECT i.status, i.last_price, i.reference_price,
       (SELECT o.id FROM orders o WHERE o.account_id = $1 AND o.client_order_id = $3) AS existing_id,
       rl.max_order_qty, rl.max_order_notional, rl.max_position, rl.max_open_orders, rl.max_orders_per_second,
       coalesce(p.net_quantity, 0) AS net_position,
       oo.open_orders, oo.buy_leaves, oo.sell_leaves, oo.ro_buy_leaves, oo.ro_sell_leaves,
       coalesce((SELECT b.amount FROM balances b WHERE b.account_id = $1 AND b.asset = $4), 0)
         - coalesce((SELECT sum(h.amount) FROM holds h
                     WHERE h.account_id = $1 AND h.asset = $4 AND h.released_at IS NULL), 0) AS free_quote,
       coalesce(p.net_quantity, 0)
         - coalesce((SELECT sum(h.amount) FROM holds h
                     WHERE h.account_id = $1 AND h.asset = $5 AND h.released_at IS NULL), 0) AS free_base
FROM instruments i
LEFT JOIN LATERAL (
    SELECT r.* FROM risk_limits r
    WHERE r.account_id = $1 AND (r.instrument_id = i.id OR r.instrument_id IS NULL)
    ORDER BY r.instrument_id NULLS LAST LIMIT 1
) rl ON TRUE
LEFT JOIN positions p ON p.account_id = $1 AND p.instrument_id = i.id
CROSS JOIN LATERAL (
    SELECT count(*) AS open_orders,
           coalesce(sum(o.quantity - o.filled_quantity) FILTER (WHERE o.side = 'buy'), 0) AS buy_leaves,
           coalesce(sum(o.quantity - o.filled_quantity) FILTER (WHERE o.side = 'sell'), 0) AS sell_leaves,
           coalesce(sum(o.quantity - o.filled_quantity) FILTER (WHERE o.side = 'buy' AND o.reduce_only), 0)
             AS ro_buy_leaves,
           coalesce(sum(o.quantity - o.filled_quantity) FILTER (WHERE o.side = 'sell' AND o.reduce_only), 0)
             AS ro_sell_leaves
    FROM orders o
    WHERE o.account_id = $1 AND o.instrument_id = i.id AND o.status IN {_OPEN_SQL}
      AND o.id IS DISTINCT FROM $6::bigint
      -- only scan the open orders when a rule needs them (a one-time filter: no scan at all otherwise)
      AND ($7::boolean OR rl.max_position IS NOT NULL OR rl.max_open_orders IS NOT NULL)
) oo
WHERE i.id = $2
"""

# One statement writes the order and everything that must commit with it. For a rejected order the hold and
# outbox parameters are NULL and those inserts select nothing.
_INSERT_ORDER = """
WITH o AS (
    INSERT INTO orders (account_id, instrument_id, client_order_id, side, type, time_in_force, quantity, price,
                        stop_price, expire_at, post_only, reduce_only, stp_mode, status, reject_reason, hold_price,
                        created_at, updated_at)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $17)
    RETURNING *
), h AS (
    INSERT INTO holds (account_id, asset, amount, order_id, created_at)
    SELECT o.account_id, $18, $19::numeric, o.id, $17 FROM o WHERE $19::numeric > 0
), x AS (
    INSERT INTO outbox (stream, key, payload, created_at)
    SELECT $20::text, $25::text, $21::text::jsonb || jsonb_build_object('order_id', o.id), $17 FROM o
    WHERE $20::text IS NOT NULL
), a AS (
    INSERT INTO audit_log (actor_user_id, action, entity, entity_id, details)
    SELECT $22, $23, 'order', o.id::text, $24::text::jsonb || jsonb_build_object('status', o.status) FROM o
)
SELECT * FROM o
"""

_LOCK_ORDER = f"""
SELECT {ORDER_COLUMNS}, o.instrument_id, o.hold_price, a.user_id, a.kind AS account_kind
FROM orders o JOIN accounts a ON a.id = o.account_id JOIN instruments i ON i.id = o.instrument_id
WHERE o.id = $1
FOR NO KEY UPDATE OF a, o
"""

_AUDIT = (
    "INSERT INTO audit_log (actor_user_id, action, entity, entity_id, details)"
    " VALUES ($1, $2, 'order', $3, $4::text::jsonb)"
)


class OrderEntry:
    """The order path's use cases. One per process: it holds the in-process instrument catalog.

    ``clock`` is injected so tests drive time (DAY expiry, GTD checks, the rate window, timestamps).
    """

    def __init__(
        self,
        cache: Cache,
        *,
        shards: int,
        catalog: InstrumentCatalog | None = None,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.cache = cache
        self.shards = shards
        self.catalog = catalog or InstrumentCatalog()
        self.clock = clock

    def stream_for(self, symbol: str) -> str:
        return order_stream(shard_for(symbol, self.shards))

    # ------------------------------------------------------------------------------------------- place

    async def place_order(self, conn: asyncpg.Connection, principal: Principal, request: OrderRequest) -> Placement:
        """Validate, run pre-trade risk and store the order (accepted or rejected) in the caller's transaction.

        Raises InvalidRequest (code ``validation_error``) for a malformed request, PermissionDenied for a
        readonly principal, NotFound for an account the principal may not trade, Conflict
        (``duplicate_client_order_id``) for a reused client_order_id with different terms.
        """
        _require_writer(principal)
        now = self.clock()
        terms = request.terms
        problem = shape_error(terms, now)
        if problem is None and request.client_order_id is not None and not 1 <= len(request.client_order_id) <= 64:
            problem = "client_order_id must be 1 to 64 characters"
        if problem is not None:
            raise InvalidRequest(problem, code="validation_error")

        account = await conn.fetchrow(_LOCK_ACCOUNT, request.account_id)
        if (
            account is None
            or account["kind"] == "house"
            or (not sees_all_accounts(principal) and account["user_id"] != principal.user_id)
        ):
            raise NotFound(f"no account {request.account_id}", code="account_not_found")
        owner: int | None = account["user_id"]

        rules = await self.catalog.get(conn, request.symbol)
        if rules is None:
            rejection = RiskRejection(RiskReason.UNKNOWN_INSTRUMENT, f"no instrument {request.symbol!r}")
            await conn.execute(
                _AUDIT,
                principal.user_id,
                "order.reject",
                None,
                json.dumps(
                    {"account_id": request.account_id, "symbol": request.symbol, "reason": rejection.reason.value}
                ),
            )
            return Placement(PlacementOutcome.REJECTED, None, rejection, owner)

        exposure_row, orders_this_second = await asyncio.gather(
            conn.fetchrow(
                _EXPOSURE,
                request.account_id,
                rules.instrument_id,
                request.client_order_id,
                rules.quote_asset,
                rules.base_asset,
                None,
                terms.reduce_only,
            ),
            self._count_order(request.account_id, now),
        )
        assert exposure_row is not None  # the catalog only knows instruments that exist

        if exposure_row["existing_id"] is not None:
            return await self._replay(conn, exposure_row["existing_id"], rules, request, owner)

        market = MarketState(exposure_row["status"], exposure_row["last_price"], exposure_row["reference_price"])
        verdict = assess(
            terms,
            rules,
            market,
            _limits_of(exposure_row),
            _exposure_of(exposure_row, account["kind"]),
            orders_this_second=orders_this_second,
            account_active=account["status"] == "active",
        )
        order = await self._insert(conn, principal, request, rules, now, verdict)
        if isinstance(verdict, RiskRejection):
            return Placement(PlacementOutcome.REJECTED, order, verdict, owner)
        return Placement(PlacementOutcome.ACCEPTED, order, None, owner)

    async def _count_order(self, account_id: int, now: datetime) -> int:
        """This order's place in its account's one-second window, shared by every api replica."""
        key = rate_limit_key(account_id, int(now.timestamp()))
        try:
            async with self.cache.client.pipeline(transaction=False) as pipe:
                pipe.incr(key)
                pipe.expire(key, RATE_WINDOW_TTL_S)
                count, _ = await pipe.execute()
        except REDIS_ERRORS as exc:
            raise InfrastructureUnavailable(f"Redis unavailable for the order rate limit: {exc}") from exc
        return int(count)

    async def _replay(
        self, conn: asyncpg.Connection, order_id: int, rules: InstrumentRules, request: OrderRequest, owner: int | None
    ) -> Placement:
        row = await conn.fetchrow(
            f"SELECT {ORDER_COLUMNS}, o.instrument_id FROM orders o JOIN instruments i ON i.id = o.instrument_id"
            " WHERE o.id = $1",
            order_id,
        )
        assert row is not None
        if row["instrument_id"] != rules.instrument_id or terms_of_row(row) != request.terms:
            raise Conflict(
                f"client_order_id {request.client_order_id!r} was already used for order {order_id}"
                " with different parameters",
                code="duplicate_client_order_id",
            )
        order = order_from_row(row)
        return Placement(PlacementOutcome.REPLAYED, order, _rejection_of(order), owner)

    async def _insert(
        self,
        conn: asyncpg.Connection,
        principal: Principal,
        request: OrderRequest,
        rules: InstrumentRules,
        now: datetime,
        verdict: Acceptance | RiskRejection,
    ) -> OrderRecord:
        t = request.terms
        expire_at = expiry_for(t, rules, now)
        audit: dict[str, Any] = {
            "account_id": request.account_id,
            "symbol": rules.symbol,
            "side": t.side.value,
            "type": t.order_type.value,
            "quantity": decimal_text(t.quantity),
            "price": None if t.price is None else decimal_text(t.price),
            "client_order_id": request.client_order_id,
        }
        if isinstance(verdict, RiskRejection):
            status = transition(OrderStatus.PENDING_NEW, OrderStatus.REJECTED)
            audit["reason"] = verdict.reason.value
            hold_asset = hold_amount = stream = payload = None
            hold_price = None
            action = "order.reject"
        else:
            status = OrderStatus.PENDING_NEW
            hold_price = verdict.hold_price
            hold_asset, hold_amount = verdict.reservation.asset, verdict.reservation.amount
            stream = self.stream_for(rules.symbol)
            payload = json.dumps(
                {
                    "type": "new",
                    "account_id": request.account_id,
                    "symbol": rules.symbol,
                    "side": t.side.value,
                    "order_type": t.order_type.value,
                    "qty": decimal_text(t.quantity),
                    "price": None if t.price is None else decimal_text(t.price),
                    "stop_price": None if t.stop_price is None else decimal_text(t.stop_price),
                    "time_in_force": t.time_in_force.value,
                    "expire_at": None if expire_at is None else expire_at.astimezone(UTC).isoformat(),
                    "post_only": t.post_only,
                    "stp": t.stp.value,
                }
            )
            action = "order.place"
        row = await conn.fetchrow(
            _INSERT_ORDER,
            request.account_id,
            rules.instrument_id,
            request.client_order_id,
            t.side.value,
            t.order_type.value,
            t.time_in_force.value,
            t.quantity,
            t.price,
            t.stop_price,
            expire_at,
            t.post_only,
            t.reduce_only,
            t.stp.value,
            status.value,
            None if isinstance(verdict, Acceptance) else verdict.reason.value,
            hold_price,
            now,
            hold_asset,
            hold_amount,
            stream,
            payload,
            principal.user_id,
            action,
            json.dumps(audit),
            rules.symbol,
        )
        assert row is not None
        return order_from_row(row, rules.symbol)

    # ------------------------------------------------------------------------------------------ modify

    async def modify_order(
        self,
        conn: asyncpg.Connection,
        principal: Principal,
        order_id: int,
        *,
        quantity: Decimal | None = None,
        price: Decimal | None = None,
    ) -> Amendment:
        """Ask the engine to change an open order's total quantity and/or limit price.

        The order row itself changes when the engine applies the modify. Here: the new terms pass the same
        grid, band and limit checks as a new order; a larger reservation (more quantity, a higher buy price) is
        checked against free funds and the hold raised now, in this transaction, so the engine never works
        with an under-funded order. A smaller reservation is released by the engine when it applies the change.
        Raises NotFound, PermissionDenied, InvalidRequest (validation_error), Conflict (order_not_open).
        """
        _require_writer(principal)
        if quantity is None and price is None:
            raise InvalidRequest("give a new quantity, a new price, or both", code="validation_error")
        for name, value in (("quantity", quantity), ("price", price)):
            if value is not None and (not value.is_finite() or value <= 0):
                raise InvalidRequest(f"{name} must be a positive number", code="validation_error")
        row = await self._lock_order(conn, principal, order_id)
        order = order_from_row(row)
        if OrderStatus(order.status) not in _CANCELABLE:
            raise Conflict(f"order {order_id} is {order.status}", code="order_not_open")
        if price is not None and OrderType(order.type) not in (OrderType.LIMIT, OrderType.STOP_LIMIT):
            raise InvalidRequest(f"a {order.type} order has no limit price to change", code="validation_error")
        if quantity is not None and quantity <= order.filled_quantity:
            raise InvalidRequest(
                f"the new quantity must exceed the filled quantity {decimal_text(order.filled_quantity)}",
                code="validation_error",
            )
        # Earlier modifies the engine may not have applied yet still count: the target is the last requested
        # terms (kept in the audit row of the last modify), overridden by what this request changes.
        pending_qty, pending_price = await self._pending_target(conn, order)
        new_qty = pending_qty if quantity is None else quantity
        new_price = pending_price if price is None else price
        rules = await self.catalog.by_id(conn, row["instrument_id"])
        side = Side(order.side)
        state = await conn.fetchrow(
            _EXPOSURE,
            order.account_id,
            rules.instrument_id,
            None,
            rules.quote_asset,
            rules.base_asset,
            order_id,
            order.reduce_only,
        )
        assert state is not None
        current_hold: Decimal = await conn.fetchval(
            "SELECT coalesce(sum(amount), 0) FROM holds WHERE order_id = $1 AND released_at IS NULL", order_id
        )
        exposure = _exposure_of(state, row["account_kind"])
        market = MarketState(state["status"], state["last_price"], state["reference_price"])
        hold_price: Decimal | None = row["hold_price"] or order.price or order.stop_price
        assert hold_price is not None  # every order the api stores has one
        if new_price is not None and OrderType(order.type) in (OrderType.LIMIT, OrderType.STOP_LIMIT):
            hold_price = max(hold_price, new_price)  # never below what fills in flight may still cost
        rejection = check_grid(rules, new_qty, price)
        if rejection is None and price is not None:
            rejection = check_band(rules, market, price)
        if rejection is None:
            rejection = check_limits(
                _limits_of(state),
                exposure,
                side,
                new_qty,
                new_qty * (new_price or hold_price),
                position_quantity=new_qty - order.filled_quantity,  # the filled part is already in the position
                new_order=False,
            )
        if rejection is None and order.reduce_only:
            rejection = check_reduce_only(side, new_qty - order.filled_quantity, exposure)
        needed = reserve(side, new_qty - order.filled_quantity, hold_price, rules, row["account_kind"])
        increase = needed.amount - current_hold
        if rejection is None and increase > 0:
            # free funds already exclude this order's current hold: only the increase must fit
            rejection = check_funds(replace(needed, amount=increase), rules, exposure)
        details: dict[str, Any] = {
            "new_qty": None if quantity is None else decimal_text(quantity),
            "new_price": None if price is None else decimal_text(price),
        }
        target = {
            "target_qty": decimal_text(new_qty),
            "target_price": None if new_price is None else decimal_text(new_price),
        }
        if rejection is not None:
            await conn.execute(
                _AUDIT,
                principal.user_id,
                "order.modify_reject",
                str(order_id),
                json.dumps({**details, "reason": rejection.reason.value}),
            )
            return Amendment(order, rejection, row["user_id"])
        now = self.clock()
        if increase > 0:
            updated = await conn.execute(
                "UPDATE holds SET amount = $2 WHERE order_id = $1 AND released_at IS NULL", order_id, needed.amount
            )
            if updated == "UPDATE 0":
                await conn.execute(
                    "INSERT INTO holds (account_id, asset, amount, order_id, created_at) VALUES ($1, $2, $3, $4, $5)",
                    order.account_id,
                    needed.asset,
                    needed.amount,
                    order_id,
                    now,
                )
        fresh = await conn.fetchrow(
            "UPDATE orders SET hold_price = $2, updated_at = $3 WHERE id = $1 RETURNING *", order_id, hold_price, now
        )
        payload = {"type": "modify", "order_id": order_id, "account_id": order.account_id, "symbol": order.symbol}
        await self._outbox_and_audit(
            conn, principal, order, {**payload, **details}, "order.modify", {**details, **target}, now
        )
        return Amendment(order_from_row(fresh, order.symbol), None, row["user_id"])

    # ------------------------------------------------------------------------------------------ cancel

    async def cancel_order(self, conn: asyncpg.Connection, principal: Principal, order_id: int) -> OrderRecord:
        """Mark an open order pending_cancel and ask its engine shard to cancel it.

        Canceling an order that is already pending_cancel changes nothing and returns it; a terminal order is
        a Conflict (``order_not_open``). The hold is released by the engine when the cancel takes effect.
        """
        _require_writer(principal)
        row = await self._lock_order(conn, principal, order_id)
        order = order_from_row(row)
        current = OrderStatus(order.status)
        if current is OrderStatus.PENDING_CANCEL:
            return order
        if current not in OPEN_STATUSES:
            raise Conflict(f"order {order_id} is {order.status}", code="order_not_open")
        now = self.clock()
        status = transition(current, OrderStatus.PENDING_CANCEL)
        fresh = await conn.fetchrow(
            "UPDATE orders SET status = $2, updated_at = $3 WHERE id = $1 RETURNING *", order_id, status.value, now
        )
        payload = {"type": "cancel", "order_id": order_id, "account_id": order.account_id, "symbol": order.symbol}
        await self._outbox_and_audit(conn, principal, order, payload, "order.cancel", {}, now)
        return order_from_row(fresh, order.symbol)

    async def cancel_all(
        self, conn: asyncpg.Connection, principal: Principal, account_id: int, symbol: str | None = None
    ) -> list[OrderRecord]:
        """Cancel every open order of an account (optionally of one symbol): one cancel per order, each to its
        symbol's shard. Orders already pending_cancel are left as they are. Returns the orders it moved."""
        _require_writer(principal)
        account = await conn.fetchrow(_LOCK_ACCOUNT, account_id)
        if (
            account is None
            or account["kind"] == "house"
            or (not sees_all_accounts(principal) and account["user_id"] != principal.user_id)
        ):
            raise NotFound(f"no account {account_id}", code="account_not_found")
        instrument_id = None if symbol is None else (await self.catalog.require(conn, symbol)).instrument_id
        rows = await conn.fetch(
            "SELECT o.id, o.instrument_id FROM orders o WHERE o.account_id = $1 AND o.status = ANY($2::text[])"
            " AND ($3::bigint IS NULL OR o.instrument_id = $3) ORDER BY o.id FOR NO KEY UPDATE",
            account_id,
            [s.value for s in _CANCELABLE],
            instrument_id,
        )
        if not rows:
            return []
        symbols = {r["instrument_id"]: (await self.catalog.by_id(conn, r["instrument_id"])).symbol for r in rows}
        now = self.clock()
        updated = await conn.fetch(
            f"""
            WITH c AS (
                UPDATE orders o SET status = 'pending_cancel', updated_at = $2
                FROM instruments i WHERE i.id = o.instrument_id AND o.id = ANY($1::bigint[])
                RETURNING {ORDER_COLUMNS}
            ), s AS (
                SELECT * FROM unnest($3::text[], $4::text[]) AS s(symbol, stream)
            ), x AS (
                INSERT INTO outbox (stream, key, payload, created_at)
                SELECT s.stream, c.symbol, jsonb_build_object('type', 'cancel', 'order_id', c.id,
                       'account_id', c.account_id, 'symbol', c.symbol), $2
                FROM c JOIN s ON s.symbol = c.symbol ORDER BY c.id
            ), a AS (
                INSERT INTO audit_log (actor_user_id, action, entity, entity_id, details)
                SELECT $5, 'order.cancel', 'order', c.id::text, jsonb_build_object('cancel_all', true) FROM c
            )
            SELECT * FROM c ORDER BY id
            """,
            [r["id"] for r in rows],
            now,
            list(symbols.values()),
            [self.stream_for(s) for s in symbols.values()],
            principal.user_id,
        )
        return [order_from_row(r) for r in updated]

    # ----------------------------------------------------------------------------------------- helpers

    async def _lock_order(self, conn: asyncpg.Connection, principal: Principal, order_id: int) -> asyncpg.Record:
        row = await conn.fetchrow(_LOCK_ORDER, order_id)
        if row is None or (not sees_all_accounts(principal) and row["user_id"] != principal.user_id):
            raise NotFound(f"no order {order_id}", code="order_not_found")
        return row

    async def _pending_target(self, conn: asyncpg.Connection, order: OrderRecord) -> tuple[Decimal, Decimal | None]:
        """The quantity and price the order will have once the engine applies every modify sent so far.

        Read from the last ``order.modify`` audit row (indexed by entity); if the engine refused that modify,
        the target overstates the order, which only makes the hold larger than needed until the engine's next
        update of it, never smaller.
        """
        details = await conn.fetchval(
            "SELECT details::text FROM audit_log WHERE entity = 'order' AND entity_id = $1 AND action = 'order.modify'"
            " ORDER BY id DESC LIMIT 1",
            str(order.id),
        )
        if details is None:
            return order.quantity, order.price
        last = json.loads(details)
        price = last.get("target_price")
        return Decimal(last["target_qty"]), (None if price is None else Decimal(price))

    async def _outbox_and_audit(
        self,
        conn: asyncpg.Connection,
        principal: Principal,
        order: OrderRecord,
        payload: dict[str, Any],
        action: str,
        details: dict[str, Any],
        now: datetime,
    ) -> None:
        await conn.execute(
            "WITH x AS (INSERT INTO outbox (stream, key, payload, created_at) VALUES ($1, $2, $3::text::jsonb, $4))"
            " INSERT INTO audit_log (actor_user_id, action, entity, entity_id, details)"
            " VALUES ($5, $6, 'order', $8, $7::text::jsonb)",
            self.stream_for(order.symbol),
            order.symbol,
            json.dumps(payload),
            now,
            principal.user_id,
            action,
            json.dumps(details),
            str(order.id),
        )


def _limits_of(row: asyncpg.Record) -> RiskLimits:
    return RiskLimits(
        max_order_qty=row["max_order_qty"],
        max_order_notional=row["max_order_notional"],
        max_position=row["max_position"],
        max_open_orders=row["max_open_orders"],
        max_orders_per_second=row["max_orders_per_second"],
    )


def _exposure_of(row: asyncpg.Record, account_kind: str) -> Exposure:
    return Exposure(
        account_kind=account_kind,
        net_position=row["net_position"],
        open_orders=row["open_orders"],
        open_buy_leaves=row["buy_leaves"],
        open_sell_leaves=row["sell_leaves"],
        reduce_only_buy_leaves=row["ro_buy_leaves"],
        reduce_only_sell_leaves=row["ro_sell_leaves"],
        free_quote=row["free_quote"],
        free_base=row["free_base"],
    )


# ------------------------------------------------------------------------------------ transaction scope


async def submit_order(db: Database, entry: OrderEntry, principal: Principal, request: OrderRequest) -> Placement:
    """Place an order in its own transaction and commit it (accepted or rejected), timing the whole path.

    Every placement of an account takes the account row lock first, so a concurrent twin with the same
    client_order_id is seen by the second placement's read. A unique violation can still happen if some
    other writer inserts orders without that lock; then the placement is retried once and finds the twin.
    """
    started = time.perf_counter()
    try:
        for attempt in (1, 2):
            try:
                async with db.transaction("orders.place") as conn:
                    return await entry.place_order(conn, principal, request)
            except asyncpg.UniqueViolationError:
                if attempt == 2 or request.client_order_id is None:
                    raise
                log.info("client_order_id %r raced; re-reading the original", request.client_order_id)
        raise AssertionError("unreachable")
    finally:
        ORDER_PLACEMENT_DURATION.observe(time.perf_counter() - started)


_ENTRIES: dict[int, OrderEntry] = {}


def order_entry(platform: Platform) -> OrderEntry:
    """The process's OrderEntry for `platform`, built on first use (kept until the platform is collected)."""
    key = id(platform)
    entry = _ENTRIES.get(key)
    if entry is None:
        entry = OrderEntry(platform.cache, shards=platform.settings.engine_shards)
        _ENTRIES[key] = entry
        weakref.finalize(platform, _ENTRIES.pop, key, None)
    return entry
