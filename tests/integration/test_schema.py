"""The schema the migrations build: it round-trips, matches the Core metadata, and enforces the rules
that money, orders and the audit trail rely on even when application code gets them wrong."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
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


async def test_filled_quantity_cannot_exceed_order_quantity(db: asyncpg.Connection) -> None:
    s = await seed(db)
    order_id = await place(db, s, quantity=Decimal("10"))
    await db.execute("UPDATE orders SET filled_quantity = 10, status = 'filled' WHERE id = $1", order_id)
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute("UPDATE orders SET filled_quantity = 10.5 WHERE id = $1", order_id)


async def test_foreign_keys_reject_orders_and_fills_for_unknown_rows(db: asyncpg.Connection) -> None:
    s = await seed(db)
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await place(db, s, account_id=999_999)
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await place(db, s, instrument_id=999_999)
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await db.execute(
            "INSERT INTO fills (fill_id, order_id, account_id, instrument_id, side, quantity, price,"
            " fee_asset, liquidity, trade_id) VALUES ('F', 999999, $1, $2, 'buy', 1, 1, 'USD', 'maker', 'T')",
            s.account_id,
            s.instrument_id,
        )


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
    first, second = await asyncpg.connect(url), await asyncpg.connect(url)
    try:
        pending = first.transaction()
        await pending.start()
        await audit(first, "committed last")
        await audit(second, "committed first")
        assert await seal(second) == 1  # sealed before the lower id commits: chain order differs from id order
        await pending.commit()
    finally:
        await first.close()
        await second.close()

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
        assert await seal(conn) == 1
        assert await conn.fetchval("SELECT max(seq) FROM audit_log") == 4
        assert await conn.fetch("SELECT * FROM tp_audit_log_verify()") == []
    finally:
        await conn.close()


# ------------------------------------------------------------------------------------------------ audit


async def audit(conn: asyncpg.Connection, action: str, details: str = "{}") -> None:
    await conn.execute(
        "INSERT INTO audit_log (actor_user_id, action, entity, entity_id, details) VALUES (7, $1, 'order', '42', $2)",
        action,
        details,
    )


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


async def seal(conn: asyncpg.Connection) -> int:
    sealed: int = await conn.fetchval("SELECT tp_audit_log_seal()")
    return sealed


async def test_audit_log_rows_are_hash_chained_when_sealed(db: asyncpg.Connection) -> None:
    await audit(db, "order.place", '{"qty": "10", "note": "a,b:c"}')
    await audit(db, "order.cancel")
    async with db.transaction():
        await audit(db, "order.replace", '{"nested": {"k": [1, 2]}}')
    # written unsealed: no chain position, no hash, until the sealer runs
    assert await db.fetchval("SELECT count(*) FROM audit_log WHERE seq IS NULL AND hash IS NULL") == 3
    assert await seal(db) == 3
    assert await seal(db) == 0
    rows = await db.fetch("SELECT *, details::text AS details_text FROM audit_log ORDER BY seq")

    assert [row["seq"] for row in rows] == [1, 2, 3]
    assert [row["action"] for row in rows] == ["order.place", "order.cancel", "order.replace"]
    assert rows[0]["prev_hash"] is None
    for previous, row in itertools.pairwise(rows):
        assert row["prev_hash"] == previous["hash"]
    for row in rows:
        assert row["hash"] == expected_hash(row["prev_hash"], row)
    assert await db.fetch("SELECT * FROM tp_audit_log_verify()") == []


async def test_audit_writers_do_not_wait_for_each_other_and_late_commits_join_the_chain(
    db: asyncpg.Connection, database_url: str
) -> None:
    other = await asyncpg.connect(database_url)
    try:
        first = db.transaction()
        await first.start()
        await audit(db, "first")  # the lower id, still uncommitted
        # A second writer commits while the first is open: no chain lock, so it does not wait.
        await asyncio.wait_for(audit(other, "second"), timeout=10)
        assert await seal(other) == 1  # only what has committed
        await first.commit()
        assert await seal(db) == 1
    finally:
        await other.close()
    rows = await db.fetch("SELECT id, seq, action, prev_hash, hash FROM audit_log ORDER BY seq")
    assert [(row["seq"], row["action"]) for row in rows] == [(1, "second"), (2, "first")]
    assert rows[0]["id"] > rows[1]["id"]  # chain order is commit (seal) order, not id order
    assert rows[1]["prev_hash"] == rows[0]["hash"]
    assert await db.fetch("SELECT * FROM tp_audit_log_verify()") == []


async def test_concurrent_sealers_keep_one_linear_chain(db: asyncpg.Connection, database_url: str) -> None:
    for i in range(200):
        await audit(db, f"a{i}")
    sealers = [await asyncpg.connect(database_url) for _ in range(4)]

    async def seal_in_batches(conn: asyncpg.Connection) -> int:
        return sum([await conn.fetchval("SELECT tp_audit_log_seal(7)") for _ in range(10)])

    try:
        counts = await asyncio.gather(*(seal_in_batches(conn) for conn in sealers))
    finally:
        for conn in sealers:
            await conn.close()
    assert sum(counts) == 200
    assert [r[0] for r in await db.fetch("SELECT seq FROM audit_log ORDER BY seq")] == list(range(1, 201))
    assert await db.fetch("SELECT * FROM tp_audit_log_verify()") == []


async def test_audit_log_refuses_update_delete_and_truncate(db: asyncpg.Connection) -> None:
    await audit(db, "login")
    for statement in (
        "UPDATE audit_log SET action = 'nothing'",  # unsealed: content may still not change
        "DELETE FROM audit_log",
        "TRUNCATE audit_log",
    ):
        with pytest.raises(asyncpg.RestrictViolationError, match="append-only"):
            await db.execute(statement)
    await seal(db)
    for statement in (
        "UPDATE audit_log SET action = 'nothing'",
        "UPDATE audit_log SET hash = sha256('forged'), seq = 9",  # a sealed row cannot be re-sealed
        "DELETE FROM audit_log",
    ):
        with pytest.raises(asyncpg.RestrictViolationError, match="append-only"):
            await db.execute(statement)
    assert await db.fetchval("SELECT action FROM audit_log") == "login"
    assert await db.fetch("SELECT * FROM tp_audit_log_verify()") == []


async def test_audit_log_verify_finds_a_row_tampered_behind_the_triggers(db: asyncpg.Connection) -> None:
    for action in ("a", "b", "c"):
        await audit(db, action)
    await seal(db)
    # A superuser can switch the guard off; the chain still tells.
    await db.execute("ALTER TABLE audit_log DISABLE TRIGGER tp_audit_log_immutable")
    await db.execute("UPDATE audit_log SET details = '{\"forged\": true}' WHERE seq = 2")
    forged = await db.fetchval("SELECT id FROM audit_log WHERE seq = 2")
    assert [row[0] for row in await db.fetch("SELECT * FROM tp_audit_log_verify()")] == [forged]
    # removing a sealed row breaks the link of the one after it
    await db.execute("DELETE FROM audit_log WHERE seq = 2")
    after = await db.fetchval("SELECT id FROM audit_log WHERE seq = 3")
    assert [row[0] for row in await db.fetch("SELECT * FROM tp_audit_log_verify()")] == [after]


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
