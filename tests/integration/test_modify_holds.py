"""Holds while client modifies are in flight, through the real order entry, relay, engine worker and PostgreSQL.

PATCH /orders/{id} checks the funds for the order's new terms and raises its hold before the engine has seen the
modify. Until the engine has processed it, whatever else it settles for the order (a fill, an earlier modify it
refused) must leave that money reserved: freed, it could fund another order, and the modify would then grow the
hold back with no funds check, committing the same cash twice. With several in flight, each was funded when the
api accepted it, the larger ones too, though only the latest target is stored.
"""

from __future__ import annotations

from decimal import Decimal as D

from tests.integration import test_engine
from tests.integration.test_engine import Desk, Trader, cash_buy_hold
from tests.integration.test_modify_pending import counters, patch, post_only, post_only_bid
from tradeplane.domain.orders import Side
from tradeplane.domain.risk import RiskReason, RiskRejection
from tradeplane.services.relay import OutboxRelay

desk = test_engine.desk  # the engine tests' fixture: database, Redis, a namespaced bus, relay and engine


async def bid(desk: Desk, trader: Trader, qty: str, price: str) -> RiskRejection | None:
    return (await post_only(desk, trader, Side.BUY, qty, price)).rejection


async def ask(desk: Desk, trader: Trader, qty: str, price: str) -> RiskRejection | None:
    return (await post_only(desk, trader, Side.SELL, qty, price)).rejection


async def holds(trader: Trader, asset: str = "USD") -> D:
    """The trader's active holds in ``asset`` (BTC: what its cash-account sells keep aside)."""
    return D(
        await trader.desk.value(
            "SELECT coalesce(sum(amount), 0) FROM holds WHERE account_id = $1 AND asset = $2 AND released_at IS NULL",
            trader.account_id,
            asset,
        )
    )


async def base_holds(trader: Trader) -> D:
    return await holds(trader, "BTC")


async def relay_one(desk: Desk) -> None:
    """Publish only the oldest unpublished outbox row: the engine will see it and nothing committed after it."""
    desk.published += await OutboxRelay(desk.db, desk.bus, batch_size=1).publish_pending()


async def test_a_fill_settled_before_a_quantity_rise_keeps_the_rise_reserved(desk: Desk) -> None:
    """BUY 10 at 100 raised to 20; a fill of 2 is settled before the engine applies the modify. The hold stays
    at what 20 (18 left) at 100 needs, so the 1000 the api reserved for the rise cannot fund another bid, and
    once the modify applies the account's cash still covers its holds."""
    seller = await desk.trader("seller", base="5")
    buyer = await desk.trader("buyer", cash="2100")
    order = await post_only_bid(desk, buyer, "10", "100.00")
    await desk.pump()
    assert await desk.held(order) == cash_buy_hold("10", "100.00")

    await seller.place("sell", "2", "100.00")
    await desk.relay_all()  # the sell is on the bus ahead of the modify
    assert await patch(desk, buyer, order, quantity="20") is None
    assert await desk.held(order) == cash_buy_hold("20", "100.00") == D("2001.00")
    await desk.settle_published()  # the fill of 2, the modify still in the outbox

    row = await desk.order(order)
    assert (row["quantity"], row["filled_quantity"], row["status"]) == (D(10), D(2), "partially_filled")
    assert await counters(desk, order) == (1, 0)
    assert await desk.held(order) == cash_buy_hold("18", "100.00") == D("1800.90")  # not 8 at 100: 800.40
    assert await buyer.cash() == D("1899.96")  # 2100 - 200 - 0.04 maker fee
    await desk.check()  # holds equal what open orders reserve, a modify's target included

    # free: 1899.96 - 1800.90 = 99.06; had the fill freed the rise, 1099.56 would have funded this
    rejection = await bid(desk, buyer, "5", "100.00")
    assert rejection is not None and rejection.reason is RiskReason.INSUFFICIENT_FUNDS

    await desk.pump()
    row = await desk.order(order)
    assert (row["quantity"], row["filled_quantity"], row["status"]) == (D(20), D(2), "partially_filled")
    assert await counters(desk, order) == (1, 1)
    assert await desk.held(order) == cash_buy_hold("18", "100.00")
    assert await holds(buyer) == D("1800.90") <= await buyer.cash()
    await desk.check()


async def test_a_refused_modify_settled_before_a_quantity_rise_keeps_the_rise_reserved(desk: Desk) -> None:
    """A post-only bid's reprice to a crossing 106 is refused by the engine after the client has also raised
    the quantity to 10. Settling the refusal keeps the hold the api raised for the quantity modify still in
    flight (priced, as the api priced it, at the target 106); once that modify applies, at the price the order
    kept, the hold is what 10 at 100 needs."""
    seller = await desk.trader("seller", base="5")
    buyer = await desk.trader("buyer", cash="1100")
    await seller.place("sell", "1", "105.00")
    order = await post_only_bid(desk, buyer, "1", "100.00")
    await desk.pump()

    assert await patch(desk, buyer, order, price="106.00") is None
    await desk.relay_all()  # the reprice is on the bus ahead of the quantity modify
    assert await patch(desk, buyer, order, quantity="10") is None
    assert await desk.held(order) == cash_buy_hold("10", "106.00") == D("1060.53")
    await desk.settle_published()  # the reprice, refused: post-only would take

    row = await desk.order(order)
    assert (row["quantity"], row["price"], row["reject_reason"]) == (D(1), D("100.00"), "post_only_would_take")
    assert await counters(desk, order) == (2, 1)
    assert await desk.held(order) == D("1060.53")  # not 1 at 100: 100.05
    await desk.check()

    # free: 1100 - 1060.53 = 39.47; had the refusal freed the rise, 999.95 would have funded this
    rejection = await bid(desk, buyer, "5", "100.00")
    assert rejection is not None and rejection.reason is RiskReason.INSUFFICIENT_FUNDS

    await desk.pump()
    row = await desk.order(order)
    assert (row["quantity"], row["price"], row["hold_price"], row["status"]) == (D(10), D("100.00"), D("100.00"), "new")
    assert await counters(desk, order) == (2, 2)
    assert await desk.held(order) == cash_buy_hold("10", "100.00") == D("1000.50")
    assert await holds(buyer) == D("1000.50") <= await buyer.cash()
    await desk.check()


async def test_a_fill_settled_before_two_modifies_keeps_what_the_larger_one_was_funded_with(desk: Desk) -> None:
    """BUY 10 at 100 raised to 20, then lowered to 15, both before the engine runs; a fill of 2 is settled
    first. The first modify, once applied, needs 18 at 100 (1800.90), though the order's latest target, 15,
    needs only 13 at 100 (1300.65): the hold stays at what the api funded the rise with, less what the fill
    used. Freed, the 500.25 between them would fund another bid, and the first modify would then grow the
    hold back with no funds check: cash below holds."""
    seller = await desk.trader("seller", base="5")
    buyer = await desk.trader("buyer", cash="2100")
    order = await post_only_bid(desk, buyer, "10", "100.00")
    await desk.pump()

    await seller.place("sell", "2", "100.00")
    await desk.relay_all()  # the sell is on the bus ahead of both modifies
    assert await patch(desk, buyer, order, quantity="20") is None
    assert await patch(desk, buyer, order, quantity="15") is None
    assert await desk.held(order) == cash_buy_hold("20", "100.00") == D("2001.00")  # the api never lowers it
    await desk.settle_published()  # the fill of 2, both modifies still in the outbox

    row = await desk.order(order)
    assert (row["quantity"], row["filled_quantity"], row["status"]) == (D(10), D(2), "partially_filled")
    assert (row["target_quantity"], await counters(desk, order)) == (D(15), (2, 0))
    assert await desk.held(order) == cash_buy_hold("18", "100.00") == D("1800.90")  # not 13 at 100: 1300.65
    assert await buyer.cash() == D("1899.96")  # 2100 - 200 - 0.04 maker fee
    await desk.check()  # holds cover every modify in flight

    # free: 1899.96 - 1800.90 = 99.06; had the fill freed the first modify's funding, 599.31 would fund this
    rejection = await bid(desk, buyer, "5", "100.00")
    assert rejection is not None and rejection.reason is RiskReason.INSUFFICIENT_FUNDS

    await relay_one(desk)  # the engine applies the first modify only
    await desk.settle_published()
    row = await desk.order(order)
    assert (row["quantity"], row["filled_quantity"]) == (D(20), D(2))
    assert await counters(desk, order) == (2, 1)
    assert await desk.held(order) == D("1800.90")  # what 18 at 100 needs: nothing grew unfunded
    assert await holds(buyer) == D("1800.90") <= await buyer.cash()
    await desk.check()

    await desk.pump()  # and the second
    row = await desk.order(order)
    assert (row["quantity"], row["filled_quantity"], row["status"]) == (D(15), D(2), "partially_filled")
    assert await counters(desk, order) == (2, 2)
    assert await desk.held(order) == cash_buy_hold("13", "100.00") == D("1300.65")  # at rest: the terms exactly
    assert await holds(buyer) == D("1300.65") <= await buyer.cash()
    await desk.check()


async def test_a_fill_settled_before_two_modifies_of_a_sell_keeps_the_base_asset_funded(desk: Desk) -> None:
    """A cash account's SELL 2 at 100 raised to 4, then lowered to 3; a buy of 1 is settled first. The hold,
    in the base asset, stays at the 3 left of the 4 the api reserved for the rise (not the 2 left of the latest
    target), so the seller cannot offer the same coins twice."""
    seller = await desk.trader("seller", base="5")
    buyer = await desk.trader("buyer")
    assert await ask(desk, seller, "2", "100.00") is None
    await desk.pump()
    (order,) = [r["id"] for r in await desk.fetch("SELECT id FROM orders WHERE account_id = $1", seller.account_id)]
    assert await desk.held(order) == D(2)

    await buyer.place("buy", "1", "100.00")
    await desk.relay_all()  # the buy is on the bus ahead of both modifies
    assert await patch(desk, seller, order, quantity="4") is None
    assert await patch(desk, seller, order, quantity="3") is None
    assert await desk.held(order) == D(4)
    await desk.settle_published()  # the fill of 1

    assert (await desk.order(order))["filled_quantity"] == D(1)
    assert await counters(desk, order) == (2, 0)
    assert await desk.held(order) == D(3)  # not 2: the first modify will have 3 left to sell
    await desk.check()

    # the position is 4 and 3 of it held: 1 free; had the fill freed the rise, 2 would fund this
    rejection = await ask(desk, seller, "2", "101.00")
    assert rejection is not None and rejection.reason is RiskReason.INSUFFICIENT_POSITION

    await relay_one(desk)  # the first modify only
    await desk.settle_published()
    assert ((await desk.order(order))["quantity"], await counters(desk, order)) == (D(4), (2, 1))
    assert await desk.held(order) == D(3)
    await desk.check()

    await desk.pump()
    assert ((await desk.order(order))["quantity"], await counters(desk, order)) == (D(3), (2, 2))
    assert await base_holds(seller) == await desk.held(order) == D(2)
    position = await seller.position()
    assert position is not None and position["net_quantity"] == D(4) >= await base_holds(seller)
    await desk.check()


async def test_a_modify_after_one_was_applied_is_priced_at_the_reprice_still_in_flight(desk: Desk) -> None:
    """BUY 10 at 100: quantity to 11, then reprice to 109, then the engine applies the first one only. Until it
    applies the reprice the order may fill at 109, so the hold price stays 109 (not the limit, 100, the order
    has now) and a third modify to 100 at 101 is priced at 109 (10905.45), which the buyer's 10500 does not
    cover. Priced at 101 (10105.05) it would be accepted, and after fills at 109 the engine would apply it with
    more cash committed than the account has."""
    buyer = await desk.trader("buyer", cash="10500")
    order = await post_only_bid(desk, buyer, "10", "100.00")
    await desk.pump()

    assert await patch(desk, buyer, order, quantity="11") is None
    assert await patch(desk, buyer, order, price="109.00") is None
    assert await desk.held(order) == cash_buy_hold("11", "109.00") == D("1199.60")
    await relay_one(desk)
    await desk.settle_published()  # the quantity modify; the reprice still in the outbox

    row = await desk.order(order)
    assert (row["quantity"], row["price"], row["hold_price"]) == (D(11), D("100.00"), D("109.00"))
    assert await counters(desk, order) == (2, 1)
    assert await desk.held(order) == D("1199.60")
    await desk.check()

    rejection = await patch(desk, buyer, order, quantity="100", price="101.00")
    assert rejection is not None and rejection.reason is RiskReason.INSUFFICIENT_FUNDS

    await desk.pump()
    row = await desk.order(order)
    assert (row["quantity"], row["price"], row["hold_price"]) == (D(11), D("109.00"), D("109.00"))
    assert await counters(desk, order) == (2, 2)
    assert await holds(buyer) == await desk.held(order) == D("1199.60")
    await desk.check()


async def test_a_refused_modify_between_two_others_cannot_leave_the_order_unfunded(desk: Desk) -> None:
    """BUY 10 at 100 (post-only): quantity to 20, then 5 at a crossing 105, then price 101, all before the engine
    runs. The middle one is refused (post-only would take), so the order ends at 20 at 101, not the 5 at 101 the
    latest target says. Any modify in flight may be refused, so the api funds the largest quantity they can
    leave at the hold price: 20 at 105 (2101.05) from the second on. Funded for the target's 5, it kept only
    what 20 at 100 needs (2001.00), left 108.95 free for another bid, and the engine then grew the hold to
    2021.01 with no funds check: holds above cash."""
    seller = await desk.trader("seller", base="5")
    buyer = await desk.trader("buyer", cash="2110")
    await seller.place("sell", "1", "105.00")
    order = await post_only_bid(desk, buyer, "10", "100.00")
    await desk.pump()

    assert await patch(desk, buyer, order, quantity="20") is None
    assert await patch(desk, buyer, order, quantity="5", price="105.00") is None
    assert await patch(desk, buyer, order, price="101.00") is None
    assert await desk.held(order) == cash_buy_hold("20", "105.00") == D("2101.05")
    await desk.check()

    # free: 2110 - 2101.05 = 8.95; funded for 5 at 105, 108.95 would have funded this
    rejection = await bid(desk, buyer, "1", "100.00")
    assert rejection is not None and rejection.reason is RiskReason.INSUFFICIENT_FUNDS

    await desk.pump()
    row = await desk.order(order)
    assert (row["quantity"], row["price"]) == (D(20), D("101.00"))
    assert await counters(desk, order) == (3, 3)
    assert await holds(buyer) == await desk.held(order) == cash_buy_hold("20", "101.00") <= await buyer.cash()
    await desk.check()


async def test_a_reprice_after_a_cut_in_flight_is_funded_for_the_quantity_before_the_cut(desk: Desk) -> None:
    """BUY 20 at 100 cut to 5, then repriced to 102, both in flight: if the engine applies the reprice, the cut
    may have been refused (here it is not, but the api cannot know), so the reprice is funded for 20 at 102.
    The buyer has the cash; once both are processed the hold is what 5 at 102 needs."""
    buyer = await desk.trader("buyer", cash="2100")
    order = await post_only_bid(desk, buyer, "20", "100.00")
    await desk.pump()

    assert await patch(desk, buyer, order, quantity="5") is None
    assert await patch(desk, buyer, order, price="102.00") is None
    assert await desk.held(order) == cash_buy_hold("20", "102.00") == D("2041.02")
    await desk.check()

    await desk.pump()
    row = await desk.order(order)
    assert (row["quantity"], row["price"]) == (D(5), D("102.00"))
    assert await holds(buyer) == await desk.held(order) == cash_buy_hold("5", "102.00")
    await desk.check()
