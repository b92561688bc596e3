"""What the ledger's zero-sum check costs PostgreSQL: per entry (revision 0015) against per statement (0016).

Run:  .venv/bin/python tests/bench/bench_ledger_balance.py [--commits N] [--per-statement K] [--rounds R]
          [--database-url URL]

The server is --database-url, else TRADEPLANE_TEST_DATABASE_URL (it must run on this machine: the backend's CPU
is read from /proc). Two fresh databases are built by the real migrations, one stopped at 0015 (the deferred
per-entry constraint trigger) and one at head, and dropped at the end. Each commit posts K ledger transactions of
4 entries (two USD transfers) through ``services.ledger.post_many``, the only writer, in one transaction: K = 1 is
a deposit's shape, a larger K an engine batch's. The two databases alternate round by round. Figures per ledger
transaction: the backend's CPU (user + system) and the time PostgreSQL spent inside the check functions
(``track_functions``, their own time), medians over the rounds. Not a test: no assertions on the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import uuid
from decimal import Decimal
from pathlib import Path

import asyncpg

from tradeplane.adapters.db.migrate import upgrade
from tradeplane.domain.ledger import LedgerEntry, LedgerTransaction
from tradeplane.services import ledger

TICKS = os.sysconf("SC_CLK_TCK")
REVISIONS = {"0015 per entry": "0015", "0016 per statement": "head"}
CHECKS_SQL = (
    "SELECT coalesce(sum(self_time), 0) FROM pg_stat_user_functions"
    " WHERE funcname IN ('tp_ledger_balanced', 'tp_ledger_entries_balanced')"
)


def with_database(url: str, name: str) -> str:
    head, _, _ = url.rpartition("/")
    return f"{head}/{name}"


def backend_cpu(pid: int) -> float:
    """Seconds of CPU the PostgreSQL backend ``pid`` has used (user + system)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


async def prepare(url: str) -> list[int]:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("INSERT INTO assets (code, scale, name) VALUES ('USD', 2, 'US dollar')")
        return [
            await conn.fetchval(
                "INSERT INTO accounts (user_id, name, kind, currency) VALUES (NULL, $1, 'house', 'USD') RETURNING id",
                f"bench-{n}",
            )
            for n in range(4)
        ]
    finally:
        await conn.close()


async def run_round(
    conn: asyncpg.Connection, accounts: list[int], commits: int, per_statement: int
) -> tuple[float, float]:
    """Backend CPU and check-function time, both in microseconds per ledger transaction."""
    a, b, c, d = accounts
    txs = [
        LedgerTransaction(
            kind="transfer",
            reference=f"bench-{n}",
            entries=(
                LedgerEntry(a, "USD", Decimal("1.25")),
                LedgerEntry(b, "USD", Decimal("-1.25")),
                LedgerEntry(c, "USD", Decimal("0.50")),
                LedgerEntry(d, "USD", Decimal("-0.50")),
            ),
        )
        for n in range(per_statement)
    ]
    pid = conn.get_server_pid()
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    checks = await conn.fetchval(CHECKS_SQL)
    server = backend_cpu(pid)
    for _ in range(commits):
        async with conn.transaction():
            await ledger.post_many(conn, txs)
    server = backend_cpu(pid) - server
    await asyncio.sleep(0.6)  # function statistics reach the cumulative view when the backend flushes them
    await conn.execute("SELECT pg_stat_force_next_flush()")
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    checks = float(await conn.fetchval(CHECKS_SQL)) - float(checks)
    count = commits * per_statement
    return server / count * 1e6, checks * 1e3 / count


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commits", type=int, default=5000)
    parser.add_argument("--per-statement", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--database-url", default=os.environ.get("TRADEPLANE_TEST_DATABASE_URL"))
    args = parser.parse_args()
    if not args.database_url:
        print("set --database-url or TRADEPLANE_TEST_DATABASE_URL (a server on this machine)", file=sys.stderr)
        return 2
    admin = await asyncpg.connect(with_database(args.database_url, "postgres"))
    names = {label: f"tp_bench_ledger_{uuid.uuid4().hex[:8]}" for label in REVISIONS}
    conns: dict[str, asyncpg.Connection] = {}
    try:
        accounts: dict[str, list[int]] = {}
        for label, revision in REVISIONS.items():
            await admin.execute(f'CREATE DATABASE "{names[label]}"')
            url = with_database(args.database_url, names[label])
            await asyncio.to_thread(upgrade, url, revision)
            accounts[label] = await prepare(url)
            conns[label] = await asyncpg.connect(url)
            await conns[label].execute("SET track_functions = 'pl'")
            await run_round(conns[label], accounts[label], 200, args.per_statement)  # warm the plan caches
        figures: dict[str, list[tuple[float, float]]] = {label: [] for label in REVISIONS}
        for n in range(args.rounds):
            for label in REVISIONS if n % 2 == 0 else reversed(REVISIONS):
                server, checks = await run_round(conns[label], accounts[label], args.commits, args.per_statement)
                figures[label].append((server, checks))
                print(f"round {n + 1} {label}: backend CPU {server:.1f} us, checks {checks:.1f} us per ledger tx")
        summary = {
            label: {
                "backend_cpu_us_per_tx": round(statistics.median(f[0] for f in rows), 1),
                "check_us_per_tx": round(statistics.median(f[1] for f in rows), 1),
            }
            for label, rows in figures.items()
        }
        print(
            json.dumps({"commits": args.commits, "per_statement": args.per_statement, "entries_per_tx": 4, **summary})
        )
    finally:
        for conn in conns.values():
            await conn.close()
        for name in names.values():
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
