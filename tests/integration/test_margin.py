"""Margin accounts through the real order entry, relay and engine: free funds are equity less margin in use, and
a leveraged position is closed by a reduce-only order without fresh margin."""

from __future__ import annotations

from decimal import Decimal as D

from tests.integration import test_engine
from tests.integration.test_engine import Desk, Trader
from tradeplane.domain.orders import OrderType, Side
from tradeplane.domain.risk import OrderTerms, RiskReason
from tradeplane.services import queries
from tradeplane.services.identity import Principal, Role
from tradeplane.services.orders import OrderEntry, OrderRequest, Placement

desk = test_engine.desk  # the engine tests' fixture: database, Redis, a namespaced bus, relay and engine


async def place(desk: Desk, trader: Trader, side: Side, *, reduce_only: bool = False) -> Placement:
    """1 at 100.00 through the api's order entry (pre-trade risk and the hold as POST /orders computes them)."""
    principal = Principal(trader.user_id, f"user{trader.user_id}", Role.TRADER)
    terms = OrderTerms(side, OrderType.LIMIT, D("1"), D("100.00"), reduce_only=reduce_only)
    async with desk.db.transaction("test.place") as conn:
        return await OrderEntry(desk.cache, shards=1).place_order(
            conn, principal, OrderRequest(trader.account_id, desk.symbol, terms)
        )


async def summary(desk: Desk, trader: Trader) -> queries.AccountSummary:
    principal = Principal(trader.user_id, f"user{trader.user_id}", Role.TRADER)
    async with desk.db.connection("test.summary") as conn:
        return await queries.account_summary(conn, principal, trader.account_id)


async def test_a_leveraged_long_is_closed_by_a_reduce_only_sell(desk: Desk) -> None:
    street = await desk.trader("street", kind="margin", cash="100000")
    trader = await desk.trader("trader", kind="margin", cash="20")
    await street.place("sell", "1", "100.00")
    await desk.pump()
    bought = await place(desk, trader, Side.BUY)  # initial margin 1 x 100 x (0.10 + 0.0005) = 10.05 of 20
    assert bought.rejection is None
    await desk.pump()
    assert (await desk.order(bought.order.id))["status"] == "filled"  # type: ignore[union-attr]

    # the buy took the whole notional and the taker fee from cash; the position is worth it back at the mark
    account = await summary(desk, trader)
    assert (account.cash, account.equity, account.margin_used, account.holds) == (
        D("-80.05"),
        D("19.95"),
        D("10.00"),
        D("0"),
    )
    assert account.free == D("9.95")  # equity - margin in use - holds

    # an ordinary sell may open a short, so it needs initial margin the account no longer has free
    plain = await place(desk, trader, Side.SELL)
    assert plain.rejection is not None and plain.rejection.reason is RiskReason.INSUFFICIENT_FUNDS
    # a reduce-only sell only shrinks the position: the worst fee is all it holds
    closing = await place(desk, trader, Side.SELL, reduce_only=True)
    assert closing.rejection is None and closing.order is not None
    assert await desk.held(closing.order.id) == D("0.05")
    await desk.pump()
    await street.place("buy", "1", "100.00")
    await desk.pump()
    assert (await desk.order(closing.order.id))["status"] == "filled"

    # flat again: 20 less the buy's taker fee (0.05) and the resting sell's maker fee (100 x 0.0002 = 0.02)
    account = await summary(desk, trader)
    assert (account.cash, account.margin_used, account.free) == (D("19.93"), D("0"), D("19.93"))
    await desk.check()
