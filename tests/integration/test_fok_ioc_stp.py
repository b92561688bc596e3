"""Audit of FOK and IOC sweeping several levels while self-trade prevention acts (issue 3: "FOK fills completely or
not at all"; "Self-trade prevention per account: cancel newest (default), cancel oldest, cancel both"), through the
engine worker and settlement: statuses, fills and holds agree with what the book did.
"""

from __future__ import annotations

from decimal import Decimal

from tests.integration import test_engine
from tests.integration.test_engine import Desk

desk = test_engine.desk  # the engine tests' fixture: database, Redis, a namespaced bus, relay and engine

D = Decimal


async def test_a_fok_with_cancel_oldest_sweeps_past_its_own_order_and_cancels_it(desk: Desk) -> None:
    street = await desk.trader("street", base="5")
    me = await desk.trader("me", base="5")
    cheap = await street.place("sell", "1", "100.00")
    mine = await me.place("sell", "1", "101.00")
    dear = await street.place("sell", "1", "102.00")
    await desk.pump()
    fok = await me.place("buy", "2", "102.00", tif="fok", stp="cancel_oldest")
    await desk.pump()
    row = await desk.order(fok)
    assert (row["status"], row["filled_quantity"]) == ("filled", D("2"))
    assert [(await desk.order(i))["status"] for i in (cheap, mine, dear)] == ["filled", "canceled", "filled"]
    assert (await desk.order(mine))["reject_reason"] == "stp"  # canceled without being asked: the row says why
    assert await desk.held(mine) == 0 and await desk.held(fok) == 0
    await desk.check()


async def test_a_fok_with_cancel_newest_that_meets_its_own_order_is_rejected_and_touches_nothing(desk: Desk) -> None:
    street = await desk.trader("street", base="5")
    me = await desk.trader("me", base="5")
    cheap = await street.place("sell", "1", "100.00")
    mine = await me.place("sell", "1", "101.00")
    await street.place("sell", "1", "102.00")
    await desk.pump()
    fok = await me.place("buy", "2", "102.00", tif="fok")
    await desk.pump()
    row = await desk.order(fok)
    assert (row["status"], row["reject_reason"], row["filled_quantity"]) == ("rejected", "fok_unfillable", D("0"))
    assert [(await desk.order(i))["status"] for i in (cheap, mine)] == ["new", "new"]
    assert await desk.held(fok) == 0 and await desk.held(mine) == D("1")
    assert await desk.value("SELECT count(*) FROM fills") == 0
    await desk.check()


async def test_an_ioc_with_cancel_both_stops_at_its_own_order_and_releases_the_rest(desk: Desk) -> None:
    street = await desk.trader("street", base="5")
    me = await desk.trader("me", base="5")
    await street.place("sell", "1", "100.00")
    mine = await me.place("sell", "1", "101.00")
    dear = await street.place("sell", "1", "102.00")
    await desk.pump()
    ioc = await me.place("buy", "3", "102.00", tif="ioc", stp="cancel_both")
    await desk.pump()
    row = await desk.order(ioc)
    assert (row["status"], row["filled_quantity"], row["reject_reason"]) == ("canceled", D("1"), "stp")
    assert [(await desk.order(i))["status"] for i in (mine, dear)] == ["canceled", "new"]
    assert (await desk.order(mine))["reject_reason"] == "stp"
    assert await desk.held(ioc) == 0 and await desk.held(mine) == 0
    await desk.check()
