"""The demo market maker and traders against the real API served over HTTP."""

from __future__ import annotations

import asyncio

from tests.integration.conftest import TEST_SECRET
from tests.integration.live_server import serving
from tradeplane.bootstrap import Platform
from tradeplane.entrypoints.workers.demo import (
    DEMO_MARKET_MAKER,
    DEMO_SYMBOLS,
    DEMO_TRADERS,
    MM_DEPOSIT,
    create_demo_participants,
    run_demo_traders,
)


async def test_demo_participants_are_created_once_with_fresh_keys(platform: Platform) -> None:
    async with platform.db.transaction("test.demo") as conn:
        first = await create_demo_participants(conn, TEST_SECRET)
    async with platform.db.transaction("test.demo") as conn:
        second = await create_demo_participants(conn, TEST_SECRET)
    assert first.account_ids == second.account_ids
    assert set(first.api_keys).isdisjoint(second.api_keys)
    async with platform.db.connection("test.demo") as conn:
        kinds = await conn.fetch(
            "SELECT u.username, a.kind, b.amount FROM accounts a JOIN users u ON u.id = a.user_id"
            " JOIN balances b ON b.account_id = a.id AND b.asset = 'USD' WHERE a.id = ANY($1) ORDER BY a.id",
            list(first.account_ids),
        )
        live_keys = await conn.fetchval("SELECT count(*) FROM api_keys WHERE name = 'demo-bot' AND revoked_at IS NULL")
    assert [(r["username"], r["kind"]) for r in kinds] == [(DEMO_MARKET_MAKER, "margin")] + [
        (name, "cash") for name in DEMO_TRADERS
    ]
    assert kinds[0]["amount"] == MM_DEPOSIT  # deposited once, not twice
    assert live_keys == len(DEMO_TRADERS) + 1  # the first run's keys were revoked
    for key in first.api_keys:
        async with platform.db.connection("test.demo") as conn:
            try:
                await platform.authenticator.authenticate(conn, key)
            except Exception as exc:
                assert getattr(exc, "code", None) == "invalid_api_key"
            else:
                raise AssertionError("a revoked demo key still authenticates")


async def test_demo_traders_place_orders_through_the_api(platform: Platform) -> None:
    async with platform.db.transaction("test.demo") as conn:
        participants = await create_demo_participants(conn, TEST_SECRET)
    stop = asyncio.Event()
    async with serving(platform) as base_url:
        running = asyncio.create_task(
            run_demo_traders(base_url, participants.api_keys, participants.account_ids, stop, seed=42)
        )
        async with platform.db.connection("test.demo") as conn:
            # until every trader has had an order acknowledged and the market maker has quoted both sides of every
            # symbol (it quotes one symbol after another: the traders can be quicker) (a hang guard, not a timer)
            for _ in range(300):
                traders_with_orders = await conn.fetchval(
                    "SELECT count(DISTINCT account_id) FROM orders WHERE account_id = ANY($1) AND status <> 'rejected'",
                    list(participants.account_ids[1:]),
                )
                sides_quoted = await conn.fetchval(
                    "SELECT count(DISTINCT (instrument_id, side)) FROM orders WHERE account_id = $1"
                    " AND status <> 'rejected'",
                    participants.market_maker.account_id,
                )
                if traders_with_orders == len(DEMO_TRADERS) and sides_quoted == 2 * len(DEMO_SYMBOLS):
                    break
                await asyncio.sleep(0.1)
        stop.set()
        stats = await running

    assert stats.accepted > 0 and stats.failed == 0
    async with platform.db.connection("test.demo") as conn:
        quotes = await conn.fetch(
            "SELECT i.symbol, o.side, o.type, o.price FROM orders o JOIN instruments i ON i.id = o.instrument_id"
            " WHERE o.account_id = $1 AND o.status <> 'rejected'",
            participants.market_maker.account_id,
        )
        outbox = await conn.fetchval("SELECT count(*) FROM outbox WHERE payload->>'type' = 'new'")
        accepted = await conn.fetchval(
            "SELECT count(*) FROM orders WHERE account_id = ANY($1) AND status <> 'rejected'",
            list(participants.account_ids),
        )
    # the market maker quoted both sides of every demo symbol, with limit orders
    assert {(q["symbol"], q["side"]) for q in quotes} == {(s, side) for s in DEMO_SYMBOLS for side in ("buy", "sell")}
    assert all(q["type"] == "limit" and q["price"] > 0 for q in quotes)
    # every acknowledged order reached the outbox for the engine
    assert accepted == stats.accepted == outbox
    assert traders_with_orders == len(DEMO_TRADERS)
