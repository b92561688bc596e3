"""Audit of modifying stop orders through the real order entry (issue 3: "Modify (price and/or quantity)";
"stop-limit becomes a limit at its limit price"): a waiting stop-limit's new limit is the price it rests at once
triggered, with the hold following it; a stop (market) order has no limit price to change.
"""

from __future__ import annotations

from decimal import Decimal

import pytest

from tests.integration import test_engine
from tests.integration.test_engine import Desk, cash_buy_hold
from tradeplane.errors import InvalidRequest
from tradeplane.services.identity import Principal, Role
from tradeplane.services.orders import OrderEntry

desk = test_engine.desk  # the engine tests' fixture: database, Redis, a namespaced bus, relay and engine

D = Decimal


async def test_a_repriced_waiting_stop_limit_rests_at_its_new_limit_once_triggered(desk: Desk) -> None:
    seller = await desk.trader("seller", base="1")
    buyer = await desk.trader("buyer")
    stopper = await desk.trader("stopper")
    stop = await stopper.submit("buy", "0.5", "102.00", order_type="stop_limit", stop_price="101.00")
    await desk.pump()
    await stopper.amend(stop, price="103.00")  # a higher limit: the api raises the hold now
    await desk.pump()
    row = await desk.order(stop)
    assert (row["status"], row["price"], row["triggered_at"]) == ("new", D("103.00"), None)
    assert await desk.held(stop) == cash_buy_hold("0.5", "103.00")
    await stopper.amend(stop, price="101.50")  # a lower one: the engine lowers the hold when it applies it
    await desk.pump()
    assert await desk.held(stop) == cash_buy_hold("0.5", "101.50")

    await seller.place("sell", "0.1", "101.00")
    await buyer.place("buy", "0.1", "101.00")  # last trade 101 >= 101: the stop-limit becomes a limit at 101.50
    await desk.pump()
    row = await desk.order(stop)
    assert (row["status"], row["price"]) == ("new", D("101.50"))
    assert row["triggered_at"] is not None
    assert desk.worker.engine.book(desk.symbol).depth()[0] == [(10150, 5000)]
    assert await desk.held(stop) == cash_buy_hold("0.5", "101.50")
    await desk.check()


async def test_a_stop_market_order_has_no_limit_price_to_change(desk: Desk) -> None:
    stopper = await desk.trader("stopper", base="1")
    stop = await stopper.submit("sell", "0.5", order_type="stop", stop_price="95.00")
    await desk.pump()
    principal = Principal(stopper.user_id, f"user{stopper.user_id}", Role.TRADER)
    with pytest.raises(InvalidRequest) as refused:
        async with desk.db.transaction("test.amend") as conn:
            await OrderEntry(desk.cache, shards=1).modify_order(conn, principal, stop, price=D("96.00"))
    assert refused.value.status_code == 422
    async with desk.db.transaction("test.amend") as conn:
        amendment = await OrderEntry(desk.cache, shards=1).modify_order(conn, principal, stop, quantity=D("0.3"))
    assert amendment.rejection is None
    await desk.pump()
    row = await desk.order(stop)
    assert (row["status"], row["quantity"], row["triggered_at"]) == ("new", D("0.3"), None)
    assert await desk.held(stop) == D("0.3")  # a cash sell holds the base it sells
    await desk.check()
