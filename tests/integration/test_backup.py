"""Backup and restore of the system of record (pg_dump, pg_restore), on the test and embedded servers."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest

from tests.conftest import create_database, drop_database, with_database
from tradeplane.adapters.db.backup import BackupFailed, backup, find_pg_tool, restore, server_major
from tradeplane.adapters.db.migrate import upgrade
from tradeplane.adapters.embedded import EmbeddedStack
from tradeplane.adapters.postgres import Database
from tradeplane.errors import Conflict
from tradeplane.services.audit import AuditSealer
from tradeplane.services.demo import seed_demo

SECRET = "test-secret-key-not-for-production"

TABLES_SQL = """
SELECT format('%I.%I', schemaname, tablename) FROM pg_tables
WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1
"""


def server_of(database_url: str) -> str:
    return with_database(database_url, "postgres")


@pytest.fixture
async def fresh_database_url(pg_server_url: str) -> AsyncIterator[str]:
    """A second empty database on the same server: the restore target."""
    name = await create_database(pg_server_url)
    yield with_database(pg_server_url, name)
    await drop_database(pg_server_url, name)


async def row_counts(database_url: str) -> dict[str, int]:
    conn = await asyncpg.connect(database_url)
    try:
        tables = [row[0] for row in await conn.fetch(TABLES_SQL)]
        return {table: await conn.fetchval(f"SELECT count(*) FROM {table}") for table in tables}
    finally:
        await conn.close()


async def load_trading_data(database_url: str) -> None:
    """The demo reference data, users, accounts and deposits (ledger, audit trail), plus exact-money fills."""
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction():
            await seed_demo(conn, SECRET)
        await conn.execute(
            "CREATE TABLE backup_probe (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
            " price numeric(38, 18) NOT NULL, filled_at timestamptz NOT NULL DEFAULT now())"
        )
        await conn.executemany(
            "INSERT INTO backup_probe (price) VALUES ($1)",
            [(Decimal("65000.123456789012345678"),), (Decimal("0.000000000000000001"),), (Decimal("1"),)],
        )
    finally:
        await conn.close()


async def test_backup_restores_every_table_into_a_fresh_database(
    database_url: str, fresh_database_url: str, tmp_path: Path
) -> None:
    await load_trading_data(database_url)
    before = await row_counts(database_url)
    assert sum(before.values()) > 10  # the demo seed really wrote across the schema

    dump = tmp_path / "tradeplane.dump"
    backup(database_url, dump)
    assert dump.read_bytes().startswith(b"PGDMP")  # pg_dump's custom format
    restore(fresh_database_url, dump)

    assert await row_counts(fresh_database_url) == before
    source, target = await asyncpg.connect(database_url), await asyncpg.connect(fresh_database_url)
    try:
        query = "SELECT id, price, filled_at FROM backup_probe ORDER BY id"
        assert await target.fetch(query) == await source.fetch(query)
        # identity sequences come back too: the next fill does not collide with a restored one
        assert await target.fetchval("INSERT INTO backup_probe (price) VALUES (2) RETURNING id") == 4
        # so does the schema's behaviour: the audit trail is still append-only
        if "public.audit_log" in before:
            with pytest.raises(asyncpg.PostgresError):
                await target.execute("DELETE FROM audit_log")
    finally:
        await source.close()
        await target.close()
    if "public.audit_log" in before:
        # and the chain carries on: the restored rows, sealed or not, and new ones are chained once each
        restored_db = Database(fresh_database_url, min_size=1, max_size=2)
        await restored_db.connect()
        try:
            async with restored_db.transaction("test") as conn:
                await conn.execute("INSERT INTO audit_log (action, entity) VALUES ('after restore', 'test')")
            check = await AuditSealer(restored_db).verify()
            assert (check.bad_row_ids, check.unsealed) == ([], 0)
            async with restored_db.connection("test") as conn:
                assert await conn.fetchval("SELECT count(*) FROM audit_chain") == before["public.audit_log"] + 1
        finally:
            await restored_db.close()


async def test_restore_refuses_a_database_that_already_has_tables(database_url: str, tmp_path: Path) -> None:
    await load_trading_data(database_url)
    dump = tmp_path / "tradeplane.dump"
    backup(database_url, dump)
    before = await row_counts(database_url)

    with pytest.raises(Conflict, match="empty database"):
        restore(database_url, dump)
    assert await row_counts(database_url) == before


async def test_a_truncated_backup_file_is_refused_in_one_line(
    database_url: str, fresh_database_url: str, tmp_path: Path
) -> None:
    await load_trading_data(database_url)
    dump = tmp_path / "tradeplane.dump"
    backup(database_url, dump)
    truncated = tmp_path / "truncated.dump"
    truncated.write_bytes(dump.read_bytes()[: dump.stat().st_size * 3 // 4])

    with pytest.raises(BackupFailed, match="pg_restore") as caught:
        restore(fresh_database_url, truncated)
    assert "\n" not in str(caught.value)
    assert await row_counts(fresh_database_url) == {}


async def test_a_restore_that_fails_half_way_leaves_the_target_as_it_was(
    database_url: str, fresh_database_url: str, tmp_path: Path
) -> None:
    await load_trading_data(database_url)
    dump = tmp_path / "tradeplane.dump"
    backup(database_url, dump)
    conn = await asyncpg.connect(fresh_database_url)
    try:
        # not a table, so the target counts as empty, but the restore trips over it after creating others
        await conn.execute("CREATE VIEW backup_probe AS SELECT 1 AS id")

        with pytest.raises(BackupFailed, match="backup_probe"):
            restore(fresh_database_url, dump)
        assert await row_counts(fresh_database_url) == {}  # one transaction: all or nothing
        assert await conn.fetchval("SELECT id FROM backup_probe") == 1
    finally:
        await conn.close()


async def test_failed_backup_reports_the_tool_error_and_leaves_no_file(pg_server_url: str, tmp_path: Path) -> None:
    dump = tmp_path / "missing.dump"
    with pytest.raises(BackupFailed) as caught:
        backup(with_database(pg_server_url, "no_such_database_tp"), dump)
    assert "no_such_database_tp" in str(caught.value)
    assert "\n" not in str(caught.value)
    assert not dump.exists()
    assert not dump.with_name("missing.dump.partial").exists()

    with pytest.raises(BackupFailed, match="no backup file"):
        restore(pg_server_url, tmp_path / "absent.dump")


async def test_tools_match_the_server_major(pg_server_url: str) -> None:
    major = server_major(pg_server_url)
    for name in ("pg_dump", "pg_restore"):
        tool = find_pg_tool(name, major)
        version = (await _version_of(tool)).split()
        assert version[0] == name
        # a pg_dump newer than the server writes SETs an older server rejects; older ones refuse the server
        assert int(version[2].split(".")[0]) >= major
    with pytest.raises(BackupFailed, match="no pg_dump for PostgreSQL 99"):
        find_pg_tool("pg_dump", 99)


async def _version_of(tool: Path) -> str:
    proc = await asyncio.create_subprocess_exec(str(tool), "--version", stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    return out.decode()


async def test_password_in_the_url_reaches_the_tools(pg_server_url: str, tmp_path: Path) -> None:
    """A password-protected login works end to end (passed through PGPASSWORD, never argv)."""
    admin = await asyncpg.connect(server_of(pg_server_url))
    role = "tp_backup_operator"
    try:
        await admin.execute(f"DROP ROLE IF EXISTS {role}")
        await admin.execute(f"CREATE ROLE {role} LOGIN SUPERUSER PASSWORD 'p@ss:w/rd%'")
    finally:
        await admin.close()
    try:
        name = await create_database(pg_server_url)
        parts = urlsplit(pg_server_url)
        url = f"postgresql://{role}:p%40ss%3Aw%2Frd%25@{parts.hostname}:{parts.port}/{name}"
        try:
            dump = tmp_path / "pw.dump"
            backup(url, dump)
            assert dump.stat().st_size > 0
        finally:
            await drop_database(pg_server_url, name)
    finally:
        admin = await asyncpg.connect(server_of(pg_server_url))
        await admin.execute(f"DROP ROLE IF EXISTS {role}")
        await admin.close()


async def test_backup_and_restore_on_the_embedded_postgres() -> None:
    data_dir = Path(tempfile.mkdtemp(prefix="tp"))
    try:
        with EmbeddedStack(data_dir) as stack:
            database_url = stack.start("postgres")
            await asyncio.to_thread(upgrade, database_url)
            await load_trading_data(database_url)
            before = await row_counts(database_url)
            assert server_major(database_url) >= 16

            dump = data_dir / "backups" / "tradeplane.dump"
            backup(database_url, dump)
            server = server_of(database_url)
            name = await create_database(server)
            restore(with_database(server, name), dump)
            assert await row_counts(with_database(server, name)) == before
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
