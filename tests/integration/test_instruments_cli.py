"""`tradeplane instruments add|list|set` as an operator runs them: real process, real PostgreSQL, exit codes,
messages, exact decimals and audit rows."""

from __future__ import annotations

from decimal import Decimal

import asyncpg
import pytest

from tests.integration.test_cli import run

ADD = [
    "instruments", "add", "SOL-USD", "--base", "SOL", "--quote", "USD", "--tick-size", "0.001", "--lot-size", "0.01",
    "--min-qty", "0.01", "--max-qty", "10000", "--band", "10", "--reference-price", "150.000",
    "--maker-fee", "-0.0001", "--taker-fee", "0.0004", "--margin-rate", "0.2", "--session-close", "21:00",
    "--quote-scale", "2",
]  # fmt: skip


@pytest.fixture
def db_env(database_url: str) -> dict[str, str]:
    return {"TRADEPLANE_DATABASE_URL": database_url}


async def fetchrow(database_url: str, query: str, *args: object) -> asyncpg.Record:
    conn = await asyncpg.connect(database_url)
    try:
        row = await conn.fetchrow(query, *args)
        assert row is not None
        return row
    finally:
        await conn.close()


async def test_add_list_and_set_with_exact_decimals_and_audit(db_env: dict[str, str], database_url: str) -> None:
    added = run(*ADD, env=db_env)
    assert added.returncode == 0, added.stderr
    assert "instrument SOL-USD listed with id" in added.stdout
    row = await fetchrow(database_url, "SELECT * FROM instruments WHERE symbol = 'SOL-USD'")
    assert (row["tick_size"], row["lot_size"], row["maker_fee_rate"], row["reference_price"]) == (
        Decimal("0.001"), Decimal("0.01"), Decimal("-0.0001"), Decimal("150"),
    )  # fmt: skip
    assert str(row["session_close_utc"]) == "21:00:00" and row["status"] == "open"
    assets = await fetchrow(
        database_url,
        "SELECT (SELECT scale FROM assets WHERE code = 'SOL') s, (SELECT scale FROM assets WHERE code = 'USD') u",
    )
    assert (assets["s"], assets["u"]) == (2, 2)  # base: the lot's places; quote: as given

    listed = run("instruments", "list", env=db_env)
    assert listed.returncode == 0, listed.stderr
    assert "SOL-USD" in listed.stdout and "0.001" in listed.stdout and "-0.0001/0.0004" in listed.stdout

    # Live-safe parameters change while it is open.
    changed = run("instruments", "set", "SOL-USD", "--band", "5", "--max-qty", "500", env=db_env)
    assert changed.returncode == 0, changed.stderr
    # Lower fees or margin rate apply at once; higher ones (what holds are priced at) only while halted, and then
    # reopening waits for the api catalogs.
    lowered = run("instruments", "set", "SOL-USD", "--taker-fee", "0.0003", env=db_env)
    assert lowered.returncode == 0, lowered.stderr
    for pricing in (["--taker-fee", "0.0005"], ["--margin-rate", "0.25"]):
        refused = run("instruments", "set", "SOL-USD", *pricing, env=db_env)
        assert refused.returncode == 1 and "halt it" in refused.stderr, refused.stderr
        assert "Lowering them needs no halt" in refused.stderr
    halted = run(
        "instruments", "set", "SOL-USD", "--status", "halted", "--taker-fee", "0.0005", "--margin-rate", "0.25",
        env=db_env,
    )  # fmt: skip
    assert halted.returncode == 0, halted.stderr
    assert "status open -> halted" in halted.stdout
    early = run("instruments", "set", "SOL-USD", "--status", "open", env=db_env)
    assert early.returncode == 1 and "reopen in" in early.stderr

    row = await fetchrow(database_url, "SELECT * FROM instruments WHERE symbol = 'SOL-USD'")
    assert (row["price_band_pct"], row["max_qty"], row["margin_rate"], row["taker_fee_rate"], row["status"]) == (
        Decimal("5"), Decimal("500"), Decimal("0.25"), Decimal("0.0005"), "halted",
    )  # fmt: skip
    audit = await fetchrow(
        database_url,
        "SELECT array_agg(action ORDER BY id) AS actions FROM audit_log WHERE entity = 'instrument' AND entity_id = $1",
        str(row["id"]),
    )
    assert audit["actions"] == [
        "instrument.list", "instrument.set", "instrument.set", "instrument.status", "instrument.set",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--tick-size", "0"], "tick size must be positive"),
        (["--lot-size", "abc"], "lot size 'abc' is not a decimal number"),
        (["--min-qty", "5", "--max-qty", "1"], "max quantity 1 is below min quantity 5"),
        (["--min-qty", "0.015"], "min quantity 0.015 is not a multiple of the lot size 0.01"),
        (["--taker-fee", "0.5"], "taker fee rate must be between 0 and 0.1"),
        (["--maker-fee", "-0.001"], "a rebate no larger than the taker fee"),
        (["--margin-rate", "1.5"], "margin rate must be above 0 and at most 1"),
        (["--band", "NaN"], "price band must be a finite number"),
        (["--lot-size", "0.0000000000000000001"], "more than 18 decimal places"),
        (["--max-qty", "1_000"], "max quantity '1_000' is not a decimal number (write it without '_' separators)"),
        (["--taker-fee", "\uff10.001"], "use ASCII digits"),  # a full-width 0
        (["--session-close", "25:00"], "is not a time of day"),
        (["--status", "paused"], "status must be one of open, halted, closed"),
        (["--quote", "SOL"], "base and quote asset must differ"),
    ],
)
def test_add_refuses_bad_input_with_a_reason(db_env: dict[str, str], change: list[str], message: str) -> None:
    args = list(ADD)
    for i in range(0, len(change), 2):
        if change[i] in args:
            args[args.index(change[i]) + 1] = change[i + 1]
        else:
            args += change[i : i + 2]
    result = run(*args, env=db_env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


async def test_set_refuses_what_is_unsafe_or_unknown(db_env: dict[str, str], database_url: str) -> None:
    assert run(*ADD, env=db_env).returncode == 0
    row = await fetchrow(database_url, "SELECT id FROM instruments WHERE symbol = 'SOL-USD'")
    conn = await asyncpg.connect(database_url)
    try:
        user = await conn.fetchval("INSERT INTO users (username) VALUES ('t') RETURNING id")
        account = await conn.fetchval(
            "INSERT INTO accounts (user_id, name, kind, currency) VALUES ($1, 'main', 'cash', 'USD') RETURNING id", user
        )
        await conn.execute(
            "INSERT INTO orders (account_id, instrument_id, side, type, quantity, price, status)"
            " VALUES ($1, $2, 'buy', 'limit', 1, 150, 'new')",
            account,
            row["id"],
        )
    finally:
        await conn.close()
    grid = run("instruments", "set", "SOL-USD", "--tick-size", "0.01", env=db_env)
    assert grid.returncode == 1 and "1 open orders" in grid.stderr and "tick or lot size" in grid.stderr
    unknown = run("instruments", "set", "NOPE", "--band", "3", env=db_env)
    assert unknown.returncode == 1 and "no instrument 'NOPE'" in unknown.stderr
    nothing = run("instruments", "set", "SOL-USD", env=db_env)
    assert nothing.returncode == 2 and "nothing to change" in nothing.stderr
    again = run(*ADD, env=db_env)
    assert again.returncode == 1 and "listed already" in again.stderr
