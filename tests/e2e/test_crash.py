"""The crash test of issue 3: SIGKILL the engine and the relay while thousands of orders stream in.

Concurrent clients place and cancel orders exactly as the api's transaction does (``submit_order``: order row,
hold and outbox row committed together = acknowledged). The relay and the engine run as real processes
(`tradeplane run relay`, `tradeplane run engine` with two shards) and are killed with SIGKILL mid-stream,
then restarted. Once everything has drained, nothing acknowledged may be missing, nothing may have applied
twice, the money must add up and the books rebuilt from PostgreSQL must be the books the engine published.

NATS and Redis are embedded servers private to this test (the processes use un-namespaced streams);
PostgreSQL is a fresh database on the test server.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import asyncpg
import orjson
import pytest

from tests.integration.test_engine import add_instrument, add_outbox, check_invariants, submit_order
from tradeplane.adapters.bus import create_bus
from tradeplane.adapters.cache import Cache
from tradeplane.adapters.embedded import EmbeddedStack
from tradeplane.adapters.postgres import Database
from tradeplane.domain.orders import OrderStatus, transition
from tradeplane.domain.reservations import shard_for
from tradeplane.entrypoints.workers.engine import EngineWorker, book_snapshot_key
from tradeplane.services import accounts, identity
from tradeplane.services.identity import Role

CLI = [sys.executable, "-m", "tradeplane.entrypoints.cli"]
SHARDS = 2
CLIENTS = 8
ORDERS_PER_CLIENT = 400
INVENTORY = Decimal("100000")
D = Decimal


@pytest.fixture
def private_servers(tmp_path: Path) -> Iterator[dict[str, str]]:
    stack = EmbeddedStack(tmp_path / "servers")
    try:
        yield {"bus_url": stack.start("nats"), "redis_url": stack.start("redis")}
    finally:
        stack.stop()


@dataclass
class Process:
    """One `tradeplane run <what>` process, restartable, its output appended to a log file."""

    what: str
    env: dict[str, str]
    log: Path
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self) -> None:
        self.starts += 1
        with self.log.open("ab") as out:
            out.write(f"--- start {self.starts}\n".encode())
            self.process = subprocess.Popen([*CLI, "run", self.what], env=self.env, stdout=out, stderr=out)

    def kill(self) -> None:
        assert self.process is not None and self.process.poll() is None, f"{self.what} died early:\n{self.tail()}"
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> int:
        """SIGTERM once the process is up (it has logged since its last start: its handler is installed then;
        a process stopped while still importing dies of the signal, which says nothing about a clean stop)."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        deadline = time.monotonic() + 60
        while not self.started_logging() and self.process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)

    def started_logging(self) -> bool:
        last_start = self.log.read_text(errors="replace").rsplit(f"--- start {self.starts}\n", 1)[-1]
        return bool(last_start.strip())

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])


@dataclass
class Market:
    db: Database
    symbols: list[str]
    accounts: list[int]
    seeds: dict[tuple[int, int], Decimal] = field(default_factory=dict)
    acknowledged: list[int] = field(default_factory=list)
    cancels: int = 0
    operations: int = 0


async def open_market(db: Database) -> Market:
    symbols: list[str] = []
    while len({shard_for(s, SHARDS) for s in symbols}) < SHARDS or len(symbols) < SHARDS:
        candidate = f"C{uuid.uuid4().hex[:6].upper()}-USD"
        if shard_for(candidate, SHARDS) not in {shard_for(s, SHARDS) for s in symbols}:
            symbols.append(candidate)
    market = Market(db, symbols, [])
    async with db.transaction("crash.setup") as conn:
        instrument_ids = [await add_instrument(conn, s) for s in symbols]
        for n in range(CLIENTS):
            user_id = await identity.create_user(conn, f"client{n}", Role.TRADER)
            account_id = await accounts.create_account(conn, user_id, "main", "cash")
            await accounts.deposit(conn, account_id, D("100000000"))
            for instrument_id in instrument_ids:  # inventory to sell
                await conn.execute(
                    "INSERT INTO positions (account_id, instrument_id, net_quantity, average_price)"
                    " VALUES ($1, $2, $3, 100)",
                    account_id,
                    instrument_id,
                    INVENTORY,
                )
                market.seeds[(account_id, instrument_id)] = INVENTORY
            market.accounts.append(account_id)
    return market


async def cancel_if_open(conn: asyncpg.Connection, order_id: int) -> bool:
    """DELETE /orders/{id} for an order that may have finished meanwhile (then nothing is sent)."""
    row = await conn.fetchrow(
        "SELECT o.status, o.account_id, i.symbol FROM orders o JOIN instruments i ON i.id = o.instrument_id"
        " WHERE o.id = $1 FOR UPDATE OF o",
        order_id,
    )
    if row["status"] not in ("pending_new", "new", "partially_filled"):
        return False
    status = transition(OrderStatus(row["status"]), OrderStatus.PENDING_CANCEL)
    await conn.execute("UPDATE orders SET status = $2 WHERE id = $1", order_id, status.value)
    payload = {"type": "cancel", "order_id": order_id, "account_id": row["account_id"], "symbol": row["symbol"]}
    await add_outbox(conn, row["symbol"], payload, SHARDS)
    return True


async def client(market: Market, account_id: int, seed: int) -> None:
    rng = random.Random(seed)
    mine: list[int] = []
    for _ in range(ORDERS_PER_CLIENT):
        roll = rng.random()
        market.operations += 1
        async with market.db.transaction("crash.client") as conn:
            if roll < 0.15 and mine:
                if await cancel_if_open(conn, rng.choice(mine)):
                    market.cancels += 1
                continue
            symbol = rng.choice(market.symbols)
            side = rng.choice(("buy", "sell"))
            qty = str(D(rng.randint(1, 50)) / 100)
            if roll < 0.25:
                order_id = await submit_order(
                    conn,
                    account_id=account_id,
                    symbol=symbol,
                    side=side,
                    qty=qty,
                    order_type="market",
                    shards=SHARDS,
                )
            else:
                ticks = rng.randint(-40, 40) * 5
                price = str(D(10000 + ticks if side == "buy" else 10000 - ticks) / 100)
                order_id = await submit_order(
                    conn, account_id=account_id, symbol=symbol, side=side, qty=qty, price=price, shards=SHARDS
                )
        # the transaction committed: this order is acknowledged
        market.acknowledged.append(order_id)
        mine.append(order_id)
        await asyncio.sleep(0.002)  # a client's think time: the stream lasts long enough to kill into


# Work done since start: by the engine shards (bus sequences applied) and by the relay (rows published).
PROGRESS_SQL = {
    # the shard that has applied least: a kill then lands while every shard is busy
    "engine": f"SELECT CASE WHEN count(*) < {SHARDS} THEN 0 ELSE min(last_sequence) END FROM engine_offsets"
    " WHERE consumer NOT LIKE '%.commands'",
    "relay": "SELECT count(*) FROM outbox WHERE published_at IS NOT NULL",
}


async def progress(db: Database, what: str) -> int:
    async with db.connection("crash.progress") as conn:
        return int(await conn.fetchval(PROGRESS_SQL[what]))


async def operations_reach(market: Market, count: float) -> None:
    while market.operations < count:  # noqa: ASYNC110 - the clients advance it; no test hooks in them
        await asyncio.sleep(0.01)


async def wait_for(db: Database, sql: str, what: str, within: float = 120.0) -> None:
    """Poll until the query returns true: readiness, not a timing assertion."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        async with db.connection("crash.wait") as conn:
            if await conn.fetchval(sql):
                return
        await asyncio.sleep(0.2)
    raise AssertionError(f"{what} did not happen within {within:.0f} s")


@pytest.fixture
async def crash_db(database_url: str) -> AsyncIterator[Database]:
    db = Database(database_url, min_size=2, max_size=CLIENTS + 4)
    await db.connect()
    yield db
    await db.close()


async def test_sigkill_of_engine_and_relay_loses_nothing_and_applies_nothing_twice(
    database_url: str, crash_db: Database, private_servers: dict[str, str], tmp_path: Path
) -> None:
    db = crash_db
    bus = create_bus(private_servers["bus_url"])
    await bus.connect()
    await bus.setup(SHARDS)
    await bus.close()
    market = await open_market(db)

    env = {k: v for k, v in os.environ.items() if not k.startswith("TRADEPLANE_")}
    env.update(
        TRADEPLANE_DATABASE_URL=database_url,
        TRADEPLANE_REDIS_URL=private_servers["redis_url"],
        TRADEPLANE_BUS_URL=private_servers["bus_url"],
        TRADEPLANE_ENGINE_SHARDS=str(SHARDS),
        TRADEPLANE_CONNECT_TIMEOUT_S="2",
        TRADEPLANE_DB_POOL_MIN="1",
        TRADEPLANE_DB_POOL_MAX="4",
    )
    engine = Process("engine", env, tmp_path / "engine.log")
    relay = Process("relay", env, tmp_path / "relay.log")
    engine.start()
    relay.start()
    total = CLIENTS * ORDERS_PER_CLIENT

    async def chaos() -> None:
        """Kill mid-stream: once the clients are far enough AND the victims have done work since their start."""
        plan = [(0.2, [engine]), (0.45, [relay]), (0.7, [engine, relay])]
        for fraction, victims in plan:
            marks = {victim.what: await progress(db, victim.what) for victim in victims}
            await operations_reach(market, fraction * total)
            for what, mark in marks.items():
                await wait_for(db, f"SELECT ({PROGRESS_SQL[what]}) > {mark}", f"the {what} getting to work")
            for victim in victims:
                victim.kill()
            await asyncio.sleep(0.5)  # orders keep arriving while they are down
            for victim in victims:
                victim.start()

    try:
        await asyncio.gather(chaos(), *(client(market, account, seed) for seed, account in enumerate(market.accounts)))
        await wait_for(db, "SELECT count(*) = 0 FROM outbox WHERE published_at IS NULL", "the outbox draining")
        await wait_for(
            db,
            "SELECT count(*) = 0 FROM orders WHERE status IN ('pending_new', 'pending_cancel')",
            "the engine applying every command",
        )
        assert engine.process is not None and engine.process.poll() is None, engine.tail()
    finally:
        engine_rc, relay_rc = engine.stop(), relay.stop()
    assert (engine_rc, relay_rc) == (0, 0), f"unclean stop:\n{engine.tail()}\n{relay.tail()}"
    snapshots = await published_books(private_servers["redis_url"], market.symbols)
    assert (engine.starts, relay.starts) == (3, 3)

    async with db.connection("crash.check") as conn:
        # every acknowledged order is there, and the engine decided on each
        trades = await conn.fetchval("SELECT count(*) FROM trades")
        open_orders = await conn.fetch(
            "SELECT i.symbol, count(o.id) FROM instruments i LEFT JOIN orders o ON o.instrument_id = i.id"
            " AND o.status IN ('new', 'partially_filled') WHERE i.symbol = ANY($1::text[]) GROUP BY 1",
            market.symbols,
        )
        print(
            f"\n{len(market.acknowledged)} orders acknowledged, {market.cancels} cancels, {trades} trades,"
            f" open orders {dict((r[0], r[1]) for r in open_orders)}"
        )
        assert len(market.acknowledged) > 2000
        found = await conn.fetch("SELECT id, status FROM orders WHERE id = ANY($1::bigint[])", market.acknowledged)
        assert len(found) == len(set(market.acknowledged))
        assert not [r for r in found if r["status"] in ("pending_new", "pending_cancel")]
        # no duplicate fills: two fills per trade, one trade row per trade id, one ledger transaction each
        trades = await conn.fetchval("SELECT count(*) FROM trades")
        assert trades > 100, "too few trades to mean anything"
        assert await conn.fetchval("SELECT count(*) FROM fills") == 2 * trades
        assert await conn.fetchval("SELECT count(DISTINCT trade_id) FROM trades") == trades
        assert await conn.fetchval("SELECT count(*) FROM ledger_transactions WHERE kind = 'trade'") == trades
        # balanced ledger, balances = entries, holds = open orders' reservations, positions = seed + fills
        await check_invariants(conn, market.seeds)

    # books rebuilt from PostgreSQL by a fresh engine = PostgreSQL's open orders = what the live engine published
    cache = Cache(private_servers["redis_url"])
    bus = create_bus(private_servers["bus_url"])
    try:
        for shard in range(SHARDS):
            fresh = EngineWorker(db, cache, bus, shard=shard, shards=SHARDS)
            await fresh.rebuild()
            for symbol in fresh.engine.symbols:
                if symbol not in market.symbols:
                    continue
                book = fresh.engine.book(symbol)
                async with db.connection("crash.check") as conn:
                    rows = await conn.fetch(
                        "SELECT o.id, o.quantity - o.filled_quantity AS leaves FROM orders o"
                        " JOIN instruments i ON i.id = o.instrument_id WHERE i.symbol = $1"
                        " AND o.status IN ('new', 'partially_filled', 'pending_cancel') ORDER BY o.sequence",
                        symbol,
                    )
                spec = fresh.instruments[symbol].spec
                assert [(s.order_id, spec.lots_to_qty(s.leaves_qty)) for s in book.resting_orders()] == [
                    (r["id"], r["leaves"]) for r in rows
                ]
                bids, asks = book.depth(50)
                as_text = {
                    "bids": [[format(spec.ticks_to_price(p), "f"), format(spec.lots_to_qty(q), "f")] for p, q in bids],
                    "asks": [[format(spec.ticks_to_price(p), "f"), format(spec.lots_to_qty(q), "f")] for p, q in asks],
                }
                published = snapshots[symbol]
                assert {"bids": published["bids"], "asks": published["asks"]} == as_text
    finally:
        await cache.close()


async def published_books(redis_url: str, symbols: list[str]) -> dict[str, dict[str, object]]:
    """The live engine's last book snapshots, once it has caught up (they follow the last commit)."""
    cache = Cache(redis_url)
    try:
        out: dict[str, dict[str, object]] = {}
        for symbol in symbols:
            raw = await cache.client.get(book_snapshot_key(symbol))
            assert raw is not None, f"the engine never published a book for {symbol}"
            out[symbol] = orjson.loads(raw)
        return out
    finally:
        await cache.close()
