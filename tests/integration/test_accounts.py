"""Accounts and deposits: every deposit is a balanced ledger transaction and balances follow entries."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import asyncpg
import pytest

from tests.integration.conftest import Actor
from tradeplane.bootstrap import Platform
from tradeplane.errors import Conflict, InvalidRequest, NotFound
from tradeplane.services import accounts, demo, identity
from tradeplane.services.identity import Role


async def test_deposit_posts_a_balanced_transaction(platform: Platform, trader: Actor) -> None:
    assert trader.account_id is not None
    async with platform.db.transaction("test") as conn:
        first = await accounts.deposit(conn, trader.account_id, Decimal("1000.50"))
        second = await accounts.deposit(conn, trader.account_id, Decimal("0.25"))
    assert first.balance == Decimal("1000.50")
    assert second.balance == Decimal("1000.75")
    async with platform.db.connection("test") as conn:
        sums = await conn.fetch("SELECT transaction_id, asset, sum(amount) AS total FROM ledger_entries GROUP BY 1, 2")
        assert sums and all(row["total"] == 0 for row in sums)
        mismatched = await conn.fetchval(
            "SELECT count(*) FROM balances b WHERE b.amount <> (SELECT coalesce(sum(amount), 0)"
            " FROM ledger_entries e WHERE e.account_id = b.account_id AND e.asset = b.asset)"
        )
        assert mismatched == 0
        house = await conn.fetchval(
            "SELECT amount FROM balances JOIN accounts a ON a.id = account_id WHERE a.kind = 'house'"
        )
        assert house == Decimal("-1000.75")


@pytest.mark.parametrize("amount", ["0", "-5", "NaN", "Infinity", "abc"])
async def test_invalid_amounts_are_refused(platform: Platform, trader: Actor, amount: str) -> None:
    assert trader.account_id is not None
    async with platform.db.transaction("test") as conn:
        with pytest.raises(InvalidRequest):
            await accounts.deposit(conn, trader.account_id, accounts.parse_amount(amount))


async def test_amount_finer_than_the_asset_scale_is_refused(platform: Platform, trader: Actor) -> None:
    assert trader.account_id is not None
    async with platform.db.transaction("test") as conn:
        with pytest.raises(InvalidRequest, match="2 decimal places"):
            await accounts.deposit(conn, trader.account_id, Decimal("1.001"))


async def test_unknown_account_and_duplicate_names(platform: Platform, trader: Actor) -> None:
    # each refusal in its own transaction, as each request would be
    async with platform.db.transaction("test") as conn:
        with pytest.raises(NotFound):
            await accounts.deposit(conn, 999_999, Decimal("1"))
    with pytest.raises(Conflict):
        async with platform.db.transaction("test") as conn:
            await accounts.create_account(conn, trader.user_id, "main")
    async with platform.db.transaction("test") as conn:
        with pytest.raises(NotFound):
            await accounts.create_account(conn, trader.user_id, "other", currency="XYZ")
        with pytest.raises(InvalidRequest):
            await accounts.create_account(conn, trader.user_id, "other", kind="crypto")


async def test_duplicate_user_is_a_conflict(platform: Platform) -> None:
    async with platform.db.transaction("test") as conn:
        await identity.create_user(conn, "bob", Role.READONLY)
    async with platform.db.transaction("test") as conn:
        with pytest.raises(Conflict):
            await identity.create_user(conn, "bob", Role.TRADER)


async def test_demo_seed_is_idempotent(platform: Platform) -> None:
    async with platform.db.transaction("test") as conn:
        first = await demo.seed_demo(conn, "k")
    async with platform.db.transaction("test") as conn:
        second = await demo.seed_demo(conn, "k")
        instruments = await conn.fetchval("SELECT count(*) FROM instruments")
        balance = await conn.fetchval("SELECT amount FROM balances WHERE account_id = $1", first.trader_account_id)
    assert first.issued_key is not None and second.issued_key is None
    assert first.trader_account_id == second.trader_account_id
    assert instruments == len(demo.INSTRUMENTS)
    assert balance == demo.DEMO_DEPOSIT


async def test_two_transactions_creating_the_same_house_account_both_get_it(platform: Platform) -> None:
    """Engine shards rebuilding together create the fee account at once: the second waits, then reads it."""
    async with platform.db.transaction("test.reference") as conn:
        await demo.load_reference_data(conn)
    async with platform.db.connection("test.first") as first, platform.db.connection("test.second") as second:
        async with first.transaction():
            created = await accounts.house_account(first, "race", "USD")
            racing = asyncio.create_task(_house_account_in_transaction(second))
            await asyncio.sleep(0.2)
            assert not racing.done()  # blocked on the first transaction's uncommitted row
        assert await racing == created


async def _house_account_in_transaction(conn: asyncpg.Connection) -> int:
    async with conn.transaction():
        return await accounts.house_account(conn, "race", "USD")
