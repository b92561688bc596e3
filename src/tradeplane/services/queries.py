"""Read models of the order path: orders, fills, positions, account summaries, instruments and the L2 book.

Visibility is one rule everywhere: admin and system principals see every account; traders and readonly users
see only accounts they own, and anything else is reported as not found (never "forbidden"), so ids of other
users' orders and accounts leak nothing.

Lists are keyset-paginated on (created_at, id) descending: the cursor is opaque to clients and stable under
concurrent inserts (a new order never shifts the next page).

Every decimal leaves this module as a plain string (``decimal_text``): exact, no exponent, no trailing zeros.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time as monotonic_time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import MAX_PREC, Context, Decimal
from typing import Any, Generic, TypeVar

import asyncpg

from tradeplane.adapters.cache import REDIS_ERRORS, TTL_ORDER_BOOK, TTL_POSITIONS, Cache
from tradeplane.domain.orders import OPEN_STATUSES, OrderStatus
from tradeplane.domain.risk import InstrumentRules
from tradeplane.errors import InvalidRequest, NotFound
from tradeplane.services.identity import Principal, Role

T = TypeVar("T")
log = logging.getLogger("tradeplane.queries")

MAX_PAGE = 500
DEFAULT_PAGE = 100
MAX_ROW_ID = 2**63 - 1
"""Row ids are PostgreSQL bigints: a larger id names nothing, and the driver refuses to send one."""
BOOK_MAX_LEVELS = 50
INSTRUMENT_TTL_S = 10.0

_SEES_ALL = frozenset({Role.ADMIN, Role.SYSTEM})


def sees_all_accounts(principal: Principal) -> bool:
    return principal.role in _SEES_ALL


#: ``normalize()`` in the default context keeps 28 significant digits and rounds the rest away; a NUMERIC(38, 18)
#: value has up to 38. This context only strips zeros.
_EXACT = Context(prec=MAX_PREC)


def decimal_text(value: Decimal) -> str:
    """Exact plain notation: Decimal('65000.000000') -> '65000', Decimal('0.50') -> '0.5', never '6.5E+4', every
    digit kept (12345678901.123456789012345678 has 29)."""
    if value == 0:
        return "0"
    return format(value.normalize(_EXACT), "f")


def _opt_text(value: Decimal | None) -> str | None:
    return None if value is None else decimal_text(value)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


# ------------------------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class OrderRecord:
    """One order row as clients see it (the OrderPublic shape)."""

    id: int
    account_id: int
    symbol: str
    client_order_id: str | None
    side: str
    type: str
    time_in_force: str
    quantity: Decimal
    price: Decimal | None
    stop_price: Decimal | None
    expire_at: datetime | None
    post_only: bool
    reduce_only: bool
    stp: str
    status: str
    filled_quantity: Decimal
    average_fill_price: Decimal | None
    reject_reason: str | None
    created_at: datetime
    updated_at: datetime

    @property
    def leaves_quantity(self) -> Decimal:
        if OrderStatus(self.status) not in OPEN_STATUSES:
            return Decimal(0)
        return self.quantity - self.filled_quantity

    def to_json(self) -> dict[str, Any]:
        """The OrderPublic JSON object (decimals as strings), for pub/sub events and caches."""
        return {
            "id": self.id,
            "account_id": self.account_id,
            "symbol": self.symbol,
            "client_order_id": self.client_order_id,
            "side": self.side,
            "type": self.type,
            "time_in_force": self.time_in_force,
            "quantity": decimal_text(self.quantity),
            "price": _opt_text(self.price),
            "stop_price": _opt_text(self.stop_price),
            "expire_at": _iso(self.expire_at),
            "post_only": self.post_only,
            "reduce_only": self.reduce_only,
            "stp": self.stp,
            "status": self.status,
            "filled_quantity": decimal_text(self.filled_quantity),
            "leaves_quantity": decimal_text(self.leaves_quantity),
            "average_fill_price": _opt_text(self.average_fill_price),
            "reject_reason": self.reject_reason,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> OrderRecord:
        def dec(key: str) -> Decimal | None:
            return None if data[key] is None else Decimal(data[key])

        def when(key: str) -> datetime | None:
            return None if data[key] is None else datetime.fromisoformat(data[key])

        return cls(
            id=data["id"],
            account_id=data["account_id"],
            symbol=data["symbol"],
            client_order_id=data["client_order_id"],
            side=data["side"],
            type=data["type"],
            time_in_force=data["time_in_force"],
            quantity=Decimal(data["quantity"]),
            price=dec("price"),
            stop_price=dec("stop_price"),
            expire_at=when("expire_at"),
            post_only=data["post_only"],
            reduce_only=data["reduce_only"],
            stp=data["stp"],
            status=data["status"],
            filled_quantity=Decimal(data["filled_quantity"]),
            average_fill_price=dec("average_fill_price"),
            reject_reason=data["reject_reason"],
            created_at=datetime.fromisoformat(data["created_at"]),
            updated_at=datetime.fromisoformat(data["updated_at"]),
        )


#: Columns for ``order_from_row``; alias ``o`` for orders and ``i`` for instruments, LEFT JOINed where a
#: rejected order for an unlisted symbol (no instrument) may be among the rows.
ORDER_COLUMNS = (
    "o.id, o.account_id, COALESCE(i.symbol, o.unlisted_symbol) AS symbol, o.client_order_id, o.side, o.type,"
    " o.time_in_force, o.quantity, o.price,"
    " o.stop_price, o.expire_at, o.post_only, o.reduce_only, o.stp_mode, o.status, o.filled_quantity,"
    " o.average_fill_price, o.reject_reason, o.created_at, o.updated_at"
)


def order_from_row(row: asyncpg.Record | dict[str, Any], symbol: str | None = None) -> OrderRecord:
    """An OrderRecord from an orders row; ``symbol`` when the row has no ``symbol`` column (e.g. RETURNING)."""
    return OrderRecord(
        id=row["id"],
        account_id=row["account_id"],
        symbol=symbol if symbol is not None else row["symbol"],
        client_order_id=row["client_order_id"],
        side=row["side"],
        type=row["type"],
        time_in_force=row["time_in_force"],
        quantity=row["quantity"],
        price=row["price"],
        stop_price=row["stop_price"],
        expire_at=row["expire_at"],
        post_only=row["post_only"],
        reduce_only=row["reduce_only"],
        stp=row["stp_mode"],
        status=row["status"],
        filled_quantity=row["filled_quantity"],
        average_fill_price=row["average_fill_price"],
        reject_reason=row["reject_reason"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


@dataclass(frozen=True, slots=True)
class FillRecord:
    id: int
    fill_id: str
    order_id: int
    account_id: int
    symbol: str
    side: str
    quantity: Decimal
    price: Decimal
    fee: Decimal
    fee_asset: str
    liquidity: str
    trade_id: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class PositionRecord:
    account_id: int
    symbol: str
    net_quantity: Decimal
    average_price: Decimal
    realized_pnl: Decimal
    mark_price: Decimal | None
    unrealized_pnl: Decimal


@dataclass(frozen=True, slots=True)
class AccountSummary:
    """Money of one account in its currency. equity = cash + Σ net quantity * mark; margin_used = Σ |net
    quantity| * mark * margin rate (margin accounts; 0 for cash accounts); free = cash - holds for a cash
    account, equity - margin_used - holds for a margin account (what pre-trade risk lets it commit)."""

    account_id: int
    user_id: int | None
    name: str
    kind: str
    currency: str
    status: str
    stp: str  # self-trade prevention for orders that name none
    cash: Decimal
    holds: Decimal
    free: Decimal
    positions_value: Decimal
    equity: Decimal
    margin_used: Decimal
    realized_pnl: Decimal
    unrealized_pnl: Decimal

    def to_json(self) -> dict[str, Any]:
        """The AccountPublic JSON object (decimals as strings)."""
        return {
            "account_id": self.account_id,
            "user_id": self.user_id,
            "name": self.name,
            "kind": self.kind,
            "currency": self.currency,
            "status": self.status,
            "stp": self.stp,
            "cash": decimal_text(self.cash),
            "holds": decimal_text(self.holds),
            "free": decimal_text(self.free),
            "positions_value": decimal_text(self.positions_value),
            "equity": decimal_text(self.equity),
            "margin_used": decimal_text(self.margin_used),
            "realized_pnl": decimal_text(self.realized_pnl),
            "unrealized_pnl": decimal_text(self.unrealized_pnl),
        }


@dataclass(frozen=True, slots=True)
class InstrumentRecord:
    id: int
    symbol: str
    base_asset: str
    quote_asset: str
    tick_size: Decimal
    lot_size: Decimal
    min_qty: Decimal
    max_qty: Decimal
    price_band_pct: Decimal
    reference_price: Decimal | None
    last_price: Decimal | None
    maker_fee_rate: Decimal
    taker_fee_rate: Decimal
    margin_rate: Decimal
    status: str


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    items: list[T]
    next_cursor: str | None


# ---------------------------------------------------------------------------------- instrument catalog


class InstrumentCatalog:
    """In-process cache of every instrument's static rules, reloaded every ``ttl_s`` seconds or on a miss.

    Only static fields live here (grid, limits, fees, session close); status and last price are read in the
    order's own transaction. A miss reloads at most once per second, so a flood of unknown symbols cannot turn
    into a flood of catalog reloads.
    """

    def __init__(self, ttl_s: float = INSTRUMENT_TTL_S) -> None:
        self.ttl_s = ttl_s
        self._by_symbol: dict[str, InstrumentRules] = {}
        self._by_id: dict[int, InstrumentRules] = {}
        self._loaded_at = float("-inf")
        self._lock = asyncio.Lock()

    async def reload(self, conn: asyncpg.Connection) -> None:
        rows = await conn.fetch(
            "SELECT i.id, i.symbol, i.base_asset, i.quote_asset, a.scale, i.tick_size, i.lot_size, i.min_qty,"
            " i.max_qty, i.price_band_pct, i.maker_fee_rate, i.taker_fee_rate, i.margin_rate, i.session_close_utc"
            " FROM instruments i JOIN assets a ON a.code = i.quote_asset"
        )
        rules = [
            InstrumentRules(
                instrument_id=r["id"],
                symbol=r["symbol"],
                base_asset=r["base_asset"],
                quote_asset=r["quote_asset"],
                quote_scale=r["scale"],
                tick_size=r["tick_size"],
                lot_size=r["lot_size"],
                min_qty=r["min_qty"],
                max_qty=r["max_qty"],
                price_band_pct=r["price_band_pct"],
                maker_fee_rate=r["maker_fee_rate"],
                taker_fee_rate=r["taker_fee_rate"],
                margin_rate=r["margin_rate"],
                session_close_utc=r["session_close_utc"],
            )
            for r in rows
        ]
        self._by_symbol = {r.symbol: r for r in rules}
        self._by_id = {r.instrument_id: r for r in rules}
        self._loaded_at = monotonic_time.monotonic()

    async def _refresh(self, conn: asyncpg.Connection, *, min_age_s: float) -> None:
        async with self._lock:
            if monotonic_time.monotonic() - self._loaded_at >= min_age_s:
                await self.reload(conn)

    async def get(self, conn: asyncpg.Connection, symbol: str) -> InstrumentRules | None:
        if monotonic_time.monotonic() - self._loaded_at >= self.ttl_s:
            await self._refresh(conn, min_age_s=self.ttl_s)
        rules = self._by_symbol.get(symbol)
        if rules is None:
            await self._refresh(conn, min_age_s=1.0)
            rules = self._by_symbol.get(symbol)
        return rules

    async def require(self, conn: asyncpg.Connection, symbol: str) -> InstrumentRules:
        rules = await self.get(conn, symbol)
        if rules is None:
            raise NotFound(f"no instrument {symbol!r}", code="instrument_not_found")
        return rules

    async def by_id(self, conn: asyncpg.Connection, instrument_id: int) -> InstrumentRules:
        rules = self._by_id.get(instrument_id)
        if rules is None:
            await self._refresh(conn, min_age_s=0.0)
            rules = self._by_id[instrument_id]
        return rules


# ------------------------------------------------------------------------------------------- cursors


def encode_cursor(created_at: datetime, row_id: int) -> str:
    return base64.urlsafe_b64encode(f"{created_at.isoformat()}|{row_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, int]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        when, _, row_id = raw.partition("|")
        created_at, position = datetime.fromisoformat(when), int(row_id)
        if created_at.tzinfo is not None:
            created_at = created_at.astimezone(UTC)  # OverflowError for a time UTC cannot express
    except (ValueError, OverflowError, binascii.Error, UnicodeDecodeError):
        created_at, position = None, 0
    # encode_cursor writes an aware time and a row id; anything else was not made here
    if created_at is None or created_at.tzinfo is None or not 1 <= position <= MAX_ROW_ID:
        raise InvalidRequest("cursor is not one this server issued", code="validation_error")
    return created_at, position


class _Where:
    """Accumulates WHERE clauses with numbered asyncpg parameters."""

    def __init__(self) -> None:
        self.clauses: list[str] = []
        self.args: list[Any] = []

    def add(self, clause: str, *values: Any) -> None:
        """``clause`` uses ``{}`` for each value, in order."""
        marks = []
        for value in values:
            self.args.append(value)
            marks.append(f"${len(self.args)}")
        self.clauses.append(clause.format(*marks))

    def sql(self) -> str:
        return " AND ".join(self.clauses) if self.clauses else "TRUE"


def _page_limit(limit: int) -> int:
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidRequest(f"limit must be between 1 and {MAX_PAGE}", code="validation_error")
    return limit


async def require_visible_account(conn: asyncpg.Connection, principal: Principal, account_id: int) -> asyncpg.Record:
    """The account, or NotFound (account_not_found) unless `principal` may see it: a filter on an account that is
    not the caller's is refused (GET /orders, /fills, /positions) rather than answered with an empty list."""
    row = await conn.fetchrow(
        "SELECT id, user_id, name, kind, currency, status FROM accounts WHERE id = $1 AND kind <> 'house'",
        account_id,
    )
    if row is None or (not sees_all_accounts(principal) and row["user_id"] != principal.user_id):
        raise NotFound(f"no account {account_id}", code="account_not_found")
    return row


def _scope(where: _Where, principal: Principal, alias: str) -> None:
    """Restrict a query on rows with ``{alias}.account_id`` to the principal's accounts."""
    if not sees_all_accounts(principal):
        where.add(f"{alias}.account_id IN (SELECT id FROM accounts WHERE user_id = {{}})", principal.user_id)


# -------------------------------------------------------------------------------------------- orders

OPEN_STATUS_VALUES: tuple[str, ...] = tuple(sorted(s.value for s in OPEN_STATUSES))


def order_book_key(user_id: int) -> str:
    return f"order_book:{user_id}"


def positions_key(user_id: int) -> str:
    return f"positions:{user_id}"


#: Redis channel an order-path writer publishes to after committing outbox rows, so the relay publishes them
#: now rather than at its next poll (services.relay.OutboxRelay).
OUTBOX_WAKEUP_CHANNEL = "tp:outbox"


async def after_order_commit(cache: Cache, *user_ids: int | None) -> None:
    """After an order change commits: drop the read-through caches of users whose orders changed (None, a
    house account's missing owner, is skipped) and wake the outbox relay for the outbox rows the change
    wrote. One Redis round trip; a failure is logged, not raised: the change is committed, a stale cache
    expires within its TTL, and the relay also polls."""
    owners = {uid for uid in user_ids if uid is not None}
    keys = [key for uid in sorted(owners) for key in (order_book_key(uid), positions_key(uid))]
    try:
        await cache.invalidate_and_publish(keys, OUTBOX_WAKEUP_CHANNEL)
    except REDIS_ERRORS as exc:
        log.warning("could not drop caches %s or wake the relay: %s", keys, exc)


async def get_order(conn: asyncpg.Connection, principal: Principal, order_id: int) -> OrderRecord:
    row = await conn.fetchrow(
        f"SELECT {ORDER_COLUMNS}, a.user_id FROM orders o LEFT JOIN instruments i ON i.id = o.instrument_id"
        " JOIN accounts a ON a.id = o.account_id WHERE o.id = $1",
        order_id,
    )
    if row is None or (not sees_all_accounts(principal) and row["user_id"] != principal.user_id):
        raise NotFound(f"no order {order_id}", code="order_not_found")
    return order_from_row(row)


async def list_orders(
    conn: asyncpg.Connection,
    principal: Principal,
    *,
    account_id: int | None = None,
    instrument_id: int | None = None,
    unlisted_symbol: str | None = None,
    statuses: Sequence[str] = (),
    start: datetime | None = None,
    end: datetime | None = None,
    limit: int = DEFAULT_PAGE,
    cursor: str | None = None,
) -> Page[OrderRecord]:
    """Orders newest first. ``statuses`` may contain ``open`` for every open status; ``end`` is exclusive;
    ``unlisted_symbol`` selects the rejected orders for a symbol no instrument had."""
    limit = _page_limit(limit)
    where = _Where()
    _scope(where, principal, "o")
    if account_id is not None:
        where.add("o.account_id = {}", account_id)
    if instrument_id is not None:
        where.add("o.instrument_id = {}", instrument_id)
    if unlisted_symbol is not None:
        where.add("o.instrument_id IS NULL AND o.unlisted_symbol = {}", unlisted_symbol)
    if statuses:
        wanted: set[str] = set()
        for status in statuses:
            if status == "open":
                wanted.update(OPEN_STATUS_VALUES)
            else:
                try:
                    wanted.add(OrderStatus(status).value)
                except ValueError:
                    raise InvalidRequest(f"unknown order status {status!r}", code="validation_error") from None
        where.add("o.status = ANY({}::text[])", sorted(wanted))
    if start is not None:
        where.add("o.created_at >= {}", start)
    if end is not None:
        where.add("o.created_at < {}", end)
    if cursor is not None:
        where.add("(o.created_at, o.id) < ({}, {})", *decode_cursor(cursor))
    where.args.append(limit + 1)
    rows = await conn.fetch(
        f"SELECT {ORDER_COLUMNS} FROM orders o LEFT JOIN instruments i ON i.id = o.instrument_id"
        f" WHERE {where.sql()} ORDER BY o.created_at DESC, o.id DESC LIMIT ${len(where.args)}",
        *where.args,
    )
    items = [order_from_row(r) for r in rows[:limit]]
    more = len(rows) > limit
    return Page(items, encode_cursor(items[-1].created_at, items[-1].id) if more else None)


async def open_orders_of_user(conn: asyncpg.Connection, cache: Cache, user_id: int) -> list[OrderRecord]:
    """A user's open orders through the seed's ``order_book:{user_id}`` read-through cache (30 s).

    The api drops the key after placing, modifying or canceling; the engine after every batch that touched
    the user, so the cache never outlives a change by more than the commit-to-delete gap.
    """
    cached, generation = await cache.read_through(order_book_key(user_id))
    if cached is not None:
        return [OrderRecord.from_json(item) for item in json.loads(cached)]
    rows = await conn.fetch(
        f"SELECT {ORDER_COLUMNS} FROM orders o JOIN instruments i ON i.id = o.instrument_id"
        " WHERE o.account_id IN (SELECT id FROM accounts WHERE user_id = $1) AND o.status = ANY($2::text[])"
        " ORDER BY o.created_at DESC, o.id DESC",
        user_id,
        list(OPEN_STATUS_VALUES),
    )
    orders = [order_from_row(r) for r in rows]
    await cache.fill(
        order_book_key(user_id), json.dumps([o.to_json() for o in orders]).encode(), TTL_ORDER_BOOK, generation
    )
    return orders


# --------------------------------------------------------------------------------------------- fills


async def list_fills(
    conn: asyncpg.Connection,
    principal: Principal,
    *,
    account_id: int | None = None,
    instrument_id: int | None = None,
    order_id: int | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
    limit: int = DEFAULT_PAGE,
    cursor: str | None = None,
) -> Page[FillRecord]:
    limit = _page_limit(limit)
    where = _Where()
    _scope(where, principal, "f")
    if account_id is not None:
        where.add("f.account_id = {}", account_id)
    if instrument_id is not None:
        where.add("f.instrument_id = {}", instrument_id)
    if order_id is not None:
        where.add("f.order_id = {}", order_id)
    if start is not None:
        where.add("f.created_at >= {}", start)
    if end is not None:
        where.add("f.created_at < {}", end)
    if cursor is not None:
        where.add("(f.created_at, f.id) < ({}, {})", *decode_cursor(cursor))
    where.args.append(limit + 1)
    rows = await conn.fetch(
        "SELECT f.id, f.fill_id, f.order_id, f.account_id, i.symbol, f.side, f.quantity, f.price, f.fee,"
        " f.fee_asset, f.liquidity, f.trade_id, f.created_at FROM fills f JOIN instruments i ON i.id = f.instrument_id"
        f" WHERE {where.sql()} ORDER BY f.created_at DESC, f.id DESC LIMIT ${len(where.args)}",
        *where.args,
    )
    items = [FillRecord(**dict(r)) for r in rows[:limit]]
    more = len(rows) > limit
    return Page(items, encode_cursor(items[-1].created_at, items[-1].id) if more else None)


# ----------------------------------------------------------------------------------------- positions


def unrealized_pnl(net_quantity: Decimal, average_price: Decimal, mark: Decimal | None) -> Decimal:
    """net * (mark - average); zero without a mark (nothing has traded and no reference is known)."""
    return Decimal(0) if mark is None else net_quantity * (mark - average_price)


_POSITION_ROWS = (
    "SELECT p.account_id, p.instrument_id, i.symbol, p.net_quantity, p.average_price, p.realized_pnl"
    " FROM positions p JOIN instruments i ON i.id = p.instrument_id"
)


async def list_positions(
    conn: asyncpg.Connection,
    cache: Cache,
    principal: Principal,
    *,
    account_id: int | None = None,
    instrument_id: int | None = None,
) -> list[PositionRecord]:
    """Positions with unrealized P&L at the mark (last trade price, else the reference price).

    For a user reading their own accounts the position rows come through the seed's ``positions:{user_id}``
    cache (30 s, dropped by the engine when a fill changes them); marks are always read fresh, since they
    move with every trade of anyone.
    """
    if account_id is not None:
        await require_visible_account(conn, principal, account_id)
    rows: list[dict[str, Any]]
    if sees_all_accounts(principal):
        where = _Where()
        if account_id is not None:
            where.add("p.account_id = {}", account_id)
        if instrument_id is not None:
            where.add("p.instrument_id = {}", instrument_id)
        records = await conn.fetch(f"{_POSITION_ROWS} WHERE {where.sql()} ORDER BY 1, 3", *where.args)
        rows = [dict(r) for r in records]
    else:
        rows = await _user_position_rows(conn, cache, principal.user_id)
        rows = [
            r
            for r in rows
            if (account_id is None or r["account_id"] == account_id)
            and (instrument_id is None or r["instrument_id"] == instrument_id)
        ]
    marks = {
        r["id"]: r["mark"]
        for r in await conn.fetch(
            "SELECT id, coalesce(last_price, reference_price) AS mark FROM instruments WHERE id = ANY($1::bigint[])",
            sorted({r["instrument_id"] for r in rows}),
        )
    }
    return [
        PositionRecord(
            account_id=r["account_id"],
            symbol=r["symbol"],
            net_quantity=r["net_quantity"],
            average_price=r["average_price"],
            realized_pnl=r["realized_pnl"],
            mark_price=marks.get(r["instrument_id"]),
            unrealized_pnl=unrealized_pnl(r["net_quantity"], r["average_price"], marks.get(r["instrument_id"])),
        )
        for r in rows
    ]


async def _user_position_rows(conn: asyncpg.Connection, cache: Cache, user_id: int) -> list[dict[str, Any]]:
    cached, generation = await cache.read_through(positions_key(user_id))
    if cached is not None:
        return [
            {**r, **{k: Decimal(r[k]) for k in ("net_quantity", "average_price", "realized_pnl")}}
            for r in json.loads(cached)
        ]
    records = await conn.fetch(
        f"{_POSITION_ROWS} WHERE p.account_id IN (SELECT id FROM accounts WHERE user_id = $1) ORDER BY 1, 3", user_id
    )
    rows = [dict(r) for r in records]
    payload = [
        {**r, **{k: decimal_text(r[k]) for k in ("net_quantity", "average_price", "realized_pnl")}} for r in rows
    ]
    await cache.fill(positions_key(user_id), json.dumps(payload).encode(), TTL_POSITIONS, generation)
    return rows


# ------------------------------------------------------------------------------------------ accounts


def position_mark(instrument: str, position: str) -> str:
    """SQL for the price a position is marked at, given the aliases of its instrument and position rows: the
    last trade price, else the reference price, else the position's own average price (no P&L without a
    market price). Account summaries and pre-trade margin use the same mark."""
    return f"coalesce({instrument}.last_price, {instrument}.reference_price, {position}.average_price)"


async def account_summary(conn: asyncpg.Connection, principal: Principal, account_id: int) -> AccountSummary:
    """Cash, holds, free funds, equity, margin in use and P&L of one account (see AccountSummary), in one
    statement; positions are marked at ``position_mark``."""
    row = await conn.fetchrow(
        "SELECT a.id, a.user_id, a.name, a.kind, a.currency, a.status, a.stp_mode,"
        " coalesce((SELECT b.amount FROM balances b WHERE b.account_id = a.id AND b.asset = a.currency), 0) AS cash,"
        " coalesce((SELECT sum(h.amount) FROM holds h WHERE h.account_id = a.id AND h.asset = a.currency"
        "           AND h.released_at IS NULL), 0) AS holds,"
        " coalesce(pv.realized, 0) AS realized, coalesce(pv.market_value, 0) AS market_value,"
        " coalesce(pv.unrealized, 0) AS unrealized, coalesce(pv.margin, 0) AS margin"
        " FROM accounts a LEFT JOIN LATERAL ("
        "   SELECT sum(p.realized_pnl) AS realized, sum(p.net_quantity * m.mark) AS market_value,"
        "          sum(p.net_quantity * (m.mark - p.average_price)) AS unrealized,"
        "          sum(abs(p.net_quantity) * m.mark * i.margin_rate) AS margin"
        "   FROM positions p JOIN instruments i ON i.id = p.instrument_id"
        f"   CROSS JOIN LATERAL (SELECT {position_mark('i', 'p')} AS mark) m"
        "   WHERE p.account_id = a.id) pv ON TRUE"
        " WHERE a.id = $1 AND a.kind <> 'house'",
        account_id,
    )
    if row is None or (not sees_all_accounts(principal) and row["user_id"] != principal.user_id):
        raise NotFound(f"no account {account_id}", code="account_not_found")
    cash: Decimal = row["cash"]
    holds: Decimal = row["holds"]
    equity: Decimal = cash + row["market_value"]
    margin_used: Decimal = row["margin"] if row["kind"] == "margin" else Decimal(0)
    return AccountSummary(
        account_id=row["id"],
        user_id=row["user_id"],
        name=row["name"],
        kind=row["kind"],
        currency=row["currency"],
        status=row["status"],
        stp=row["stp_mode"],
        cash=cash,
        holds=holds,
        free=equity - margin_used - holds if row["kind"] == "margin" else cash - holds,
        positions_value=row["market_value"],
        equity=equity,
        margin_used=margin_used,
        realized_pnl=row["realized"],
        unrealized_pnl=row["unrealized"],
    )


# ------------------------------------------------------------------------------- instruments and book


async def list_instruments(conn: asyncpg.Connection) -> list[InstrumentRecord]:
    rows = await conn.fetch(
        "SELECT id, symbol, base_asset, quote_asset, tick_size, lot_size, min_qty, max_qty, price_band_pct,"
        " reference_price, last_price, maker_fee_rate, taker_fee_rate, margin_rate, status"
        " FROM instruments ORDER BY symbol"
    )
    return [InstrumentRecord(**dict(r)) for r in rows]


def book_snapshot_key(symbol: str) -> str:
    return f"tp:book:{symbol}:snapshot"


async def book_snapshot(cache: Cache, symbol: str, levels: int = BOOK_MAX_LEVELS) -> dict[str, Any]:
    """The engine's latest L2 snapshot ``{"seq", "bids", "asks"}`` cut to ``levels`` per side.

    Before the engine has written one the book is empty at seq 0. The caller checks the symbol exists.
    """
    if not 1 <= levels <= BOOK_MAX_LEVELS:
        raise InvalidRequest(f"levels must be between 1 and {BOOK_MAX_LEVELS}", code="validation_error")
    raw = await cache.get_cached(book_snapshot_key(symbol))
    snapshot: dict[str, Any] = json.loads(raw) if raw is not None else {"seq": 0, "bids": [], "asks": []}
    return {
        "symbol": symbol,
        "seq": snapshot.get("seq", 0),
        "bids": snapshot.get("bids", [])[:levels],
        "asks": snapshot.get("asks", [])[:levels],
    }
