"""The database refuses to commit a ledger transaction whose entries do not sum to zero per asset, whoever wrote
them and however many statements they took, and checks each INSERT once rather than once per entry (0016)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from decimal import Decimal

import asyncpg
import pytest

from tradeplane.adapters.db.migrate import downgrade, upgrade
from tradeplane.domain.ledger import LedgerEntry, LedgerTransaction
from tradeplane.services import ledger

INSERT_ENTRY = "INSERT INTO ledger_entries (transaction_id, account_id, asset, amount) VALUES ($1, $2, $3, $4)"
INSERT_LEGS = (
    "INSERT INTO ledger_entries (transaction_id, account_id, asset, amount)"
    " SELECT $1, a, s, x FROM unnest($2::bigint[], $3::text[], $4::numeric[]) AS l(a, s, x)"
)
CHECK_CALLS = (
    "SELECT funcname, calls FROM pg_stat_xact_user_functions"
    " WHERE funcname IN ('tp_ledger_balanced', 'tp_ledger_entries_balanced') ORDER BY funcname"
)
TRIGGERS_SQL = (
    "SELECT tgrelid::regclass::text AS tbl, tgname, tgconstraint <> 0 AS is_constraint,"
    " (tgtype & 1) = 1 AS per_row FROM pg_trigger WHERE tgname IN ('tp_ledger_balanced', 'tp_ledger_entries_balanced')"
    " ORDER BY tgname"
)


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url)
    yield conn
    await conn.close()


async def accounts(conn: asyncpg.Connection) -> tuple[int, int, int]:
    await conn.execute("INSERT INTO assets (code, scale, name) VALUES ('USD', 2, 'US dollar'), ('EUR', 2, 'Euro')")
    sql = "INSERT INTO accounts (user_id, name, kind, currency) VALUES (NULL, $1, 'house', 'USD') RETURNING id"
    a, b, c = [await conn.fetchval(sql, name) for name in ("a", "b", "c")]
    return a, b, c


def unchecked(reference: str, *legs: tuple[int, str, str]) -> LedgerTransaction:
    """A LedgerTransaction the domain would refuse to build: what a bug in a writer could hand post_many."""
    tx = object.__new__(LedgerTransaction)
    object.__setattr__(tx, "kind", "transfer")
    object.__setattr__(tx, "reference", reference)
    object.__setattr__(tx, "entries", tuple(LedgerEntry(a, asset, Decimal(x)) for a, asset, x in legs))
    return tx


def transfer(reference: str, payer: int, payee: int, amount: str = "2.50") -> LedgerTransaction:
    return LedgerTransaction(
        "transfer",
        reference,
        (LedgerEntry(payer, "USD", -Decimal(amount)), LedgerEntry(payee, "USD", Decimal(amount))),
    )


async def counts(conn: asyncpg.Connection) -> tuple[int, int, int]:
    row = await conn.fetchrow(
        "SELECT (SELECT count(*) FROM ledger_transactions), (SELECT count(*) FROM ledger_entries),"
        " (SELECT count(*) FROM balances WHERE amount <> 0)"
    )
    assert row is not None
    return row[0], row[1], row[2]


async def insert_legs(conn: asyncpg.Connection, tx_id: int, legs: list[tuple[int, str, str]]) -> None:
    """The legs of one ledger transaction in one statement."""
    await conn.execute(
        INSERT_LEGS, tx_id, [a for a, _, _ in legs], [s for _, s, _ in legs], [Decimal(x) for _, _, x in legs]
    )


async def new_transaction(conn: asyncpg.Connection) -> int:
    tx_id: int = await conn.fetchval("INSERT INTO ledger_transactions (kind) VALUES ('manual') RETURNING id")
    return tx_id


# ------------------------------------------------------------------------------------ one statement (post_many)


async def test_post_many_of_an_unbalanced_transaction_is_refused_and_leaves_nothing(db: asyncpg.Connection) -> None:
    a, b, c = await accounts(db)
    batch = [
        transfer("ok-1", a, b),
        unchecked("bad", (a, "USD", "-10"), (b, "USD", "9.99")),
        transfer("ok-2", b, c),
    ]
    with pytest.raises(asyncpg.CheckViolationError, match=r"does not balance: USD entries sum to -0\.01"):
        async with db.transaction():
            await ledger.post_many(db, batch)
    assert await counts(db) == (0, 0, 0)


async def test_post_many_refuses_a_transaction_that_balances_in_total_but_not_per_asset(
    db: asyncpg.Connection,
) -> None:
    a, b, _ = await accounts(db)
    with pytest.raises(asyncpg.CheckViolationError, match="does not balance"):
        async with db.transaction():
            await ledger.post_many(db, [unchecked("fx", (a, "USD", "-10"), (b, "EUR", "10"))])
    assert await counts(db) == (0, 0, 0)


async def test_balanced_batches_commit_with_their_balances(db: asyncpg.Connection) -> None:
    a, b, c = await accounts(db)
    async with db.transaction():
        ids = await ledger.post_many(db, [transfer(f"t{n}", a, b) for n in range(20)] + [transfer("last", b, c)])
    assert len(ids) == 21
    unbalanced = await db.fetch(
        "SELECT transaction_id, asset FROM ledger_entries GROUP BY 1, 2 HAVING sum(amount) <> 0"
    )
    assert unbalanced == []
    balances = dict(await db.fetch("SELECT account_id, amount FROM balances WHERE asset = 'USD'"))
    assert balances == {a: Decimal("-50"), b: Decimal("47.50"), c: Decimal("2.50")}


async def test_the_check_runs_once_per_insert_statement_not_once_per_entry(db: asyncpg.Connection) -> None:
    """0001 ran a deferred check per entry (40 here); since 0016 one statement-level call covers the batch."""
    a, b, c = await accounts(db)
    batch = [
        LedgerTransaction(
            "trade",
            f"t{n}",
            (
                LedgerEntry(a, "USD", Decimal("-3")),
                LedgerEntry(b, "USD", Decimal("2")),
                LedgerEntry(c, "USD", Decimal("1")),
                LedgerEntry(a, "EUR", Decimal("-1")),
                LedgerEntry(b, "EUR", Decimal("1")),
            ),
        )
        for n in range(8)
    ]
    async with db.transaction():
        await db.execute("SET LOCAL track_functions = 'pl'")
        await db.execute("SET CONSTRAINTS ALL IMMEDIATE")  # deferred checks run now, where this transaction sees them
        await ledger.post_many(db, batch)
        calls = [tuple(row) for row in await db.fetch(CHECK_CALLS)]
    assert calls == [("tp_ledger_entries_balanced", 1)]


# ---------------------------------------------------------------------------------------- several statements


async def test_legs_may_arrive_in_separate_statements_if_they_balance_by_commit(db: asyncpg.Connection) -> None:
    """Allowed, as 0001 promised: an operator's correction in psql, or a writer that inserts leg by leg."""
    a, b, c = await accounts(db)
    async with db.transaction():
        tx_id = await new_transaction(db)
        await db.execute(INSERT_ENTRY, tx_id, a, "USD", Decimal("-10"))
        await db.execute(INSERT_ENTRY, tx_id, b, "USD", Decimal("7"))
        await db.execute(INSERT_ENTRY, tx_id, c, "USD", Decimal("3"))
    assert await db.fetchval("SELECT count(*) FROM ledger_entries WHERE transaction_id = $1", tx_id) == 3


@pytest.mark.parametrize(
    "legs",
    [
        # every statement unbalanced, and so is the whole
        [[("a", "-10")], [("b", "9")]],
        # the first statement balanced, the second not
        [[("a", "-10"), ("b", "10")], [("c", "1")]],
        # each statement balances in total, not per asset
        [[("a", "-10"), ("b", "10")], [("a", "-5"), ("b", "5/EUR")]],
    ],
)
async def test_legs_in_separate_statements_that_do_not_balance_are_refused_at_commit(
    db: asyncpg.Connection, legs: list[list[tuple[str, str]]]
) -> None:
    ids = dict(zip("abc", await accounts(db), strict=True))
    tx = db.transaction()
    await tx.start()
    tx_id = await new_transaction(db)
    for statement in legs:
        rows = []
        for account, amount in statement:
            value, _, asset = amount.partition("/")
            rows.append((ids[account], asset or "USD", value))
        await insert_legs(db, tx_id, rows)
    with pytest.raises(asyncpg.CheckViolationError, match=f"ledger transaction {tx_id} does not balance"):
        await tx.commit()
    assert await counts(db) == (0, 0, 0)


async def test_a_balancing_leg_rolled_back_to_a_savepoint_does_not_count(db: asyncpg.Connection) -> None:
    a, b, _ = await accounts(db)
    tx = db.transaction()
    await tx.start()
    tx_id = await new_transaction(db)
    await db.execute(INSERT_ENTRY, tx_id, a, "USD", Decimal("-10"))
    savepoint = db.transaction()
    await savepoint.start()
    await db.execute(INSERT_ENTRY, tx_id, b, "USD", Decimal("10"))
    await savepoint.rollback()
    with pytest.raises(asyncpg.CheckViolationError, match="does not balance: USD entries sum to -10"):
        await tx.commit()
    assert await counts(db) == (0, 0, 0)


async def test_an_unbalancing_leg_rolled_back_to_a_savepoint_leaves_a_committable_transaction(
    db: asyncpg.Connection,
) -> None:
    a, b, c = await accounts(db)
    async with db.transaction():
        tx_id = await new_transaction(db)
        await db.execute(INSERT_ENTRY, tx_id, a, "USD", Decimal("-10"))
        await db.execute(INSERT_ENTRY, tx_id, b, "USD", Decimal("10"))
        savepoint = db.transaction()
        await savepoint.start()
        await db.execute(INSERT_ENTRY, tx_id, c, "USD", Decimal("1"))
        await savepoint.rollback()
    assert await db.fetchval("SELECT sum(amount) FROM ledger_entries WHERE transaction_id = $1", tx_id) == 0


async def test_entries_added_later_to_a_committed_transaction_must_balance_too(db: asyncpg.Connection) -> None:
    a, b, _ = await accounts(db)
    async with db.transaction():
        [tx_id] = await ledger.post_many(db, [transfer("t", a, b)])
    with pytest.raises(asyncpg.CheckViolationError, match=f"ledger transaction {tx_id} does not balance"):
        await insert_legs(db, tx_id, [(a, "EUR", "1"), (b, "EUR", "-2")])
    await insert_legs(db, tx_id, [(a, "EUR", "1"), (b, "EUR", "-1")])
    assert await db.fetchval("SELECT count(*) FROM ledger_entries WHERE transaction_id = $1", tx_id) == 4


# ------------------------------------------------------------------------------------------------ migration


async def refuses_unbalanced(url: str, label: str) -> bool:
    """Whether the database at ``url`` refuses an unbalanced post_many and commits a balanced one."""
    conn = await asyncpg.connect(url)
    try:
        a, b = [
            await conn.fetchval(
                "INSERT INTO accounts (user_id, name, kind, currency) VALUES (NULL, $1, 'house', 'USD') RETURNING id",
                f"{label}-{side}",
            )
            for side in ("x", "y")
        ]
        try:
            async with conn.transaction():
                await ledger.post_many(conn, [unchecked("bad", (a, "USD", "-1"), (b, "USD", "2"))])
        except asyncpg.CheckViolationError:
            refused = True
        else:
            refused = False
        async with conn.transaction():
            await ledger.post_many(conn, [transfer("ok", a, b)])
        return refused
    finally:
        await conn.close()


async def test_downgrade_to_0015_restores_the_per_entry_trigger_and_upgrade_replaces_it(
    empty_database_url: str,
) -> None:
    url = empty_database_url
    await asyncio.to_thread(upgrade, url)
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("INSERT INTO assets (code, scale, name) VALUES ('USD', 2, 'US dollar')")
        assert [tuple(r) for r in await conn.fetch(TRIGGERS_SQL)] == [
            ("ledger_transactions", "tp_ledger_balanced", True, True),
            ("ledger_entries", "tp_ledger_entries_balanced", False, False),
        ]
        assert await refuses_unbalanced(url, "head")

        await asyncio.to_thread(downgrade, url, "0015")
        assert [tuple(r) for r in await conn.fetch(TRIGGERS_SQL)] == [
            ("ledger_entries", "tp_ledger_balanced", True, True)
        ]
        assert await conn.fetchval("SELECT count(*) FROM pg_proc WHERE proname = 'tp_ledger_entries_balanced'") == 0
        assert await refuses_unbalanced(url, "0015")

        await asyncio.to_thread(upgrade, url)
        assert len(await conn.fetch(TRIGGERS_SQL)) == 2
        assert await refuses_unbalanced(url, "again")
    finally:
        await conn.close()
