"""Modifies in flight, through the real order entry, relay, engine worker and PostgreSQL (issue 3).

The api prices a modify (its risk checks and the hold it raises) from the terms the order is headed for: the
modifies it sent that the engine has not processed yet, then this one. Once the engine has processed them,
applied or refused, the order's own terms are the target again: a refused price is not asked for twice, and
the engine's own cut of a reduce-only order is not undone by a later modify.
"""

from __future__ import annotations

from decimal import Decimal as D

from tests.integration import test_engine
from tests.integration.test_engine import Desk, Trader, cash_buy_hold
from tests.integration.test_reduce_only import go_long, place
from tradeplane.domain.orders import OrderType, Side
from tradeplane.domain.risk import OrderTerms, RiskReason, RiskRejection
from tradeplane.services.orders import OrderEntry, OrderRequest, Placement

desk = test_engine.desk  # the engine tests' fixture: database, Redis, a namespaced bus, relay and engine


async def post_only(desk: Desk, trader: Trader, side: Side, qty: str, price: str) -> Placement:
    """POST /orders through the real order entry (pre-trade risk and its funds check): a post-only limit order."""
    terms = OrderTerms(side, OrderType.LIMIT, D(qty), D(price), post_only=True)
    async with desk.db.transaction("test.place") as conn:
        return await OrderEntry(desk.cache, shards=1).place_order(
            conn, trader.principal, OrderRequest(trader.account_id, desk.symbol, terms)
        )


async def post_only_bid(desk: Desk, trader: Trader, qty: str, price: str) -> int:
    """A post-only limit buy that risk accepts: its order id."""
    placement = await post_only(desk, trader, Side.BUY, qty, price)
    assert placement.rejection is None and placement.order is not None, placement.rejection
    return placement.order.id


async def patch(
    desk: Desk, trader: Trader, order_id: int, *, quantity: str | None = None, price: str | None = None
) -> RiskRejection | None:
    """PATCH /orders/{id} through the real order entry (committed whatever risk said, as the api does)."""
    async with desk.db.transaction("test.modify") as conn:
        amendment = await OrderEntry(desk.cache, shards=1).modify_order(
            conn,
            trader.principal,
            order_id,
            quantity=None if quantity is None else D(quantity),
            price=None if price is None else D(price),
        )
    return amendment.rejection


async def counters(desk: Desk, order_id: int) -> tuple[int, int]:
    row = await desk.order(order_id)
    return row["modifies_requested"], row["modifies_done"]


async def test_a_quantity_change_after_a_refused_reprice_keeps_the_original_price(desk: Desk) -> None:
    """The issue's defect: a post-only bid's reprice to a crossing price is refused by the engine; a later
    quantity-only modify must be priced (funds check and hold) at the price the order still has, not the
    refused one. The buyer can afford 2 at 100 (200.10) but not 2 at 106 (212.11)."""
    seller = await desk.trader("seller", base="5")
    buyer = await desk.trader("buyer", cash="210")
    await seller.place("sell", "1", "105.00")
    bid = await post_only_bid(desk, buyer, "1", "100.00")
    await desk.pump()

    assert await patch(desk, buyer, bid, price="106.00") is None  # accepted by the api: 106.06 fits
    await desk.pump()
    row = await desk.order(bid)
    assert (row["price"], row["reject_reason"]) == (D("100.00"), "post_only_would_take")
    assert await counters(desk, bid) == (1, 1)  # the refused modify is no longer in flight

    assert await patch(desk, buyer, bid, quantity="2") is None  # was refused for insufficient funds at 106
    assert await desk.held(bid) == cash_buy_hold("2", "100.00") == D("200.10")
    assert (await desk.order(bid))["hold_price"] == D("100.00")
    await desk.pump()
    row = await desk.order(bid)
    assert (row["status"], row["quantity"], row["price"], row["hold_price"], row["reject_reason"]) == (
        "new",
        D(2),
        D("100.00"),
        D("100.00"),
        None,
    )
    resting = desk.worker.engine.book(desk.symbol).order(bid)
    assert resting is not None and resting.price == 10000
    assert await desk.held(bid) == D("200.10")
    assert await counters(desk, bid) == (2, 2)
    await desk.check()


async def test_a_second_modify_in_flight_keeps_the_first_ones_target(desk: Desk) -> None:
    """Two modifies before the engine runs: the second (quantity only) keeps the first's new price, and the
    engine applies both."""
    buyer = await desk.trader("buyer", cash="1000")
    bid = await post_only_bid(desk, buyer, "1", "100.00")
    await desk.pump()

    assert await patch(desk, buyer, bid, price="101.00") is None
    assert await patch(desk, buyer, bid, quantity="2") is None
    row = await desk.order(bid)
    assert (row["target_quantity"], row["target_price"], row["hold_price"]) == (D(2), D("101.00"), D("101.00"))
    assert await desk.held(bid) == cash_buy_hold("2", "101.00")
    assert await counters(desk, bid) == (2, 0)
    await desk.pump()
    row = await desk.order(bid)
    assert (row["quantity"], row["price"], row["hold_price"]) == (D(2), D("101.00"), D("101.00"))
    assert await desk.held(bid) == cash_buy_hold("2", "101.00")
    assert await counters(desk, bid) == (2, 2)
    await desk.check()


async def test_a_reprice_in_flight_after_a_quantity_rise_is_checked_for_the_new_quantity(desk: Desk) -> None:
    """Quantity 1 -> 2, then (before the engine applies it) a reprice to 103: the order will be 2 at 103
    (206.11), more than the buyer's 205, so the reprice is refused rather than left for the engine to fund."""
    buyer = await desk.trader("buyer", cash="205")
    bid = await post_only_bid(desk, buyer, "1", "100.00")
    await desk.pump()

    assert await patch(desk, buyer, bid, quantity="2") is None
    assert await desk.held(bid) == D("200.10")
    rejection = await patch(desk, buyer, bid, price="103.00")
    assert rejection is not None and rejection.reason is RiskReason.INSUFFICIENT_FUNDS
    assert await counters(desk, bid) == (1, 0)  # a refused modify is not sent
    await desk.pump()
    row = await desk.order(bid)
    assert (row["quantity"], row["price"]) == (D(2), D("100.00"))
    assert await desk.held(bid) == D("200.10")
    await desk.check()


async def test_a_modify_without_a_number_still_applies(desk: Desk) -> None:
    """A modify command from before modify numbers (no ``modify_no``) is applied and leaves the record of
    processed modifies as it is; numbered ones after it are recorded."""
    buyer = await desk.trader("buyer", cash="1000")
    bid = await post_only_bid(desk, buyer, "1", "100.00")
    await desk.pump()

    await buyer.modify(bid, new_qty="2")  # the old wire format: test_engine.request_modify
    await desk.pump()
    row = await desk.order(bid)
    assert (row["quantity"], row["price"]) == (D(2), D("100.00"))
    assert await counters(desk, bid) == (0, 0)

    assert await patch(desk, buyer, bid, price="99.00") is None
    await desk.pump()
    row = await desk.order(bid)
    assert (row["quantity"], row["price"]) == (D(2), D("99.00"))
    assert await counters(desk, bid) == (1, 1)
    await desk.check()


async def test_the_engines_cut_of_a_reduce_only_order_is_not_undone_by_a_later_reprice(desk: Desk) -> None:
    """A reduce-only SELL 6 is repriced (applied), then the engine cuts it to the 3 left of the position
    (``reduce_only_capped``: not a client modify). A later price-only modify is for 3, not the 6 of the
    earlier modify, so the reduce-only check passes."""
    street = await desk.trader("street", kind="margin", cash="100000")
    trader = await desk.trader("trader", kind="margin", cash="10000")
    await go_long(desk, trader, street, "10")
    closing = await place(desk, trader, "sell", "6", "105.00", reduce_only=True)
    await desk.pump()
    assert await patch(desk, trader, closing, price="106.00") is None
    await desk.pump()
    assert (await desk.order(closing))["price"] == D("106.00")

    await place(desk, street, "buy", "7", "100.00")
    await place(desk, trader, "sell", "7", "100.00")
    await desk.pump()
    row = await desk.order(closing)
    assert (row["quantity"], row["reject_reason"]) == (D(3), "reduce_only_capped")
    assert await counters(desk, closing) == (1, 1)

    assert await patch(desk, trader, closing, price="107.00") is None  # was refused: reduce-only for 6
    await desk.pump()
    row = await desk.order(closing)
    assert (row["status"], row["quantity"], row["price"]) == ("new", D(3), D("107.00"))
    await desk.check()
