"""The `tradeplane` command as a user runs it: real process, real servers, exit codes and messages."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import asyncpg
import pytest

from tests.conftest import create_database, drop_database, with_database

CLI = [sys.executable, "-m", "tradeplane.entrypoints.cli"]


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("TRADEPLANE_") or k.startswith("TRADEPLANE_TEST")}
    base["COLUMNS"] = "200"
    return subprocess.run([*CLI, *args], env={**base, **(env or {})}, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def server_env(database_url: str, redis_url: str, nats_url: str) -> dict[str, str]:
    return {
        "TRADEPLANE_DATABASE_URL": database_url,
        "TRADEPLANE_REDIS_URL": redis_url,
        "TRADEPLANE_BUS_URL": nats_url,
        "TRADEPLANE_SECRET_KEY": "cli-test-secret",
    }


def test_help_everywhere() -> None:
    for command in (
        [],
        ["up"],
        ["run"],
        ["run", "api"],
        ["setup"],
        ["check"],
        ["db"],
        ["db", "upgrade"],
        ["db", "downgrade"],
        ["db", "current"],
        ["db", "verify-audit"],
        ["backup"],
        ["restore"],
        ["users", "create"],
        ["keys", "create"],
        ["accounts", "create"],
        ["accounts", "deposit"],
        ["accounts", "stp"],
    ):
        result = run(*command, "--help")
        assert result.returncode == 0, (command, result.stderr)
        assert "Usage" in result.stdout


def test_check_test_passes_on_real_servers(server_env: dict[str, str]) -> None:
    result = run("check", "--test", env=server_env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("ok") >= 3
    assert "write/read ok" in result.stdout


def test_check_reports_an_unreachable_server_and_exits_1(server_env: dict[str, str]) -> None:
    result = run("check", env={**server_env, "TRADEPLANE_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert result.returncode == 1
    assert "fail" in result.stdout
    assert "Traceback" not in result.stderr


def test_malformed_url_is_one_line_and_exit_2() -> None:
    result = run("check", env={"TRADEPLANE_DATABASE_URL": "mysql://localhost/db"})
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "TRADEPLANE_DATABASE_URL" in lines[0]


def test_unreachable_database_is_one_line_and_nonzero(server_env: dict[str, str]) -> None:
    env = {**server_env, "TRADEPLANE_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/postgres"}
    result = run("users", "create", "x", env=env)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "TRADEPLANE_DATABASE_URL" in result.stderr


def test_users_keys_accounts_and_deposit(server_env: dict[str, str], database_url: str) -> None:
    assert run("users", "create", "carol", "--role", "trader", env=server_env).returncode == 0
    duplicate = run("users", "create", "carol", env=server_env)
    assert duplicate.returncode == 1 and "already exists" in duplicate.stderr
    bad_role = run("users", "create", "dave", "--role", "king", env=server_env)
    assert bad_role.returncode == 2 and "--role" in bad_role.stderr

    key = run("keys", "create", "--user", "carol", env=server_env)
    assert key.returncode == 0, key.stderr
    printed = key.stdout.strip()
    assert printed.startswith("tp_")

    # A fresh database lists nothing: the account's currency must come from an instrument the operator lists,
    # not from demo data loaded behind their back.
    no_currency = run("accounts", "create", "--user", "carol", env=server_env)
    assert no_currency.returncode == 1 and "tradeplane instruments add" in no_currency.stderr
    listed = run(
        "instruments", "add", "SOL-USD", "--base", "SOL", "--quote", "USD", "--tick-size", "0.01", "--lot-size", "1",
        "--min-qty", "1", "--max-qty", "100", "--band", "10", "--reference-price", "150", env=server_env,
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    assert run("instruments", "list", env=server_env).stdout.count("-USD") == 1, "demo instruments were loaded"
    created = run("accounts", "create", "--user", "carol", env=server_env)
    assert created.returncode == 0, created.stderr
    account_id = created.stdout.split()[1]
    deposited = run("accounts", "deposit", account_id, "2500.10", env=server_env)
    assert deposited.returncode == 0, deposited.stderr
    assert "balance now 2500.10" in deposited.stdout
    negative = run("accounts", "deposit", "--", account_id, "-1", env=server_env)
    assert negative.returncode == 1 and "positive" in negative.stderr
    margin = run("accounts", "create", "--user", "carol", "--name", "m", "--stp", "cancel_oldest", env=server_env)
    assert margin.returncode == 0 and "self-trade prevention cancel_oldest" in margin.stdout, margin.stderr
    changed = run("accounts", "stp", account_id, "cancel_both", env=server_env)
    assert changed.returncode == 0 and "cancel_both" in changed.stdout, changed.stderr
    bad_mode = run("accounts", "stp", account_id, "cancel_all", env=server_env)
    assert bad_mode.returncode == 1 and "cancel_newest, cancel_oldest, cancel_both" in bad_mode.stderr
    missing = run("accounts", "stp", "999999999", "cancel_both", env=server_env)
    assert missing.returncode == 1 and "no account" in missing.stderr

    import asyncio

    async def stored_hash_matches() -> bool:
        from tradeplane.services.identity import hash_api_key

        conn = await asyncpg.connect(database_url)
        try:
            found = await conn.fetchval(
                "SELECT count(*) FROM api_keys WHERE key_hash = $1", hash_api_key("cli-test-secret", printed)
            )
            plain = await conn.fetchval("SELECT count(*) FROM api_keys WHERE key_hash = $1", printed)
        finally:
            await conn.close()
        return bool(found == 1 and plain == 0)

    assert asyncio.run(stored_hash_matches())

    async def stp_modes() -> list[str]:
        conn = await asyncpg.connect(database_url)
        try:
            rows = await conn.fetch("SELECT stp_mode FROM accounts WHERE user_id IS NOT NULL ORDER BY id")
        finally:
            await conn.close()
        return [r["stp_mode"] for r in rows]

    assert asyncio.run(stp_modes())[-2:] == ["cancel_both", "cancel_oldest"]


async def test_db_commands_round_trip(empty_database_url: str) -> None:
    env = {"TRADEPLANE_DATABASE_URL": empty_database_url}
    assert "base" in run("db", "current", env=env).stdout
    up = run("db", "upgrade", env=env)
    assert up.returncode == 0, up.stderr
    assert "up to date" in run("db", "current", env=env).stdout
    down = run("db", "downgrade", "base", env=env)
    assert down.returncode == 0, down.stderr
    assert "base" in run("db", "current", env=env).stdout


async def test_db_verify_audit_seals_checks_and_reports_a_broken_chain(
    server_env: dict[str, str], database_url: str
) -> None:
    env = {**server_env, "TRADEPLANE_DATABASE_URL": database_url}
    conn = await asyncpg.connect(database_url)
    try:
        for action in ("login", "order.place", "order.cancel"):
            await conn.execute("INSERT INTO audit_log (action, entity) VALUES ($1, 'test')", action)
        result = run("db", "verify-audit", env=env)
        assert result.returncode == 0, result.stderr
        assert "audit chain intact (sealed 3 rows now" in result.stdout
        assert await conn.fetchval("SELECT count(*) FROM audit_chain") == 3

        await conn.execute("ALTER TABLE audit_log DISABLE TRIGGER tp_audit_log_immutable")
        forged = await conn.fetchval("SELECT audit_id FROM audit_chain WHERE seq = 2")
        await conn.execute("UPDATE audit_log SET action = 'forged' WHERE id = $1", forged)
    finally:
        await conn.close()
    result = run("db", "verify-audit", env=env)
    assert result.returncode == 1
    assert f"audit chain broken: 1 rows fail verification (ids {forged})" in result.stderr


async def test_backup_then_restore_into_empty_database(
    server_env: dict[str, str], database_url: str, pg_server_url: str, tmp_path: Path
) -> None:
    assert run("users", "create", "erin", env=server_env).returncode == 0
    dump = tmp_path / "tp.dump"
    made = run("backup", str(dump), env=server_env)
    assert made.returncode == 0, made.stderr
    target = await create_database(pg_server_url)
    try:
        target_url = with_database(pg_server_url, target)
        restored = run("restore", str(dump), env={**server_env, "TRADEPLANE_DATABASE_URL": target_url})
        assert restored.returncode == 0, restored.stderr
        again = run("restore", str(dump), env={**server_env, "TRADEPLANE_DATABASE_URL": target_url})
        assert again.returncode == 1 and "not empty" in again.stderr
        src, dst = await asyncpg.connect(database_url), await asyncpg.connect(target_url)
        try:
            assert await dst.fetchval("SELECT username FROM users") == "erin"
            for table in ("users", "audit_log", "assets", "instruments"):
                assert await src.fetchval(f"SELECT count(*) FROM {table}") == await dst.fetchval(
                    f"SELECT count(*) FROM {table}"
                )
        finally:
            await src.close()
            await dst.close()
    finally:
        await drop_database(pg_server_url, target)
    missing = run("restore", str(tmp_path / "nope.dump"), env=server_env)
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_check_test_on_the_embedded_default() -> None:
    data_dir = tempfile.mkdtemp(prefix="tpcli")
    try:
        result = run("check", "--test", env={"TRADEPLANE_DATA_DIR": data_dir}, timeout=240)
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.count("write/read ok") == 3
    finally:
        import shutil

        shutil.rmtree(data_dir, ignore_errors=True)
