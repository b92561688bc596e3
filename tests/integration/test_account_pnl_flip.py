"""Audit of GET /accounts/{id} after real fills (issue 3: "cash, holds, free, equity, realized and unrealized P&L";
"unrealized P&L uses the mark (last trade price)"): a margin position that flips sign through the engine, then is
marked by a trade between two other accounts, adds up by hand, and equity equals deposits plus P&L less fees.
"""

from __future__ import annotations

from decimal import Decimal

from tests.integration import test_engine
from tests.integration.test_engine import Desk, Trader
from tradeplane.services import queries
from tradeplane.services.identity import Principal, Role
from tradeplane.services.queries import AccountSummary

desk = test_engine.desk  # the engine tests' fixture: database, Redis, a namespaced bus, relay and engine

D = Decimal


async def _summary(desk: Desk, trader: Trader) -> AccountSummary:
    async with desk.db.connection("test.summary") as conn:
        return await queries.account_summary(
            conn, Principal(trader.user_id, f"user{trader.user_id}", Role.TRADER), trader.account_id
        )


async def test_a_flipped_margin_position_adds_up_in_the_account_summary(desk: Desk) -> None:
    trader = await desk.trader("trader", kind="margin", cash="100000")
    street = await desk.trader("street", kind="margin", cash="100000")
    others = [await desk.trader(f"other{i}", kind="margin", cash="100000") for i in range(2)]
    await street.place("sell", "1", "100.00")
    await trader.place("buy", "1", "100.00")  # taker: fee 100 x 5 bp = 0.05
    await desk.pump()
    await street.place("buy", "1.6", "90.00")
    await trader.place(
        "sell", "1.6", "90.00"
    )  # closes 1 at -10, opens 0.6 short at 90; fee 144 x 5 bp = 0.072, to the cent toward zero: 0.07
    await desk.pump()
    await others[0].place("sell", "0.1", "95.00")
    await others[1].place("buy", "0.1", "95.00")  # marks the instrument at 95
    await desk.pump()

    position = await trader.position()
    assert position is not None
    assert (position["net_quantity"], position["average_price"], position["realized_pnl"]) == (
        D("-0.6"),
        D("90"),
        D("-10"),
    )
    summary = await _summary(desk, trader)
    cash = D("100000") - D("100") - D("0.05") + D("144") - D("0.07")
    assert summary.cash == cash == D("100043.88")
    assert summary.holds == 0
    assert summary.positions_value == D("-0.6") * D("95")
    assert summary.equity == cash - D("57")
    assert summary.realized_pnl == D("-10")
    assert summary.unrealized_pnl == D("-0.6") * (D("95") - D("90")) == D("-3")
    assert summary.margin_used == D("0.6") * D("95") * D("0.10")
    assert summary.free == summary.equity - summary.margin_used
    # deposits + realized + unrealized - fees paid
    assert summary.equity == D("100000") + summary.realized_pnl + summary.unrealized_pnl - D("0.12")
    await desk.check()
