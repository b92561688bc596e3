"""The order path's REST API against real PostgreSQL and Redis: risk, holds, outbox, idempotency, permissions,
queries and account numbers.

The engine is written elsewhere, so these tests set engine-owned state (fills, positions, last price, filled
quantities) directly in SQL. Users and accounts get random ids far above the identity sequence: Redis is
shared by every test database, and its keys (rate counters per account, caches per user) must not collide
with another test's account 1 or user 1.
"""

from __future__ import annotations

import asyncio
import json
import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import pytest

from tests.integration.conftest import TEST_SECRET, Actor
from tradeplane.bootstrap import Platform
from tradeplane.domain.orders import OrderType, Side
from tradeplane.domain.reservations import shard_for
from tradeplane.domain.risk import OrderTerms
from tradeplane.entrypoints.api.schemas import OrderPublic
from tradeplane.services import accounts, demo, identity
from tradeplane.services.identity import Principal, Role
from tradeplane.services.orders import (
    RATE_WINDOW_TTL_S,
    OrderRequest,
    order_entry,
    rate_limit_key,
    submit_mixed,
    submit_order,
    submit_orders,
)

D = Decimal
BTC_RESERVE = D("32516.25")  # 0.5 BTC at 65000.00 plus the worst (taker) fee 0.05%, rounded up to the cent


async def new_actor(
    platform: Platform, role: Role = Role.TRADER, *, cash: str | None = "1000000", kind: str = "cash"
) -> Actor:
    """A user (and, for traders, a funded account) with a random high id shared by user and account."""
    uid = random.randint(1_000_000_000, 9_000_000_000)
    async with platform.db.transaction("test.actor") as conn:
        await demo.load_reference_data(conn)
        await conn.execute("INSERT INTO users (id, username, role) VALUES ($1, $2, $3)", uid, f"u{uid}", role.value)
        key = (await identity.issue_api_key(conn, TEST_SECRET, uid, "test")).key
        if role is not Role.TRADER:
            return Actor(uid, key)
        await conn.execute(
            "INSERT INTO accounts (id, user_id, name, kind, currency) VALUES ($1, $1, 'main', $2, 'USD')", uid, kind
        )
        if cash is not None:
            await accounts.deposit(conn, uid, D(cash))
    return Actor(uid, key, uid)


def body(actor: Actor, **overrides: Any) -> dict[str, Any]:
    order: dict[str, Any] = {
        "account_id": actor.account_id,
        "symbol": "BTC-USD",
        "side": "buy",
        "type": "limit",
        "quantity": "0.5",
        "price": "65000.00",
    }
    order.update(overrides)
    return {k: v for k, v in order.items() if v is not None}


async def post(client: httpx.AsyncClient, actor: Actor, **overrides: Any) -> httpx.Response:
    return await client.post("/api/v1/orders", json=body(actor, **overrides), headers=actor.headers)


async def sql(platform: Platform, query: str, *args: Any) -> list[asyncpg.Record]:
    async with platform.db.connection("test.sql") as conn:
        return list(await conn.fetch(query, *args))


async def script(platform: Platform, statements: str) -> None:
    """Several statements without parameters (simple query protocol)."""
    async with platform.db.connection("test.sql") as conn:
        await conn.execute(statements)


async def one(platform: Platform, query: str, *args: Any) -> Any:
    async with platform.db.connection("test.sql") as conn:
        return await conn.fetchval(query, *args)


async def counts(platform: Platform) -> tuple[int, int, int]:
    rows = await sql(
        platform,
        "SELECT (SELECT count(*) FROM orders) AS o, (SELECT count(*) FROM holds) AS h,"
        " (SELECT count(*) FROM outbox) AS x",
    )
    return rows[0]["o"], rows[0]["h"], rows[0]["x"]


@pytest.fixture
async def alice(platform: Platform) -> Actor:
    return await new_actor(platform)


# ------------------------------------------------------------------------------------------- placement


async def test_an_accepted_order_is_committed_with_its_hold_outbox_and_audit_rows(
    client: httpx.AsyncClient, platform: Platform, alice: Actor
) -> None:
    response = await post(client, alice, client_order_id="c-1")
    assert response.status_code == 201, response.text
    order = OrderPublic.model_validate(response.json())
    assert order.status == "pending_new"
    assert (order.symbol, order.side, order.quantity, order.price) == ("BTC-USD", Side.BUY, D("0.5"), D("65000"))
    assert response.json()["quantity"] == "0.5" and response.json()["leaves_quantity"] == "0.5"

    row = (await sql(platform, "SELECT status, hold_price, client_order_id FROM orders WHERE id = $1", order.id))[0]
    assert (row["status"], row["hold_price"], row["client_order_id"]) == ("pending_new", D("65000"), "c-1")
    holds = await sql(
        platform, "SELECT account_id, asset, amount, released_at FROM holds WHERE order_id = $1", order.id
    )
    assert [tuple(h) for h in holds] == [(alice.account_id, "USD", BTC_RESERVE, None)]
    outbox = await sql(platform, "SELECT stream, key, payload::text AS payload FROM outbox")
    assert len(outbox) == 1
    assert outbox[0]["stream"] == f"orders.{shard_for('BTC-USD', platform.settings.engine_shards)}"
    assert outbox[0]["key"] == "BTC-USD"
    assert json.loads(outbox[0]["payload"]) == {
        "type": "new",
        "order_id": order.id,
        "account_id": alice.account_id,
        "symbol": "BTC-USD",
        "side": "buy",
        "order_type": "limit",
        "qty": "0.5",
        "price": "65000",
        "stop_price": None,
        "time_in_force": "gtc",
        "expire_at": None,
        "post_only": False,
        "stp": "cancel_newest",
    }
    audit = await sql(
        platform, "SELECT actor_user_id, action FROM audit_log WHERE entity = 'order' AND entity_id = $1", str(order.id)
    )
    assert [tuple(a) for a in audit] == [(alice.user_id, "order.place")]

    summary = (await client.get(f"/api/v1/accounts/{alice.account_id}", headers=alice.headers)).json()
    assert (summary["cash"], summary["holds"], summary["free"]) == ("1000000", "32516.25", "967483.75")


async def refuse_outbox_inserts(platform: Platform) -> None:
    """Make the outbox insert inside the placement statement fail ('outbox down')."""
    await script(
        platform,
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'outbox down'; END $$;"
        " CREATE TRIGGER refuse BEFORE INSERT ON outbox FOR EACH ROW EXECUTE FUNCTION refuse();",
    )


async def test_placement_is_all_or_nothing(platform: Platform, alice: Actor) -> None:
    # the outbox insert fails inside the placement statement: no order, hold or audit row may survive
    await refuse_outbox_inserts(platform)
    principal = Principal(alice.user_id, "alice", Role.TRADER)
    terms = OrderTerms(Side.BUY, OrderType.LIMIT, D("0.5"), price=D("65000"))
    audit_before = await one(platform, "SELECT count(*) FROM audit_log")
    with pytest.raises(asyncpg.RaiseError, match="outbox down"):
        await submit_order(
            platform.db, order_entry(platform), principal, OrderRequest(alice.account_id or 0, "BTC-USD", terms)
        )
    assert await counts(platform) == (0, 0, 0)
    assert await one(platform, "SELECT count(*) FROM audit_log") == audit_before


async def test_a_grouped_placement_is_all_or_nothing(platform: Platform, alice: Actor) -> None:
    """The placement of several orders (a batch, or single orders grouped by the placement queue) sets its plan mode
    in the same round trip as BEGIN: a failure still rolls back every row, and leaves no transaction open."""
    await refuse_outbox_inserts(platform)
    principal = Principal(alice.user_id, "alice", Role.TRADER)
    terms = OrderTerms(Side.BUY, OrderType.LIMIT, D("0.5"), price=D("65000"))
    request = OrderRequest(alice.account_id or 0, "BTC-USD", terms)
    audit_before = await one(platform, "SELECT count(*) FROM audit_log")
    with pytest.raises(asyncpg.RaiseError, match="outbox down"):
        await submit_orders(platform.db, order_entry(platform), principal, [request, request])
    assert await counts(platform) == (0, 0, 0)
    assert await one(platform, "SELECT count(*) FROM audit_log") == audit_before
    open_transactions = await one(
        platform,
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND state LIKE 'idle in transaction%'",
    )
    assert open_transactions == 0
    await script(platform, "DROP TRIGGER refuse ON outbox")
    outcomes = await submit_orders(platform.db, order_entry(platform), principal, [request, request])
    assert [o.outcome.value for o in outcomes if not isinstance(o, Exception)] == ["accepted", "accepted"]
    assert await counts(platform) == (2, 2, 1)  # one outbox row: the shard's batch of commands


async def test_a_placement_adds_each_accounts_orders_to_its_rate_window_which_expires(
    platform: Platform, alice: Actor
) -> None:
    bob = await new_actor(platform)
    second = datetime.now(UTC).replace(microsecond=0)
    entry = order_entry(platform)
    entry.clock = lambda: second
    terms = OrderTerms(Side.BUY, OrderType.LIMIT, D("0.1"), price=D("65000"))
    placements = [
        (Principal(actor.user_id, "trader", Role.TRADER), OrderRequest(actor.account_id or 0, "BTC-USD", terms))
        for actor in (alice, bob, alice)
    ]
    await submit_mixed(platform.db, entry, placements)  # one placement: alice's two orders and bob's one
    await submit_mixed(platform.db, entry, placements[:1])
    redis = platform.cache.client
    for actor, count in ((alice, b"3"), (bob, b"1")):
        key = rate_limit_key(actor.account_id or 0, int(second.timestamp()))
        assert await redis.get(key) == count
        assert 0 < await redis.ttl(key) <= RATE_WINDOW_TTL_S  # the window's counter does not outlive it for long


async def test_day_orders_carry_the_session_close_and_market_orders_hold_at_the_band_edge(
    client: httpx.AsyncClient, platform: Platform, alice: Actor
) -> None:
    await sql(platform, "UPDATE instruments SET session_close_utc = '21:00' WHERE symbol = 'BTC-USD'")
    entry = order_entry(platform)
    entry.clock = lambda: datetime(2026, 11, 21, 22, 30, tzinfo=UTC)  # today's close has passed
    day = await post(client, alice, time_in_force="day")
    assert day.status_code == 201, day.text
    assert datetime.fromisoformat(day.json()["expire_at"]) == datetime(2026, 11, 22, 21, 0, tzinfo=UTC)

    await sql(platform, "UPDATE instruments SET last_price = 60000 WHERE symbol = 'BTC-USD'")
    market = await post(client, alice, type="market", price=None, quantity="1")
    assert market.status_code == 201, market.text
    hold_price = await one(platform, "SELECT hold_price FROM orders WHERE id = $1", market.json()["id"])
    assert hold_price == D("66000")  # 60000 + 10% band
    hold = await one(platform, "SELECT amount FROM holds WHERE order_id = $1", market.json()["id"])
    assert hold == D("66033.00")
    payloads = [
        json.loads(r["payload"]) for r in await sql(platform, "SELECT payload::text AS payload FROM outbox ORDER BY id")
    ]
    assert payloads[0]["expire_at"] == "2026-11-22T21:00:00+00:00"
    assert payloads[1]["price"] is None and payloads[1]["order_type"] == "market"


# ------------------------------------------------------------------------------------------------ risk

RISK_CASES: list[tuple[str, str, dict[str, Any], str]] = [
    ("halted", "UPDATE instruments SET status = 'halted' WHERE symbol = 'BTC-USD'", {}, "instrument_not_open"),
    ("frozen", "UPDATE accounts SET status = 'frozen' WHERE id = $1", {}, "account_not_active"),
    ("tick", "", {"price": "65000.005"}, "price_not_on_tick"),
    ("stop_tick", "", {"type": "stop_limit", "stop_price": "64000.001"}, "stop_price_not_on_tick"),
    ("lot", "", {"quantity": "0.00005"}, "quantity_not_on_lot"),
    (
        "min",
        "UPDATE instruments SET min_qty = 0.01 WHERE symbol = 'BTC-USD'",
        {"quantity": "0.005"},
        "quantity_below_min",
    ),
    ("max", "", {"quantity": "100.0001"}, "quantity_above_max"),
    ("band", "", {"price": "71500.01"}, "price_outside_band"),
    ("band_last", "UPDATE instruments SET last_price = 50000 WHERE symbol = 'BTC-USD'", {}, "price_outside_band"),
    (
        "no_reference",
        "UPDATE instruments SET reference_price = NULL WHERE symbol = 'BTC-USD'",
        {"type": "market", "price": None},
        "no_reference_price",
    ),
    (
        "max_qty",
        "INSERT INTO risk_limits (account_id, max_order_qty) VALUES ($1, 0.4)",
        {},
        "max_order_qty_exceeded",
    ),
    (
        "max_notional",
        "INSERT INTO risk_limits (account_id, max_order_notional) VALUES ($1, 30000)",
        {},
        "max_order_notional_exceeded",
    ),
    (
        "max_position",
        "INSERT INTO risk_limits (account_id, max_position) VALUES ($1, 1.2);"
        " INSERT INTO positions (account_id, instrument_id, net_quantity, average_price)"
        " SELECT $1, id, 1, 60000 FROM instruments WHERE symbol = 'BTC-USD'",
        {},
        "max_position_exceeded",
    ),
    (
        "max_open",
        "INSERT INTO risk_limits (account_id, max_open_orders) VALUES ($1, 1);"
        " INSERT INTO orders (account_id, instrument_id, side, type, quantity, price, status)"
        " SELECT $1, id, 'sell', 'limit', 1, 70000, 'new' FROM instruments WHERE symbol = 'BTC-USD'",
        {},
        "max_open_orders_exceeded",
    ),
    ("funds", "", {"quantity": "15.4"}, "insufficient_funds"),  # 15.4 * 65000 * 1.0005 > 1,000,000
    ("position", "", {"side": "sell"}, "insufficient_position"),
    ("reduce_only", "", {"side": "sell", "reduce_only": True}, "reduce_only_would_increase"),
]


@pytest.mark.parametrize(("setup", "overrides", "reason"), [c[1:] for c in RISK_CASES], ids=[c[0] for c in RISK_CASES])
async def test_each_risk_rule_rejects_with_its_reason_and_keeps_the_rejected_order(
    client: httpx.AsyncClient, platform: Platform, alice: Actor, setup: str, overrides: dict[str, Any], reason: str
) -> None:
    if setup:
        async with platform.db.transaction("test.setup") as conn:
            for statement in setup.split(";"):
                await conn.execute(statement, *([alice.account_id] if "$1" in statement else []))
    orders_before = await one(platform, "SELECT count(*) FROM orders")
    response = await post(client, alice, **overrides)
    assert response.status_code == 422, response.text
    payload = response.json()
    assert (payload["error"], payload["reason"]) == ("risk_rejected", reason)
    assert payload["order"]["status"] == "rejected" and payload["order"]["reject_reason"] == reason
    order_id = payload["order"]["id"]
    stored = await sql(platform, "SELECT status, reject_reason FROM orders WHERE id = $1", order_id)
    assert [tuple(r) for r in stored] == [("rejected", reason)]
    assert await one(platform, "SELECT count(*) FROM orders") == orders_before + 1
    assert await one(platform, "SELECT count(*) FROM holds WHERE order_id = $1", order_id) == 0
    assert await one(platform, "SELECT count(*) FROM outbox") == 0
    action = await one(
        platform, "SELECT action FROM audit_log WHERE entity = 'order' AND entity_id = $1", str(order_id)
    )
    assert action == "order.reject"


async def test_the_instrument_specific_limits_row_wins_over_the_account_wide_one(
    client: httpx.AsyncClient, platform: Platform, alice: Actor
) -> None:
    await sql(
        platform,
        "INSERT INTO risk_limits (account_id, instrument_id, max_order_qty) VALUES ($1, NULL, 0.1),"
        " ($1, (SELECT id FROM instruments WHERE symbol = 'BTC-USD'), 1)",
        alice.account_id,
    )
    assert (await post(client, alice)).status_code == 201  # BTC-USD: 0.5 <= 1
    eth = await post(client, alice, symbol="ETH-USD", quantity="0.5", price="3200.00")
    assert eth.status_code == 422 and eth.json()["reason"] == "max_order_qty_exceeded"  # account-wide 0.1


async def test_the_order_rate_is_limited_per_account_per_second(
    client: httpx.AsyncClient, platform: Platform, alice: Actor
) -> None:
    await sql(platform, "INSERT INTO risk_limits (account_id, max_orders_per_second) VALUES ($1, 2)", alice.account_id)
    second = datetime.now(UTC).replace(microsecond=0)
    entry = order_entry(platform)
    entry.clock = lambda: second  # three orders in one window, whatever the wall clock does
    statuses = [(await post(client, alice)).status_code for _ in range(3)]
    assert statuses == [201, 201, 422]
    last = await one(platform, "SELECT reject_reason FROM orders ORDER BY id DESC LIMIT 1")
    assert last == "rate_limited"
    entry.clock = lambda: second + timedelta(seconds=1)  # a new window
    assert (await post(client, alice)).status_code == 201
    counter = await platform.cache.client.get(f"ratelimit:orders:{alice.account_id}:{int(second.timestamp())}")
    assert counter == b"3"


async def test_orders_for_unknown_symbols_count_in_the_rate_window(
    client: httpx.AsyncClient, platform: Platform, alice: Actor
) -> None:
    """Each is stored as a rejected order, so a flood of them is as much load as any other: it uses the window."""
    await sql(platform, "INSERT INTO risk_limits (account_id, max_orders_per_second) VALUES ($1, 2)", alice.account_id)
    second = datetime.now(UTC).replace(microsecond=0)
    order_entry(platform).clock = lambda: second
    unknown = [await post(client, alice, symbol="NOPE-USD") for _ in range(2)]
    assert [r.json()["reason"] for r in unknown] == ["unknown_instrument", "unknown_instrument"]
    known = await post(client, alice)
    assert known.status_code == 422 and known.json()["reason"] == "rate_limited"
    counter = await platform.cache.client.get(f"ratelimit:orders:{alice.account_id}:{int(second.timestamp())}")
    assert counter == b"3"


async def long_one_btc(platform: Platform, actor: Actor) -> None:
    """A position of 1 BTC bought before the test."""
    await sql(
        platform,
        "INSERT INTO positions (account_id, instrument_id, net_quantity, average_price)"
        " SELECT $1, id, 1, 60000 FROM instruments WHERE symbol = 'BTC-USD'",
        actor.account_id,
    )


async def test_reduce_only_counts_every_open_order_on_its_side(
    client: httpx.AsyncClient, platform: Platform, alice: Actor
) -> None:
    await long_one_btc(platform, alice)
    first = await post(client, alice, side="sell", quantity="0.6", reduce_only=True)
    assert first.status_code == 201, first.text
    second = await post(client, alice, side="sell", quantity="0.5", reduce_only=True)
    assert second.status_code == 422 and second.json()["reason"] == "reduce_only_would_increase"
    third = await post(client, alice, side="sell", quantity="0.4", reduce_only=True)
    assert third.status_code == 201
    hold = await one(platform, "SELECT sum(amount) FROM holds WHERE asset = 'BTC' AND released_at IS NULL")
    assert hold == D("1.0")


async def test_reduce_only_counts_ordinary_orders_on_its_side_too(
    client: httpx.AsyncClient, platform: Platform, alice: Actor
) -> None:
    """If the ordinary sell filled first, a reduce-only sell beside it for the whole position would cross zero."""
    await long_one_btc(platform, alice)
    plain = await post(client, alice, side="sell", quantity="0.3")
    assert plain.status_code == 201, plain.text
    too_much = await post(client, alice, side="sell", quantity="0.8", reduce_only=True)
    assert too_much.status_code == 422 and too_much.json()["reason"] == "reduce_only_would_increase"
    assert (await post(client, alice, side="sell", quantity="0.7", reduce_only=True)).status_code == 201


@pytest.mark.parametrize(
    "overrides",
    [
        {"type": "market", "price": None, "post_only": True},
        {"time_in_force": "gtd", "expire_at": "2001-01-01T00:00:00Z"},
        {"time_in_force": "gtd"},
        {"type": "market"},  # market with a price
        {"price": None},
        {"quantity": "-1"},
        {"side": "hold"},
        {"colour": "blue"},
    ],
)
async def test_malformed_orders_are_validation_errors_and_store_nothing(
    client: httpx.AsyncClient, platform: Platform, alice: Actor, overrides: dict[str, Any]
) -> None:
    response = await post(client, alice, **overrides)
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "validation_error"
    assert await counts(platform) == (0, 0, 0)


async def test_an_unknown_symbol_is_stored_as_a_rejected_order(
    client: httpx.AsyncClient, platform: Platform, alice: Actor
) -> None:
    response = await post(client, alice, symbol="NOPE-USD", client_order_id="nope-1")
    assert response.status_code == 422
    assert response.json()["reason"] == "unknown_instrument"
    order = response.json()["order"]
    assert (order["status"], order["symbol"], order["reject_reason"]) == ("rejected", "NOPE-USD", "unknown_instrument")
    assert await counts(platform) == (1, 0, 0)  # the order; no hold, nothing for the engine
    audited = await sql(
        platform, "SELECT entity_id, details->>'reason' AS reason FROM audit_log WHERE action = 'order.reject'"
    )
    assert [(r["entity_id"], r["reason"]) for r in audited] == [(str(order["id"]), "unknown_instrument")]

    # it reads back like any order, and its client_order_id is taken
    fetched = await client.get(f"/api/v1/orders/{order['id']}", headers=alice.headers)
    assert fetched.status_code == 200 and fetched.json() == order
    listed = await client.get("/api/v1/orders", headers=alice.headers)
    assert [o["id"] for o in listed.json()["items"]] == [order["id"]]
    retry = await post(client, alice, symbol="NOPE-USD", client_order_id="nope-1")
    assert (retry.status_code, retry.json()["order"]) == (422, order)
    other = await post(client, alice, client_order_id="nope-1")
    assert other.status_code == 409 and other.json()["error"] == "duplicate_client_order_id"
    canceled = await client.delete(f"/api/v1/orders/{order['id']}", headers=alice.headers)
    assert canceled.status_code == 409 and canceled.json()["error"] == "order_not_open"
    assert await counts(platform) == (1, 0, 0)


# ------------------------------------------------------------------------------------------ idempotency


async def test_a_retry_with_the_same_client_order_id_returns_the_original_order(
    client: httpx.AsyncClient, platform: Platform, alice: Actor
) -> None:
    first = await post(client, alice, client_order_id="abc", quantity="0.5")
    again = await post(client, alice, client_order_id="abc", quantity="0.50")  # same number, other spelling
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json() == first.json()
    assert await counts(platform) == (1, 1, 1)

    different = await post(client, alice, client_order_id="abc", quantity="0.6")
    assert different.status_code == 409
    assert different.json()["error"] == "duplicate_client_order_id"
    assert await counts(platform) == (1, 1, 1)

    # the id is per account: another account may use it
    bob = await new_actor(platform)
    assert (await post(client, bob, client_order_id="abc")).status_code == 201


async def test_a_retry_of_a_rejected_order_replays_the_rejection(
    client: httpx.AsyncClient, platform: Platform, alice: Actor
) -> None:
    first = await post(client, alice, client_order_id="big", quantity="20")
    again = await post(client, alice, client_order_id="big", quantity="20")
    assert first.status_code == again.status_code == 422
    assert again.json()["order"]["id"] == first.json()["order"]["id"]
    assert again.json()["reason"] == "insufficient_funds"
    assert await one(platform, "SELECT count(*) FROM orders") == 1


async def test_concurrent_retries_with_one_client_order_id_make_exactly_one_order(
    client: httpx.AsyncClient, platform: Platform, alice: Actor
) -> None:
    responses = await asyncio.gather(*(post(client, alice, client_order_id="race") for _ in range(12)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 11 + [201]
    assert len({r.json()["id"] for r in responses}) == 1
    assert await counts(platform) == (1, 1, 1)


async def test_concurrent_orders_cannot_spend_the_same_cash(client: httpx.AsyncClient, platform: Platform) -> None:
    trader = await new_actor(platform, cash="10000.00")
    await sql(platform, "UPDATE instruments SET maker_fee_rate = 0, taker_fee_rate = 0 WHERE symbol = 'AAPL'")
    # each buy reserves 5 x 200.00 = 1000.00, a tenth of the cash
    responses = await asyncio.gather(
        *(post(client, trader, symbol="AAPL", quantity="5", price="200.00") for _ in range(20))
    )
    accepted = [r for r in responses if r.status_code == 201]
    rejected = [r for r in responses if r.status_code == 422]
    assert len(accepted) == 10 and len(rejected) == 10
    assert {r.json()["reason"] for r in rejected} == {"insufficient_funds"}
    holds = await one(platform, "SELECT sum(amount) FROM holds WHERE account_id = $1", trader.account_id)
    assert holds == D("10000.00")
    open_orders = await one(platform, "SELECT count(*) FROM orders WHERE status = 'pending_new'")
    assert open_orders == 10


# ---------------------------------------------------------------------------------- cancel and modify


async def outbox_payloads(platform: Platform) -> list[dict[str, Any]]:
    return [json.loads(r["p"]) for r in await sql(platform, "SELECT payload::text AS p FROM outbox ORDER BY id")]


async def test_orders_that_name_no_self_trade_prevention_get_the_accounts_default(
    client: httpx.AsyncClient, platform: Platform, alice: Actor
) -> None:
    account = f"/api/v1/accounts/{alice.account_id}"
    assert (await client.get(account, headers=alice.headers)).json()["stp"] == "cancel_newest"
    changed = await client.patch(account, json={"stp": "cancel_oldest"}, headers=alice.headers)
    assert changed.status_code == 200 and changed.json()["stp"] == "cancel_oldest"

    defaulted = (await post(client, alice, client_order_id="s1")).json()
    explicit = (await post(client, alice, client_order_id="s2", stp="cancel_both")).json()
    assert (defaulted["stp"], explicit["stp"]) == ("cancel_oldest", "cancel_both")
    assert [p["stp"] for p in await outbox_payloads(platform)] == ["cancel_oldest", "cancel_both"]  # to the engine

    # a later change of the default leaves placed orders alone, and a retry that names no mode still matches
    await client.patch(account, json={"stp": "cancel_both"}, headers=alice.headers)
    retry = await post(client, alice, client_order_id="s1")
    assert (retry.status_code, retry.json()) == (200, defaulted)
    other = await post(client, alice, client_order_id="s1", stp="cancel_newest")
    assert other.status_code == 409 and other.json()["error"] == "duplicate_client_order_id"
    audited = await sql(
        platform, "SELECT details->>'stp' AS stp FROM audit_log WHERE action = 'account.stp' ORDER BY id"
    )
    assert [r["stp"] for r in audited] == ["cancel_oldest", "cancel_both"]


async def test_only_the_owner_or_admin_sets_an_accounts_self_trade_prevention(
    client: httpx.AsyncClient, platform: Platform, alice: Actor
) -> None:
    account = f"/api/v1/accounts/{alice.account_id}"
    bob = await new_actor(platform)
    viewer = await new_actor(platform, Role.READONLY)
    admin = await new_actor(platform, Role.ADMIN)
    assert (await client.patch(account, json={"stp": "cancel_both"}, headers=bob.headers)).status_code == 404
    assert (await client.patch(account, json={"stp": "cancel_both"}, headers=viewer.headers)).status_code == 403
    bad = await client.patch(account, json={"stp": "cancel_all"}, headers=alice.headers)
    assert bad.status_code == 422 and bad.json()["error"] == "validation_error"
    assert (await client.get(account, headers=alice.headers)).json()["stp"] == "cancel_newest"
    by_admin = await client.patch(account, json={"stp": "cancel_both"}, headers=admin.headers)
    assert by_admin.status_code == 200 and by_admin.json()["stp"] == "cancel_both"


async def test_cancel_marks_pending_cancel_and_queues_a_cancel(
    client: httpx.AsyncClient, platform: Platform, alice: Actor
) -> None:
    order_id = (await post(client, alice)).json()["id"]
    response = await client.delete(f"/api/v1/orders/{order_id}", headers=alice.headers)
    assert response.status_code == 200 and response.json()["status"] == "pending_cancel"
    assert (await outbox_payloads(platform))[-1] == {
        "type": "cancel",
        "order_id": order_id,
        "account_id": alice.account_id,
        "symbol": "BTC-USD",
    }
    # the hold stays until the engine confirms the cancel
    assert await one(platform, "SELECT amount FROM holds WHERE order_id = $1 AND released_at IS NULL", order_id) == (
        BTC_RESERVE
    )
    again = await client.delete(f"/api/v1/orders/{order_id}", headers=alice.headers)
    assert again.status_code == 200 and again.json()["status"] == "pending_cancel"
    assert len(await outbox_payloads(platform)) == 2  # no second cancel message

    await sql(platform, "UPDATE orders SET status = 'canceled' WHERE id = $1", order_id)
    done = await client.delete(f"/api/v1/orders/{order_id}", headers=alice.headers)
    assert done.status_code == 409 and done.json()["error"] == "order_not_open"
    actions = await sql(
        platform, "SELECT action FROM audit_log WHERE entity = 'order' AND entity_id = $1 ORDER BY id", str(order_id)
    )
    assert [a["action"] for a in actions] == ["order.place", "order.cancel"]


async def test_modify_raises_the_hold_for_a_larger_order_and_queues_a_modify(
    client: httpx.AsyncClient, platform: Platform, alice: Actor
) -> None:
    order_id = (await post(client, alice)).json()["id"]
    response = await client.patch(f"/api/v1/orders/{order_id}", json={"quantity": "1"}, headers=alice.headers)
    assert response.status_code == 200, response.text
    assert await one(platform, "SELECT amount FROM holds WHERE order_id = $1", order_id) == D("65032.50")
    assert (await outbox_payloads(platform))[-1] == {
        "type": "modify",
        "order_id": order_id,
        "account_id": alice.account_id,
        "symbol": "BTC-USD",
        "modify_no": 1,  # the engine records it once processed, ending this modify's target
        "new_qty": "1",
        "new_price": None,
    }
    # a price rise raises the hold price and the hold; a later fall keeps the higher one until the engine acts
    up = await client.patch(f"/api/v1/orders/{order_id}", json={"price": "66000.00"}, headers=alice.headers)
    assert up.status_code == 200
    assert await one(platform, "SELECT hold_price FROM orders WHERE id = $1", order_id) == D("66000")
    assert await one(platform, "SELECT amount FROM holds WHERE order_id = $1", order_id) == D("66033.00")
    down = await client.patch(f"/api/v1/orders/{order_id}", json={"price": "64000.00"}, headers=alice.headers)
    assert down.status_code == 200
    assert await one(platform, "SELECT amount FROM holds WHERE order_id = $1", order_id) == D("66033.00")
    assert [(p["modify_no"], p["new_price"]) for p in (await outbox_payloads(platform))[-2:]] == [
        (2, "66000"),
        (3, "64000"),
    ]
    assert await one(platform, "SELECT modifies_requested FROM orders WHERE id = $1", order_id) == 3
    actions = await sql(
        platform, "SELECT action FROM audit_log WHERE entity = 'order' AND entity_id = $1 ORDER BY id", str(order_id)
    )
    assert [a["action"] for a in actions] == ["order.place"] + ["order.modify"] * 3


async def test_modify_refusals(client: httpx.AsyncClient, platform: Platform, alice: Actor) -> None:
    order_id = (await post(client, alice)).json()["id"]
    url = f"/api/v1/orders/{order_id}"
    broke = await client.patch(url, json={"quantity": "16"}, headers=alice.headers)  # 16 BTC: more than the cash
    assert broke.status_code == 422 and broke.json()["reason"] == "insufficient_funds"
    assert broke.json()["order"]["quantity"] == "0.5"
    assert await one(platform, "SELECT amount FROM holds WHERE order_id = $1", order_id) == BTC_RESERVE
    off_tick = await client.patch(url, json={"price": "65000.001"}, headers=alice.headers)
    assert off_tick.status_code == 422 and off_tick.json()["reason"] == "price_not_on_tick"
    empty = await client.patch(url, json={}, headers=alice.headers)
    assert empty.status_code == 422 and empty.json()["error"] == "validation_error"

    await sql(platform, "UPDATE orders SET status = 'partially_filled', filled_quantity = 0.3 WHERE id = $1", order_id)
    below = await client.patch(url, json={"quantity": "0.3"}, headers=alice.headers)
    assert below.status_code == 422 and below.json()["error"] == "validation_error"
    ok = await client.patch(url, json={"quantity": "0.3001"}, headers=alice.headers)
    assert ok.status_code == 200  # a decrease: the engine shrinks the hold when it applies it

    await sql(platform, "UPDATE orders SET status = 'filled', filled_quantity = quantity WHERE id = $1", order_id)
    done = await client.patch(url, json={"quantity": "2"}, headers=alice.headers)
    assert done.status_code == 409 and done.json()["error"] == "order_not_open"
    assert [p["type"] for p in await outbox_payloads(platform)] == ["new", "modify"]


async def test_cancel_all_queues_one_cancel_per_open_order_on_its_symbols_shard(
    client: httpx.AsyncClient, platform: Platform, alice: Actor
) -> None:
    btc = [(await post(client, alice)).json()["id"] for _ in range(2)]
    eth = (await post(client, alice, symbol="ETH-USD", quantity="1", price="3200.00")).json()["id"]
    filled = (await post(client, alice, symbol="ETH-USD", quantity="1", price="3200.00")).json()["id"]
    await sql(platform, "UPDATE orders SET status = 'filled', filled_quantity = quantity WHERE id = $1", filled)

    only_eth = await client.delete(
        "/api/v1/orders", params={"account_id": alice.account_id, "symbol": "ETH-USD"}, headers=alice.headers
    )
    assert only_eth.status_code == 200 and [o["id"] for o in only_eth.json()] == [eth]
    everything = await client.delete("/api/v1/orders", params={"account_id": alice.account_id}, headers=alice.headers)
    assert [o["id"] for o in everything.json()] == btc
    assert {o["status"] for o in everything.json()} == {"pending_cancel"}

    cancels = await sql(
        platform, "SELECT stream, key, payload::text AS p FROM outbox WHERE payload->>'type' = 'cancel' ORDER BY id"
    )
    assert [json.loads(c["p"])["order_id"] for c in cancels] == [eth, *btc]
    shards = platform.settings.engine_shards
    assert [(c["stream"], c["key"]) for c in cancels] == [
        (f"orders.{shard_for('ETH-USD', shards)}", "ETH-USD"),
        *[(f"orders.{shard_for('BTC-USD', shards)}", "BTC-USD")] * 2,
    ]
    statuses = await sql(platform, "SELECT id, status FROM orders ORDER BY id")
    assert {r["id"]: r["status"] for r in statuses} == {
        btc[0]: "pending_cancel",
        btc[1]: "pending_cancel",
        eth: "pending_cancel",
        filled: "filled",
    }
    assert await one(platform, "SELECT count(*) FROM audit_log WHERE action = 'order.cancel'") == 3


# --------------------------------------------------------------------------------------- permissions


async def test_traders_see_and_touch_only_their_own_accounts(
    client: httpx.AsyncClient, platform: Platform, alice: Actor
) -> None:
    bob = await new_actor(platform)
    order_id = (await post(client, alice)).json()["id"]
    for method, url, payload in [
        ("GET", f"/api/v1/orders/{order_id}", None),
        ("PATCH", f"/api/v1/orders/{order_id}", {"quantity": "1"}),
        ("DELETE", f"/api/v1/orders/{order_id}", None),
        ("GET", f"/api/v1/accounts/{alice.account_id}", None),
        ("GET", f"/api/v1/positions?account_id={alice.account_id}", None),
        ("DELETE", f"/api/v1/orders?account_id={alice.account_id}", None),
    ]:
        response = await client.request(method, url, json=payload, headers=bob.headers)
        assert response.status_code == 404, (method, url, response.text)
    stolen = await client.post("/api/v1/orders", json=body(alice), headers=bob.headers)
    assert stolen.status_code == 404
    listed = await client.get("/api/v1/orders", headers=bob.headers)
    assert listed.json()["items"] == []
    assert await one(platform, "SELECT status FROM orders WHERE id = $1", order_id) == "pending_new"

    admin = await new_actor(platform, Role.ADMIN)
    assert (await client.get(f"/api/v1/orders/{order_id}", headers=admin.headers)).status_code == 200
    assert [o["id"] for o in (await client.get("/api/v1/orders", headers=admin.headers)).json()["items"]] == [order_id]
    on_behalf = await client.post("/api/v1/orders", json=body(alice), headers=admin.headers)
    assert on_behalf.status_code == 201
    assert (await client.delete(f"/api/v1/orders/{order_id}", headers=admin.headers)).status_code == 200


async def test_readonly_users_may_read_but_never_write(
    client: httpx.AsyncClient, platform: Platform, alice: Actor
) -> None:
    viewer = await new_actor(platform, Role.READONLY)
    order_id = (await post(client, alice)).json()["id"]
    writes = [
        await client.post("/api/v1/orders", json=body(alice), headers=viewer.headers),
        await client.patch(f"/api/v1/orders/{order_id}", json={"quantity": "1"}, headers=viewer.headers),
        await client.delete(f"/api/v1/orders/{order_id}", headers=viewer.headers),
        await client.delete("/api/v1/orders", params={"account_id": alice.account_id}, headers=viewer.headers),
    ]
    assert [w.status_code for w in writes] == [403] * 4
    assert {w.json()["error"] for w in writes} == {"forbidden"}
    assert (await client.get("/api/v1/instruments", headers=viewer.headers)).status_code == 200
    assert (await client.get("/api/v1/orders", headers=viewer.headers)).status_code == 200
    assert await counts(platform) == (1, 1, 1)


# ----------------------------------------------------------------------------------------------- reads


async def test_order_list_filters_and_paginates_without_gaps_or_repeats(
    client: httpx.AsyncClient, platform: Platform, alice: Actor
) -> None:
    ids = [(await post(client, alice)).json()["id"] for _ in range(4)]
    ids.append((await post(client, alice, symbol="ETH-USD", quantity="1", price="3200.00")).json()["id"])
    rejected = (await post(client, alice, quantity="50")).json()["order"]["id"]
    # spread creation times over days so the time filter has something to cut
    base = datetime(2026, 1, 1, tzinfo=UTC)
    for n, order_id in enumerate([*ids, rejected]):
        await sql(platform, "UPDATE orders SET created_at = $2 WHERE id = $1", order_id, base + timedelta(days=n))

    async def listing(**params: Any) -> dict[str, Any]:
        response = await client.get("/api/v1/orders", params=params, headers=alice.headers)
        assert response.status_code == 200, response.text
        return dict(response.json())

    assert [o["id"] for o in (await listing())["items"]] == [rejected, *reversed(ids)]
    assert [o["id"] for o in (await listing(symbol="ETH-USD"))["items"]] == [ids[4]]
    assert [o["id"] for o in (await listing(status="rejected"))["items"]] == [rejected]
    assert [o["id"] for o in (await listing(status="open"))["items"]] == list(reversed(ids))
    window = await listing(start=(base + timedelta(days=1)).isoformat(), end=(base + timedelta(days=3)).isoformat())
    assert [o["id"] for o in window["items"]] == [ids[2], ids[1]]

    seen: list[int] = []
    page = await listing(limit=2)
    while True:
        seen += [o["id"] for o in page["items"]]
        if page["next_cursor"] is None:
            break
        page = await listing(limit=2, cursor=page["next_cursor"])
    assert seen == [rejected, *reversed(ids)]

    assert (await client.get("/api/v1/orders", params={"limit": 501}, headers=alice.headers)).status_code == 422
    bad = await client.get("/api/v1/orders", params={"cursor": "garbage"}, headers=alice.headers)
    assert bad.status_code == 422
    assert (await client.get("/api/v1/orders", params={"status": "sleeping"}, headers=alice.headers)).status_code == 422


async def test_open_orders_come_through_the_user_cache_which_placement_invalidates(
    client: httpx.AsyncClient, platform: Platform, alice: Actor
) -> None:
    first = (await post(client, alice)).json()["id"]
    listed = await client.get("/api/v1/orders", params={"status": "open"}, headers=alice.headers)
    assert [o["id"] for o in listed.json()["items"]] == [first]
    assert await platform.cache.client.exists(f"order_book:{alice.user_id}") == 1
    assert await platform.cache.client.ttl(f"order_book:{alice.user_id}") <= 30
    second = (await post(client, alice)).json()["id"]  # drops the cache after commit
    listed = await client.get("/api/v1/orders", params={"status": "open"}, headers=alice.headers)
    assert [o["id"] for o in listed.json()["items"]] == [second, first]


async def test_account_summary_and_positions_match_a_hand_computation(
    client: httpx.AsyncClient, platform: Platform
) -> None:
    trader = await new_actor(platform, cash="100000.00")
    await sql(
        platform,
        "INSERT INTO positions (account_id, instrument_id, net_quantity, average_price, realized_pnl)"
        " SELECT $1::bigint, id, 2, 60000, 150.25 FROM instruments WHERE symbol = 'BTC-USD'"
        " UNION ALL SELECT $1::bigint, id, -10, 200, -20 FROM instruments WHERE symbol = 'AAPL'"
        " UNION ALL SELECT $1::bigint, id, 0, 0, 7 FROM instruments WHERE symbol = 'ETH-USD'",
        trader.account_id,
    )
    await sql(platform, "UPDATE instruments SET last_price = 65000.50 WHERE symbol = 'BTC-USD'")
    # AAPL has not traded: marked at its reference price 190.00
    placed = await post(client, trader, symbol="AAPL", quantity="10", price="190.00")  # holds 1900 * 1.0003
    assert placed.status_code == 201, placed.text

    summary = (await client.get(f"/api/v1/accounts/{trader.account_id}", headers=trader.headers)).json()
    # cash 100000; holds 1900.57; unrealized 2 * 5000.50 + (-10) * (190 - 200) = 10001 + 100
    # realized 150.25 - 20 + 7; positions value 2 * 65000.50 - 10 * 190 = 128101; equity = cash + that
    assert summary == {
        "account_id": trader.account_id,
        "user_id": trader.user_id,
        "name": "main",
        "kind": "cash",
        "currency": "USD",
        "status": "active",
        "stp": "cancel_newest",
        "cash": "100000",
        "holds": "1900.57",
        "free": "98099.43",
        "positions_value": "128101",
        "equity": "228101",
        "margin_used": "0",  # a cash account
        "realized_pnl": "137.25",
        "unrealized_pnl": "10101",
    }

    positions = (await client.get("/api/v1/positions", headers=trader.headers)).json()
    by_symbol = {p["symbol"]: p for p in positions}
    assert by_symbol["BTC-USD"] == {
        "account_id": trader.account_id,
        "symbol": "BTC-USD",
        "net_quantity": "2",
        "average_price": "60000",
        "realized_pnl": "150.25",
        "mark_price": "65000.5",
        "unrealized_pnl": "10001",
    }
    assert (by_symbol["AAPL"]["mark_price"], by_symbol["AAPL"]["unrealized_pnl"]) == ("190", "100")
    # the position rows are cached per user, the marks are not: a new trade price shows at once
    await sql(platform, "UPDATE instruments SET last_price = 64000 WHERE symbol = 'BTC-USD'")
    only_btc = (await client.get("/api/v1/positions", params={"symbol": "BTC-USD"}, headers=trader.headers)).json()
    assert [(p["symbol"], p["unrealized_pnl"]) for p in only_btc] == [("BTC-USD", "8000")]


async def test_fills_list_filters_by_order_and_paginates(
    client: httpx.AsyncClient, platform: Platform, alice: Actor
) -> None:
    order_id = (await post(client, alice)).json()["id"]
    other = (await post(client, alice)).json()["id"]
    await sql(
        platform,
        "INSERT INTO fills (fill_id, order_id, account_id, instrument_id, side, quantity, price, fee, fee_asset,"
        " liquidity, trade_id, created_at)"
        " SELECT 'f' || n, CASE WHEN n < 3 THEN $2::bigint ELSE $3::bigint END, $1::bigint, i.id, 'buy', 0.1, 65000,"
        " 3.25, 'USD', 'taker',"
        " 't' || n, '2026-01-01'::timestamptz + n * interval '1 minute'"
        " FROM instruments i, generate_series(0, 4) n WHERE i.symbol = 'BTC-USD'",
        alice.account_id,
        order_id,
        other,
    )
    fills = (await client.get("/api/v1/fills", params={"order_id": order_id}, headers=alice.headers)).json()
    assert [f["fill_id"] for f in fills["items"]] == ["f2", "f1", "f0"]
    assert (fills["items"][0]["quantity"], fills["items"][0]["fee"], fills["items"][0]["symbol"]) == (
        "0.1",
        "3.25",
        "BTC-USD",
    )
    page1 = (await client.get("/api/v1/fills", params={"limit": 3}, headers=alice.headers)).json()
    page2 = (
        await client.get("/api/v1/fills", params={"limit": 3, "cursor": page1["next_cursor"]}, headers=alice.headers)
    ).json()
    assert [f["fill_id"] for f in page1["items"] + page2["items"]] == ["f4", "f3", "f2", "f1", "f0"]
    assert page2["next_cursor"] is None
    stranger = await new_actor(platform)
    assert (await client.get("/api/v1/fills", headers=stranger.headers)).json()["items"] == []


async def test_instruments_and_the_book_snapshot(client: httpx.AsyncClient, platform: Platform, alice: Actor) -> None:
    instruments = (await client.get("/api/v1/instruments", headers=alice.headers)).json()
    btc = next(i for i in instruments if i["symbol"] == "BTC-USD")
    assert (btc["tick_size"], btc["lot_size"], btc["reference_price"], btc["status"]) == (
        "0.01",
        "0.0001",
        "65000",
        "open",
    )

    # a symbol of this test's own, so the shared Redis key cannot be another test's book
    symbol = f"T{random.randint(10**8, 10**9)}-USD"
    await sql(
        platform,
        "INSERT INTO instruments (symbol, base_asset, quote_asset, tick_size, lot_size, min_qty, max_qty,"
        " price_band_pct) VALUES ($1, 'T', 'USD', 0.01, 1, 1, 1000, 10)",
        symbol,
    )
    empty = (await client.get(f"/api/v1/book/{symbol}", headers=alice.headers)).json()
    assert empty == {"symbol": symbol, "seq": 0, "bids": [], "asks": []}
    snapshot = {"seq": 7, "bids": [["10.01", "3"], ["10", "1"]], "asks": [["10.02", "2"]]}
    await platform.cache.client.set(f"tp:book:{symbol}:snapshot", json.dumps(snapshot), ex=60)
    top = (await client.get(f"/api/v1/book/{symbol}", params={"levels": 1}, headers=alice.headers)).json()
    assert top == {"symbol": symbol, "seq": 7, "bids": [["10.01", "3"]], "asks": [["10.02", "2"]]}
    assert (await client.get("/api/v1/book/NOPE", headers=alice.headers)).status_code == 404
