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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson

from tradeplane.adapters.bus import order_stream
from tradeplane.adapters.cache import REDIS_ERRORS, Cache
from tradeplane.adapters.postgres import GENERIC_PLANS, Database
from tradeplane.domain.orders import (
    OPEN_STATUSES,
    PRICED_TYPES,
    OrderStatus,
    OrderType,
    SelfTradePrevention,
    Side,
    TimeInForce,
    transition,
)
from tradeplane.domain.reservations import modify_hold_price, shard_for
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
    storable,
)
from tradeplane.errors import Conflict, InfrastructureUnavailable, InvalidRequest, NotFound, TradeplaneError
from tradeplane.metrics import ORDER_PLACEMENT_DURATION
from tradeplane.services.identity import Principal, Role
from tradeplane.services.queries import (
    ORDER_COLUMNS,
    InstrumentCatalog,
    OrderRecord,
    after_order_commit,
    decimal_text,
    order_from_row,
    position_mark,
    sees_all_accounts,
)

if TYPE_CHECKING:
    from tradeplane.bootstrap import Platform

log = logging.getLogger("tradeplane.orders")

MAX_BATCH = 500
"""Orders one batch placement may carry (``POST /api/v1/orders/batch``)."""
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


# KEYS: the accounts' window counters; ARGV: the orders to add to each, then the TTL. One command for a whole
# placement: redis-py's pipeline machinery cost more CPU than the two commands it carried per account.
_COUNT_ORDERS = """
local ttl = ARGV[#ARGV]
local totals = {}
for i, key in ipairs(KEYS) do
    totals[i] = redis.call('INCRBY', key, ARGV[i])
    redis.call('EXPIRE', key, ttl)
end
return totals
"""


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
    order: OrderRecord
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


async def _placed_quantity_and_price(
    conn: asyncpg.Connection, order_ids: Sequence[int]
) -> dict[int, tuple[Decimal, Decimal | None]]:
    """The quantity and limit price the orders were placed with, from their placement's audit row: what a
    retry of the placement request is compared with (a retry is the same request, whatever happened since)."""
    rows = await conn.fetch(
        "SELECT entity_id::bigint AS order_id, details->>'quantity' AS quantity, details->>'price' AS price"
        " FROM audit_log WHERE entity = 'order' AND entity_id = ANY($1::text[])"
        " AND action IN ('order.place', 'order.reject')",
        [str(order_id) for order_id in order_ids],
    )
    return {r["order_id"]: (Decimal(r["quantity"]), None if r["price"] is None else Decimal(r["price"])) for r in rows}


def _rejection_of(order: OrderRecord) -> RiskRejection | None:
    if order.status != OrderStatus.REJECTED:
        return None
    reason = order.reject_reason or ""
    try:
        return RiskRejection(RiskReason(reason), "the original order was rejected")
    except ValueError:  # an engine reject reason (e.g. post_only_would_take) is not a RiskReason
        return None


_LOCK_ACCOUNT = "SELECT id, user_id, kind, status, stp_mode FROM accounts WHERE id = $1 FOR NO KEY UPDATE"
# Several accounts (a batch): locked in id order, so two batches naming the same accounts cannot deadlock.
_LOCK_ACCOUNTS = (
    "SELECT id, user_id, kind, status, stp_mode FROM accounts WHERE id = ANY($1::bigint[]) ORDER BY id"
    " FOR NO KEY UPDATE"
)

# After the account locks, in a new statement (READ COMMITTED: a fresh snapshot that sees every placement that
# committed while we waited for the locks): per (account, instrument) pair ``q``, the market state, the
# effective limits and the account's exposure. Two driving clauses share the body: one pair from scalar
# parameters (a single order or a modify: PostgreSQL keeps one cheap generic plan for it), or many pairs from
# arrays, in the order given. Parameters: account, instrument, quote asset, base asset, whether to scan open
# orders regardless of limits (reduce-only), an order to leave out of the open orders (a modify), then the
# client_order_ids to look up.
_EXPOSURE_BODY = f"""
SELECT i.status, i.last_price, i.reference_price,
       rl.max_order_qty, rl.max_order_notional, rl.max_position, rl.max_open_orders, rl.max_orders_per_second,
       coalesce(p.net_quantity, 0) AS net_position,
       oo.open_orders, oo.buy_leaves, oo.sell_leaves,
       coalesce((SELECT b.amount FROM balances b WHERE b.account_id = q.account_id AND b.asset = q.quote_asset), 0)
         - coalesce((SELECT sum(h.amount) FROM holds h
                     WHERE h.account_id = q.account_id AND h.asset = q.quote_asset AND h.released_at IS NULL), 0)
         AS free_quote,
       -- what a margin account's positions add to its free funds: value at the mark less initial margin
       coalesce((SELECT sum(pm.net_quantity * m.mark - abs(pm.net_quantity) * m.mark * im.margin_rate)
                 FROM positions pm JOIN instruments im ON im.id = pm.instrument_id
                 CROSS JOIN LATERAL (SELECT {position_mark("im", "pm")} AS mark) m
                 WHERE pm.account_id = q.account_id AND im.quote_asset = q.quote_asset
                   AND pm.net_quantity <> 0), 0) AS margin_credit,
       coalesce(p.net_quantity, 0)
         - coalesce((SELECT sum(h.amount) FROM holds h
                     WHERE h.account_id = q.account_id AND h.asset = q.base_asset AND h.released_at IS NULL), 0)
         AS free_base,
       {{existing}}
FROM {{pairs}}
JOIN instruments i ON i.id = q.instrument_id
LEFT JOIN LATERAL (
    SELECT r.* FROM risk_limits r
    WHERE r.account_id = q.account_id AND (r.instrument_id = i.id OR r.instrument_id IS NULL)
    ORDER BY r.instrument_id NULLS LAST LIMIT 1
) rl ON TRUE
LEFT JOIN positions p ON p.account_id = q.account_id AND p.instrument_id = i.id
CROSS JOIN LATERAL (
    SELECT count(*) AS open_orders,
           coalesce(sum(o.quantity - o.filled_quantity) FILTER (WHERE o.side = 'buy'), 0) AS buy_leaves,
           coalesce(sum(o.quantity - o.filled_quantity) FILTER (WHERE o.side = 'sell'), 0) AS sell_leaves
    FROM orders o
    WHERE o.account_id = q.account_id AND o.instrument_id = i.id AND o.status IN {_OPEN_SQL}
      AND o.id IS DISTINCT FROM $6::bigint
      -- only scan the open orders when a rule needs them (a filter on the pair alone: no scan at all otherwise)
      AND (q.scan OR rl.max_position IS NOT NULL OR rl.max_open_orders IS NOT NULL)
) oo
"""
# one pair; $7/$8: the account and client_order_id to look up (NULL: none)
_EXPOSURE_ONE = _EXPOSURE_BODY.format(
    existing="(SELECT o.id FROM orders o WHERE o.account_id = $7 AND o.client_order_id = $8) AS existing_id",
    pairs="(SELECT $1::bigint AS account_id, $2::bigint AS instrument_id, $3::text AS quote_asset,"
    " $4::text AS base_asset, $5::boolean AS scan) AS q",
)
# pairs from arrays; existing_ids: for each (account, client_order_id) of $7/$8, the order using it, or NULL
_EXPOSURE_MANY = (
    _EXPOSURE_BODY.format(
        existing="ARRAY(SELECT (SELECT o.id FROM orders o WHERE o.account_id = c.account_id"
        " AND o.client_order_id = c.coid)"
        " FROM unnest($7::bigint[], $8::text[]) WITH ORDINALITY AS c(account_id, coid, n) ORDER BY c.n)"
        " AS existing_ids",
        pairs="unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::boolean[])"
        " WITH ORDINALITY AS q(account_id, instrument_id, quote_asset, base_asset, scan, n)",
    )
    + "ORDER BY q.n"
)
# existing_ids alone, for a placement with no known instrument to read an exposure for
_EXISTING_IDS = (
    "SELECT ARRAY(SELECT (SELECT o.id FROM orders o WHERE o.account_id = c.account_id AND o.client_order_id = c.coid)"
    " FROM unnest($1::bigint[], $2::text[]) WITH ORDINALITY AS c(account_id, coid, n) ORDER BY c.n)"
)

# One statement writes every order of a placement and everything that must commit with it, from one array per
# column (element k is the k-th order). Order ids are drawn first and handed out in ascending order, so ids,
# the engine's commands (its time priority) and audit rows follow the request's order. The accepted orders of
# one engine shard become ONE outbox row, hence one bus message: a lone order's "new" command, or a "batch"
# of them in request order, which the engine applies as consecutive commands. A rejected order has
# NULL hold and outbox columns, and those inserts select nothing for it. $24 is the time, $25 each order's actor
# (orders of several principals can share a placement); $26 the symbol of an order for an unknown instrument
# (its instrument_id is NULL), else NULL.
_INSERT_ORDERS = """
WITH t AS MATERIALIZED (
    SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[],
                         $7::numeric[], $8::numeric[], $9::numeric[], $10::timestamptz[], $11::boolean[],
                         $12::boolean[], $13::text[], $14::text[], $15::text[], $16::numeric[], $17::text[],
                         $18::numeric[], $19::text[], $20::text[], $21::text[], $22::text[], $23::text[],
                         $25::bigint[], $26::text[])
         WITH ORDINALITY AS t(account_id, instrument_id, client_order_id, side, type, time_in_force, quantity,
                              price, stop_price, expire_at, post_only, reduce_only, stp_mode, status, reject_reason,
                              hold_price, hold_asset, hold_amount, stream, symbol, payload, action, audit, actor,
                              unlisted_symbol, n)
), ids AS MATERIALIZED (
    -- ascending ids, the k-th for the k-th order: an array index, not a join, so the plan suits any batch size;
    -- the sequence is looked up once (an InitPlan), not per order: 4.5 us a row otherwise
    SELECT array_agg(id ORDER BY id) AS drawn
    FROM (SELECT nextval((SELECT pg_get_serial_sequence('orders', 'id'))::regclass) AS id FROM t) AS d
), i AS MATERIALIZED (
    SELECT t.*, ids.drawn[t.n] AS id FROM t, ids
), o AS (
    INSERT INTO orders (id, account_id, instrument_id, client_order_id, side, type, time_in_force, quantity, price,
                        stop_price, expire_at, post_only, reduce_only, stp_mode, status, reject_reason, hold_price,
                        unlisted_symbol, created_at, updated_at)
    SELECT id, account_id, instrument_id, client_order_id, side, type, time_in_force, quantity, price, stop_price,
           expire_at, post_only, reduce_only, stp_mode, status, reject_reason, hold_price, unlisted_symbol, $24, $24
    FROM i ORDER BY n
    RETURNING *
), h AS (
    INSERT INTO holds (account_id, asset, amount, order_id, created_at)
    SELECT account_id, hold_asset, hold_amount, id, $24 FROM i WHERE hold_amount > 0 ORDER BY n
), x AS (
    INSERT INTO outbox (stream, key, payload, created_at)
    SELECT stream, min(symbol),
           CASE WHEN count(*) = 1 THEN (array_agg(command))[1]
                ELSE jsonb_build_object('type', 'batch', 'commands', jsonb_agg(command ORDER BY n)) END,
           $24
    FROM (SELECT stream, symbol, n, payload::jsonb || jsonb_build_object('order_id', id) AS command
          FROM i WHERE stream IS NOT NULL) AS accepted
    GROUP BY stream ORDER BY min(n)
), a AS (
    INSERT INTO audit_log (actor_user_id, action, entity, entity_id, details)
    SELECT actor, action, 'order', id::text, audit::jsonb || jsonb_build_object('status', status) FROM i ORDER BY n
)
SELECT o.* FROM o ORDER BY o.id  -- the ids ascend in request order
"""

# A single order (the common case): the same rows as _INSERT_ORDERS from the same parameters as scalars, which
# PostgreSQL plans once, where it plans the array statement afresh on every call.
_INSERT_ONE = """
WITH o AS (
    INSERT INTO orders (account_id, instrument_id, client_order_id, side, type, time_in_force, quantity, price,
                        stop_price, expire_at, post_only, reduce_only, stp_mode, status, reject_reason, hold_price,
                        unlisted_symbol, created_at, updated_at)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $26, $24, $24)
    RETURNING *
), h AS (
    INSERT INTO holds (account_id, asset, amount, order_id, created_at)
    SELECT o.account_id, $17, $18::numeric, o.id, $24 FROM o WHERE $18::numeric > 0
), x AS (
    INSERT INTO outbox (stream, key, payload, created_at)
    SELECT $19::text, $20::text, $21::text::jsonb || jsonb_build_object('order_id', o.id), $24 FROM o
    WHERE $19::text IS NOT NULL
), a AS (
    INSERT INTO audit_log (actor_user_id, action, entity, entity_id, details)
    SELECT $25, $22, 'order', o.id::text, $23::text::jsonb || jsonb_build_object('status', o.status) FROM o
)
SELECT * FROM o
"""

_LOCK_ORDER = f"""
SELECT {ORDER_COLUMNS}, o.instrument_id, o.hold_price, o.modifies_requested, o.modifies_done, o.target_quantity,
       o.target_price, o.max_target_quantity, a.user_id, a.kind AS account_kind
FROM orders o JOIN accounts a ON a.id = o.account_id LEFT JOIN instruments i ON i.id = o.instrument_id
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
        self._count_script = cache.client.register_script(_COUNT_ORDERS)  # EVALSHA, loaded again if flushed

    def stream_for(self, symbol: str) -> str:
        return order_stream(shard_for(symbol, self.shards))

    # ------------------------------------------------------------------------------------------- place

    async def place_order(self, conn: asyncpg.Connection, principal: Principal, request: OrderRequest) -> Placement:
        """Validate, run pre-trade risk and store the order (accepted or rejected) in the caller's transaction.

        Raises InvalidRequest (code ``validation_error``) for a malformed request, PermissionDenied for a
        readonly principal, NotFound for an account the principal may not trade, Conflict
        (``duplicate_client_order_id``) for a reused client_order_id with different terms.
        """
        (outcome,) = await self.place_orders(conn, principal, [request])
        if isinstance(outcome, TradeplaneError):
            raise outcome
        return outcome

    async def place_orders(
        self, conn: asyncpg.Connection, principal: Principal, requests: Sequence[OrderRequest]
    ) -> list[Placement | TradeplaneError]:
        """Place several orders in the caller's transaction, with the same answers as placing them one by one
        in the given order: a later order sees the holds, open orders and client_order_ids of earlier ones.

        Each outcome is a Placement (accepted, replayed or rejected: stored) or the error that order alone would
        have raised (nothing stored for it). Only PermissionDenied, for a readonly principal, is raised.
        The cost is a few statements for the whole batch rather than per order: one lock statement for every
        account, one exposure read for every (account, instrument) pair, one Redis round trip for the rate
        counters and one insert of every row.
        """
        return await self.place_mixed(conn, [(principal, request) for request in requests])

    async def place_mixed(
        self, conn: asyncpg.Connection, orders: Sequence[tuple[Principal, OrderRequest]]
    ) -> list[Placement | TradeplaneError]:
        """``place_orders`` where each order has its own principal (PlacementQueue coalesces the single orders of
        several clients into one placement): each order sees only the accounts its principal may trade, and its
        audit row names that principal. PermissionDenied, for a readonly principal, is raised for all of them.
        """
        principals = [principal for principal, _ in orders]
        requests = [request for _, request in orders]
        for principal in {id(p): p for p in principals}.values():
            _require_writer(principal)
        now = self.clock()
        outcomes: list[Placement | TradeplaneError | None] = [None] * len(requests)
        for index, request in enumerate(requests):
            problem = _request_problem(request, now)
            if problem is not None:
                outcomes[index] = InvalidRequest(problem, code="validation_error")

        wanted = {requests[k].account_id for k, outcome in enumerate(outcomes) if outcome is None}
        accounts: dict[int, asyncpg.Record] = {}
        if wanted:
            if len(wanted) == 1:
                row = await conn.fetchrow(_LOCK_ACCOUNT, *wanted)
                rows = [] if row is None else [row]
            else:
                rows = await conn.fetch(_LOCK_ACCOUNTS, sorted(wanted))
            accounts = {r["id"]: r for r in rows if r["kind"] != "house"}
        # request index and its instrument's rules; None for a symbol no instrument has (stored as rejected)
        checked: list[tuple[int, InstrumentRules | None]] = []
        for index, request in enumerate(requests):
            if outcomes[index] is not None:
                continue
            account = accounts.get(request.account_id)
            principal = principals[index]
            if account is None or not (sees_all_accounts(principal) or account["user_id"] == principal.user_id):
                outcomes[index] = NotFound(f"no account {request.account_id}", code="account_not_found")
                continue
            checked.append((index, await self.catalog.get(conn, request.symbol)))
        if checked:
            await self._assess_and_store(conn, principals, requests, accounts, checked, outcomes, now)
        assert all(outcome is not None for outcome in outcomes)
        return outcomes  # type: ignore[return-value]

    async def _assess_and_store(
        self,
        conn: asyncpg.Connection,
        principals: Sequence[Principal],
        requests: Sequence[OrderRequest],
        accounts: Mapping[int, asyncpg.Record],
        checked: list[tuple[int, InstrumentRules | None]],
        outcomes: list[Placement | TradeplaneError | None],
        now: datetime,
    ) -> None:
        """Risk for every order that reached it, in order, over exposures that earlier orders of the same batch
        have already changed; then one insert of every accepted and rejected order. An order whose symbol
        names no instrument is rejected (``unknown_instrument``) and stored like any other rejection."""
        pairs: dict[tuple[int, int], int] = {}  # (account, instrument) -> row of the exposure read
        scan: list[bool] = []
        pair_rules: list[InstrumentRules] = []
        counted: dict[int, int] = {}  # account -> orders of this batch in its rate window
        for index, rules in checked:
            request = requests[index]
            # every stored order counts in its account's rate window, an unknown instrument's too: each writes a row
            counted[request.account_id] = counted.get(request.account_id, 0) + 1
            if rules is None:
                continue
            pair = (request.account_id, rules.instrument_id)
            if pair not in pairs:
                pairs[pair] = len(pairs)
                scan.append(False)
                pair_rules.append(rules)
            scan[pairs[pair]] = scan[pairs[pair]] or request.terms.reduce_only
        with_ids = [index for index, _ in checked if requests[index].client_order_id is not None]
        state_rows: list[asyncpg.Record] = []
        window_counts: dict[int, int] = {}
        existing: dict[int, int | None] = {}  # request index -> the order already using its client_order_id
        if pairs:
            (state_rows, existing), window_counts = await asyncio.gather(
                self._read_exposures(conn, requests, list(pairs), pair_rules, scan, with_ids),
                self._count_orders(counted, now),
            )
        else:  # only orders for unknown instruments
            window_counts = await self._count_orders(counted, now)
            if with_ids:
                ids = await conn.fetchval(
                    _EXISTING_IDS,
                    [requests[index].account_id for index in with_ids],
                    [requests[index].client_order_id for index in with_ids],
                )
                existing = dict(zip(with_ids, ids, strict=True))
        # the rate window count of each account's first order of this batch, then one more per order
        next_count = {account: total - counted[account] + 1 for account, total in window_counts.items()}

        book = _BatchExposure(state_rows, pairs, accounts)
        stored: list[tuple[int, InstrumentRules | None, Acceptance | RiskRejection]] = []
        first_of_id: dict[tuple[int, str], int] = {}  # (account, client_order_id) -> the batch's first order
        twins: list[tuple[int, int]] = []  # (order, earlier order of this batch with its client_order_id)
        replays: list[tuple[int, int]] = []  # (order, stored order with its client_order_id)
        for index, rules in checked:
            request = requests[index]
            account_id = request.account_id
            orders_this_second = next_count[account_id]
            next_count[account_id] += 1
            if request.client_order_id is not None:
                key = (account_id, request.client_order_id)
                taken_by = existing.get(index)
                if taken_by is not None:
                    replays.append((index, taken_by))
                    continue
                if key in first_of_id:
                    twins.append((index, first_of_id[key]))
                    continue
                first_of_id[key] = index
            if rules is None:
                unknown = RiskRejection(RiskReason.UNKNOWN_INSTRUMENT, f"no instrument {request.symbol!r}")
                stored.append((index, None, unknown))
                continue
            row, exposure = book.exposure(account_id, rules)
            verdict = assess(
                request.terms,
                rules,
                MarketState(row["status"], row["last_price"], row["reference_price"]),
                limits_of(row),
                exposure,
                orders_this_second=orders_this_second,
                account_active=accounts[account_id]["status"] == "active",
            )
            if isinstance(verdict, Acceptance):
                book.take(account_id, rules, request.terms, verdict)
            stored.append((index, rules, verdict))

        if stored:
            orders = await self._insert(conn, principals, requests, accounts, stored, now)
            for (index, _, verdict), order in zip(stored, orders, strict=True):
                owner = accounts[requests[index].account_id]["user_id"]
                if isinstance(verdict, RiskRejection):
                    outcomes[index] = Placement(PlacementOutcome.REJECTED, order, verdict, owner)
                else:
                    outcomes[index] = Placement(PlacementOutcome.ACCEPTED, order, None, owner)
        for index, first in twins:
            original = outcomes[first]
            assert isinstance(original, Placement)
            outcomes[index] = self._replayed(requests[index], original.order, requests[first].terms, accounts)
        if replays:
            rows = await conn.fetch(
                f"SELECT {ORDER_COLUMNS}, o.instrument_id"
                " FROM orders o LEFT JOIN instruments i ON i.id = o.instrument_id WHERE o.id = ANY($1::bigint[])",
                [order_id for _, order_id in replays],
            )
            by_id = {r["id"]: r for r in rows}
            placed = await _placed_quantity_and_price(conn, [order_id for _, order_id in replays])
            for index, order_id in replays:
                row = by_id[order_id]
                # a modify, or the engine's cut of a reduce-only order, may have changed these on the row since
                quantity, price = placed.get(order_id, (row["quantity"], row["price"]))
                terms = replace(terms_of_row(row), quantity=quantity, price=price)
                outcomes[index] = self._replayed(requests[index], order_from_row(row), terms, accounts)

    def _replayed(
        self,
        request: OrderRequest,
        original: OrderRecord,
        original_terms: OrderTerms,
        accounts: Mapping[int, asyncpg.Record],
    ) -> Placement | TradeplaneError:
        """The answer to a request whose client_order_id is taken: the original order if the terms agree.

        A request that leaves self-trade prevention to the account's default agrees with the mode the original
        got, even if the account's default has changed since."""
        stored_stp = SelfTradePrevention(original.stp)
        asked = request.terms if request.terms.stp is not None else replace(request.terms, stp=stored_stp)
        original_terms = original_terms if original_terms.stp is not None else replace(original_terms, stp=stored_stp)
        if original.symbol != request.symbol or original_terms != asked:
            return Conflict(
                f"client_order_id {request.client_order_id!r} was already used for order {original.id}"
                " with different parameters",
                code="duplicate_client_order_id",
            )
        owner = accounts[request.account_id]["user_id"]
        return Placement(PlacementOutcome.REPLAYED, original, _rejection_of(original), owner)

    async def _read_exposures(
        self,
        conn: asyncpg.Connection,
        requests: Sequence[OrderRequest],
        pairs: list[tuple[int, int]],
        pair_rules: list[InstrumentRules],
        scan: list[bool],
        with_ids: list[int],
    ) -> tuple[list[asyncpg.Record], dict[int, int | None]]:
        """One exposure row per pair, in order, and the order already holding each client_order_id (by
        request index). One pair with at most one client_order_id (a single order) uses the scalar
        statement: PostgreSQL plans the array one afresh on every call, which costs about 1 ms."""
        if len(pairs) == 1 and len(with_ids) <= 1:
            (account, instrument), rules = pairs[0], pair_rules[0]
            # the client_order_id's own account: it may be another account's order, for an unknown symbol
            coid_account = requests[with_ids[0]].account_id if with_ids else None
            coid = requests[with_ids[0]].client_order_id if with_ids else None
            row = await conn.fetchrow(
                _EXPOSURE_ONE,
                account,
                instrument,
                rules.quote_asset,
                rules.base_asset,
                scan[0],
                None,
                coid_account,
                coid,
            )
            assert row is not None  # the catalog only knows instruments that exist
            return [row], {index: row["existing_id"] for index in with_ids}
        rows = list(
            await conn.fetch(
                _EXPOSURE_MANY,
                [account for account, _ in pairs],
                [instrument for _, instrument in pairs],
                [rules.quote_asset for rules in pair_rules],
                [rules.base_asset for rules in pair_rules],
                scan,
                None,
                [requests[index].account_id for index in with_ids],
                [requests[index].client_order_id for index in with_ids],
            )
        )
        return rows, dict(zip(with_ids, rows[0]["existing_ids"], strict=True))

    async def _count_orders(self, counted: Mapping[int, int], now: datetime) -> dict[int, int]:
        """Add each account's orders to its one-second window, shared by every api replica; the new totals."""
        second = int(now.timestamp())
        try:
            totals = await self._count_script(
                keys=[rate_limit_key(account_id, second) for account_id in counted],
                args=[*counted.values(), RATE_WINDOW_TTL_S],
            )
        except REDIS_ERRORS as exc:
            raise InfrastructureUnavailable(f"Redis unavailable for the order rate limit: {exc}") from exc
        return {account_id: int(total) for account_id, total in zip(counted, totals, strict=True)}

    async def _insert(
        self,
        conn: asyncpg.Connection,
        principals: Sequence[Principal],
        requests: Sequence[OrderRequest],
        accounts: Mapping[int, asyncpg.Record],
        stored: list[tuple[int, InstrumentRules | None, Acceptance | RiskRejection]],
        now: datetime,
    ) -> list[OrderRecord]:
        columns: list[list[Any]] = [[] for _ in range(23)]
        unlisted: list[str | None] = []  # the symbol of an order for an unknown instrument
        symbols: list[str] = []
        for index, rules, verdict in stored:
            request = requests[index]
            t = request.terms
            expire_at = t.expire_at if rules is None else expiry_for(t, rules, now)
            stp = t.stp if t.stp is not None else SelfTradePrevention(accounts[request.account_id]["stp_mode"])
            unlisted.append(request.symbol if rules is None else None)
            symbols.append(request.symbol if rules is None else rules.symbol)
            audit: dict[str, Any] = {
                "account_id": request.account_id,
                "symbol": request.symbol,
                "side": t.side.value,
                "type": t.order_type.value,
                "quantity": decimal_text(t.quantity),
                "price": None if t.price is None else decimal_text(t.price),
                "client_order_id": request.client_order_id,
            }
            if isinstance(verdict, RiskRejection):
                status = transition(OrderStatus.PENDING_NEW, OrderStatus.REJECTED)
                audit["reason"] = verdict.reason.value
                reason: str | None = verdict.reason.value
                hold_price = hold_asset = hold_amount = stream = payload = None
                action = "order.reject"
            else:
                assert rules is not None  # an unknown instrument's order is always rejected
                status = OrderStatus.PENDING_NEW
                reason = None
                hold_price = verdict.hold_price
                hold_asset, hold_amount = verdict.reservation.asset, verdict.reservation.amount
                stream = self.stream_for(rules.symbol)
                payload = orjson.dumps(
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
                        "stp": stp.value,
                    }
                ).decode()
                action = "order.place"
            values = (
                request.account_id,
                None if rules is None else rules.instrument_id,
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
                stp.value,
                status.value,
                reason,
                hold_price,
                hold_asset,
                hold_amount,
                stream,
                request.symbol,
                payload,
                action,
                orjson.dumps(audit).decode(),
            )
            for column, value in zip(columns, values, strict=True):
                column.append(value)
        if len(stored) == 1:
            index = stored[0][0]
            row = await conn.fetchrow(
                _INSERT_ONE, *(column[0] for column in columns), now, principals[index].user_id, unlisted[0]
            )
            assert row is not None
            return [order_from_row(row, symbols[0])]
        rows = await conn.fetch(
            _INSERT_ORDERS, *columns, now, [principals[index].user_id for index, _, _ in stored], unlisted
        )
        return [order_from_row(row, symbol) for row, symbol in zip(rows, symbols, strict=True)]

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
            if value is not None and not storable(value):
                raise InvalidRequest(f"{name} must be below 10^20 with at most 18 decimals", code="validation_error")
        row = await self._lock_order(conn, principal, order_id)
        order = order_from_row(row)
        if OrderStatus(order.status) not in _CANCELABLE:
            raise Conflict(f"order {order_id} is {order.status}", code="order_not_open")
        if price is not None and OrderType(order.type) not in PRICED_TYPES:
            raise InvalidRequest(f"a {order.type} order has no limit price to change", code="validation_error")
        if quantity is not None and quantity <= order.filled_quantity:
            raise InvalidRequest(
                f"the new quantity must exceed the filled quantity {decimal_text(order.filled_quantity)}",
                code="validation_error",
            )
        # Earlier modifies the engine has not processed yet still count: the order is headed for their target,
        # overridden by what this request changes (None: the order's own value, no modify in flight changes it).
        pending_qty, pending_price, pending_max_qty = _pending_target(row)
        target_qty = pending_qty if quantity is None else quantity
        target_price = pending_price if price is None else price
        new_qty = order.quantity if target_qty is None else target_qty
        new_price = order.price if target_price is None else target_price
        # The engine may refuse any of them, this one too, so the order can end with any quantity asked for
        # since it was last at rest: the hold covers the largest.
        max_qty = max(new_qty, order.quantity, pending_max_qty or order.quantity)
        rules = await self.catalog.by_id(conn, row["instrument_id"])
        side = Side(order.side)
        state = await conn.fetchrow(
            _EXPOSURE_ONE,
            order.account_id,
            rules.instrument_id,
            rules.quote_asset,
            rules.base_asset,
            order.reduce_only,
            order_id,
            None,
            None,
        )
        assert state is not None
        current_hold: Decimal = await conn.fetchval(
            "SELECT coalesce(sum(amount), 0) FROM holds WHERE order_id = $1 AND released_at IS NULL", order_id
        )
        exposure = exposure_of(state, row["account_kind"])
        market = MarketState(state["status"], state["last_price"], state["reference_price"])
        hold_price: Decimal | None = row["hold_price"] or order.price or order.stop_price
        assert hold_price is not None  # every order the api stores has one
        hold_price = modify_hold_price(OrderType(order.type), hold_price, new_price)  # settlement mirrors it
        rejection = check_grid(rules, new_qty, price)
        if rejection is None and price is not None:
            rejection = check_band(rules, market, price)
        if rejection is None:
            rejection = check_limits(
                limits_of(state),
                exposure,
                side,
                new_qty,
                new_qty * (new_price or hold_price),
                position_quantity=new_qty - order.filled_quantity,  # the filled part is already in the position
                new_order=False,
            )
        if rejection is None and order.reduce_only:
            rejection = check_reduce_only(side, new_qty - order.filled_quantity, exposure)
        needed = reserve(
            side, max_qty - order.filled_quantity, hold_price, rules, row["account_kind"], reduce_only=order.reduce_only
        )
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
        # The modify's number goes to the engine with it; the engine records it in modifies_done once it has
        # applied or refused the modify, which ends this target (the row lock orders the numbers).
        fresh = await conn.fetchrow(
            "UPDATE orders SET hold_price = $2, updated_at = $3, modifies_requested = modifies_requested + 1,"
            " target_quantity = $4, target_price = $5, max_target_quantity = $6 WHERE id = $1 RETURNING *",
            order_id,
            hold_price,
            now,
            target_qty,
            target_price,
            max_qty,
        )
        payload = {
            "type": "modify",
            "order_id": order_id,
            "account_id": order.account_id,
            "symbol": order.symbol,
            "modify_no": fresh["modifies_requested"],
        }
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


def _pending_target(row: asyncpg.Record) -> tuple[Decimal | None, Decimal | None, Decimal | None]:
    """The quantity and price the modifies in flight will give the order if all are applied (None: they leave
    it as it is), and the largest quantity they can give it whichever are refused (None: none in flight).

    A modify is in flight from the api's commit until the engine has applied or refused it (``modifies_done``
    reaches its number). Once none is, the order's own terms are the target: a refused modify's terms are not
    asked for again, and the engine's own quantity cut of a reduce-only order (not a client modify, so not
    counted) is not undone. While some are, a refused one among them still counts until the last is
    processed, which can only overstate the hold for that while, never understate it.
    """
    if row["modifies_requested"] > row["modifies_done"]:
        return row["target_quantity"], row["target_price"], row["max_target_quantity"]
    return None, None, None


def _request_problem(request: OrderRequest, now: datetime) -> str | None:
    """Why a placement request is malformed whatever the market does (422 validation_error), or None."""
    problem = shape_error(request.terms, now)
    if problem is None and request.client_order_id is not None and not 1 <= len(request.client_order_id) <= 64:
        problem = "client_order_id must be 1 to 64 characters"
    return problem


class _BatchExposure:
    """The exposures of a batch's (account, instrument) pairs, read once and moved along as its orders are
    accepted, so each order is assessed as if the earlier ones had been committed before it was placed: an
    accepted order is one more open order with its quantity as leaves, and its hold takes free funds of its
    asset in every instrument of the account that draws on that asset."""

    def __init__(
        self,
        rows: Sequence[asyncpg.Record],
        pairs: Mapping[tuple[int, int], int],
        accounts: Mapping[int, asyncpg.Record],
    ) -> None:
        self._rows = {pair: rows[k] for pair, k in pairs.items()}
        self._exposures = {pair: exposure_of(rows[k], accounts[pair[0]]["kind"]) for pair, k in pairs.items()}
        self._held: dict[tuple[int, str], Decimal] = {}  # (account, asset) -> held by this batch's orders

    def exposure(self, account_id: int, rules: InstrumentRules) -> tuple[asyncpg.Record, Exposure]:
        pair = (account_id, rules.instrument_id)
        exposure = self._exposures[pair]
        held_quote = self._held.get((account_id, rules.quote_asset))
        held_base = self._held.get((account_id, rules.base_asset))
        if held_quote is not None or held_base is not None:
            exposure = replace(
                exposure,
                free_quote=exposure.free_quote - (held_quote or 0),
                free_base=exposure.free_base - (held_base or 0),
            )
        return self._rows[pair], exposure

    def take(self, account_id: int, rules: InstrumentRules, terms: OrderTerms, acceptance: Acceptance) -> None:
        pair = (account_id, rules.instrument_id)
        e = self._exposures[pair]
        buy = terms.side is Side.BUY
        qty = terms.quantity
        self._exposures[pair] = replace(
            e,
            open_orders=e.open_orders + 1,
            open_buy_leaves=e.open_buy_leaves + qty if buy else e.open_buy_leaves,
            open_sell_leaves=e.open_sell_leaves if buy else e.open_sell_leaves + qty,
        )
        held = acceptance.reservation
        if held.amount > 0:
            key = (account_id, held.asset)
            self._held[key] = self._held.get(key, Decimal(0)) + held.amount


def limits_of(row: asyncpg.Record) -> RiskLimits:
    return RiskLimits(
        max_order_qty=row["max_order_qty"],
        max_order_notional=row["max_order_notional"],
        max_position=row["max_position"],
        max_open_orders=row["max_open_orders"],
        max_orders_per_second=row["max_orders_per_second"],
    )


def exposure_of(row: asyncpg.Record, account_kind: str) -> Exposure:
    return Exposure(
        account_kind=account_kind,
        net_position=row["net_position"],
        open_orders=row["open_orders"],
        open_buy_leaves=row["buy_leaves"],
        open_sell_leaves=row["sell_leaves"],
        free_quote=row["free_quote"] + (row["margin_credit"] if account_kind == "margin" else 0),
        free_base=row["free_base"],
    )


# ------------------------------------------------------------------------------------ transaction scope


async def submit_order(db: Database, entry: OrderEntry, principal: Principal, request: OrderRequest) -> Placement:
    """Place an order in its own transaction and commit it (accepted or rejected), timing the whole path.

    Every placement of an account takes the account row lock first, so a concurrent twin with the same
    client_order_id is seen by the second placement's read. A unique violation can still happen if some
    other writer inserts orders without that lock; then the placement is retried once and finds the twin.
    """
    (outcome,) = await submit_orders(db, entry, principal, [request])
    if isinstance(outcome, TradeplaneError):
        raise outcome
    return outcome


async def submit_orders(
    db: Database, entry: OrderEntry, principal: Principal, requests: Sequence[OrderRequest]
) -> list[Placement | TradeplaneError]:
    """Place a batch in one transaction and commit it: every order of the batch is stored or none is.

    Each order's outcome is what ``submit_order`` would have given it (see ``OrderEntry.place_orders``); the
    placement histogram gets one observation per order, the batch's time. A unique violation (a writer that
    does not take the account lock raced one of the client_order_ids) retries the batch once.
    """
    return await submit_mixed(db, entry, [(principal, request) for request in requests])


async def submit_mixed(
    db: Database, entry: OrderEntry, orders: Sequence[tuple[Principal, OrderRequest]]
) -> list[Placement | TradeplaneError]:
    """``submit_orders`` where each order has its own principal (see ``OrderEntry.place_mixed``)."""
    started = time.perf_counter()
    try:
        for attempt in (1, 2):
            try:
                if len(orders) == 1:  # a single order uses scalar statements
                    async with db.transaction("orders.place") as conn:
                        return await entry.place_mixed(conn, orders)
                async with db.connection("orders.place_batch") as conn:
                    # the batch's array statements want generic plans: set in BEGIN's round trip, not one more
                    await conn.execute(f"BEGIN; {GENERIC_PLANS}")
                    try:
                        outcomes = await entry.place_mixed(conn, orders)
                    except BaseException:
                        if not conn.is_closed():
                            await conn.execute("ROLLBACK")
                        raise
                    await conn.execute("COMMIT")
                    return outcomes
            except asyncpg.UniqueViolationError:
                if attempt == 2:
                    raise
                log.info("a client_order_id of a batch raced; placing the batch again")
        raise AssertionError("unreachable")
    finally:
        elapsed = time.perf_counter() - started
        for _ in orders:
            ORDER_PLACEMENT_DURATION.observe(elapsed)


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


class PlacementQueue:
    """Group commit for single orders: the orders that arrive while placements are in flight share the next one.

    ``place`` is ``submit_order`` for one client's order, followed by ``after_order_commit`` for the owners of
    the accepted orders (once per placement). A lone order starts its own placement at once, so
    nothing waits when the process is quiet; at most ``max_inflight`` placements run together, and every order
    that arrives meanwhile (any client, any principal) joins the next one, up to MAX_BATCH orders. Under load a
    placement then costs a few statements for many orders instead of for each (``OrderEntry.place_mixed``),
    and each order still gets the answer it would have had alone, in arrival order. A placement that fails for
    want of PostgreSQL fails the orders it carried (a 503 for each); one that fails otherwise is placed again
    one order at a time, so only the order at fault fails. A client that stops waiting may still have its order
    placed, as with any acknowledgement lost on the way back, and a retry with the same client_order_id finds it.
    """

    def __init__(self, db: Database, entry: OrderEntry, *, max_inflight: int = 4) -> None:
        if max_inflight < 1:
            raise ValueError("max_inflight must be at least 1")
        self.db = db
        self.entry = entry
        self.max_inflight = max_inflight
        self.placements = 0  # transactions run, for tests and the curious
        self._pending: list[tuple[Principal, OrderRequest, asyncio.Future[Placement]]] = []
        self._inflight = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def place(self, principal: Principal, request: OrderRequest) -> Placement:
        return await self.submit(principal, request)

    def submit(self, principal: Principal, request: OrderRequest) -> asyncio.Future[Placement]:
        """Queue the order now and return its future: orders submitted one after the other are placed in that
        order (with ``max_inflight=1`` also committed in that order, batch after batch)."""
        _require_writer(principal)  # before queueing: a refusal is this order's alone
        future: asyncio.Future[Placement] = asyncio.get_running_loop().create_future()
        self._pending.append((principal, request, future))
        if self._inflight < self.max_inflight:
            self._inflight += 1
            task = asyncio.create_task(self._drain())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return future

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch = self._pending[:MAX_BATCH]
                del self._pending[:MAX_BATCH]
                self.placements += 1
                outcomes: Sequence[Placement | Exception]
                try:
                    outcomes = await submit_mixed(self.db, self.entry, [(p, r) for p, r, _ in batch])
                except asyncio.CancelledError:
                    for _, _, future in batch:
                        future.cancel()
                    raise
                except Exception as exc:
                    if len(batch) == 1 or isinstance(exc, InfrastructureUnavailable):
                        for _, _, future in batch:  # the transaction failed: so did every order it carried
                            if not future.done():
                                future.set_exception(exc)
                        continue
                    # Something about one order failed them all (a bug, a constraint): place each alone, so only
                    # the order at fault fails and the others get the answers they would have had.
                    log.exception("a placement of %d orders failed; placing them one at a time", len(batch))
                    outcomes = await self._one_at_a_time(batch)
                # before any answer, as POST /orders/batch does: one cache drop and one relay wake-up for all
                owners = [
                    o.owner_user_id
                    for o in outcomes
                    if isinstance(o, Placement) and o.outcome is PlacementOutcome.ACCEPTED
                ]
                if owners:
                    try:
                        await after_order_commit(self.entry.cache, *owners)
                    except Exception:  # best effort (it logs Redis errors itself): the orders are committed
                        log.exception("dropping caches after a placement failed")
                for (_, _, future), outcome in zip(batch, outcomes, strict=True):
                    if future.done():  # its client stopped waiting
                        continue
                    if isinstance(outcome, Exception):
                        future.set_exception(outcome)
                    else:
                        future.set_result(outcome)
        finally:
            self._inflight -= 1

    async def _one_at_a_time(
        self, batch: list[tuple[Principal, OrderRequest, asyncio.Future[Placement]]]
    ) -> list[Placement | Exception]:
        """Each order of a failed placement in a transaction of its own, in arrival order; a failure is that
        order's outcome."""
        self.placements += len(batch)
        outcomes: list[Placement | Exception] = []
        for principal, request, _ in batch:
            try:
                outcomes.extend(await submit_mixed(self.db, self.entry, [(principal, request)]))
            except Exception as exc:
                outcomes.append(exc)
        return outcomes


_QUEUES: dict[int, PlacementQueue] = {}


def placement_queue(platform: Platform) -> PlacementQueue:
    """The process's PlacementQueue for `platform` (one per process, like ``order_entry``)."""
    key = id(platform)
    queue = _QUEUES.get(key)
    if queue is None:
        queue = PlacementQueue(platform.db, order_entry(platform))
        _QUEUES[key] = queue
        weakref.finalize(platform, _QUEUES.pop, key, None)
    return queue
