"""Engine restart: from PostgreSQL's resting orders back to a book ready to match.

Run:  .venv/bin/python tests/bench/bench_engine_restart.py [--orders N] [--symbols S] [--repeat R]
          [--database-url URL]

The server is --database-url, else TRADEPLANE_TEST_DATABASE_URL, else an embedded PostgreSQL started here. A fresh
database is built by the real migrations and dropped at the end. --orders resting limit orders (half bids below
100.00, half asks above, 1,000 price levels a side, spread over --symbols instruments and 100 accounts) are
written as the engine leaves them (status new, ``sequence`` = time priority). Measured, best of --repeat: a
fresh ``EngineWorker.rebuild()`` (read the open orders and instruments, convert to ticks and lots, restore every
book with time priority), i.e. engine start to ready-to-match. Then, untimed, one crossing order is matched to
show the books really are ready. The issue's target is under 5 s for 100,000 orders. Prints one line per
figure and a one-line JSON summary. Not a test: no assertions on the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg

from tradeplane.adapters.bus import create_bus
from tradeplane.adapters.cache import Cache
from tradeplane.adapters.db.migrate import upgrade
from tradeplane.adapters.postgres import Database
from tradeplane.domain.matching import NewOrder, OrderAccepted
from tradeplane.domain.orders import OrderType, Side
from tradeplane.entrypoints.workers.engine import EngineWorker
from tradeplane.services import accounts, demo, identity
from tradeplane.services.identity import Role

ACCOUNTS = 100
LEVELS = 1000


def with_database(url: str, name: str) -> str:
    head, _, _ = url.rpartition("/")
    return f"{head}/{name}"


async def load_orders(db: Database, orders: int, symbols: list[str]) -> None:
    async with db.transaction("bench.setup") as conn:
        await demo.load_reference_data(conn)
        instrument_ids = []
        for symbol in symbols:
            instrument_ids.append(
                await conn.fetchval(
                    "INSERT INTO instruments (symbol, base_asset, quote_asset, tick_size, lot_size, min_qty, max_qty,"
                    " price_band_pct, reference_price, maker_fee_rate, taker_fee_rate, margin_rate, status)"
                    " VALUES ($1, 'BTC', 'USD', 0.01, 0.0001, 0.0001, 1000, 50, 100, 0.0002, 0.0005, 0.1, 'open')"
                    " RETURNING id",
                    symbol,
                )
            )
        account_ids = []
        for n in range(ACCOUNTS):
            user_id = await identity.create_user(conn, f"bench{n}", Role.TRADER)
            account_ids.append(await accounts.create_account(conn, user_id, "main", "margin"))
        # Order i: instrument i % S, account i % A, bid when i is even (below 100.00) else ask (above), at one of
        # LEVELS prices per side; time priority in order of i, as if each had been its own command.
        await conn.execute(
            "INSERT INTO orders (account_id, instrument_id, side, type, time_in_force, quantity, price, status,"
            " sequence, hold_price)"
            " SELECT a[1 + i % array_length(a, 1)], s[1 + i % array_length(s, 1)],"
            " CASE WHEN i % 2 = 0 THEN 'buy' ELSE 'sell' END, 'limit', 'gtc', 0.0100 + (i % 7) * 0.0001,"
            " p, 'new', (i + 1)::bigint << 20, p"
            " FROM (SELECT $1::bigint[] AS a, $2::bigint[] AS s) AS ids, generate_series(0, $3 - 1) AS i,"
            " LATERAL (SELECT CASE WHEN i % 2 = 0 THEN 99.99 - ((i / 2) % $4) * 0.01"
            "                      ELSE 100.01 + ((i / 2) % $4) * 0.01 END AS p) AS price",
            account_ids,
            instrument_ids,
            orders,
            LEVELS,
        )
    async with db.connection("bench.analyze") as conn:
        await conn.execute("VACUUM ANALYZE orders")


async def bench(url: str, orders: int, symbols: int, repeat: int) -> dict[str, object]:
    name = f"tp_bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(with_database(url, "postgres"))
    await admin.execute(f'CREATE DATABASE "{name}"')
    db_url = with_database(url, name)
    db = Database(db_url, min_size=1, max_size=2, timeout=30)
    try:
        await asyncio.to_thread(upgrade, db_url)
        await db.connect()
        names = [f"BENCH{k}-USD" for k in range(symbols)]
        started = time.perf_counter()
        await load_orders(db, orders, names)
        print(f"loaded {orders:,} resting orders on {symbols} symbol(s) in {time.perf_counter() - started:.1f} s")
        # Never connected: rebuilding touches PostgreSQL only (Redis and the bus come after ready).
        cache, bus = Cache("redis://127.0.0.1:1/0"), create_bus("nats://127.0.0.1:1")
        times = []
        worker = EngineWorker(db, cache, bus, shard=0, shards=1)
        for _ in range(repeat):
            worker = EngineWorker(db, cache, bus, shard=0, shards=1)
            started = time.perf_counter()
            await worker.rebuild()
            times.append(time.perf_counter() - started)
        resting = sum(len(worker.engine.book(s)) for s in names)
        book = worker.engine.book(names[0])
        assert book.best_ask is not None
        events = worker.engine.process(
            NewOrder(
                seq=worker.command_seq + 1,
                ts_ns=time.time_ns(),
                symbol=names[0],
                order_id=10**12,
                account_id=10**12,
                side=Side.BUY,
                order_type=OrderType.LIMIT,
                qty=1000,
                price=book.best_ask,
            )
        )
        matched = sum(1 for e in events if not isinstance(e, OrderAccepted))
    finally:
        await db.close()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    best = min(times)
    print(f"engine rebuild to ready-to-match: best {best:.3f} s of {repeat} ({', '.join(f'{t:.3f}' for t in times)})")
    print(
        f"  {resting:,} orders in the books, {resting / best:,.0f} orders/s;"
        f" a crossing order then gave {matched} event(s)"
    )
    return {
        "benchmark": "engine_restart",
        "orders": orders,
        "symbols": symbols,
        "resting_after_rebuild": resting,
        "rebuild_s_best": round(best, 4),
        "rebuild_s_all": [round(t, 4) for t in times],
        "orders_per_s": round(resting / best),
        "python": platform.python_version(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--orders", type=int, default=100_000)
    parser.add_argument("--symbols", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--database-url", default=os.environ.get("TRADEPLANE_TEST_DATABASE_URL"))
    args = parser.parse_args()
    url = args.database_url
    stack = None
    if not url:
        from tradeplane.adapters.embedded import EmbeddedStack

        stack = EmbeddedStack(Path(tempfile.mkdtemp(prefix="tradeplane-bench-")))
        url = stack.start("postgres")
    try:
        summary = asyncio.run(bench(url, args.orders, args.symbols, args.repeat))
    finally:
        if stack is not None:
            stack.stop()
    print(json.dumps(summary))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
