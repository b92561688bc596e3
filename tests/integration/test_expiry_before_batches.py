"""Audit of DAY/GTD expiry in the engine worker (issue 3: "DAY expires at the instrument's session close, GTD at
the given time"): an order whose time has come never trades again, whether the engine was running, behind, or
restarted; an expiry keeps what was filled, releases the rest of the hold and reads ``expired``.
"""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

from tests.integration import test_engine
from tests.integration.test_engine import T0, Desk, _restart

desk = test_engine.desk  # the engine tests' fixture: database, Redis, a namespaced bus, relay and engine

D = Decimal


async def test_an_order_past_its_expiry_does_not_trade_with_the_next_batch(desk: Desk) -> None:
    """The clock passes a GTD sell's expiry while no expiry pass has run yet (the loop expires between batches):
    a buy that arrives now must not fill against it."""
    seller = await desk.trader("seller", base="1")
    buyer = await desk.trader("buyer")
    gtd = await seller.place("sell", "1", "100.00", tif="gtd", expire_at=T0 + timedelta(hours=1))
    await desk.pump()
    assert (await desk.order(gtd))["status"] == "new"
    desk.clock.advance(timedelta(hours=2))
    bid = await buyer.place("buy", "1", "100.00")
    await desk.pump()
    assert (await desk.order(gtd))["status"] == "expired"
    row = await desk.order(bid)
    assert (row["status"], row["filled_quantity"]) == ("new", D("0"))
    assert await desk.value("SELECT count(*) FROM fills") == 0
    await desk.check()


async def test_an_order_that_expired_while_the_engine_was_down_does_not_trade_after_the_rebuild(desk: Desk) -> None:
    seller = await desk.trader("seller", base="1")
    buyer = await desk.trader("buyer")
    day = await seller.place("sell", "1", "100.00", tif="day", expire_at=T0 + timedelta(hours=6, minutes=30))
    await desk.pump()
    await _restart(desk)
    desk.clock.advance(timedelta(hours=8))  # past the 21:00 session close while the engine was away
    bid = await buyer.place("buy", "1", "100.00")
    await desk.pump()
    assert (await desk.order(day))["status"] == "expired"
    assert (await desk.order(bid))["filled_quantity"] == D("0")
    await desk.check()


async def test_a_partially_filled_order_expires_keeping_its_fills_and_releasing_the_rest(desk: Desk) -> None:
    seller = await desk.trader("seller", base="1")
    buyer = await desk.trader("buyer")
    bid = await buyer.place("buy", "1", "100.00", tif="gtd", expire_at=T0 + timedelta(hours=1))
    await desk.pump()
    await seller.place("sell", "0.4", "100.00")
    await desk.pump()
    assert (await desk.order(bid))["status"] == "partially_filled"
    assert await desk.held(bid) > 0
    desk.clock.advance(timedelta(hours=1))  # exactly at expire_at: due
    assert await desk.worker.expire_due() == 1
    row = await desk.order(bid)
    assert (row["status"], row["filled_quantity"]) == ("expired", D("0.4"))
    assert await desk.held(bid) == 0
    position = await buyer.position()
    assert position is not None and position["net_quantity"] == D("0.4")
    await desk.check()


async def test_a_waiting_stop_expires_after_a_restart_and_never_triggers(desk: Desk) -> None:
    """An untriggered GTD stop is rebuilt into the stop book with its expiry; once due it expires, and a
    later trade through its stop price no longer fires it."""
    bidder = await desk.trader("bidder")
    seller = await desk.trader("seller", base="1")
    stopper = await desk.trader("stopper", base="1")
    await bidder.place("buy", "1", "94.00")
    stop = await stopper.place(
        "sell", "0.2", order_type="stop", stop_price="95.00", tif="gtd", expire_at=T0 + timedelta(minutes=5)
    )
    await desk.pump()
    await _restart(desk)
    desk.clock.advance(timedelta(minutes=10))
    await seller.place("sell", "0.1", "94.00")  # trades at 94 <= 95: would fire the stop if it were alive
    await desk.pump()
    row = await desk.order(stop)
    assert (row["status"], row["filled_quantity"]) == ("expired", D("0"))
    await desk.check()
