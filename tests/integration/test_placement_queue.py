"""PlacementQueue: single orders of several clients that arrive together share one placement transaction.

Coalescing must not change any answer: each order gets what it would have got placed alone, in arrival order,
seeing only its own principal's accounts, and its audit row names its own principal.
"""

from __future__ import annotations

import asyncio
import random
from decimal import Decimal

import pytest

from tests.integration.test_order_batch import NOW, answer, make_book, random_order, random_setup, requests_for, stored
from tradeplane.bootstrap import Platform
from tradeplane.domain.orders import OrderType, Side
from tradeplane.domain.risk import OrderTerms
from tradeplane.errors import PermissionDenied, TradeplaneError
from tradeplane.services.identity import Principal, Role
from tradeplane.services.orders import (
    OrderEntry,
    OrderRequest,
    Placement,
    PlacementQueue,
    submit_order,
)

D = Decimal
BUY = OrderTerms(side=Side.BUY, order_type=OrderType.LIMIT, quantity=D(1), price=D("190.00"))
CASH = {"kind": "cash", "cash": D("100000.00"), "positions": {}, "limits": None}


async def outcome_of(queue: PlacementQueue, principal: Principal, request: OrderRequest) -> Placement | TradeplaneError:
    try:
        return await queue.place(principal, request)
    except TradeplaneError as exc:
        return exc


async def test_orders_of_two_users_coalesced_answer_and_store_as_if_placed_one_by_one(platform: Platform) -> None:
    entry = OrderEntry(platform.cache, shards=platform.settings.engine_shards, clock=lambda: NOW)
    for seed in range(12):
        rng = random.Random(1000 + seed)
        setups = [random_setup(rng), random_setup(rng)]
        plans = [[random_order(rng, len(setup)) for _ in range(rng.randint(5, 25))] for setup in setups]
        queued_books = [await make_book(platform, setup) for setup in setups]
        single_books = [await make_book(platform, setup) for setup in setups]

        # interleave the two users' orders at random, each user's own orders in their order, as two clients would
        turns = [user for user, plan in enumerate(plans) for _ in plan]
        rng.shuffle(turns)
        next_of = [0, 0]
        ordered = []
        for user in turns:
            ordered.append((user, next_of[user]))
            next_of[user] += 1
        queue = PlacementQueue(platform.db, entry, max_inflight=1)
        requests = [requests_for(book, plan) for book, plan in zip(queued_books, plans, strict=True)]
        results = await asyncio.gather(
            *(outcome_of(queue, queued_books[user].principal, requests[user][k]) for user, k in ordered)
        )
        assert queue.placements < len(ordered), "the orders did not share a placement"
        queued: list[list[Placement | TradeplaneError]] = [[], []]
        for (user, _), result in zip(ordered, results, strict=True):
            queued[user].append(result)

        for user in (0, 1):
            singles: list[Placement | TradeplaneError] = []
            for request in requests_for(single_books[user], plans[user]):
                try:
                    singles.append(await submit_order(platform.db, entry, single_books[user].principal, request))
                except TradeplaneError as exc:
                    singles.append(exc)
            assert [answer(o, queued_books[user]) for o in queued[user]] == [
                answer(o, single_books[user]) for o in singles
            ], seed
            assert await stored(platform, queued_books[user]) == await stored(platform, single_books[user]), seed

        async with platform.db.connection("test.queue") as conn:
            for book in queued_books:
                actors = await conn.fetch(
                    "SELECT DISTINCT actor_user_id FROM audit_log WHERE (details->>'account_id')::bigint"
                    " = ANY($1::bigint[])",
                    list(book.account_ids),
                )
                assert [r["actor_user_id"] for r in actors] in ([], [book.principal.user_id]), seed


async def test_a_coalesced_order_for_another_users_account_is_not_found_alone(platform: Platform) -> None:
    alice, bob = await make_book(platform, [CASH]), await make_book(platform, [CASH])
    queue = PlacementQueue(platform.db, OrderEntry(platform.cache, shards=platform.settings.engine_shards))
    mine = OrderRequest(alice.account_ids[0], "AAPL", BUY, None)
    theirs = OrderRequest(bob.account_ids[0], "AAPL", BUY, None)
    first, second, third = await asyncio.gather(
        outcome_of(queue, alice.principal, mine),
        outcome_of(queue, alice.principal, theirs),
        outcome_of(queue, bob.principal, theirs),
    )
    assert isinstance(first, Placement) and first.order is not None and first.order.account_id == alice.account_ids[0]
    assert isinstance(second, TradeplaneError) and second.code == "account_not_found"
    assert isinstance(third, Placement) and third.order is not None and third.order.account_id == bob.account_ids[0]


async def test_a_readonly_principal_is_refused_without_failing_the_orders_beside_it(platform: Platform) -> None:
    book = await make_book(platform, [CASH])
    reader = Principal(book.principal.user_id, book.principal.username, Role.READONLY)
    queue = PlacementQueue(platform.db, OrderEntry(platform.cache, shards=platform.settings.engine_shards))
    request = OrderRequest(book.account_ids[0], "AAPL", BUY, None)
    placed, refused = await asyncio.gather(
        outcome_of(queue, book.principal, request), outcome_of(queue, reader, request)
    )
    assert isinstance(placed, Placement) and placed.order is not None
    assert isinstance(refused, PermissionDenied)


async def test_a_quiet_queue_places_each_order_at_once_in_its_own_transaction(platform: Platform) -> None:
    book = await make_book(platform, [CASH])
    queue = PlacementQueue(platform.db, OrderEntry(platform.cache, shards=platform.settings.engine_shards))
    for n in range(3):
        placement = await queue.place(book.principal, OrderRequest(book.account_ids[0], "AAPL", BUY, None))
        assert placement.order is not None and placement.order.status == "pending_new"
        assert queue.placements == n + 1


def test_a_queue_needs_room_for_one_placement(platform: Platform) -> None:
    with pytest.raises(ValueError, match="max_inflight"):
        PlacementQueue(platform.db, OrderEntry(platform.cache, shards=1), max_inflight=0)


async def test_an_order_that_fails_its_placement_fails_alone(platform: Platform) -> None:
    """A failure that is not PostgreSQL being away (here a trigger refusing one account's rows, as a bug or a
    constraint would) fails only the order at fault: the orders it shared the transaction with are placed."""
    good, bad = await make_book(platform, [CASH]), await make_book(platform, [CASH])
    async with platform.db.connection("test.trigger") as conn:
        await conn.execute(
            f"""
            CREATE FUNCTION refuse_one_account() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.account_id = {bad.account_ids[0]} THEN RAISE EXCEPTION 'refused by the test'; END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER refuse_one_account BEFORE INSERT ON orders
                FOR EACH ROW EXECUTE FUNCTION refuse_one_account();
            """
        )
    try:
        queue = PlacementQueue(
            platform.db, OrderEntry(platform.cache, shards=platform.settings.engine_shards), max_inflight=1
        )
        mine = OrderRequest(good.account_ids[0], "AAPL", BUY, None)
        theirs = OrderRequest(bad.account_ids[0], "AAPL", BUY, None)
        results = await asyncio.gather(
            *(outcome_of(queue, book.principal, request) for book, request in [(good, mine), (bad, theirs)] * 3),
            return_exceptions=True,
        )
        assert queue.placements > 1
        placed = [r for r in results[0::2] if isinstance(r, Placement)]
        assert len(placed) == 3 and all(p.order.status == "pending_new" for p in placed)
        assert all(isinstance(r, Exception) and "refused by the test" in str(r) for r in results[1::2])
        async with platform.db.connection("test.count") as conn:
            counts = await conn.fetch(
                "SELECT account_id, count(*) AS n FROM orders WHERE account_id = ANY($1::bigint[]) GROUP BY 1",
                [good.account_ids[0], bad.account_ids[0]],
            )
        assert {r["account_id"]: r["n"] for r in counts} == {good.account_ids[0]: 3}
    finally:
        async with platform.db.connection("test.trigger") as conn:
            await conn.execute("DROP TRIGGER refuse_one_account ON orders; DROP FUNCTION refuse_one_account()")
