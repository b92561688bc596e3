"""Batch placement (``POST /api/v1/orders/batch``, ``OrderEntry.place_orders``) against real PostgreSQL and Redis.

The main check is equivalence: random batches (funds running out, limits, reduce-only, twins and reuses of
client_order_ids, unknown symbols and accounts, malformed orders) are placed once as a batch for one set of
accounts and once order by order for an identical set, and must give the same answer for every order, the
same stored rows and the same outbox order.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx
import pytest

from tests.integration.conftest import TEST_SECRET, Actor
from tradeplane.bootstrap import Platform
from tradeplane.domain.orders import OrderType, SelfTradePrevention, Side, TimeInForce
from tradeplane.domain.risk import OrderTerms
from tradeplane.errors import TradeplaneError
from tradeplane.services import accounts, demo, identity
from tradeplane.services.identity import Principal, Role
from tradeplane.services.orders import (
    MAX_BATCH,
    OrderEntry,
    OrderRequest,
    Placement,
    PlacementOutcome,
    submit_order,
    submit_orders,
)

D = Decimal
NOW = datetime(2026, 11, 20, 15, 0, 0, 123456, tzinfo=UTC)
PRICES = {"AAPL": D("190.00"), "BTC-USD": D("65000.00")}
ORDER_FIELDS = ("status", "reject_reason", "quantity", "price", "hold_price", "client_order_id")


@dataclass(frozen=True)
class Book:
    """One user's accounts for a scenario: account_ids[k] plays the k-th account of the scenario."""

    principal: Principal
    key: str
    account_ids: tuple[int, ...]


async def make_book(platform: Platform, setup: list[dict[str, Any]]) -> Book:
    uid = random.randint(1_000_000_000, 9_000_000_000)
    ids = []
    async with platform.db.transaction("test.batch") as conn:
        await demo.load_reference_data(conn)
        await conn.execute("INSERT INTO users (id, username, role) VALUES ($1, $2, 'trader')", uid, f"b{uid}")
        key = (await identity.issue_api_key(conn, TEST_SECRET, uid, "test")).key
        for k, account in enumerate(setup):
            account_id = uid + k + 1
            ids.append(account_id)
            await conn.execute(
                "INSERT INTO accounts (id, user_id, name, kind, currency) VALUES ($1, $2, $3, $4, 'USD')",
                account_id,
                uid,
                f"a{k}",
                account["kind"],
            )
            await accounts.deposit(conn, account_id, account["cash"])
            for symbol, quantity in account["positions"].items():
                await conn.execute(
                    "INSERT INTO positions (account_id, instrument_id, net_quantity, average_price)"
                    " SELECT $1, id, $2, $3 FROM instruments WHERE symbol = $4",
                    account_id,
                    quantity,
                    PRICES[symbol],
                    symbol,
                )
            if account["limits"]:
                await conn.execute(
                    "INSERT INTO risk_limits (account_id, instrument_id, max_open_orders, max_position,"
                    " max_orders_per_second) VALUES ($1, NULL, $2, $3, $4)",
                    account_id,
                    *account["limits"],
                )
    return Book(Principal(uid, f"b{uid}", Role.TRADER), key, tuple(ids))


def random_setup(rng: random.Random) -> list[dict[str, Any]]:
    setup = []
    for _ in range(rng.randint(1, 3)):
        positions = {}
        if rng.random() < 0.6:
            positions["AAPL"] = D(rng.choice([5, 20, 60]))
        if rng.random() < 0.4:
            positions["BTC-USD"] = D(rng.choice(["0.1", "1.5"]))
        limits = None
        if rng.random() < 0.5:
            limits = (rng.choice([3, 6, 100]), rng.choice([None, D(40), D(1000)]), rng.choice([8, 50]))
        setup.append(
            {
                "kind": rng.choice(["cash", "cash", "margin"]),
                "cash": D(rng.choice(["3000.00", "25000.00", "150000.00"])),
                "positions": positions,
                "limits": limits,
            }
        )
    return setup


def random_order(rng: random.Random, accounts_n: int) -> tuple[int | None, str, OrderTerms, str | None]:
    """(account index or None for a foreign account, symbol, terms, client_order_id)."""
    symbol = rng.choices(["AAPL", "BTC-USD", "NOPE-USD"], weights=[6, 3, 1])[0]
    centre = PRICES.get(symbol, D("10.00"))
    side = rng.choice([Side.BUY, Side.SELL])
    order_type = rng.choices(list(OrderType), weights=[2, 6, 1, 1])[0]
    quantity = D(rng.choice([1, 2, 5, 10, 30])) if symbol != "BTC-USD" else D(rng.choice(["0.01", "0.1", "0.5"]))
    if rng.random() < 0.05:
        quantity = quantity + D("0.5") if symbol == "AAPL" else D("0.0001")  # off the lot grid
    offset = centre * D(rng.choice([-12, -3, 0, 2, 4, 15])) / 100
    price = (centre + offset).quantize(D("0.01")) if order_type in (OrderType.LIMIT, OrderType.STOP_LIMIT) else None
    stop_price = None
    if order_type in (OrderType.STOP, OrderType.STOP_LIMIT):
        stop_price = (centre * D("1.01") if side is Side.BUY else centre * D("0.99")).quantize(D("0.01"))
    if rng.random() < 0.04:
        price = centre  # a market order with a price, or a limit at the centre: malformed or fine
    tif = rng.choices([TimeInForce.GTC, TimeInForce.DAY, TimeInForce.IOC], weights=[6, 2, 1])[0]
    terms = OrderTerms(
        side=side,
        order_type=order_type,
        quantity=quantity,
        price=price,
        stop_price=stop_price,
        time_in_force=tif,
        post_only=order_type is OrderType.LIMIT and tif is TimeInForce.GTC and rng.random() < 0.1,
        reduce_only=rng.random() < 0.15,
        stp=SelfTradePrevention.CANCEL_NEWEST,
    )
    account = None if rng.random() < 0.03 else rng.randrange(accounts_n)
    coid = rng.choice([None, None, "c1", "c2", "c3"])
    return account, symbol, terms, coid


def requests_for(book: Book, orders: list[tuple[int | None, str, OrderTerms, str | None]]) -> list[OrderRequest]:
    return [
        OrderRequest(1 if account is None else book.account_ids[account], symbol, terms, coid)
        for account, symbol, terms, coid in orders
    ]


def answer(outcome: Placement | TradeplaneError, book: Book) -> tuple[Any, ...]:
    """What a client learns from one outcome, with account ids replaced by their index in the book."""
    if isinstance(outcome, TradeplaneError):
        return ("error", outcome.status_code, outcome.code)
    reason = None if outcome.rejection is None else outcome.rejection.reason.value
    order = outcome.order
    if order is None:
        return (outcome.outcome.value, reason)
    return (
        outcome.outcome.value,
        reason,
        order.status,
        book.account_ids.index(order.account_id),
        order.symbol,
        order.quantity,
        order.price,
    )


async def stored(platform: Platform, book: Book) -> dict[str, list[tuple[Any, ...]]]:
    """Every row the placements wrote for the book's accounts, in id order, ids replaced by positions."""
    async with platform.db.connection("test.batch") as conn:
        orders = await conn.fetch(
            "SELECT id, account_id, status, reject_reason, quantity, price, hold_price, client_order_id"
            " FROM orders WHERE account_id = ANY($1::bigint[]) ORDER BY id",
            list(book.account_ids),
        )
        position = {r["id"]: k for k, r in enumerate(orders)}
        holds = await conn.fetch(
            "SELECT order_id, asset, amount FROM holds WHERE account_id = ANY($1::bigint[]) ORDER BY id",
            list(book.account_ids),
        )
        # the engine's commands in the order it gets them (a batch row carries several)
        outbox = await conn.fetch(
            "SELECT x.stream, (c.command->>'order_id')::bigint AS order_id FROM outbox x,"
            " jsonb_array_elements(CASE WHEN x.payload->>'type' = 'batch' THEN x.payload->'commands'"
            " ELSE jsonb_build_array(x.payload) END) WITH ORDINALITY AS c(command, n)"
            " WHERE (c.command->>'account_id')::bigint = ANY($1::bigint[]) ORDER BY x.id, c.n",
            list(book.account_ids),
        )
        audit = await conn.fetch(
            "SELECT action, details->>'reason' AS reason FROM audit_log"
            " WHERE (details->>'account_id')::bigint = ANY($1::bigint[]) ORDER BY id",
            list(book.account_ids),
        )
    index = book.account_ids.index
    return {
        "orders": [(*(r[column] for column in ORDER_FIELDS), index(r["account_id"])) for r in orders],
        "holds": [(position[r["order_id"]], r["asset"], r["amount"]) for r in holds],
        "outbox": [(r["stream"], position[r["order_id"]]) for r in outbox],
        "audit": [(r["action"], r["reason"]) for r in audit],
    }


async def test_a_batch_answers_and_stores_exactly_what_placing_its_orders_one_by_one_does(platform: Platform) -> None:
    entry = OrderEntry(platform.cache, shards=platform.settings.engine_shards, clock=lambda: NOW)
    seen_reasons: set[str] = set()
    for seed in range(30):
        rng = random.Random(seed)
        setup = random_setup(rng)
        orders = [random_order(rng, len(setup)) for _ in range(rng.randint(5, 40))]
        batch_book, one_by_one_book = await make_book(platform, setup), await make_book(platform, setup)

        batch = await submit_orders(platform.db, entry, batch_book.principal, requests_for(batch_book, orders))
        singles: list[Placement | TradeplaneError] = []
        for request in requests_for(one_by_one_book, orders):
            try:
                singles.append(await submit_order(platform.db, entry, one_by_one_book.principal, request))
            except TradeplaneError as exc:
                singles.append(exc)

        assert [answer(o, batch_book) for o in batch] == [answer(o, one_by_one_book) for o in singles], seed
        assert await stored(platform, batch_book) == await stored(platform, one_by_one_book), seed
        for outcome in batch:
            if isinstance(outcome, TradeplaneError):
                seen_reasons.add(outcome.code)
            elif outcome.rejection is not None:
                seen_reasons.add(outcome.rejection.reason.value)
    # the scenarios reach the interesting cases, so the equality above is not vacuous
    assert {"insufficient_funds", "reduce_only_would_increase", "price_outside_band", "unknown_instrument"} <= (
        seen_reasons
    )
    assert {"validation_error", "account_not_found", "duplicate_client_order_id"} <= seen_reasons


async def test_orders_of_a_batch_share_the_accounts_free_cash_in_request_order(platform: Platform) -> None:
    """Cash for about two AAPL buys: the first two of three are accepted, whichever instrument they trade."""
    book = await make_book(platform, [{"kind": "cash", "cash": D("4000.00"), "positions": {}, "limits": None}])
    entry = OrderEntry(platform.cache, shards=platform.settings.engine_shards, clock=lambda: NOW)
    buy = OrderTerms(side=Side.BUY, order_type=OrderType.LIMIT, quantity=D(10), price=D("190.00"))
    outcomes = await submit_orders(platform.db, entry, book.principal, requests_for(book, [(0, "AAPL", buy, None)] * 3))
    assert [answer(o, book)[:3] for o in outcomes] == [
        ("accepted", None, "pending_new"),
        ("accepted", None, "pending_new"),
        ("rejected", "insufficient_funds", "rejected"),
    ]


async def test_the_batch_endpoint_answers_each_order_with_its_own_status(
    client: httpx.AsyncClient, platform: Platform
) -> None:
    book = await make_book(platform, [{"kind": "cash", "cash": D("100000.00"), "positions": {}, "limits": None}])
    account = book.account_ids[0]
    buy = {"account_id": account, "symbol": "AAPL", "side": "buy", "type": "limit", "quantity": "1", "price": "190.00"}
    response = await client.post(
        "/api/v1/orders/batch",
        json={
            "orders": [
                {**buy, "client_order_id": "x"},
                {**buy, "client_order_id": "x"},
                {**buy, "client_order_id": "x", "quantity": "2"},
                {**buy, "price": "300.00"},
                {**buy, "type": "market"},
                {**buy, "account_id": 1},
                {**buy, "symbol": "NOPE"},
            ]
        },
        headers={"Authorization": f"Bearer {book.key}"},
    )
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [(r["status"], r.get("error"), r.get("reason")) for r in results] == [
        (201, None, None),
        (200, None, None),
        (409, "duplicate_client_order_id", None),
        (422, "risk_rejected", "price_outside_band"),
        (422, "validation_error", None),
        (404, "account_not_found", None),
        (422, "risk_rejected", "unknown_instrument"),
    ]
    assert results[0]["order"]["id"] == results[1]["order"]["id"]
    assert results[3]["order"]["status"] == "rejected" and results[6]["order"]["status"] == "rejected"
    assert results[6]["order"]["reject_reason"] == "unknown_instrument"
    async with platform.db.connection("test.batch") as conn:
        assert await conn.fetchval("SELECT count(*) FROM orders WHERE account_id = $1", account) == 3
        assert await conn.fetchval("SELECT count(*) FROM outbox WHERE (payload->>'account_id')::bigint = $1", account)


@pytest.mark.parametrize("orders", [[], "too many"])
async def test_an_empty_or_oversized_batch_is_refused_whole(
    client: httpx.AsyncClient, platform: Platform, orders: Any
) -> None:
    book = await make_book(platform, [{"kind": "cash", "cash": D("100000.00"), "positions": {}, "limits": None}])
    one = {"account_id": book.account_ids[0], "symbol": "AAPL", "side": "buy", "type": "limit", "quantity": "1"}
    body = {"orders": [{**one, "price": "190.00"}] * (MAX_BATCH + 1) if orders == "too many" else orders}
    response = await client.post("/api/v1/orders/batch", json=body, headers={"Authorization": f"Bearer {book.key}"})
    assert response.status_code == 422 and response.json()["error"] == "validation_error"
    async with platform.db.connection("test.batch") as conn:
        assert await conn.fetchval("SELECT count(*) FROM orders WHERE account_id = $1", book.account_ids[0]) == 0


async def test_a_readonly_key_may_not_place_a_batch(client: httpx.AsyncClient, platform: Platform) -> None:
    async with platform.db.transaction("test.batch") as conn:
        await demo.load_reference_data(conn)
        uid = await identity.create_user(conn, "viewer", Role.READONLY)
        key = (await identity.issue_api_key(conn, TEST_SECRET, uid, "test")).key
    viewer = Actor(uid, key)
    order = {"account_id": 1, "symbol": "AAPL", "side": "buy", "type": "limit", "quantity": "1", "price": "190.00"}
    response = await client.post("/api/v1/orders/batch", json={"orders": [order]}, headers=viewer.headers)
    assert response.status_code == 403


async def test_a_client_order_id_for_an_unknown_symbol_is_looked_up_in_its_own_account(platform: Platform) -> None:
    """One placement holding one known (account, instrument) pair and, from another account, an unknown
    symbol's order with a client_order_id (PlacementQueue coalesces several clients' orders; a batch may span
    a user's accounts): the id is the other account's own, never the pair's account's."""
    cash = {"kind": "cash", "cash": D("100000.00"), "positions": {}, "limits": None}
    alice, bob = await make_book(platform, [cash]), await make_book(platform, [cash])
    a, b = alice.account_ids[0], bob.account_ids[0]
    entry = OrderEntry(platform.cache, shards=platform.settings.engine_shards, clock=lambda: NOW)
    buy = OrderTerms(side=Side.BUY, order_type=OrderType.LIMIT, quantity=D(1), price=D("190.00"))
    taken = await submit_orders(platform.db, entry, alice.principal, [OrderRequest(a, "AAPL", buy, "dup")])
    mine = await submit_orders(platform.db, entry, bob.principal, [OrderRequest(b, "NOPE", buy, "mine")])
    assert all(isinstance(outcome, Placement) for outcome in taken + mine)

    async def together(coid: str) -> Placement | TradeplaneError:
        async with platform.db.transaction("test.batch") as conn:
            outcomes = await entry.place_mixed(
                conn,
                [(alice.principal, OrderRequest(a, "AAPL", buy)), (bob.principal, OrderRequest(b, "NOPE", buy, coid))],
            )
        return outcomes[1]

    fresh = await together("dup")  # alice's "dup" is not bob's
    assert isinstance(fresh, Placement) and fresh.outcome is PlacementOutcome.REJECTED
    assert fresh.order.account_id == b
    retry = await together("mine")  # bob's own retry: his original, and alice's order is placed too
    assert isinstance(retry, Placement) and retry.outcome is PlacementOutcome.REPLAYED
    assert retry.order.id == mine[0].order.id  # type: ignore[union-attr]
