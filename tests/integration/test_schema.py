"""The schema the migrations build: it round-trips, matches the Core metadata, and enforces the rules
that money, orders and the audit trail rely on even when application code gets them wrong."""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import itertools
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from tradeplane.adapters.db.migrate import async_url, current, downgrade, heads, upgrade
from tradeplane.adapters.db.tables import TIMESERIES_TABLES, metadata
from tradeplane.adapters.db.timeseries import (
    drop_partitions_older_than,
    drop_partitions_older_than_async,
    ensure_daily_partitions_async,
    partition_name,
    storage_kind_async,
    timescale_available_async,
)
from tradeplane.domain.ledger import LedgerEntry, LedgerTransaction
from tradeplane.services import ledger

# Everything in the public schema that is ours, by kind; alembic_version is Alembic's.
INVENTORY_SQL = """
SELECT 'relation' AS kind, c.relname::text AS name FROM pg_class c
  JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = 'public' AND c.relname NOT IN ('alembic_version', 'alembic_version_pkc')
UNION ALL
SELECT 'function', p.proname::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE n.nspname = 'public'
UNION ALL
SELECT 'type', t.typname::text FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
 WHERE n.nspname = 'public' AND t.typname NOT IN ('alembic_version', '_alembic_version')
UNION ALL
SELECT 'trigger', tg.tgname::text FROM pg_trigger tg WHERE NOT tg.tgisinternal
UNION ALL
SELECT 'extension', e.extname::text FROM pg_extension e WHERE e.extname <> 'plpgsql'
"""


async def inventory(url: str) -> set[tuple[str, str]]:
    conn = await asyncpg.connect(url)
    try:
        return {(row["kind"], row["name"]) for row in await conn.fetch(INVENTORY_SQL)}
    finally:
        await conn.close()


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url)
    yield conn
    await conn.close()


@dataclass(frozen=True)
class Seed:
    user_id: int
    account_id: int
    other_account_id: int
    house_account_id: int
    instrument_id: int


async def seed(conn: asyncpg.Connection) -> Seed:
    await conn.execute("INSERT INTO assets (code, scale, name) VALUES ('USD', 2, 'US dollar'), ('EUR', 2, 'Euro')")
    user_id = await conn.fetchval("INSERT INTO users (username, role) VALUES ('alice', 'trader') RETURNING id")
    account_sql = "INSERT INTO accounts (user_id, name, kind, currency) VALUES ($1, $2, $3, 'USD') RETURNING id"
    account_id = await conn.fetchval(account_sql, user_id, "main", "cash")
    other_account_id = await conn.fetchval(account_sql, user_id, "second", "margin")
    house_account_id = await conn.fetchval(account_sql, None, "fees", "house")
    instrument_id = await conn.fetchval(
        "INSERT INTO instruments (symbol, base_asset, quote_asset, tick_size, lot_size, min_qty, max_qty,"
        " price_band_pct) VALUES ('AAPL', 'AAPL', 'USD', $1, $2, $2, $3, $4) RETURNING id",
        Decimal("0.01"),
        Decimal("1"),
        Decimal("100000"),
        Decimal("10"),
    )
    return Seed(user_id, account_id, other_account_id, house_account_id, instrument_id)


async def place(conn: asyncpg.Connection, s: Seed, **overrides: Any) -> int:
    """Insert an order row: a valid GTC limit buy unless overridden."""
    row: dict[str, Any] = {
        "account_id": s.account_id,
        "instrument_id": s.instrument_id,
        "client_order_id": None,
        "side": "buy",
        "type": "limit",
        "time_in_force": "gtc",
        "quantity": Decimal("10"),
        "price": Decimal("190.00"),
        "status": "new",
    }
    row.update(overrides)
    columns = ", ".join(row)
    params = ", ".join(f"${i}" for i in range(1, len(row) + 1))
    order_id: int = await conn.fetchval(f"INSERT INTO orders ({columns}) VALUES ({params}) RETURNING id", *row.values())
    return order_id


# ------------------------------------------------------------------------------------------- migrations


async def test_downgrade_to_base_removes_everything_and_upgrade_rebuilds_it(empty_database_url: str) -> None:
    url = empty_database_url
    head = heads()
    assert len(head) == 1

    await asyncio.to_thread(upgrade, url)
    assert await asyncio.to_thread(current, url) == head[0]
    built = await inventory(url)
    assert ("relation", "orders") in built
    assert ("function", "tp_ledger_balanced") in built
    assert ("function", "tp_audit_log_seal") in built

    await asyncio.to_thread(downgrade, url, "base")
    assert await asyncio.to_thread(current, url) is None
    assert await inventory(url) == set()

    await asyncio.to_thread(upgrade, url, "head")
    assert await asyncio.to_thread(current, url) == head[0]
    assert await inventory(url) == built


async def test_migrated_database_matches_the_table_metadata(database_url: str) -> None:
    """A column, index or constraint added to tables.py without a migration (or vice versa) fails here."""

    def include_name(name: str | None, type_: str, parent_names: object) -> bool:
        # Daily partitions and alembic_version are not described by the metadata.
        return type_ != "table" or name in metadata.tables

    def diff(connection: Connection) -> list[Any]:
        context = MigrationContext.configure(connection, opts={"include_name": include_name})
        return list(compare_metadata(context, metadata))

    engine = create_async_engine(async_url(database_url), poolclass=pool.NullPool)
    try:
        async with engine.connect() as connection:
            differences = await connection.run_sync(diff)
    finally:
        await engine.dispose()
    assert differences == []


# ------------------------------------------------------------------------------------------ constraints


async def test_client_order_id_is_unique_per_account(db: asyncpg.Connection) -> None:
    s = await seed(db)
    await place(db, s, client_order_id="abc-1")
    with pytest.raises(asyncpg.UniqueViolationError):
        await place(db, s, client_order_id="abc-1")
    # Another account may reuse it, and orders without a client id never collide.
    await place(db, s, account_id=s.other_account_id, client_order_id="abc-1")
    await place(db, s)
    await place(db, s)
    assert await db.fetchval("SELECT count(*) FROM orders") == 4


async def test_fill_id_is_unique_so_a_redelivered_fill_cannot_double_count(db: asyncpg.Connection) -> None:
    s = await seed(db)
    order_id = await place(db, s)
    insert_fill = (
        "INSERT INTO fills (fill_id, order_id, account_id, instrument_id, side, quantity, price, fee,"
        " fee_asset, liquidity, trade_id) VALUES ($1, $2, $3, $4, 'buy', 5, 190, 0.5, 'USD', 'taker', 'T1')"
    )
    await db.execute(insert_fill, "T1-buy", order_id, s.account_id, s.instrument_id)
    with pytest.raises(asyncpg.UniqueViolationError):
        await db.execute(insert_fill, "T1-buy", order_id, s.account_id, s.instrument_id)


@pytest.mark.parametrize(
    ("overrides", "constraints"),
    [
        ({"quantity": Decimal("0")}, {"ck_orders_quantity_positive", "ck_orders_filled_within_quantity"}),
        ({"quantity": Decimal("-1")}, {"ck_orders_quantity_positive", "ck_orders_filled_within_quantity"}),
        ({"price": Decimal("-0.01")}, {"ck_orders_price_positive"}),
        ({"status": "sleeping"}, {"ck_orders_status"}),
        ({"side": "hold"}, {"ck_orders_side"}),
        ({"type": "limit", "price": None}, {"ck_orders_limit_has_price"}),
        ({"time_in_force": "gtd"}, {"ck_orders_gtd_has_expiry"}),
    ],
)
async def test_order_checks_reject_invalid_rows(
    db: asyncpg.Connection, overrides: dict[str, Any], constraints: set[str]
) -> None:
    s = await seed(db)
    with pytest.raises(asyncpg.CheckViolationError) as caught:
        await place(db, s, **overrides)
    assert caught.value.constraint_name in constraints
    assert await db.fetchval("SELECT count(*) FROM orders") == 0


async def test_a_ledger_posting_in_an_unknown_asset_is_refused_by_the_balance_it_moves(
    db: asyncpg.Connection,
) -> None:
    """ledger_entries.asset has no foreign key since 0010: the balance row post_many moves checks the asset."""
    s = await seed(db)
    legs = (LedgerEntry(s.account_id, "XYZ", Decimal("5")), LedgerEntry(s.other_account_id, "XYZ", Decimal("-5")))
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        async with db.transaction():
            await ledger.post_many(db, [LedgerTransaction(kind="transfer", reference="t1", entries=legs)])
    assert await db.fetchval("SELECT count(*) FROM ledger_entries") == 0
    usd = tuple(LedgerEntry(entry.account_id, "USD", entry.amount) for entry in legs)
    async with db.transaction():
        await ledger.post_many(db, [LedgerTransaction(kind="transfer", reference="t2", entries=usd)])
    assert await db.fetchval("SELECT count(*) FROM ledger_entries") == 2


async def test_a_ledger_posting_to_an_unknown_account_is_refused_by_the_balance_it_moves(
    db: asyncpg.Connection,
) -> None:
    """ledger_entries.account_id has no foreign key since 0015: the balance row post_many moves checks it."""
    s = await seed(db)
    legs = (LedgerEntry(s.account_id, "USD", Decimal("5")), LedgerEntry(999_999, "USD", Decimal("-5")))
    with pytest.raises(asyncpg.ForeignKeyViolationError) as caught:
        async with db.transaction():
            await ledger.post_many(db, [LedgerTransaction(kind="transfer", reference="t1", entries=legs)])
    assert caught.value.constraint_name == "fk_balances_account_id_accounts"
    assert await db.fetchval("SELECT count(*) FROM ledger_entries") == 0
    # and an account with a balance, hence entries, cannot be deleted from under them
    usd = (LedgerEntry(s.account_id, "USD", Decimal("5")), LedgerEntry(s.other_account_id, "USD", Decimal("-5")))
    async with db.transaction():
        await ledger.post_many(db, [LedgerTransaction(kind="transfer", reference="t2", entries=usd)])
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await db.execute("DELETE FROM accounts WHERE id = $1", s.other_account_id)


async def test_a_hold_of_an_unknown_order_is_refused_and_an_order_with_a_hold_is_kept(db: asyncpg.Connection) -> None:
    """holds.account_id has no foreign key since 0015: a hold reaches its account through its order, whose key
    it keeps (its writers copy the order's account)."""
    s = await seed(db)
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await db.execute(
            "INSERT INTO holds (account_id, asset, amount, order_id) VALUES ($1, 'USD', 1, 999999)", s.account_id
        )
    order_id = await place(db, s)
    await db.execute(
        "INSERT INTO holds (account_id, asset, amount, order_id) VALUES ($1, 'USD', 1, $2)", s.account_id, order_id
    )
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await db.execute("DELETE FROM orders WHERE id = $1", order_id)


async def test_filled_quantity_cannot_exceed_order_quantity(db: asyncpg.Connection) -> None:
    s = await seed(db)
    order_id = await place(db, s, quantity=Decimal("10"))
    await db.execute("UPDATE orders SET filled_quantity = 10, status = 'filled' WHERE id = $1", order_id)
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute("UPDATE orders SET filled_quantity = 10.5 WHERE id = $1", order_id)


async def test_foreign_keys_reject_orders_and_fills_for_unknown_rows(db: asyncpg.Connection) -> None:
    """orders.instrument_id has no foreign key since 0017 (see the test below)."""
    s = await seed(db)
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await place(db, s, account_id=999_999)
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await db.execute(
            "INSERT INTO fills (fill_id, order_id, account_id, instrument_id, side, quantity, price,"
            " fee_asset, liquidity, trade_id) VALUES ('F', 999999, $1, $2, 'buy', 1, 1, 'USD', 'maker', 'T')",
            s.account_id,
            s.instrument_id,
        )


async def test_instruments_and_ledger_transactions_are_never_removed_or_renumbered(db: asyncpg.Connection) -> None:
    """Orders name their instrument, and ledger entries their transaction, without a foreign key (0017): the rows
    they name must stay, whether anything refers to them yet or not."""
    s = await seed(db)
    order_id = await place(db, s)
    tx_id = await post(db, [(s.account_id, "USD", Decimal("-5")), (s.other_account_id, "USD", Decimal("5"))])
    bare_tx_id = await db.fetchval("INSERT INTO ledger_transactions (kind) VALUES ('deposit') RETURNING id")
    for statement in (
        "DELETE FROM instruments",
        f"DELETE FROM instruments WHERE id = {s.instrument_id}",
        "TRUNCATE instruments CASCADE",
        "UPDATE instruments SET id = id + 1000",
        "DELETE FROM ledger_transactions",
        f"DELETE FROM ledger_transactions WHERE id = {bare_tx_id}",
        "TRUNCATE ledger_transactions CASCADE",
        f"UPDATE ledger_transactions SET id = id + 1000 WHERE id = {bare_tx_id}",
    ):
        with pytest.raises(asyncpg.RestrictViolationError, match="never removed"):
            await db.execute(statement)
    # everything else about them may change (a delisting, 0016's touch of an unbalanced transaction)
    await db.execute("UPDATE instruments SET status = 'halted', id = id WHERE id = $1", s.instrument_id)
    await db.execute("UPDATE ledger_transactions SET kind = kind")
    assert await db.fetchval("SELECT instrument_id FROM orders WHERE id = $1", order_id) == s.instrument_id
    assert await db.fetchval("SELECT count(*) FROM instruments") == 1
    assert await db.fetchval("SELECT count(*) FROM ledger_entries WHERE transaction_id = $1", tx_id) == 2
    assert await db.fetchval("SELECT count(*) FROM ledger_transactions") == 2


async def test_ledger_entries_of_an_unknown_ledger_transaction_are_refused(db: asyncpg.Connection) -> None:
    """ledger_entries.transaction_id has no foreign key since 0017: the statement check refuses the entries."""
    s = await seed(db)
    legs = [(999_999, s.account_id, Decimal("-5")), (999_999, s.other_account_id, Decimal("5"))]
    known = await db.fetchval("INSERT INTO ledger_transactions (kind) VALUES ('trade') RETURNING id")
    for rows in (legs, [(known, s.account_id, Decimal("-1")), (known, s.other_account_id, Decimal("1")), *legs]):
        with pytest.raises(asyncpg.ForeignKeyViolationError) as caught:
            await db.execute(
                "INSERT INTO ledger_entries (transaction_id, account_id, asset, amount)"
                " SELECT t, a, 'USD', m FROM unnest($1::bigint[], $2::bigint[], $3::numeric[]) AS u(t, a, m)",
                [t for t, _, _ in rows],
                [a for _, a, _ in rows],
                [m for _, _, m in rows],
            )
        assert caught.value.constraint_name == "fk_ledger_entries_transaction_id_ledger_transactions"
    assert await db.fetchval("SELECT count(*) FROM ledger_entries") == 0


async def test_amounts_must_be_positive_and_house_accounts_unique(db: asyncpg.Connection) -> None:
    s = await seed(db)
    tx_id = await db.fetchval("INSERT INTO ledger_transactions (kind) VALUES ('deposit') RETURNING id")
    for table in ("holds", "deposits"):
        extra = ", transaction_id" if table == "deposits" else ""
        value = f", {tx_id}" if table == "deposits" else ""
        with pytest.raises(asyncpg.CheckViolationError):
            await db.execute(
                f"INSERT INTO {table} (account_id, asset, amount{extra}) VALUES ($1, 'USD', 0{value})",
                s.account_id,
            )
    with pytest.raises(asyncpg.UniqueViolationError):  # NULLS NOT DISTINCT: one house account per name
        await db.execute("INSERT INTO accounts (user_id, name, kind, currency) VALUES (NULL, 'fees', 'house', 'USD')")
    with pytest.raises(asyncpg.CheckViolationError):  # only house accounts may lack an owner
        await db.execute("INSERT INTO accounts (user_id, name, kind, currency) VALUES (NULL, 'x', 'cash', 'USD')")


# ----------------------------------------------------------------------------------------------- ledger


async def post(conn: asyncpg.Connection, entries: list[tuple[int, str, Decimal]]) -> int:
    """One ledger transaction with the given (account, asset, amount) legs, committed."""
    async with conn.transaction():
        tx_id: int = await conn.fetchval("INSERT INTO ledger_transactions (kind) VALUES ('trade') RETURNING id")
        await conn.executemany(
            "INSERT INTO ledger_entries (transaction_id, account_id, asset, amount) VALUES ($1, $2, $3, $4)",
            [(tx_id, account, asset, amount) for account, asset, amount in entries],
        )
    return tx_id


async def test_balanced_ledger_transaction_commits(db: asyncpg.Connection) -> None:
    s = await seed(db)
    tx_id = await post(
        db,
        [
            (s.account_id, "USD", Decimal("-100.50")),
            (s.other_account_id, "USD", Decimal("100.00")),
            (s.house_account_id, "USD", Decimal("0.50")),
        ],
    )
    assert await db.fetchval("SELECT sum(amount) FROM ledger_entries WHERE transaction_id = $1", tx_id) == 0


async def test_unbalanced_ledger_transaction_fails_at_commit(db: asyncpg.Connection) -> None:
    s = await seed(db)
    tx = db.transaction()
    await tx.start()
    tx_id = await db.fetchval("INSERT INTO ledger_transactions (kind) VALUES ('trade') RETURNING id")
    # The legs are accepted one by one (the rule is deferred) ...
    await db.execute(
        "INSERT INTO ledger_entries (transaction_id, account_id, asset, amount) VALUES ($1, $2, 'USD', -100)",
        tx_id,
        s.account_id,
    )
    await db.execute(
        "INSERT INTO ledger_entries (transaction_id, account_id, asset, amount) VALUES ($1, $2, 'USD', 99)",
        tx_id,
        s.other_account_id,
    )
    # ... and the commit refuses the whole transaction.
    with pytest.raises(asyncpg.CheckViolationError, match="does not balance"):
        await tx.commit()
    assert await db.fetchval("SELECT count(*) FROM ledger_entries") == 0
    assert await db.fetchval("SELECT count(*) FROM ledger_transactions") == 0


async def test_ledger_must_balance_per_asset_not_in_total(db: asyncpg.Connection) -> None:
    s = await seed(db)
    with pytest.raises(asyncpg.CheckViolationError, match="does not balance"):
        await post(db, [(s.account_id, "USD", Decimal("-10")), (s.other_account_id, "EUR", Decimal("10"))])
    assert await db.fetchval("SELECT count(*) FROM ledger_entries") == 0


async def test_ledger_entries_cannot_be_changed_or_removed(db: asyncpg.Connection) -> None:
    s = await seed(db)
    await post(db, [(s.account_id, "USD", Decimal("-5")), (s.other_account_id, "USD", Decimal("5"))])
    for statement in (
        "UPDATE ledger_entries SET amount = amount * 2",
        "DELETE FROM ledger_entries",
        "TRUNCATE ledger_entries CASCADE",
    ):
        with pytest.raises(asyncpg.RestrictViolationError, match="append-only"):
            await db.execute(statement)
    assert await db.fetchval("SELECT count(*) FROM ledger_entries") == 2


async def test_downgrade_below_the_audit_sealer_keeps_a_verifiable_chain(empty_database_url: str) -> None:
    """0005 moved chaining to a sealer; going back to 0004 seals what is pending and renumbers rows by chain."""
    url = empty_database_url
    await asyncio.to_thread(upgrade, url)
    early, late = await asyncpg.connect(url), await asyncpg.connect(url)
    try:
        # `early` holds a transaction id before `late` writes the lower audit id: chain order is not id order
        early_tx, late_tx = early.transaction(), late.transaction()
        await early_tx.start()
        await early.fetchval("SELECT pg_current_xact_id()")
        await late_tx.start()
        await audit(late, "committed last")
        await audit(early, "committed first")
        await early_tx.commit()
        assert await seal_committed(early) == 1
        await late_tx.commit()
    finally:
        await early.close()
        await late.close()

    await asyncio.to_thread(downgrade, url, "0004")
    conn = await asyncpg.connect(url)
    try:
        assert await conn.fetch("SELECT * FROM tp_audit_log_verify()") == []
        await audit(conn, "chained by the 0001 trigger")
        actions = [r[0] for r in await conn.fetch("SELECT action FROM audit_log ORDER BY id")]
        assert actions == ["committed first", "committed last", "chained by the 0001 trigger"]
        assert await conn.fetch("SELECT * FROM tp_audit_log_verify()") == []
    finally:
        await conn.close()

    await asyncio.to_thread(upgrade, url, "head")
    conn = await asyncpg.connect(url)
    try:
        await audit(conn, "sealed again")
        assert await seal_committed(conn) == 1
        assert await conn.fetchval("SELECT max(seq) FROM audit_chain") == 4
        assert await conn.fetch("SELECT * FROM tp_audit_log_verify()") == []
    finally:
        await conn.close()


# The audit objects as PostgreSQL describes them (columns by name, not position).
AUDIT_SCHEMA_SQL = """
WITH audit_tables(oid) AS (VALUES ('audit_log'::regclass), ('audit_log_head'::regclass))
SELECT 'column', c.relname || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
       || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END || ' identity:' || a.attidentity::text
       || coalesce(' default ' || pg_get_expr(d.adbin, d.adrelid), '')
       || coalesce(' -- ' || col_description(c.oid, a.attnum), '')
  FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
  LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
 WHERE c.oid IN (SELECT oid FROM audit_tables) AND a.attnum > 0 AND NOT a.attisdropped
UNION ALL
SELECT 'index', pg_get_indexdef(indexrelid) FROM pg_index WHERE indrelid IN (SELECT oid FROM audit_tables)
UNION ALL
SELECT 'constraint', conname || ' ' || pg_get_constraintdef(oid) FROM pg_constraint
 WHERE conrelid IN (SELECT oid FROM audit_tables)
UNION ALL
SELECT 'trigger', pg_get_triggerdef(oid) FROM pg_trigger
 WHERE tgrelid IN (SELECT oid FROM audit_tables) AND NOT tgisinternal
UNION ALL
SELECT 'function', pg_get_functiondef(oid) FROM pg_proc WHERE proname LIKE 'tp\\_audit\\_%'
"""


async def audit_schema(conn: asyncpg.Connection) -> set[tuple[str, str]]:
    return {(row[0], row[1]) for row in await conn.fetch(AUDIT_SCHEMA_SQL)}


async def test_upgrade_to_the_chain_table_and_back_keeps_every_hash(empty_database_url: str) -> None:
    """0009 moves (seq, prev_hash, hash) out of audit_log: sealed rows keep their hashes, rows unsealed at upgrade
    are sealed by it, and downgrade puts the chain back, leaving rows not chained yet to the 0005 sealer."""
    url = empty_database_url
    await asyncio.to_thread(upgrade, url, "0008")
    conn = await asyncpg.connect(url)
    try:
        ids = [await audit(conn, action) for action in ("a", "b", "c")]
        assert await seal(conn, 2) == 2  # "c" stays unsealed
        sealed_before = [
            tuple(r) for r in await conn.fetch("SELECT id, seq, prev_hash, hash FROM audit_log WHERE seq IS NOT NULL")
        ]
        schema_0008 = await audit_schema(conn)
    finally:
        await conn.close()

    await asyncio.to_thread(upgrade, url, "0009")
    conn = await asyncpg.connect(url)
    try:
        chain = [
            tuple(r) for r in await conn.fetch("SELECT audit_id, seq, prev_hash, hash FROM audit_chain ORDER BY seq")
        ]
        assert sorted(chain[:2]) == sorted(sealed_before)
        assert [row[0] for row in chain] == ids
        assert await conn.fetch("SELECT * FROM tp_audit_log_verify()") == []
        assert await conn.fetchval("SELECT count(*) FROM audit_log WHERE xact_id <> 0") == 0
        ids.append(await audit(conn, "d"))
        assert await seal_committed(conn) == 1
        ids.append(await audit(conn, "e"))  # committed, not sealed when the downgrade runs
        chain = [
            tuple(r) for r in await conn.fetch("SELECT audit_id, seq, prev_hash, hash FROM audit_chain ORDER BY seq")
        ]
    finally:
        await conn.close()

    await asyncio.to_thread(downgrade, url, "0008")
    conn = await asyncpg.connect(url)
    try:
        assert await audit_schema(conn) == schema_0008
        rows = [tuple(r) for r in await conn.fetch("SELECT id, seq, prev_hash, hash FROM audit_log ORDER BY id")]
        assert rows == [*chain, (ids[-1], None, None, None)]
        assert await conn.fetch("SELECT * FROM tp_audit_log_verify()") == []
        assert await seal(conn) == 1  # the 0005 sealer picks the unsealed row up
        assert await conn.fetch("SELECT * FROM tp_audit_log_verify()") == []
    finally:
        await conn.close()

    await asyncio.to_thread(upgrade, url, "head")
    conn = await asyncpg.connect(url)
    try:
        assert [r[0] for r in await conn.fetch("SELECT audit_id FROM audit_chain ORDER BY seq")] == ids
        assert await conn.fetch("SELECT * FROM tp_audit_log_verify()") == []
    finally:
        await conn.close()


# ------------------------------------------------------------------------------------------------ audit

CHAIN_SQL = """
SELECT c.seq, c.prev_hash, c.hash, a.id, a.ts, a.actor_user_id, a.action, a.entity, a.entity_id,
       a.details::text AS details_text
FROM audit_chain c JOIN audit_log a ON a.id = c.audit_id ORDER BY c.seq
"""
UNCHAINED_SQL = "SELECT count(*) FROM audit_log a WHERE NOT EXISTS (SELECT FROM audit_chain c WHERE c.audit_id = a.id)"
NEXT_XACT_ID_SQL = "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint"
# A committed row of a transaction below $1 that is not chained yet.
COMMITTED_UNCHAINED_SQL = """
SELECT EXISTS (
    SELECT FROM audit_log a
     WHERE a.xact_id >= (SELECT xact_cursor FROM audit_log_head) AND a.xact_id < $1
       AND NOT EXISTS (SELECT FROM audit_chain c WHERE c.audit_id = a.id)
)
"""


async def audit(conn: asyncpg.Connection, action: str, details: str = "{}") -> int:
    audit_id: int = await conn.fetchval(
        "INSERT INTO audit_log (actor_user_id, action, entity, entity_id, details) VALUES (7, $1, 'order', '42', $2)"
        " RETURNING id",
        action,
        details,
    )
    return audit_id


def expected_hash(prev_hash: bytes | None, row: asyncpg.Record) -> bytes:
    """The documented chain rule, recomputed outside the database."""
    fields = [
        str(row["seq"]),
        row["ts"].astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        None if row["actor_user_id"] is None else str(row["actor_user_id"]),
        row["action"],
        row["entity"],
        row["entity_id"],
        row["details_text"],
    ]
    content = ",".join("-" if f is None else f"{len(f)}:{f}" for f in fields)
    return hashlib.sha256((prev_hash or b"") + content.encode()).digest()


async def seal(conn: asyncpg.Connection, max_rows: int = 10_000) -> int:
    sealed: int = await conn.fetchval("SELECT tp_audit_log_seal($1)", max_rows)
    return sealed


async def seal_committed(conn: asyncpg.Connection) -> int:
    """Seal until every row committed before the call is chained, as `AuditSealer.seal_committed` does: a
    transaction open anywhere on the server (other tests' databases share it) holds sealing back meanwhile."""
    target = await conn.fetchval(NEXT_XACT_ID_SQL)
    sealed = 0
    async with asyncio.timeout(30):
        while True:
            sealed += await seal(conn)
            if not await conn.fetchval(COMMITTED_UNCHAINED_SQL, target):
                return sealed
            await asyncio.sleep(0.01)


async def test_audit_log_rows_are_hash_chained_when_sealed(db: asyncpg.Connection) -> None:
    await audit(db, "order.place", '{"qty": "10", "note": "a,b:c"}')
    await audit(db, "order.cancel")
    async with db.transaction():
        await audit(db, "order.replace", '{"nested": {"k": [1, 2]}}')
    # written unchained: no chain position, no hash, until the sealer runs
    assert await db.fetchval(UNCHAINED_SQL) == 3
    assert await seal_committed(db) == 3
    assert await seal(db) == 0
    rows = await db.fetch(CHAIN_SQL)

    assert [row["seq"] for row in rows] == [1, 2, 3]
    assert [row["action"] for row in rows] == ["order.place", "order.cancel", "order.replace"]
    assert rows[0]["prev_hash"] is None
    for previous, row in itertools.pairwise(rows):
        assert row["prev_hash"] == previous["hash"]
    for row in rows:
        assert row["hash"] == expected_hash(row["prev_hash"], row)
    assert await db.fetchval("SELECT (last_seq, last_hash) FROM audit_log_head") == (3, rows[-1]["hash"])
    assert await db.fetch("SELECT * FROM tp_audit_log_verify()") == []


async def test_audit_content_is_the_0001_text_for_every_kind_of_row(db: asyncpg.Connection) -> None:
    """0009 gave tp_audit_log_content a body the planner inlines; the text it returns (what every hash covers)
    is still exactly 0001's, NULLs, separators and multibyte characters included."""
    initial = importlib.import_module("tradeplane.adapters.db.migrations.versions.0001_initial")
    await db.execute(
        initial.AUDIT_CONTENT.replace(
            "CREATE FUNCTION tp_audit_log_content(", "CREATE FUNCTION pg_temp.content_0001(", 1
        )
    )
    texts = [None, "", "-", "a,b:c", "1:x,-", "ordre passé ✓", "日本語", " spaced ", "line\nbreak", "x" * 300]
    details = [None, "{}", "[]", "null", '"s"', '{"ü": [1, 2.50, null], "a": "b,c:d"}', '{"k": {"n": 1e3}}']
    seqs = [None, 0, 1, 42, -5, 9_223_372_036_854_775_807]
    stamps = [
        None,
        datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC),
        datetime(2026, 6, 30, 23, 59, 59, 999_999, tzinfo=timezone(timedelta(hours=-7))),
        datetime(1999, 12, 31, 22, 0, tzinfo=timezone(timedelta(hours=5, minutes=30))),
    ]
    rows = [
        (seq, ts, actor, text, texts[(i + 3) % len(texts)], texts[(i + 7) % len(texts)], detail)
        for i, (seq, ts, actor, text, detail) in enumerate(
            itertools.product(seqs, stamps, [None, 7, -1], texts, details)
        )
    ]
    differing = await db.fetch(
        """
        SELECT r.*, tp_audit_log_content(r.seq, r.ts, r.actor, r.action, r.entity, r.entity_id, r.details) AS now,
               pg_temp.content_0001(r.seq, r.ts, r.actor, r.action, r.entity, r.entity_id, r.details) AS before
          FROM unnest($1::bigint[], $2::timestamptz[], $3::bigint[], $4::text[], $5::text[], $6::text[],
                      $7::jsonb[]) AS r(seq, ts, actor, action, entity, entity_id, details)
         WHERE tp_audit_log_content(r.seq, r.ts, r.actor, r.action, r.entity, r.entity_id, r.details)
               IS DISTINCT FROM pg_temp.content_0001(r.seq, r.ts, r.actor, r.action, r.entity, r.entity_id, r.details)
        """,
        *[list(column) for column in zip(*rows, strict=True)],
    )
    assert len(rows) > 5000
    assert differing == []


async def test_a_late_commit_joins_the_chain_and_an_open_writer_holds_later_rows_back(
    db: asyncpg.Connection, database_url: str
) -> None:
    early, late, blocker = [await asyncpg.connect(database_url) for _ in range(3)]
    try:
        early_tx, late_tx = early.transaction(), late.transaction()
        await early_tx.start()
        await early.fetchval("SELECT pg_current_xact_id()")  # `early` holds a transaction id from here
        await late_tx.start()
        async with late.transaction():  # a savepoint: the row carries the top-level transaction's id
            await audit(late, "late")  # the lower id, committed last
        # A writer commits while another is open: no chain lock, so it does not wait.
        await asyncio.wait_for(audit(early, "early"), timeout=10)
        await early_tx.commit()
        assert await seal_committed(db) == 1  # only what has committed
        assert await seal(db) == 0
        await late_tx.commit()
        assert await seal_committed(db) == 1

        # A committed row stays unsealed while a transaction that took its id earlier is open (it could still
        # write a row that belongs before it), and is sealed once that one ends.
        blocker_tx = blocker.transaction()
        await blocker_tx.start()
        await blocker.fetchval("SELECT pg_current_xact_id()")
        await audit(db, "behind an open transaction")
        assert await seal(db) == 0
        await blocker_tx.rollback()
        assert await seal_committed(db) == 1
    finally:
        for conn in (early, late, blocker):
            await conn.close()
    rows = await db.fetch(CHAIN_SQL)
    assert [(row["seq"], row["action"]) for row in rows] == [
        (1, "early"),
        (2, "late"),
        (3, "behind an open transaction"),
    ]
    assert rows[0]["id"] > rows[1]["id"]  # chain order is transaction order, not id order
    assert rows[1]["prev_hash"] == rows[0]["hash"]
    assert await db.fetch("SELECT * FROM tp_audit_log_verify()") == []


async def test_a_full_batch_inside_one_transaction_resumes_after_its_last_row(db: asyncpg.Connection) -> None:
    async with db.transaction():
        ids = [await audit(db, f"a{i}") for i in range(25)]
    batches: list[int] = []
    async with asyncio.timeout(30):
        while sum(batches) < 25:
            if sealed := await seal(db, 10):
                batches.append(sealed)
            else:
                await asyncio.sleep(0.01)  # a transaction open elsewhere on the server holds sealing back
    assert batches == [10, 10, 5]
    assert [row["id"] for row in await db.fetch(CHAIN_SQL)] == ids
    assert await db.fetch("SELECT * FROM tp_audit_log_verify()") == []


async def test_sealing_probes_the_chain_per_row_however_long_the_chain_is(db: asyncpg.Connection) -> None:
    """The sealer's statements run generic plans (PL/pgSQL, bounds in variables). 0009's turned the window's
    "not chained yet" test into a hash anti join over all of audit_chain, so each call read the whole chain and
    cost grew with history; since 0015 it probes the chain's unique index once per window row."""
    await db.execute(
        "INSERT INTO audit_log (actor_user_id, action, entity, entity_id, details)"
        " SELECT 7, 'bulk', 'order', g::text, '{}' FROM generate_series(1, 5000) AS g"
    )
    assert await seal_committed(db) == 5000
    await db.execute("SET plan_cache_mode = force_generic_plan")
    await db.execute("ANALYZE audit_log, audit_chain")
    ids = [await audit(db, f"after {i}") for i in range(3)]
    scans: list[asyncpg.Record] = []
    async with asyncio.timeout(30):
        while True:
            async with db.transaction():
                sealed = await seal(db)
                if sealed:
                    scans.append(
                        await db.fetchrow(
                            "SELECT seq_scan, idx_scan FROM pg_stat_xact_user_tables WHERE relname = 'audit_chain'"
                        )
                    )
                    break
            await asyncio.sleep(0.01)  # a transaction open elsewhere on the server holds sealing back
    assert sealed == 3
    assert [row["id"] for row in await db.fetch(CHAIN_SQL)][-3:] == ids
    assert scans[0]["seq_scan"] == 0, f"sealing read the whole chain: {dict(scans[0])}"
    assert await db.fetch("SELECT * FROM tp_audit_log_verify()") == []


async def test_concurrent_sealers_and_writers_keep_one_linear_chain(db: asyncpg.Connection, database_url: str) -> None:
    """Writers commit out of id order while four sealers run: every row is chained exactly once."""
    rng = random.Random(20261125)
    writers = [await asyncpg.connect(database_url) for _ in range(4)]
    sealers = [await asyncpg.connect(database_url) for _ in range(4)]
    writing_done = asyncio.Event()

    async def write(conn: asyncpg.Connection) -> list[int]:
        written: list[int] = []
        for _ in range(25):
            async with conn.transaction():
                for _ in range(rng.randint(1, 3)):
                    written.append(await audit(conn, "w"))
                    await asyncio.sleep(rng.random() * 0.004)  # held open: commits land out of id order
        return written

    async def seal_until_done(conn: asyncpg.Connection) -> int:
        sealed = 0
        while not writing_done.is_set():
            sealed += await seal(conn, 7)
            await asyncio.sleep(0.001)
        return sealed

    try:
        sealing = [asyncio.create_task(seal_until_done(conn)) for conn in sealers]
        written = [row_id for ids in await asyncio.gather(*(write(conn) for conn in writers)) for row_id in ids]
        writing_done.set()
        counts = await asyncio.gather(*sealing)
    finally:
        writing_done.set()
        for conn in (*writers, *sealers):
            await conn.close()
    rest = await seal_committed(db)
    chain = await db.fetch("SELECT seq, audit_id FROM audit_chain ORDER BY seq")
    assert sum(counts) + rest == len(written) == len(chain)
    assert [row["seq"] for row in chain] == list(range(1, len(written) + 1))
    assert sorted(row["audit_id"] for row in chain) == sorted(written)
    assert await db.fetch("SELECT * FROM tp_audit_log_verify()") == []


async def test_a_restore_onto_a_server_with_lower_transaction_ids_seals_every_row_once(db: asyncpg.Connection) -> None:
    """Transaction ids belong to the server: restored where they are lower than the sealer's cursor, new rows
    would sit behind it. The sealer notices (the cursor is ahead of the server) and re-bases."""
    await audit(db, "sealed before the backup")
    await seal_committed(db)
    next_id = await db.fetchval(NEXT_XACT_ID_SQL)
    # What a restore from a server whose ids ran far ahead brings: its cursor, and rows it had not sealed yet,
    # one of them with an id this server is about to reach.
    await db.execute("UPDATE audit_log_head SET xact_cursor = $1, id_cursor = 3", next_id + 1_000_000_000)
    await db.execute(
        "INSERT INTO audit_log (action, entity, xact_id) VALUES ('restored, behind', 'test', 5),"
        " ('restored, ahead', 'test', $1)",
        next_id + 40,
    )
    await audit(db, "written after the restore")  # this server's id: below the restored cursor
    assert await seal_committed(db) == 3
    assert await db.fetchval("SELECT xact_cursor FROM audit_log_head") <= await db.fetchval(NEXT_XACT_ID_SQL)

    for _ in range(50):  # this server's ids pass the restored row's: it is not sealed again
        await db.fetchval("SELECT pg_current_xact_id()")
    await audit(db, "written later")
    assert await seal_committed(db) == 1
    actions = [row["action"] for row in await db.fetch(CHAIN_SQL)]
    assert actions[0] == "sealed before the backup"
    assert sorted(actions[1:4]) == ["restored, ahead", "restored, behind", "written after the restore"]
    assert actions[4:] == ["written later"]
    assert await db.fetchval(UNCHAINED_SQL) == 0
    assert await db.fetch("SELECT * FROM tp_audit_log_verify()") == []


async def test_audit_tables_refuse_update_delete_and_truncate(db: asyncpg.Connection) -> None:
    await audit(db, "login")
    refused = [
        "UPDATE audit_log SET action = 'nothing'",
        "UPDATE audit_log SET action = action WHERE false",  # every statement, even one that changes no row
        "DELETE FROM audit_log",
        "TRUNCATE audit_log",
    ]
    for statement in refused:
        with pytest.raises(asyncpg.RestrictViolationError, match="append-only"):
            await db.execute(statement)
    assert await seal_committed(db) == 1
    for statement in (
        *refused,
        "UPDATE audit_chain SET hash = sha256('forged')",
        "DELETE FROM audit_chain WHERE false",
        "DELETE FROM audit_chain",
        "TRUNCATE audit_chain",
        "TRUNCATE audit_log, audit_chain",
    ):
        with pytest.raises(asyncpg.RestrictViolationError, match="append-only"):
            await db.execute(statement)
    assert await db.fetchval("SELECT action FROM audit_log") == "login"
    assert await db.fetchval("SELECT count(*) FROM audit_chain") == 1
    assert await db.fetch("SELECT * FROM tp_audit_log_verify()") == []


async def test_audit_log_verify_finds_rows_tampered_behind_the_triggers(db: asyncpg.Connection) -> None:
    ids = [await audit(db, action) for action in ("a", "b", "c", "d")]
    await seal_committed(db)
    # A superuser can switch the guards off; the chain still tells.
    await db.execute("ALTER TABLE audit_log DISABLE TRIGGER tp_audit_log_immutable")
    await db.execute("ALTER TABLE audit_chain DISABLE TRIGGER tp_audit_chain_immutable")
    await db.execute("UPDATE audit_log SET details = '{\"forged\": true}' WHERE id = $1", ids[1])
    assert [row[0] for row in await db.fetch("SELECT * FROM tp_audit_log_verify()")] == [ids[1]]
    # removing a chain row breaks the link and the position of the one after it
    await db.execute("DELETE FROM audit_chain WHERE audit_id = $1", ids[1])
    assert [row[0] for row in await db.fetch("SELECT * FROM tp_audit_log_verify()")] == [ids[2]]
    # a sealed audit row that is gone is reported too
    await db.execute("DELETE FROM audit_log WHERE id = $1", ids[3])
    assert [row[0] for row in await db.fetch("SELECT * FROM tp_audit_log_verify()")] == [ids[2], ids[3]]
    # so is a re-hashed chain row whose link no longer matches its predecessor
    await db.execute("UPDATE audit_chain SET hash = sha256('forged') WHERE audit_id = $1", ids[0])
    assert [row[0] for row in await db.fetch("SELECT * FROM tp_audit_log_verify()")] == ids[:1] + ids[2:4]


# ------------------------------------------------------------------------------------------ time series


async def server_today(conn: asyncpg.Connection) -> date:
    today: date = await conn.fetchval("SELECT CAST(timezone('UTC', now()) AS date)")
    return today


async def partitions(conn: asyncpg.Connection, table: str) -> list[str]:
    rows = await conn.fetch(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = to_regclass($1) ORDER BY 1",
        table,
    )
    return [row[0] for row in rows]


async def migration_day(conn: asyncpg.Connection, table: str) -> date:
    """The UTC day the migration ran: it created partitions from the day before. Tests compare with
    this rather than today, so a session crossing midnight UTC does not flake."""
    first = (await partitions(conn, table))[0]
    return datetime.strptime(first.rsplit("_p", 1)[1], "%Y%m%d").date() + timedelta(days=1)


def names(table: str, start: date, days: range) -> list[str]:
    return [partition_name(table, start + timedelta(days=offset)) for offset in days]


async def test_market_data_uses_native_daily_partitions_without_timescaledb(db: asyncpg.Connection) -> None:
    kinds = await storage_kind_async(db)
    if await timescale_available_async(db):
        assert set(kinds.values()) == {"hypertable"}
        return
    assert kinds == dict.fromkeys(TIMESERIES_TABLES, "partitioned")
    today = await server_today(db)
    migrated = await migration_day(db, "ticks")
    assert migrated in (today, today - timedelta(days=1))
    for table in TIMESERIES_TABLES:  # yesterday through 7 days ahead
        assert await partitions(db, table) == names(table, migrated, range(-1, 8))
    # A tick stamped now lands in today's partition, and ts has a BRIN index.
    landed = await db.fetchval(
        "INSERT INTO ticks (ts, instrument_id, bid, ask) VALUES (now(), 1, 1.1, 1.2) RETURNING tableoid::regclass::text"
    )
    assert landed == partition_name("ticks", today)
    assert await db.fetchval("SELECT count(*) FROM pg_indexes WHERE indexname = 'ix_ticks_ts_brin'") == 1


async def test_partitions_are_created_on_demand_and_dropped_by_retention(db: asyncpg.Connection) -> None:
    if await timescale_available_async(db):
        assert await ensure_daily_partitions_async(db, "ticks", date(2000, 1, 1), 3) == []
        return
    today = await server_today(db)
    far = today + timedelta(days=30)
    insert = "INSERT INTO ticks (ts, instrument_id, last) VALUES ($1, 1, 100)"
    far_ts = datetime(far.year, far.month, far.day, 12, tzinfo=UTC)

    with pytest.raises(asyncpg.CheckViolationError):  # no partition for that day: refused, not misfiled
        await db.execute(insert, far_ts)
    assert await ensure_daily_partitions_async(db, "ticks", far, 2) == [
        partition_name("ticks", far),
        partition_name("ticks", far + timedelta(days=1)),
    ]
    assert await ensure_daily_partitions_async(db, "ticks", far, 2) == []  # idempotent
    await db.execute(insert, far_ts)

    migrated = await migration_day(db, "ticks")
    dropped = await drop_partitions_older_than_async(db, "ticks", today)
    assert dropped == names("ticks", migrated, range(-1, (today - migrated).days))
    assert partition_name("ticks", today) in await partitions(db, "ticks")


async def test_retention_through_a_sqlalchemy_connection(db: asyncpg.Connection, database_url: str) -> None:
    """The synchronous helpers (used by migrations) work through AsyncConnection.run_sync too."""
    native = (await storage_kind_async(db))["spreads"] == "partitioned"
    migrated = await migration_day(db, "spreads") if native else await server_today(db)
    engine = create_async_engine(async_url(database_url), poolclass=pool.NullPool)
    try:
        async with engine.begin() as connection:
            cutoff = migrated + timedelta(days=2)
            dropped = await connection.run_sync(drop_partitions_older_than, "spreads", cutoff)
    finally:
        await engine.dispose()
    assert dropped == (names("spreads", migrated, range(-1, 2)) if native else [])
    if native:
        assert await partitions(db, "spreads") == names("spreads", migrated, range(2, 8))


async def test_only_time_series_tables_are_accepted(db: asyncpg.Connection) -> None:
    with pytest.raises(ValueError, match="not a time-series table"):
        await ensure_daily_partitions_async(db, "orders; DROP TABLE users", date(2024, 1, 1), 1)
