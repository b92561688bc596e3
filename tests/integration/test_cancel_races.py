"""Audit of cancel and cancel-all racing with fills (issue 3: "cancel-all for an account, optionally for one
symbol"): through the real order entry, the real relay and the real engine, a fill that reaches the engine before
the cancel wins, the rest is canceled, every hold is released, and a cancel of a finished order is a clear 409.
"""

from __future__ import annotations

from decimal import Decimal

import pytest

from tests.integration import test_engine
from tests.integration.test_engine import Desk
from tradeplane.errors import Conflict
from tradeplane.services.orders import OrderEntry

desk = test_engine.desk  # the engine tests' fixture: database, Redis, a namespaced bus, relay and engine

D = Decimal


async def test_cancel_all_racing_a_fill_cancels_only_what_is_still_open(desk: Desk) -> None:
    seller = await desk.trader("seller", base="3")
    buyer = await desk.trader("buyer")
    near = await seller.place("sell", "1", "100.00")
    far = await seller.place("sell", "1", "101.00")
    half = await seller.place("sell", "1", "102.00")
    await desk.pump()
    # The buys are committed (and so reach the engine) before the cancel-all: they win the race.
    await buyer.place("buy", "1", "100.00")
    await buyer.place("buy", "0.4", "102.00")  # takes 101 first: 0.4 of `far`
    async with desk.db.transaction("test.cancel_all") as conn:
        moved = await OrderEntry(desk.cache, shards=1).cancel_all(conn, seller.principal, seller.account_id)
    assert sorted(o.id for o in moved) == [near, far, half]
    assert {o.status for o in moved} == {"pending_cancel"}
    await desk.pump()
    rows = {i: await desk.order(i) for i in (near, far, half)}
    assert (rows[near]["status"], rows[near]["filled_quantity"]) == ("filled", D("1"))
    assert (rows[far]["status"], rows[far]["filled_quantity"]) == ("canceled", D("0.4"))
    assert (rows[half]["status"], rows[half]["filled_quantity"]) == ("canceled", D("0"))
    for order_id in (near, far, half):
        assert await desk.held(order_id) == 0
    position = await seller.position()
    assert position is not None and position["net_quantity"] == D("1.6")
    await desk.check()


async def test_canceling_a_filled_order_is_a_conflict_and_changes_nothing(desk: Desk) -> None:
    seller = await desk.trader("seller", base="1")
    buyer = await desk.trader("buyer")
    ask = await seller.place("sell", "1", "100.00")
    await buyer.place("buy", "1", "100.00")
    await desk.pump()
    assert (await desk.order(ask))["status"] == "filled"
    outbox_before = await desk.value("SELECT count(*) FROM outbox")
    with pytest.raises(Conflict) as refused:
        async with desk.db.transaction("test.cancel") as conn:
            await OrderEntry(desk.cache, shards=1).cancel_order(conn, seller.principal, ask)
    assert (refused.value.status_code, refused.value.code) == (409, "order_not_open")
    assert (await desk.order(ask))["status"] == "filled"
    assert await desk.value("SELECT count(*) FROM outbox") == outbox_before
    # cancel-all finds nothing to cancel in the account either
    async with desk.db.transaction("test.cancel_all") as conn:
        assert await OrderEntry(desk.cache, shards=1).cancel_all(conn, seller.principal, seller.account_id) == []
