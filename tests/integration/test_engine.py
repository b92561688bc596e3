"""The engine shard worker against real PostgreSQL, Redis and both buses.

Orders enter exactly as the api's transaction puts them (order row pending_new + hold + outbox row, see
``submit_order``); the real relay publishes them and the real worker matches and settles them. Each test gets
its own database, bus namespace and instrument symbol (so Redis channels never cross between tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import Any

import asyncpg
import orjson
import pytest

from tests.conftest import create_database, drop_database, with_database
from tradeplane.adapters.bus import Delivery, MessageBus, create_bus
from tradeplane.adapters.cache import Cache
from tradeplane.adapters.postgres import Database
from tradeplane.bootstrap import Platform, build_platform
from tradeplane.config import Settings
from tradeplane.domain.orders import OPEN_STATUSES, OrderStatus, OrderType, Side, TimeInForce, transition
from tradeplane.domain.reservations import reservation, shard_for
from tradeplane.domain.risk import OrderTerms
from tradeplane.entrypoints.workers.engine import EngineWorker, book_snapshot_key, commands_of
from tradeplane.services import accounts, demo, identity
from tradeplane.services.identity import Principal, Role
from tradeplane.services.orders import OrderEntry, OrderRequest, Placement
from tradeplane.services.relay import OutboxRelay

D = Decimal

# --------------------------------------------------------------------------------- the api's transaction


async def add_instrument(conn: asyncpg.Connection, symbol: str, reference: str = "100.00") -> int:
    """A BTC/USD-like instrument under a unique symbol: tick 0.01, lot 0.0001, band 10 %, fees 2/5 bp."""
    await demo.load_reference_data(conn)
    instrument_id: int = await conn.fetchval(
        "INSERT INTO instruments (symbol, base_asset, quote_asset, tick_size, lot_size, min_qty, max_qty,"
        " price_band_pct, reference_price, maker_fee_rate, taker_fee_rate, margin_rate, status, session_close_utc)"
        " VALUES ($1, 'BTC', 'USD', 0.01, 0.0001, 0.0001, 1000, 10, $2::numeric, 0.0002, 0.0005, 0.10, 'open',"
        " '21:00') RETURNING id",
        symbol,
        D(reference),
    )
    return instrument_id


async def submit_order(
    conn: asyncpg.Connection,
    *,
    account_id: int,
    symbol: str,
    side: str,
    qty: str,
    price: str | None = None,
    order_type: str = "limit",
    stop_price: str | None = None,
    tif: str = "gtc",
    expire_at: datetime | None = None,
    post_only: bool = False,
    stp: str = "cancel_newest",
    shards: int = 1,
) -> int:
    """What the api does for POST /orders once risk passed: order row (pending_new, hold_price), hold row and
    outbox row, in the caller's transaction."""
    inst = await conn.fetchrow(
        "SELECT i.*, a.scale AS quote_scale FROM instruments i JOIN assets a ON a.code = i.quote_asset"
        " WHERE symbol = $1",
        symbol,
    )
    kind = await conn.fetchval("SELECT kind FROM accounts WHERE id = $1", account_id)
    if order_type in ("limit", "stop_limit"):
        assert price is not None
        hold_price = D(price)
    else:
        reference = inst["last_price"] or inst["reference_price"]
        band = inst["price_band_pct"] / 100
        tick = inst["tick_size"]
        if side == "buy":
            hold_price = (reference * (1 + band) / tick).to_integral_value(ROUND_FLOOR) * tick
        else:
            hold_price = (reference * (1 - band) / tick).to_integral_value(ROUND_CEILING) * tick
    reserve = reservation(
        side=Side(side),
        account_kind=kind,
        leaves_qty=D(qty),
        hold_price=hold_price,
        maker_fee_rate=inst["maker_fee_rate"],
        taker_fee_rate=inst["taker_fee_rate"],
        margin_rate=inst["margin_rate"],
        base_asset=inst["base_asset"],
        quote_asset=inst["quote_asset"],
        quote_scale=inst["quote_scale"],
    )
    order_id: int = await conn.fetchval(
        "INSERT INTO orders (account_id, instrument_id, side, type, time_in_force, quantity, price, stop_price,"
        " expire_at, post_only, stp_mode, status, hold_price)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, 'pending_new', $12) RETURNING id",
        account_id,
        inst["id"],
        side,
        order_type,
        tif,
        D(qty),
        None if price is None else D(price),
        None if stop_price is None else D(stop_price),
        expire_at,
        post_only,
        stp,
        hold_price,
    )
    if reserve.amount > 0:
        await conn.execute(
            "INSERT INTO holds (account_id, asset, amount, order_id) VALUES ($1, $2, $3, $4)",
            account_id,
            reserve.asset,
            reserve.amount,
            order_id,
        )
    payload = {
        "type": "new",
        "order_id": order_id,
        "account_id": account_id,
        "symbol": symbol,
        "side": side,
        "order_type": order_type,
        "qty": qty,
        "price": price,
        "stop_price": stop_price,
        "time_in_force": tif,
        "expire_at": None if expire_at is None else expire_at.isoformat(),
        "post_only": post_only,
        "stp": stp,
    }
    await add_outbox(conn, symbol, payload, shards)
    return order_id


async def add_outbox(conn: asyncpg.Connection, symbol: str, payload: dict[str, Any], shards: int = 1) -> None:
    await conn.execute(
        "INSERT INTO outbox (stream, key, payload) VALUES ($1, $2, $3::jsonb)",
        f"orders.{shard_for(symbol, shards)}",
        symbol,
        orjson.dumps(payload).decode(),
    )


async def request_cancel(conn: asyncpg.Connection, order_id: int, shards: int = 1) -> None:
    """DELETE /orders/{id}: pending_cancel through the transition table, then a cancel command."""
    row = await conn.fetchrow(
        "SELECT o.status, o.account_id, i.symbol FROM orders o JOIN instruments i ON i.id = o.instrument_id"
        " WHERE o.id = $1 FOR UPDATE OF o",
        order_id,
    )
    status = transition(OrderStatus(row["status"]), OrderStatus.PENDING_CANCEL)
    await conn.execute("UPDATE orders SET status = $2, updated_at = now() WHERE id = $1", order_id, status.value)
    payload = {"type": "cancel", "order_id": order_id, "account_id": row["account_id"], "symbol": row["symbol"]}
    await add_outbox(conn, row["symbol"], payload, shards)


async def request_modify(
    conn: asyncpg.Connection, order_id: int, *, new_qty: str | None = None, new_price: str | None = None
) -> None:
    """PATCH /orders/{id}: the api raises the hold if the new reservation is larger, the engine does the rest."""
    row = await conn.fetchrow(
        "SELECT o.*, i.symbol, i.maker_fee_rate, i.taker_fee_rate, i.margin_rate, i.base_asset, i.quote_asset,"
        " a.kind FROM orders o JOIN instruments i ON i.id = o.instrument_id JOIN accounts a ON a.id = o.account_id"
        " WHERE o.id = $1 FOR UPDATE OF o",
        order_id,
    )
    qty = D(new_qty) if new_qty is not None else row["quantity"]
    price = D(new_price) if new_price is not None else row["hold_price"]
    wanted = reservation(
        side=Side(row["side"]),
        account_kind=row["kind"],
        leaves_qty=qty - row["filled_quantity"],
        hold_price=price,
        maker_fee_rate=row["maker_fee_rate"],
        taker_fee_rate=row["taker_fee_rate"],
        margin_rate=row["margin_rate"],
        base_asset=row["base_asset"],
        quote_asset=row["quote_asset"],
        quote_scale=2,
    )
    await conn.execute(
        "UPDATE holds SET amount = GREATEST(amount, $2) WHERE order_id = $1 AND released_at IS NULL",
        order_id,
        wanted.amount,
    )
    payload = {
        "type": "modify",
        "order_id": order_id,
        "account_id": row["account_id"],
        "symbol": row["symbol"],
        "new_qty": new_qty,
        "new_price": new_price,
    }
    await add_outbox(conn, row["symbol"], payload)


# ------------------------------------------------------------------------------------------- invariants


def _reserved(o: asyncpg.Record, leaves: Decimal, hold_price: Decimal) -> Decimal:
    """``reservation`` of ``leaves`` of the order ``o`` (a row of ``check_invariants``) at ``hold_price``."""
    return reservation(
        side=Side(o["side"]),
        account_kind=o["kind"],
        leaves_qty=leaves,
        hold_price=hold_price,
        maker_fee_rate=o["maker_fee_rate"],
        taker_fee_rate=o["taker_fee_rate"],
        margin_rate=o["margin_rate"],
        base_asset=o["base_asset"],
        quote_asset=o["quote_asset"],
        quote_scale=o["scale"],
        reduce_only=o["reduce_only"],
    ).amount


async def check_invariants(conn: asyncpg.Connection, seeds: dict[tuple[int, int], Decimal] | None = None) -> None:
    """The money invariants of the issue, over the whole database."""
    unbalanced = await conn.fetch(
        "SELECT transaction_id, asset, sum(amount) FROM ledger_entries GROUP BY 1, 2 HAVING sum(amount) <> 0"
    )
    assert unbalanced == [], f"unbalanced ledger transactions: {unbalanced}"
    drift = await conn.fetch(
        "SELECT coalesce(b.account_id, e.account_id) AS account_id, b.amount, e.total FROM balances b"
        " FULL JOIN (SELECT account_id, asset, sum(amount) AS total FROM ledger_entries GROUP BY 1, 2) e"
        " ON e.account_id = b.account_id AND e.asset = b.asset"
        " WHERE b.amount IS DISTINCT FROM e.total"
    )
    assert drift == [], f"balances differ from the sum of their entries: {drift}"
    negative = await conn.fetch(
        "SELECT b.account_id, b.asset, b.amount FROM balances b JOIN accounts a ON a.id = b.account_id"
        " WHERE a.kind = 'cash' AND b.amount < 0"
    )
    assert negative == [], f"cash accounts below zero: {negative}"
    orders = await conn.fetch(
        "SELECT o.id, o.side, o.type, o.status, o.quantity, o.price, o.filled_quantity, o.hold_price, a.kind,"
        " i.maker_fee_rate, i.taker_fee_rate, i.margin_rate, i.base_asset, i.quote_asset, q.scale, o.reduce_only,"
        " o.modifies_requested, o.modifies_done,"
        " (SELECT coalesce(sum(amount), 0) FROM holds h WHERE h.order_id = o.id AND h.released_at IS NULL) AS held,"
        " (SELECT count(*) FROM holds h WHERE h.order_id = o.id AND h.released_at IS NULL) AS active,"
        " (SELECT coalesce(sum(quantity), 0) FROM fills f WHERE f.order_id = o.id) AS fill_qty"
        " FROM orders o JOIN accounts a ON a.id = o.account_id JOIN instruments i ON i.id = o.instrument_id"
        " JOIN assets q ON q.code = i.quote_asset"
    )
    # The client modifies the api sent and the engine has not processed yet, from the outbox, in their order.
    in_flight: dict[int, list[asyncpg.Record]] = {}
    for m in await conn.fetch(
        "SELECT (x.payload->>'order_id')::bigint AS order_id, (x.payload->>'modify_no')::int AS modify_no,"
        " x.payload->>'new_qty' AS new_qty, x.payload->>'new_price' AS new_price FROM outbox x"
        " JOIN orders o ON o.id = (x.payload->>'order_id')::bigint WHERE x.payload->>'type' = 'modify'"
        " AND (x.payload->>'modify_no')::int > o.modifies_done ORDER BY 2"
    ):
        in_flight.setdefault(m["order_id"], []).append(m)
    for o in orders:
        assert o["fill_qty"] == o["filled_quantity"], f"order {o['id']}: fills do not add up to filled_quantity"
        if OrderStatus(o["status"]) in OPEN_STATUSES and o["modifies_requested"] > o["modifies_done"]:
            # Client modifies in flight: the engine will apply or refuse each in turn with no funds check, and
            # until then fills come at the current terms. Whichever it refuses, the order ends with a quantity
            # and a price among those of its terms now and of the modifies: the hold covers the largest of each
            # (a price is the limit, or a market or stop order's protection), whatever it keeps beyond that.
            modifies = in_flight.get(o["id"], [])
            assert [m["modify_no"] for m in modifies] == list(
                range(o["modifies_done"] + 1, o["modifies_requested"] + 1)
            ), f"order {o['id']}: the outbox does not hold its modifies in flight"
            qty = max([o["quantity"], *(D(m["new_qty"]) for m in modifies if m["new_qty"] is not None)])
            price = max([o["price"] or o["hold_price"], *(D(m["new_price"]) for m in modifies if m["new_price"])])
            need = _reserved(o, max(qty - o["filled_quantity"], D(0)), price)
            assert o["held"] >= need, (
                f"order {o['id']} holds {o['held']} with modifies in flight; {qty} at {price} reserves {need}"
            )
        else:  # at rest: exactly what the order's terms reserve, nothing once it is finished
            expected = D(0)
            if OrderStatus(o["status"]) in OPEN_STATUSES:
                expected = _reserved(o, o["quantity"] - o["filled_quantity"], o["hold_price"])
            assert o["held"] == expected, f"order {o['id']} ({o['status']}) holds {o['held']}, reserves {expected}"
        assert o["active"] <= 1, f"order {o['id']} has {o['active']} active holds"
    # Holds, fills and ledger entries reach accounts and instruments through their orders and balances, not keys
    # of their own (migration 0015): each must name its order's account (and instrument), or an account that has
    # a balance in the asset. Orders and entries name their instrument and ledger transaction without a key
    # (0017): each must exist.
    strays = await conn.fetch(
        "SELECT 'hold' AS kind, h.id FROM holds h JOIN orders o ON o.id = h.order_id WHERE h.account_id <> o.account_id"
        " UNION ALL SELECT 'fill', f.id FROM fills f JOIN orders o ON o.id = f.order_id"
        " WHERE (f.account_id, f.instrument_id) <> (o.account_id, o.instrument_id)"
        " UNION ALL SELECT 'entry', e.id FROM ledger_entries e WHERE NOT EXISTS"
        " (SELECT FROM balances b WHERE b.account_id = e.account_id AND b.asset = e.asset)"
        " UNION ALL SELECT 'order', o.id FROM orders o WHERE o.instrument_id IS NOT NULL AND NOT EXISTS"
        " (SELECT FROM instruments i WHERE i.id = o.instrument_id)"
        " UNION ALL SELECT 'entry', e.id FROM ledger_entries e WHERE NOT EXISTS"
        " (SELECT FROM ledger_transactions t WHERE t.id = e.transaction_id)"
    )
    assert strays == [], f"rows whose references are missing or not their order's or balance's: {strays}"
    fills_per_trade = await conn.fetch(
        "SELECT trade_id, count(*), array_agg(liquidity ORDER BY liquidity) AS sides FROM fills GROUP BY 1"
    )
    for t in fills_per_trade:
        assert list(t["sides"]) == ["maker", "taker"], f"trade {t['trade_id']} has fills {t['sides']}"
    net_from_fills = await conn.fetch(
        "SELECT account_id, instrument_id,"
        " sum(CASE WHEN side = 'buy' THEN quantity ELSE -quantity END) AS net FROM fills GROUP BY 1, 2"
    )
    expected_net = dict(seeds or {})
    for r in net_from_fills:
        key = (r["account_id"], r["instrument_id"])
        expected_net[key] = expected_net.get(key, D(0)) + r["net"]
    positions = {
        (r["account_id"], r["instrument_id"]): r["net_quantity"]
        for r in await conn.fetch("SELECT account_id, instrument_id, net_quantity FROM positions")
    }
    for key, net in expected_net.items():
        assert positions.get(key, D(0)) == net, f"position {key} is {positions.get(key)}, fills say {net}"
    fee_total = await conn.fetchval("SELECT coalesce(sum(fee), 0) FROM fills")
    fee_balance = await conn.fetchval(
        "SELECT coalesce(sum(b.amount), 0) FROM balances b JOIN accounts a ON a.id = b.account_id"
        " WHERE a.name LIKE 'house:fees:%'"
    )
    assert fee_balance == fee_total, "the house fee account did not receive exactly the fees charged"


# ------------------------------------------------------------------------------------------------ harness


class FakeClock:
    """The engine's injected clock: time moves only when the test says so."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


@dataclass
class Desk:
    """One test's platform slice: database, Redis, a namespaced bus, the relay and an engine worker."""

    db: Database
    cache: Cache
    bus: MessageBus
    symbol: str
    instrument_id: int
    clock: FakeClock
    relay: OutboxRelay
    worker: EngineWorker
    seeds: dict[tuple[int, int], Decimal] = field(default_factory=dict)
    published: int = 0
    consumed: int = 0

    def new_worker(self) -> EngineWorker:
        return EngineWorker(self.db, self.cache, self.bus, clock=self.clock, fetch_timeout=0.5)

    async def trader(self, name: str, *, kind: str = "cash", cash: str = "100000", base: str | None = None) -> Trader:
        async with self.db.transaction("test.trader") as conn:
            user_id = await identity.create_user(conn, f"{name}-{uuid.uuid4().hex[:6]}", Role.TRADER)
            account_id = await accounts.create_account(conn, user_id, "main", kind)
            await accounts.deposit(conn, account_id, D(cash))
            if base is not None:  # inventory to sell: a position bought before the test
                await conn.execute(
                    "INSERT INTO positions (account_id, instrument_id, net_quantity, average_price)"
                    " VALUES ($1, $2, $3, 100)",
                    account_id,
                    self.instrument_id,
                    D(base),
                )
                self.seeds[(account_id, self.instrument_id)] = D(base)
        return Trader(self, user_id, account_id)

    async def pump(self) -> None:
        """Relay every outbox row, then let the engine apply them all (one batch at a time)."""
        await self.relay_all()
        await self.settle_published()

    async def relay_all(self) -> None:
        """Publish every committed outbox row to the bus; the engine has not run them yet."""
        while published := await self.relay.publish_pending():
            self.published += published

    async def settle_published(self) -> None:
        """Let the engine apply what is on the bus now, and nothing committed to the outbox since."""
        while self.consumed < self.published:
            self.consumed += await self.worker.step()

    async def order(self, order_id: int) -> asyncpg.Record:
        async with self.db.connection("test") as conn:
            row = await conn.fetchrow("SELECT * FROM orders WHERE id = $1", order_id)
        assert row is not None
        return row

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        async with self.db.connection("test") as conn:
            return list(await conn.fetch(sql, *args))

    async def value(self, sql: str, *args: Any) -> Any:
        async with self.db.connection("test") as conn:
            return await conn.fetchval(sql, *args)

    async def held(self, order_id: int) -> Decimal:
        return D(
            await self.value(
                "SELECT coalesce(sum(amount), 0) FROM holds WHERE order_id = $1 AND released_at IS NULL", order_id
            )
        )

    async def check(self) -> None:
        async with self.db.connection("test") as conn:
            await check_invariants(conn, self.seeds)


@dataclass
class Trader:
    desk: Desk
    user_id: int
    account_id: int

    @property
    def principal(self) -> Principal:
        return Principal(self.user_id, f"user{self.user_id}", Role.TRADER)

    async def place(self, side: str, qty: str, price: str | None = None, **options: Any) -> int:
        async with self.desk.db.transaction("test.place") as conn:
            return await submit_order(
                conn, account_id=self.account_id, symbol=self.desk.symbol, side=side, qty=qty, price=price, **options
            )

    async def submit(
        self,
        side: str,
        qty: str,
        price: str | None = None,
        *,
        order_type: str = "limit",
        stop_price: str | None = None,
        tif: str = "gtc",
    ) -> int:
        """POST /orders through the real order entry: shape check, band, pre-trade risk and the hold as the api
        computes them (``place`` imitates the api's transaction with a simpler hold)."""
        terms = OrderTerms(
            side=Side(side),
            order_type=OrderType(order_type),
            quantity=D(qty),
            price=None if price is None else D(price),
            stop_price=None if stop_price is None else D(stop_price),
            time_in_force=TimeInForce(tif),
        )
        async with self.desk.db.transaction("test.submit") as conn:
            placement = await OrderEntry(self.desk.cache, shards=1).place_order(
                conn, self.principal, OrderRequest(self.account_id, self.desk.symbol, terms)
            )
        assert placement.rejection is None and placement.order is not None, placement.rejection
        return placement.order.id

    async def cancel(self, order_id: int) -> None:
        async with self.desk.db.transaction("test.cancel") as conn:
            await request_cancel(conn, order_id)

    async def modify(self, order_id: int, **change: str) -> None:
        async with self.desk.db.transaction("test.modify") as conn:
            await request_modify(conn, order_id, **change)

    async def amend(self, order_id: int, *, price: str) -> None:
        """PATCH /orders/{id} through the real order entry, which raises the hold price before the engine runs."""
        principal = Principal(self.user_id, f"user{self.user_id}", Role.TRADER)
        async with self.desk.db.transaction("test.amend") as conn:
            amendment = await OrderEntry(self.desk.cache, shards=1).modify_order(
                conn, principal, order_id, price=D(price)
            )
        assert amendment.rejection is None, amendment.rejection

    async def position(self) -> asyncpg.Record | None:
        rows = await self.desk.fetch(
            "SELECT * FROM positions WHERE account_id = $1 AND instrument_id = $2",
            self.account_id,
            self.desk.instrument_id,
        )
        return rows[0] if rows else None

    async def cash(self) -> Decimal:
        return D(
            await self.desk.value(
                "SELECT coalesce(sum(amount), 0) FROM balances WHERE account_id = $1 AND asset = 'USD'",
                self.account_id,
            )
        )


T0 = datetime(2026, 3, 2, 14, 30, tzinfo=UTC)


@pytest.fixture
async def desk(database_url: str, redis_url: str, bus_url: str) -> AsyncIterator[Desk]:
    bus = create_bus(bus_url, namespace=f"t{uuid.uuid4().hex[:8]}")
    db = Database(database_url, min_size=1, max_size=4)
    cache = Cache(redis_url)
    await db.connect()
    await cache.connect()
    await bus.connect()
    symbol = f"T{uuid.uuid4().hex[:8].upper()}-USD"
    try:
        await bus.setup(1)
        async with db.transaction("test.instrument") as conn:
            instrument_id = await add_instrument(conn, symbol)
        clock = FakeClock(T0)
        worker = EngineWorker(db, cache, bus, clock=clock, fetch_timeout=0.5)
        await worker.rebuild()
        desk = Desk(db, cache, bus, symbol, instrument_id, clock, OutboxRelay(db, bus), worker)
        yield desk
        await desk.worker.close()
        await desk.check()
    finally:
        await cache.client.delete(book_snapshot_key(symbol))
        await bus.destroy(1)
        await bus.close()
        await cache.close()
        await db.close()


# --------------------------------------------------------------------------------------------------- tests


def cash_buy_hold(qty: str, price: str) -> D:
    """What a cash account's buy of ``qty`` at ``price`` reserves on the test instrument (fees 2/5 bp)."""
    return reservation(
        side=Side.BUY,
        account_kind="cash",
        leaves_qty=D(qty),
        hold_price=D(price),
        maker_fee_rate=D("0.0002"),
        taker_fee_rate=D("0.0005"),
        margin_rate=D("0.10"),
        base_asset="BTC",
        quote_asset="USD",
        quote_scale=2,
    ).amount


async def test_crossing_order_fills_at_the_makers_price_with_deterministic_ids(desk: Desk) -> None:
    seller = await desk.trader("seller", base="5")
    buyer = await desk.trader("buyer")
    resting = await seller.place("sell", "1", "100.00")
    await desk.pump()
    assert (await desk.order(resting))["status"] == "new"
    crossing = await buyer.place("buy", "0.4", "101.00")
    await desk.pump()

    # command 1 was the resting sell, command 2 the crossing buy: trade id {symbol}-{seq}-{match}
    trade_id = f"{desk.symbol}-2-1"
    fills = await desk.fetch("SELECT * FROM fills ORDER BY fill_id")
    assert [(f["fill_id"], f["order_id"], f["liquidity"]) for f in fills] == [
        (f"{trade_id}-M", resting, "maker"),
        (f"{trade_id}-T", crossing, "taker"),
    ]
    assert all(f["price"] == D("100") and f["quantity"] == D("0.4") and f["trade_id"] == trade_id for f in fills)
    # fees: maker 40 x 0.0002 = 0.008 -> 0.00 (toward zero, so pieces never cost more than the hold), taker 40 x
    # 0.0005 = 0.02
    assert [f["fee"] for f in fills] == [D("0.00"), D("0.02")]
    maker, taker = await desk.order(resting), await desk.order(crossing)
    assert (maker["status"], maker["filled_quantity"], maker["average_fill_price"]) == (
        "partially_filled",
        D("0.4"),
        D("100"),
    )
    assert (taker["status"], taker["filled_quantity"]) == ("filled", D("0.4"))
    assert await buyer.cash() == D("100000") - D("40") - D("0.02")
    assert await seller.cash() == D("100000") + D("40")  # the maker fee 0.008 rounds toward zero
    buyer_position = await buyer.position()
    assert buyer_position is not None
    assert (buyer_position["net_quantity"], buyer_position["average_price"]) == (D("0.4"), D("100"))
    seller_position = await seller.position()
    assert seller_position is not None and seller_position["net_quantity"] == D("4.6")
    trade = await desk.fetch("SELECT * FROM trades")
    assert [(t["trade_id"], t["buy_order_id"], t["sell_order_id"], t["aggressor_side"]) for t in trade] == [
        (trade_id, crossing, resting, "buy")
    ]
    assert await desk.value("SELECT last_price FROM instruments WHERE id = $1", desk.instrument_id) == D("100")
    # the seller's hold shrank to the 0.6 still offered; the buyer's is released
    assert await desk.held(resting) == D("0.6")
    assert await desk.held(crossing) == 0
    await desk.check()


async def test_partial_fills_walk_the_book_and_the_rest_rests(desk: Desk) -> None:
    seller = await desk.trader("seller", base="5")
    buyer = await desk.trader("buyer")
    first = await seller.place("sell", "0.3", "99.00")
    second = await seller.place("sell", "0.3", "100.00")
    bid = await buyer.place("buy", "1", "100.00")
    await desk.pump()
    assert [(r["status"], r["filled_quantity"]) for r in [await desk.order(i) for i in (first, second, bid)]] == [
        ("filled", D("0.3")),
        ("filled", D("0.3")),
        ("partially_filled", D("0.6")),
    ]
    taker = await desk.order(bid)
    assert taker["average_fill_price"] == D("99.5")
    # the remaining 0.4 rests at 100.00 and keeps 0.4 x 100 x (1 + 0.0005) reserved
    assert await desk.held(bid) == D("40.02")
    assert desk.worker.engine.book(desk.symbol).depth() == ([(10000, 4000)], [])
    await desk.check()


async def test_cancel_releases_the_hold(desk: Desk) -> None:
    buyer = await desk.trader("buyer")
    bid = await buyer.place("buy", "2", "90.00")
    await desk.pump()
    assert await desk.held(bid) == D("180.09")
    await buyer.cancel(bid)
    assert (await desk.order(bid))["status"] == "pending_cancel"
    await desk.pump()
    assert (await desk.order(bid))["status"] == "canceled"
    assert await desk.held(bid) == 0
    assert desk.worker.engine.book(desk.symbol).depth() == ([], [])
    await desk.check()


async def test_market_order_remainder_is_canceled_and_its_hold_released(desk: Desk) -> None:
    seller = await desk.trader("seller", base="1")
    buyer = await desk.trader("buyer")
    ask = await seller.place("sell", "0.2", "101.00")
    market = await buyer.place("buy", "0.5", order_type="market")
    await desk.pump()
    row = await desk.order(market)
    assert (row["status"], row["filled_quantity"], row["average_fill_price"]) == ("canceled", D("0.2"), D("101"))
    assert (await desk.order(ask))["status"] == "filled"
    assert await desk.held(market) == 0
    assert await buyer.cash() == D("100000") - D("20.20") - D("0.01")
    await desk.check()


async def test_market_order_with_no_liquidity_within_its_band_is_rejected_no_liquidity(desk: Desk) -> None:
    seller = await desk.trader("seller", base="1")
    buyer = await desk.trader("buyer")
    lonely = await buyer.place("buy", "0.5", order_type="market")  # the book is empty
    await seller.place("sell", "0.1", "115.00")  # beyond the 10 % band the next market order is held for
    beyond = await buyer.place("buy", "0.5", order_type="market")
    await desk.pump()
    for order_id in (lonely, beyond):
        row = await desk.order(order_id)
        assert (row["status"], row["reject_reason"], row["filled_quantity"]) == ("rejected", "no_liquidity", 0)
        assert await desk.held(order_id) == 0
    await desk.check()


async def test_market_order_never_pays_beyond_its_hold_price(desk: Desk) -> None:
    seller = await desk.trader("seller", base="1")
    buyer = await desk.trader("buyer")
    cheap = await seller.place("sell", "0.1", "105.00")
    dear = await seller.place("sell", "0.1", "115.00")  # beyond the 10 % band the market order was held for
    market = await buyer.place("buy", "0.2", order_type="market")
    await desk.pump()
    assert (await desk.order(cheap))["status"] == "filled"
    assert (await desk.order(dear))["status"] == "new"
    row = await desk.order(market)
    assert (row["status"], row["filled_quantity"]) == ("canceled", D("0.1"))
    await desk.check()


async def test_realized_pnl_on_reduce_and_flip(desk: Desk) -> None:
    trader = await desk.trader("trader", kind="margin")
    street = await desk.trader("street", kind="margin")
    await street.place("sell", "1", "100.00")
    await trader.place("buy", "1", "100.00")
    await desk.pump()
    await street.place("buy", "0.4", "110.00")
    await trader.place("sell", "0.4", "110.00")  # reduce: +0.4 x 10
    await desk.pump()
    position = await trader.position()
    assert position is not None
    assert (position["net_quantity"], position["average_price"], position["realized_pnl"]) == (
        D("0.6"),
        D("100"),
        D("4"),
    )
    await street.place("buy", "1.6", "90.00")
    await trader.place("sell", "1.6", "90.00")  # close 0.6 at -10 each, open 1.0 short at 90
    await desk.pump()
    position = await trader.position()
    assert position is not None
    assert (position["net_quantity"], position["average_price"], position["realized_pnl"]) == (
        D("-1"),
        D("90"),
        D("-2"),
    )
    await desk.check()


async def test_stop_order_triggers_on_the_last_trade_price(desk: Desk) -> None:
    bidder = await desk.trader("bidder")
    seller = await desk.trader("seller", base="1")
    stopper = await desk.trader("stopper", base="1")
    await bidder.place("buy", "0.1", "96.00")
    low_bid = await bidder.place("buy", "1", "94.00")
    stop = await stopper.place("sell", "0.2", order_type="stop", stop_price="95.00")
    await desk.pump()
    assert (await desk.order(stop))["status"] == "new"
    await seller.place("sell", "0.1", "96.00")  # trades at 96: above the stop, nothing happens
    await desk.pump()
    assert (await desk.order(stop))["status"] == "new"
    await seller.place("sell", "0.1", "94.00")  # trades at 94 <= 95: the stop sells at market
    await desk.pump()
    row = await desk.order(stop)
    assert (row["status"], row["filled_quantity"], row["average_fill_price"]) == ("filled", D("0.2"), D("94"))
    assert (await desk.order(low_bid))["filled_quantity"] == D("0.3")
    await desk.check()


async def _restart(desk: Desk) -> None:
    """The engine goes away and a new one rebuilds its books from PostgreSQL."""
    await desk.worker.close()
    restarted = desk.new_worker()
    await restarted.rebuild()
    desk.worker = restarted


async def _stop_fills(desk: Desk, order_id: int) -> list[tuple[Decimal, Decimal]]:
    rows = await desk.fetch("SELECT price, quantity FROM fills WHERE order_id = $1 ORDER BY fill_id", order_id)
    return [(r["price"], r["quantity"]) for r in rows]


@pytest.mark.parametrize("restart", [False, True], ids=["live", "rebuilt"])
async def test_a_triggered_stop_buy_never_pays_beyond_its_hold_price(desk: Desk, restart: bool) -> None:
    """A stop is a market order once triggered, and gets the same price protection: it walks the book only up
    to the price its hold was computed at (the band around its stop price), and the rest is canceled. Without
    that cap a thin book fills it above what the api reserved and its cash account goes negative."""
    maker = await desk.trader("maker", base="5")
    taker = await desk.trader("taker")
    stopper = await desk.trader("stopper", cash="34")
    # The price visits 110 (band now 99..121), where an offer at 120 is allowed and rests ...
    await maker.submit("sell", "0.1", "110.00")
    await taker.submit("buy", "0.1", "110.00")
    await desk.pump()
    dear = await maker.submit("sell", "0.5", "120.00")
    # ... then falls back to 99, where the stop buy is placed: its hold is the band's top around 100.
    await taker.submit("buy", "0.1", "99.00")
    await maker.submit("sell", "0.1", "99.00")
    await desk.pump()
    cheap = await maker.submit("sell", "0.1", "105.00")
    stop = await stopper.submit("buy", "0.3", order_type="stop", stop_price="100.00")
    await desk.pump()
    row = await desk.order(stop)
    assert (row["status"], row["hold_price"]) == ("new", D("110.00"))
    assert await desk.held(stop) == D("33.02")  # 0.3 x 110 x (1 + 0.0005 taker fee)
    if restart:
        await _restart(desk)

    await maker.submit("sell", "0.1", "100.00")
    await taker.submit("buy", "0.1", "100.00")  # trades at 100: the stop fires into 105 and then 120
    await desk.pump()

    fills = await _stop_fills(desk, stop)
    assert all(price <= row["hold_price"] for price, _ in fills), f"stop filled beyond its hold price: {fills}"
    assert fills == [(D("105"), D("0.1"))]
    row = await desk.order(stop)
    assert (row["status"], row["filled_quantity"], row["triggered_at"]) == ("canceled", D("0.1"), desk.clock.now)
    assert stop not in desk.worker.engine.book(desk.symbol), "the remainder was rested, not canceled"
    assert (await desk.order(cheap))["status"] == "filled"
    assert ((await desk.order(dear))["status"], desk.worker.engine.book(desk.symbol).depth()) == (
        "new",
        ([], [(12000, 5000)]),
    )
    assert await desk.held(stop) == 0
    assert await stopper.cash() == D("34") - D("10.50")  # the taker fee 0.00525 rounds toward zero
    await desk.check()


async def test_a_triggered_stop_sell_never_sells_below_its_hold_price(desk: Desk) -> None:
    """The mirror case: a stop sell walks the bids only down to the bottom of the band around its stop."""
    maker = await desk.trader("maker", base="5")
    bidder = await desk.trader("bidder")
    stopper = await desk.trader("stopper", base="1")
    # The price visits 90 (band now 81..99), where a bid at 81 is allowed and rests ...
    await bidder.submit("buy", "0.1", "90.00")
    await maker.submit("sell", "0.1", "90.00")
    await desk.pump()
    low = await bidder.submit("buy", "0.5", "81.00")
    # ... then climbs back to 101 (by 99), above the stop, where the stop sell is placed.
    for price in ("99.00", "101.00"):
        await bidder.submit("buy", "0.1", price)
        await maker.submit("sell", "0.1", price)
        await desk.pump()
    good = await bidder.submit("buy", "0.1", "95.00")
    stop = await stopper.submit("sell", "0.3", order_type="stop", stop_price="100.00")
    await desk.pump()
    row = await desk.order(stop)
    assert (row["status"], row["hold_price"]) == ("new", D("90.00"))

    await bidder.submit("buy", "0.1", "100.00")
    await maker.submit("sell", "0.1", "100.00")  # trades at 100: the stop fires into 95 and then 81
    await desk.pump()

    fills = await _stop_fills(desk, stop)
    assert all(price >= row["hold_price"] for price, _ in fills), f"stop filled beyond its hold price: {fills}"
    assert fills == [(D("95"), D("0.1"))]
    row = await desk.order(stop)
    assert (row["status"], row["filled_quantity"]) == ("canceled", D("0.1"))
    assert stop not in desk.worker.engine.book(desk.symbol), "the remainder was rested, not canceled"
    assert [(await desk.order(i))["status"] for i in (good, low)] == ["filled", "new"]
    assert desk.worker.engine.book(desk.symbol).depth() == ([(8100, 5000)], [])
    assert await desk.held(stop) == 0
    await desk.check()


async def test_a_waiting_stop_keeps_its_protection_and_day_expiry_through_a_quantity_change(desk: Desk) -> None:
    """The protection rides on the stop in the engine only: the row stays a price-less stop with the hold price
    risk gave it, a quantity change keeps both, and a DAY stop still expires while it waits."""
    desk.clock.now = datetime.now(UTC)  # the order entry stamps the DAY expiry from the real clock
    stopper = await desk.trader("stopper")
    stop = await stopper.submit("buy", "0.3", order_type="stop", stop_price="100.00", tif="day")
    await desk.pump()
    await stopper.modify(stop, new_qty="0.2")
    await desk.pump()
    row = await desk.order(stop)
    assert (row["type"], row["status"], row["quantity"], row["price"], row["hold_price"]) == (
        "stop",
        "new",
        D("0.2"),
        None,
        D("110.00"),
    )
    waiting = desk.worker.engine.book(desk.symbol).order(stop)
    assert waiting is not None and (waiting.price, waiting.stop_price, waiting.qty) == (11000, 10000, 2000)
    await _restart(desk)
    assert desk.worker.engine.book(desk.symbol).order(stop) == waiting
    desk.clock.advance(timedelta(days=1, hours=1))
    assert await desk.worker.expire_due() == 1
    assert (await desk.order(stop))["status"] == "expired"
    assert await desk.held(stop) == 0
    await desk.check()


async def test_a_modify_the_engine_refuses_gives_back_the_hold_the_api_raised(desk: Desk) -> None:
    """The api raises a repriced buy's hold before the engine sees the modify; when the engine refuses it (a
    post-only bid that would now cross) the order keeps its price, its hold price and the hold its leaves need,
    and its report carries the engine's reason until a later modify is applied."""
    seller = await desk.trader("seller", base="5")
    buyer = await desk.trader("buyer")
    await seller.place("sell", "1", "105.00")
    bid = await buyer.place("buy", "1", "100.00", post_only=True)
    await desk.pump()
    needed = cash_buy_hold("1", "100.00")
    assert await desk.held(bid) == needed == D("100.05")

    await buyer.amend(bid, price="106.00")  # accepted by the api, which raises the hold to 106.06
    assert await desk.held(bid) == D("106.06")
    await desk.pump()
    row = await desk.order(bid)
    assert (row["status"], row["price"], row["hold_price"], row["reject_reason"]) == (
        "new",
        D("100.00"),
        D("100.00"),
        "post_only_would_take",
    )
    assert await desk.held(bid) == needed
    resting = desk.worker.engine.book(desk.symbol).order(bid)
    assert resting is not None and resting.price == 10000
    await desk.check()

    await buyer.amend(bid, price="101.00")  # applied: the order moves and the old refusal is no longer news
    await desk.pump()
    row = await desk.order(bid)
    assert (row["price"], row["hold_price"], row["reject_reason"]) == (D("101.00"), D("101.00"), None)
    await desk.check()


async def test_day_and_gtd_orders_expire_by_the_engine_clock(desk: Desk) -> None:
    buyer = await desk.trader("buyer")
    gtd = await buyer.place("buy", "1", "90.00", tif="gtd", expire_at=T0 + timedelta(hours=1))
    day = await buyer.place("buy", "1", "91.00", tif="day", expire_at=T0 + timedelta(hours=3))
    await desk.pump()
    assert [(await desk.order(i))["status"] for i in (gtd, day)] == ["new", "new"]
    desk.clock.advance(timedelta(minutes=90))
    assert await desk.worker.expire_due() == 1
    assert [(await desk.order(i))["status"] for i in (gtd, day)] == ["expired", "new"]
    assert await desk.held(gtd) == 0 and await desk.held(day) > 0
    desk.clock.advance(timedelta(hours=2))
    await desk.worker.step()  # the loop expires between batches too
    assert (await desk.order(day))["status"] == "expired"
    assert await desk.held(day) == 0
    await desk.check()


async def test_an_expiry_already_past_is_rejected(desk: Desk) -> None:
    buyer = await desk.trader("buyer")
    late = await buyer.place("buy", "1", "90.00", tif="gtd", expire_at=T0 - timedelta(seconds=1))
    await desk.pump()
    row = await desk.order(late)
    assert (row["status"], row["reject_reason"]) == ("rejected", "already_expired")
    assert await desk.held(late) == 0


async def test_a_batch_placement_is_one_message_applied_in_request_order(desk: Desk) -> None:
    seller = await desk.trader("seller", base="5")
    buyer = await desk.trader("buyer")
    async with desk.db.transaction("test.admin") as conn:
        admin_id = await identity.create_user(conn, f"desk-{uuid.uuid4().hex[:6]}", Role.ADMIN)

    def limit(trader: Trader, side: str, qty: str, price: str) -> OrderRequest:
        terms = OrderTerms(side=Side(side), order_type=OrderType.LIMIT, quantity=D(qty), price=D(price))
        return OrderRequest(trader.account_id, desk.symbol, terms)

    batch = [
        limit(seller, "sell", "1", "100.00"),
        limit(seller, "sell", "1", "99.00"),
        limit(buyer, "buy", "1.5", "100.00"),
    ]
    async with desk.db.transaction("test.batch") as conn:
        placements = await OrderEntry(desk.cache, shards=1).place_orders(
            conn, Principal(admin_id, "desk", Role.ADMIN), batch
        )
    ids = [p.order.id for p in placements if isinstance(p, Placement) and p.order is not None]
    assert len(ids) == 3 and await desk.value("SELECT count(*) FROM outbox") == 1
    await desk.pump()

    # commands 1-3 in request order: the buy (command 3) takes the better 99.00 offer first, then half the 100.00
    fills = await desk.fetch("SELECT trade_id, order_id, price, quantity FROM fills ORDER BY id")
    assert [(f["trade_id"], f["order_id"], f["price"], f["quantity"]) for f in fills] == [
        (f"{desk.symbol}-3-1", ids[1], D("99"), D("1")),
        (f"{desk.symbol}-3-1", ids[2], D("99"), D("1")),
        (f"{desk.symbol}-3-2", ids[0], D("100"), D("0.5")),
        (f"{desk.symbol}-3-2", ids[2], D("100"), D("0.5")),
    ]
    assert [(await desk.order(i))["status"] for i in ids] == ["partially_filled", "filled", "filled"]
    await desk.check()


@pytest.mark.parametrize(
    "payload",
    [{"type": "batch"}, {"type": "batch", "commands": []}, {"type": "batch", "commands": [{"type": "new"}]}, [1]],
)
def test_a_malformed_message_has_no_commands(payload: Any) -> None:
    with pytest.raises(ValueError):
        commands_of(payload)


async def test_a_redelivered_message_is_a_no_op(desk: Desk) -> None:
    seller = await desk.trader("seller", base="5")
    buyer = await desk.trader("buyer")
    if desk.bus.kind == "nats":
        # The worker binds its consumer first (a (re)subscribing worker restarts a JetStream consumer at the
        # committed offset, which would hide the redelivery this test is about). On RabbitMQ the test's
        # subscription must be the single active consumer, so the worker subscribes only afterwards.
        assert await desk.worker.step() == 0
    await seller.place("sell", "1", "100.00")
    await buyer.place("buy", "0.5", "100.00")
    while await desk.relay.publish_pending():
        pass
    # The engine commits the batch but "crashes" before acking: the bus still holds the messages unacked.
    subscription = await desk.bus.subscribe(desk.worker.stream, "engine")
    fetched: list[Delivery] = []
    while len(fetched) < 2:
        fetched += await subscription.fetch(10, timeout=2)
    unacked = [
        Delivery(
            stream=d.stream,
            data=d.data,
            msg_id=d.msg_id,
            sequence=d.sequence,
            redelivered=False,
            on_ack=_nothing,
            on_nak=_nothing_later,
        )
        for d in fetched
    ]
    await desk.worker.apply_batch(unacked)
    fills_before = await desk.fetch("SELECT fill_id FROM fills ORDER BY 1")
    assert len(fills_before) == 2
    await subscription.close()  # the "crashed" consumer goes: the bus hands the messages out again

    redelivered = 0
    while redelivered < 2:
        redelivered += await desk.worker.step()
    assert await desk.fetch("SELECT fill_id FROM fills ORDER BY 1") == fills_before
    assert await desk.value("SELECT count(*) FROM ledger_transactions WHERE kind = 'trade'") == 1
    assert await desk.worker.step() == 0, "the redelivered messages were not acked"
    await desk.check()


async def _nothing() -> None:
    return None


async def _nothing_later(delay: float | None) -> None:
    return None


async def test_a_duplicate_new_with_a_new_sequence_is_a_no_op(desk: Desk) -> None:
    seller = await desk.trader("seller", base="5")
    buyer = await desk.trader("buyer")
    ask = await seller.place("sell", "1", "100.00")
    bid = await buyer.place("buy", "0.5", "100.00")
    await desk.pump()
    # The relay re-publishes both commands (as after a crash between publish and marking the rows sent).
    async with desk.db.transaction("test.republish") as conn:
        await conn.execute(
            "INSERT INTO outbox (stream, key, payload) SELECT stream, key, payload FROM outbox ORDER BY id"
        )
    await desk.pump()
    assert await desk.value("SELECT count(*) FROM fills") == 2
    assert (await desk.order(ask))["filled_quantity"] == D("0.5")
    assert (await desk.order(bid))["status"] == "filled"
    assert desk.worker.engine.book(desk.symbol).depth() == ([], [(10000, 5000)])
    await desk.check()


async def test_restart_rebuilds_the_books_with_time_priority(desk: Desk) -> None:
    makers = [await desk.trader(f"maker{i}", base="5") for i in range(3)]
    buyer = await desk.trader("buyer")
    first = await makers[0].place("sell", "1", "100.00")
    second = await makers[1].place("sell", "1", "100.00")
    third = await makers[2].place("sell", "1", "101.00")
    stop = await makers[2].place("sell", "1", order_type="stop", stop_price="90.00")
    bid = await buyer.place("buy", "0.5", "99.00")
    await desk.pump()
    await makers[0].modify(first, new_qty="0.8")  # a quantity decrease keeps time priority
    await makers[2].modify(third, new_price="100.00")  # a price change queues behind
    await desk.pump()
    before = desk.worker.engine.book(desk.symbol).resting_orders()

    await desk.worker.close()  # the old engine is gone (on RabbitMQ it was the single active consumer)
    restarted = desk.new_worker()
    await restarted.rebuild()
    desk.worker = restarted
    rebuilt = restarted.engine.book(desk.symbol).resting_orders()
    assert rebuilt == before
    open_rows = await desk.fetch(
        "SELECT id FROM orders WHERE status IN ('new', 'partially_filled', 'pending_cancel') ORDER BY sequence"
    )
    assert [s.order_id for s in rebuilt] == [r["id"] for r in open_rows] == [first, second, stop, bid, third]

    taker = await buyer.place("buy", "2", "100.00")
    await desk.pump()
    fills = await desk.fetch("SELECT order_id, quantity FROM fills WHERE liquidity = 'maker' ORDER BY fill_id")
    assert [(f["order_id"], f["quantity"]) for f in fills] == [(first, D("0.8")), (second, D("1")), (third, D("0.2"))]
    assert (await desk.order(taker))["status"] == "filled"
    await desk.check()


async def test_a_triggered_stop_limit_stays_in_the_live_book_across_a_restart(desk: Desk) -> None:
    """A stop-limit that triggered and rests unfilled is a live order, even once the price has moved back
    above its stop: a restarted engine puts it back in the book, not in the stop book."""
    bidder = await desk.trader("bidder")
    seller = await desk.trader("seller", base="1")
    stopper = await desk.trader("stopper", base="1")
    buyer = await desk.trader("buyer")
    stop = await stopper.place("sell", "0.2", "96.00", order_type="stop_limit", stop_price="95.00")
    await desk.pump()
    assert (await desk.order(stop))["triggered_at"] is None
    await bidder.place("buy", "0.1", "95.00")
    await seller.place("sell", "0.1", "95.00")  # trades at 95 <= 95: the stop rests as a limit sell at 96
    await desk.pump()
    row = await desk.order(stop)
    assert (row["status"], row["filled_quantity"], row["triggered_at"]) == ("new", D("0"), desk.clock.now)
    await bidder.place("buy", "0.1", "95.50")
    await seller.place("sell", "0.1", "95.50")  # the price moves back above the stop
    await desk.pump()
    assert await desk.value("SELECT last_price FROM instruments WHERE id = $1", desk.instrument_id) == D("95.50")
    before = desk.worker.engine.book(desk.symbol)
    assert before.depth() == ([], [(9600, 2000)])

    await desk.worker.close()
    restarted = desk.new_worker()
    await restarted.rebuild()
    desk.worker = restarted
    rebuilt = restarted.engine.book(desk.symbol)
    assert rebuilt.resting_orders() == before.resting_orders()
    assert rebuilt.depth() == ([], [(9600, 2000)]), "the triggered stop-limit is back in the live book"

    taker = await buyer.place("buy", "0.2", "96.00")
    await desk.pump()
    assert [(await desk.order(i))["status"] for i in (stop, taker)] == ["filled", "filled"]
    await desk.check()


async def test_execution_reports_book_and_cache_invalidation_reach_redis(desk: Desk) -> None:
    seller = await desk.trader("seller", base="5")
    buyer = await desk.trader("buyer")
    redis = desk.cache.client
    await redis.set(f"order_book:{buyer.user_id}", b"stale", ex=30)
    await redis.set(f"positions:{buyer.user_id}", b"stale", ex=30)
    pubsub = redis.pubsub()
    await pubsub.subscribe(f"tp:user:{buyer.user_id}", f"tp:trades:{desk.symbol}", f"tp:book:{desk.symbol}")
    try:
        ask = await seller.place("sell", "1", "100.00")
        await desk.pump()
        bid = await buyer.place("buy", "0.25", "100.00")
        await desk.pump()
        messages = await _drain(pubsub, lambda got: sum(m["channel"] == "positions" for m in got) >= 1)
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
    by_channel: dict[str, list[dict[str, Any]]] = {}
    for m in messages:
        by_channel.setdefault(m["channel"], []).append(m)
    assert [m["data"]["seq"] for m in by_channel["book"]] == [1, 2]
    assert by_channel["book"][0]["data"] == {"seq": 1, "bids": [], "asks": [["100.00", "1.0000"]]}
    assert by_channel["book"][1]["data"] == {"seq": 2, "bids": [], "asks": [["100.00", "0.7500"]]}
    trade = by_channel["trades"][0]
    assert trade["symbol"] == desk.symbol
    assert {k: trade["data"][k] for k in ("trade_id", "price", "qty", "aggressor_side")} == {
        "trade_id": f"{desk.symbol}-2-1",
        "price": "100.00",
        "qty": "0.2500",
        "aggressor_side": "buy",
    }
    [fill] = by_channel["fills"]
    assert (fill["data"]["fill_id"], fill["data"]["order_id"], fill["data"]["price"]) == (
        f"{desk.symbol}-2-1-T",
        bid,
        "100",
    )
    [order] = by_channel["orders"]
    assert (order["data"]["id"], order["data"]["status"], order["data"]["filled_quantity"]) == (bid, "filled", "0.25")
    assert fill["data"]["id"] == await desk.value("SELECT id FROM fills WHERE fill_id = $1", fill["data"]["fill_id"])
    [position] = by_channel["positions"]
    assert {k: position["data"][k] for k in ("net_quantity", "average_price", "mark_price", "unrealized_pnl")} == {
        "net_quantity": "0.25",
        "average_price": "100",
        "mark_price": "100",
        "unrealized_pnl": "0",
    }
    snapshot = await read_snapshot(desk)
    assert snapshot == {"seq": 2, "bids": [], "asks": [["100.00", "0.7500"]]}
    assert await redis.exists(f"order_book:{buyer.user_id}", f"positions:{buyer.user_id}") == 0
    assert ask != bid


async def test_a_restarted_engine_continues_the_book_sequence(desk: Desk) -> None:
    seller = await desk.trader("seller", base="5")
    await seller.place("sell", "1", "100.00")
    await desk.pump()
    await desk.worker.close()  # the old engine is gone (on RabbitMQ it was the single active consumer)
    restarted = desk.new_worker()
    await restarted.rebuild()
    desk.worker = restarted
    await seller.place("sell", "1", "102.00")
    await desk.pump()
    snapshot = await read_snapshot(desk)
    assert snapshot == {"seq": 2, "bids": [], "asks": [["100.00", "1.0000"], ["102.00", "1.0000"]]}


async def test_the_running_worker_survives_until_stopped(desk: Desk) -> None:
    """run(): rebuild, ready, consume while orders arrive, return on stop."""
    seller = await desk.trader("seller", base="5")
    buyer = await desk.trader("buyer")
    worker = desk.new_worker()
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    relay = asyncio.create_task(desk.relay.run(stop))
    try:
        await asyncio.wait_for(worker.ready.wait(), 30)
        await seller.place("sell", "1", "100.00")
        bid = await buyer.place("buy", "1", "100.00")
        for _ in range(600):
            if (await desk.order(bid))["status"] == "filled":
                break
            await asyncio.sleep(0.05)
        assert (await desk.order(bid))["status"] == "filled"
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(running, relay), 30)
    await desk.check()


async def test_two_platforms_share_one_bus_server_in_their_own_namespaces(
    pg_server_url: str, migrated_template: str, redis_url: str, bus_url: str
) -> None:
    """TRADEPLANE_BUS_NAMESPACE as build_platform wires it: two platforms, each with its own database, list the
    same market on one NATS or RabbitMQ server, and each engine gets exactly its own platform's orders."""
    symbol = f"T{uuid.uuid4().hex[:8].upper()}-USD"
    databases: list[str] = []
    platforms: list[Platform] = []
    desks: list[Desk] = []
    try:
        for tag in ("a", "b"):
            databases.append(await create_database(pg_server_url, template=migrated_template))
            settings = Settings(
                database_url=with_database(pg_server_url, databases[-1]),
                redis_url=redis_url,
                bus_url=bus_url,
                bus_namespace=f"{tag}-{uuid.uuid4().hex[:8]}",
                db_pool_min=1,
            )
            platform = build_platform(settings)
            platforms.append(platform)
            await platform.start()
            assert platform.bus.namespace == settings.bus_namespace
            await platform.bus.setup(1)
            async with platform.db.transaction("test.instrument") as conn:
                instrument_id = await add_instrument(conn, symbol)
            clock = FakeClock(T0)
            worker = EngineWorker(platform.db, platform.cache, platform.bus, clock=clock, fetch_timeout=0.5)
            await worker.rebuild()
            relay = OutboxRelay(platform.db, platform.bus)
            desks.append(Desk(platform.db, platform.cache, platform.bus, symbol, instrument_id, clock, relay, worker))
        a, b = desks
        seller, buyer = await a.trader("seller", base="1"), await a.trader("buyer")
        ask = await seller.place("sell", "1", "100.00")
        bid = await buyer.place("buy", "0.5", "100.00")
        lone = await (await b.trader("maker", base="1")).place("sell", "1", "101.00")
        for desk in desks:
            while published := await desk.relay.publish_pending():
                desk.published += published
        # Each engine drains its namespace: what it fetches is exactly its own platform's commands.
        for desk in desks:
            while fetched := await desk.worker.step():
                desk.consumed += fetched
        assert [(d.published, d.consumed) for d in desks] == [(2, 2), (1, 1)]
        assert [(await a.order(i))["status"] for i in (ask, bid)] == ["partially_filled", "filled"]
        assert (await b.order(lone))["status"] == "new"
        assert await b.value("SELECT count(*) FROM fills") == 0
        for desk in desks:
            await desk.check()
    finally:
        for desk in desks:
            await desk.worker.close()
        if platforms:
            await platforms[0].cache.client.delete(book_snapshot_key(symbol))
        for platform in platforms:
            with contextlib.suppress(Exception):
                await platform.bus.destroy(1)
            await platform.stop()
        for database in databases:
            await drop_database(pg_server_url, database)


async def read_snapshot(desk: Desk) -> Any:
    raw = await desk.cache.client.get(book_snapshot_key(desk.symbol))
    assert isinstance(raw, bytes), "no book snapshot in Redis"
    return orjson.loads(raw)


async def _drain(pubsub: Any, done: Callable[[list[dict[str, Any]]], bool]) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    for _ in range(100):
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
        if message is not None:
            # The engine sends a batch's reports on one channel as one message: a JSON array of envelopes.
            decoded = orjson.loads(message["data"])
            got.extend(decoded if isinstance(decoded, list) else [decoded])
        elif done(got):
            return got
    raise AssertionError(f"Redis did not deliver the expected messages; got {got}")
