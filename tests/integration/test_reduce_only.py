"""Reduce-only enforced by the engine, through the real order entry, relay, engine worker and PostgreSQL: a
reduce-only order that other fills have left nothing to reduce is canceled or cut (its hold following it), never
filled into a new position, and a rebuilt engine knows the positions to do the same (issue 3)."""

from __future__ import annotations

from decimal import Decimal as D

from tests.integration import test_engine
from tests.integration.test_engine import Desk, Trader, _restart
from tradeplane.domain.orders import OrderType, Side
from tradeplane.domain.risk import OrderTerms
from tradeplane.services.identity import Principal, Role
from tradeplane.services.orders import OrderEntry, OrderRequest

desk = test_engine.desk  # the engine tests' fixture: database, Redis, a namespaced bus, relay and engine


async def place(desk: Desk, trader: Trader, side: str, qty: str, price: str, *, reduce_only: bool = False) -> int:
    """A limit order through the api's order entry (pre-trade risk, its reduce-only check and the hold)."""
    principal = Principal(trader.user_id, f"user{trader.user_id}", Role.TRADER)
    terms = OrderTerms(Side(side), OrderType.LIMIT, D(qty), D(price), reduce_only=reduce_only)
    async with desk.db.transaction("test.place") as conn:
        placement = await OrderEntry(desk.cache, shards=1).place_order(
            conn, principal, OrderRequest(trader.account_id, desk.symbol, terms)
        )
    assert placement.rejection is None and placement.order is not None, placement.rejection
    return placement.order.id


async def net(trader: Trader) -> D:
    position = await trader.position()
    return D(0) if position is None else position["net_quantity"]


async def go_long(desk: Desk, trader: Trader, street: Trader, qty: str) -> None:
    await place(desk, street, "sell", qty, "100.00")
    await place(desk, trader, "buy", qty, "100.00")
    await desk.pump()
    assert await net(trader) == D(qty)


async def test_a_plain_sell_filling_first_cancels_the_resting_reduce_only_sell(desk: Desk) -> None:
    """The issue's defect: long 10, reduce-only SELL 10 resting above the market, then a plain SELL 10 fills
    first. The reduce-only order is canceled at that fill with its hold released, so a buyer later reaching
    its price does not open a short of 10."""
    street = await desk.trader("street", kind="margin", cash="100000")
    trader = await desk.trader("trader", kind="margin", cash="10000")
    await go_long(desk, trader, street, "10")
    closing = await place(desk, trader, "sell", "10", "105.00", reduce_only=True)
    await desk.pump()
    assert (await desk.order(closing))["status"] == "new"
    assert await desk.held(closing) == D("0.53")  # reduce-only on margin: the worst fee, 10 x 105 x 0.0005 = 0.525

    await place(desk, street, "buy", "10", "100.00")
    await place(desk, trader, "sell", "10", "100.00")  # an ordinary sell takes the position to 0 first
    await desk.pump()
    assert await net(trader) == 0
    row = await desk.order(closing)
    assert (row["status"], row["filled_quantity"], row["reject_reason"]) == ("canceled", 0, "reduce_only_no_position")
    assert await desk.held(closing) == 0

    late_buyer = await place(desk, street, "buy", "10", "105.00")  # where the reduce-only sell was
    await desk.pump()
    assert (await desk.order(late_buyer))["status"] == "new"  # nothing to trade with
    assert await net(trader) == 0
    await desk.check()  # holds equal what open orders reserve, ledger balanced, positions = fills


async def test_a_rebuilt_engine_knows_the_positions_and_cuts_reduce_only_orders_to_them(desk: Desk) -> None:
    """Long 10 with a reduce-only SELL 6 resting; the engine restarts. A plain SELL 7 then leaves a position of
    3: the rebuilt engine (positions loaded from PostgreSQL with the open orders) cuts the reduce-only order to 3,
    keeping its place and its reduced hold, and it later fills 3 and no more."""
    street = await desk.trader("street", kind="margin", cash="100000")
    trader = await desk.trader("trader", kind="margin", cash="10000")
    await go_long(desk, trader, street, "10")
    closing = await place(desk, trader, "sell", "6", "105.00", reduce_only=True)
    await desk.pump()

    await _restart(desk)
    book = desk.worker.engine.book(desk.symbol)
    assert book.position(trader.account_id) == 100_000  # 10 in lots of 0.0001
    assert [s.reduce_only for s in book.resting_orders()] == [True]

    await place(desk, street, "buy", "7", "100.00")
    await place(desk, trader, "sell", "7", "100.00")
    await desk.pump()
    assert await net(trader) == 3
    row = await desk.order(closing)
    assert (row["status"], row["quantity"], row["reject_reason"]) == ("new", 3, "reduce_only_capped")
    assert await desk.held(closing) == D("0.16")  # 3 x 105 x 0.0005 = 0.1575, rounded up to the cent

    buyer = await place(desk, street, "buy", "10", "105.00")
    await desk.pump()
    assert (await desk.order(closing))["status"] == "filled"
    assert (await desk.order(buyer))["filled_quantity"] == 3
    assert await net(trader) == 0
    await desk.check()
