"""REST for the order path: orders, fills, positions, account summaries, instruments and the L2 book.

Each write runs in one transaction that commits before the response is sent: a 201 (or a 422 risk_rejected)
means the order row is in PostgreSQL. Responses are built straight from the service records (already
JSON-shaped) to keep the acknowledgement path short; the pydantic models document them.
"""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Path, Query
from fastapi.responses import Response

from tradeplane.bootstrap import Platform
from tradeplane.entrypoints.api.deps import PlatformDep, PrincipalDep
from tradeplane.entrypoints.api.schemas import (
    AccountPublic,
    AccountUpdate,
    BatchPublic,
    BookPublic,
    FillPage,
    FillPublic,
    InstrumentPublic,
    OrderAmend,
    OrderBatchCreate,
    OrderCreate,
    OrderPage,
    OrderPublic,
    PositionPublic,
    RiskRejectedBody,
    Symbol,
    UtcInstant,
)
from tradeplane.errors import TradeplaneError
from tradeplane.services import queries
from tradeplane.services.accounts import set_self_trade_prevention
from tradeplane.services.identity import Principal
from tradeplane.services.orders import (
    OrderRequest,
    Placement,
    PlacementOutcome,
    order_entry,
    placement_queue,
    submit_orders,
)
from tradeplane.services.queries import OrderRecord, sees_all_accounts

router = APIRouter(prefix="/api/v1", tags=["trading"])

# Ids are bigints: beyond that range a request names nothing and is refused (422) before any query is sent.
IdPath = Annotated[int, Path(ge=1, le=queries.MAX_ROW_ID)]
IdQuery = Annotated[int, Query(ge=1, le=queries.MAX_ROW_ID)]
IdFilter = Annotated[int | None, Query(ge=1, le=queries.MAX_ROW_ID)]
# Instants only: a time without a UTC offset would be read in whatever zone the api process runs in.
Instant = Annotated[UtcInstant | None, Query(description="with a UTC offset, e.g. 2026-01-01T00:00:00Z")]
SymbolFilter = Annotated[Symbol | None, Query()]

_REJECTED: dict[int | str, dict[str, Any]] = {
    422: {"model": RiskRejectedBody, "description": "risk_rejected (stored) or validation_error"}
}


def json_response(content: Any, status_code: int = 200) -> Response:
    """A JSON response with the bytes JSONResponse would send for these values (plain str, int, bool, None,
    lists and dicts: no floats), encoded by orjson at a fraction of the standard library's cost."""
    return Response(orjson.dumps(content), status_code=status_code, media_type="application/json")


def _order_response(order: OrderRecord, status_code: int) -> Response:
    return json_response(order.to_json(), status_code)


def _risk_rejected(order: OrderRecord, reason: str, detail: str) -> Response:
    body: dict[str, Any] = {
        "error": "risk_rejected",
        "detail": detail,
        "reason": reason,
        "order": order.to_json(),
    }
    return json_response(body, 422)


@router.post(
    "/orders",
    status_code=201,
    response_model=OrderPublic,
    responses={200: {"model": OrderPublic, "description": "idempotent retry: the original order"}, **_REJECTED},
)
async def place_order(body: OrderCreate, principal: PrincipalDep, platform: PlatformDep) -> Response:
    """Place an order: 201 once it is committed (status pending_new); a retry with the same client_order_id
    and parameters returns the original (200); the same id with other parameters is 409."""
    return await place_one(body, principal, platform)


async def place_one(body: OrderCreate, principal: Principal, platform: Platform) -> Response:
    """POST /orders once the request is authenticated and valid: this route's handler, and the whole of what
    ``app.OrderPlacementFastPath`` does after its own checks."""
    request = OrderRequest(body.account_id, body.symbol, body.terms(), body.client_order_id)
    placement = await placement_queue(platform).place(principal, request)
    if placement.rejection is not None:
        return _risk_rejected(placement.order, placement.rejection.reason.value, placement.rejection.detail)
    return _order_response(placement.order, 201 if placement.outcome is PlacementOutcome.ACCEPTED else 200)


@router.post("/orders/batch", response_model=BatchPublic)
async def place_orders(batch: OrderBatchCreate, principal: PrincipalDep, platform: PlatformDep) -> Response:
    """Place up to 500 orders in one transaction, for any accounts the key may trade: 200 once committed, with
    one result per order in the request's order, each carrying the status its own POST /orders would have had.

    The orders are checked as if placed one by one in that order (a later order sees the holds of earlier ones),
    and the ones accepted reach their engine shard in that order. A batch is the way to place orders at high
    rate: one request, one transaction and one round trip per statement for all of them.
    """
    entry = order_entry(platform)
    requests = [OrderRequest(o.account_id, o.symbol, o.terms(), o.client_order_id) for o in batch.orders]
    outcomes = await submit_orders(platform.db, entry, principal, requests)
    owners = {o.owner_user_id for o in outcomes if isinstance(o, Placement) and o.outcome is PlacementOutcome.ACCEPTED}
    if owners:
        await queries.after_order_commit(platform.cache, *owners)
    body = orjson.dumps({"results": [_batch_item(outcome) for outcome in outcomes]})
    return Response(body, media_type="application/json")


def _batch_item(outcome: Placement | TradeplaneError) -> dict[str, Any]:
    if isinstance(outcome, TradeplaneError):
        return {"status": outcome.status_code, "error": outcome.code, "detail": outcome.detail}
    order = outcome.order.to_json()
    if outcome.rejection is not None:
        rejection = outcome.rejection
        return {
            "status": 422,
            "error": "risk_rejected",
            "reason": rejection.reason.value,
            "detail": rejection.detail,
            "order": order,
        }
    return {"status": 201 if outcome.outcome is PlacementOutcome.ACCEPTED else 200, "order": order}


@router.get("/orders", response_model=OrderPage)
async def list_orders(
    principal: PrincipalDep,
    platform: PlatformDep,
    account_id: IdFilter = None,
    symbol: SymbolFilter = None,
    status: Annotated[list[str] | None, Query(description="repeatable; 'open' means every open status")] = None,
    start: Instant = None,
    end: Instant = None,
    limit: Annotated[int, Query(ge=1, le=queries.MAX_PAGE)] = queries.DEFAULT_PAGE,
    cursor: str | None = None,
) -> Response:
    """Orders newest first, filtered by account, symbol, status and created_at range [start, end)."""
    async with platform.db.connection("orders.list") as conn:
        own_open_only = (
            status == ["open"] and account_id is None and symbol is None and start is None and end is None
        ) and cursor is None
        if own_open_only and not sees_all_accounts(principal):
            cached = await queries.open_orders_of_user(conn, platform.cache, principal.user_id)
            if len(cached) <= limit:
                return json_response({"items": [o.to_json() for o in cached], "next_cursor": None})
        if account_id is not None:
            await queries.require_visible_account(conn, principal, account_id)
        instrument_id = unlisted_symbol = None
        if symbol is not None:
            rules = await order_entry(platform).catalog.get(conn, symbol)
            # no instrument: the orders stored as rejected (unknown_instrument) under the symbol asked for
            instrument_id, unlisted_symbol = (None, symbol) if rules is None else (rules.instrument_id, None)
        page = await queries.list_orders(
            conn,
            principal,
            account_id=account_id,
            instrument_id=instrument_id,
            unlisted_symbol=unlisted_symbol,
            statuses=status or (),
            start=start,
            end=end,
            limit=limit,
            cursor=cursor,
        )
    return json_response({"items": [o.to_json() for o in page.items], "next_cursor": page.next_cursor})


@router.get("/orders/{order_id}", response_model=OrderPublic)
async def get_order(order_id: IdPath, principal: PrincipalDep, platform: PlatformDep) -> Response:
    async with platform.db.connection("orders.get") as conn:
        order = await queries.get_order(conn, principal, order_id)
    return _order_response(order, 200)


@router.patch("/orders/{order_id}", response_model=OrderPublic, responses=_REJECTED)
async def modify_order(order_id: IdPath, body: OrderAmend, principal: PrincipalDep, platform: PlatformDep) -> Response:
    """Change quantity and/or price; the engine applies it (a price change or a larger quantity loses time
    priority). The response is the order as stored now; the change shows once the engine has applied it."""
    entry = order_entry(platform)
    async with platform.db.transaction("orders.modify") as conn:
        amendment = await entry.modify_order(conn, principal, order_id, quantity=body.quantity, price=body.price)
    if amendment.rejection is not None:
        return _risk_rejected(amendment.order, amendment.rejection.reason.value, amendment.rejection.detail)
    await queries.after_order_commit(platform.cache, amendment.owner_user_id)
    return _order_response(amendment.order, 200)


@router.delete("/orders/{order_id}", response_model=OrderPublic)
async def cancel_order(order_id: IdPath, principal: PrincipalDep, platform: PlatformDep) -> Response:
    """Request a cancel: the order becomes pending_cancel; the engine cancels it (or it fills first)."""
    entry = order_entry(platform)
    async with platform.db.transaction("orders.cancel") as conn:
        order = await entry.cancel_order(conn, principal, order_id)
        owner = await conn.fetchval("SELECT user_id FROM accounts WHERE id = $1", order.account_id)
    await queries.after_order_commit(platform.cache, owner)
    return _order_response(order, 200)


@router.delete("/orders", response_model=list[OrderPublic])
async def cancel_all_orders(
    account_id: IdQuery, principal: PrincipalDep, platform: PlatformDep, symbol: SymbolFilter = None
) -> Response:
    """Cancel every open order of the account (optionally one symbol); returns the orders now pending_cancel."""
    entry = order_entry(platform)
    async with platform.db.transaction("orders.cancel_all") as conn:
        orders = await entry.cancel_all(conn, principal, account_id, symbol)
        owner = await conn.fetchval("SELECT user_id FROM accounts WHERE id = $1", account_id)
    if orders:
        await queries.after_order_commit(platform.cache, owner)
    return json_response([o.to_json() for o in orders])


@router.get("/fills", response_model=FillPage)
async def list_fills(
    principal: PrincipalDep,
    platform: PlatformDep,
    account_id: IdFilter = None,
    symbol: SymbolFilter = None,
    order_id: IdFilter = None,
    start: Instant = None,
    end: Instant = None,
    limit: Annotated[int, Query(ge=1, le=queries.MAX_PAGE)] = queries.DEFAULT_PAGE,
    cursor: str | None = None,
) -> FillPage:
    async with platform.db.connection("fills.list") as conn:
        if account_id is not None:
            await queries.require_visible_account(conn, principal, account_id)
        instrument_id = None
        if symbol is not None:
            instrument_id = (await order_entry(platform).catalog.require(conn, symbol)).instrument_id
        page = await queries.list_fills(
            conn,
            principal,
            account_id=account_id,
            instrument_id=instrument_id,
            order_id=order_id,
            start=start,
            end=end,
            limit=limit,
            cursor=cursor,
        )
    return FillPage(
        items=[FillPublic.model_validate(f, from_attributes=True) for f in page.items], next_cursor=page.next_cursor
    )


@router.get("/positions", response_model=list[PositionPublic])
async def list_positions(
    principal: PrincipalDep, platform: PlatformDep, account_id: IdFilter = None, symbol: SymbolFilter = None
) -> list[PositionPublic]:
    async with platform.db.connection("positions.list") as conn:
        instrument_id = None
        if symbol is not None:
            instrument_id = (await order_entry(platform).catalog.require(conn, symbol)).instrument_id
        positions = await queries.list_positions(
            conn, platform.cache, principal, account_id=account_id, instrument_id=instrument_id
        )
    return [PositionPublic.model_validate(p, from_attributes=True) for p in positions]


@router.get("/accounts/{account_id}", response_model=AccountPublic)
async def get_account(account_id: IdPath, principal: PrincipalDep, platform: PlatformDep) -> AccountPublic:
    """Cash, holds, free funds, equity, margin in use, realized and unrealized P&L (positions marked at the last
    trade). Free is cash - holds for a cash account, equity - margin_used - holds for a margin account."""
    return AccountPublic.model_validate(await read_account(account_id, principal, platform), from_attributes=True)


async def read_account(account_id: int, principal: Principal, platform: Platform) -> queries.AccountSummary:
    """GET /accounts/{id} once the request is authenticated and the id valid: this route's read, and the whole of
    what ``fast_reads.AccountReadFastPath`` does after its own checks (it renders ``AccountSummary.to_json``)."""
    async with platform.db.connection("accounts.summary") as conn:
        return await queries.account_summary(conn, principal, account_id)


@router.patch("/accounts/{account_id}", response_model=AccountPublic)
async def update_account(
    account_id: IdPath, body: AccountUpdate, principal: PrincipalDep, platform: PlatformDep
) -> AccountPublic:
    """Set the account's self-trade prevention for orders that name none (open orders keep theirs)."""
    async with platform.db.transaction("accounts.update") as conn:
        await set_self_trade_prevention(conn, account_id, body.stp, principal)
        summary = await queries.account_summary(conn, principal, account_id)
    return AccountPublic.model_validate(summary, from_attributes=True)


@router.get("/instruments", response_model=list[InstrumentPublic])
async def list_instruments(principal: PrincipalDep, platform: PlatformDep) -> list[InstrumentPublic]:
    async with platform.db.connection("instruments.list") as conn:
        instruments = await queries.list_instruments(conn)
    return [InstrumentPublic.model_validate(i, from_attributes=True) for i in instruments]


@router.get("/book/{symbol}", response_model=BookPublic)
async def get_book(
    symbol: Annotated[Symbol, Path()],
    principal: PrincipalDep,
    platform: PlatformDep,
    levels: Annotated[int, Query(ge=1, le=queries.BOOK_MAX_LEVELS)] = queries.BOOK_MAX_LEVELS,
) -> BookPublic:
    """L2 depth from the engine's latest snapshot in Redis (empty at seq 0 before the engine wrote one)."""
    async with platform.db.connection("book.get") as conn:
        await order_entry(platform).catalog.require(conn, symbol)
    return BookPublic.model_validate(await queries.book_snapshot(platform.cache, symbol, levels))
