"""An operator changes an instrument's fees or margin rate while the engine runs: the next fill is charged the new
rates with no restart, open orders' holds follow a lowering at once, a raise waits for a halted, empty book, and
the money invariants (balanced ledger, no cash account below zero, holds = what open orders reserve) hold
throughout, also when the change commits while a batch is waiting to settle."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import pytest

from tests.integration import test_engine
from tests.integration.test_engine import Desk
from tradeplane.domain.orders import Side
from tradeplane.domain.reservations import reservation
from tradeplane.errors import Conflict
from tradeplane.services import instruments
from tradeplane.services.instruments import InstrumentChanges, adjust_instrument, set_status

desk = test_engine.desk  # the engine tests' fixture: database, Redis, a namespaced bus, relay and engine

D = Decimal
# the desk's instrument: maker 0.0002, taker 0.0005, margin rate 0.10, USD at 2 places
LOWER = InstrumentChanges(maker_fee_rate=D("0.0001"), taker_fee_rate=D("0.0003"), margin_rate=D("0.05"))


def held_for_buy(kind: str, qty: str, price: str, maker: str, taker: str, margin: str) -> D:
    return reservation(
        side=Side.BUY,
        account_kind=kind,
        leaves_qty=D(qty),
        hold_price=D(price),
        maker_fee_rate=D(maker),
        taker_fee_rate=D(taker),
        margin_rate=D(margin),
        base_asset="BTC",
        quote_asset="USD",
        quote_scale=2,
    ).amount


async def change(desk: Desk, changes: InstrumentChanges) -> None:
    async with desk.db.transaction("test.operator") as conn:
        await adjust_instrument(conn, desk.symbol, changes)


async def fees_of(desk: Desk) -> list[tuple[str, D]]:
    rows = await desk.fetch("SELECT liquidity, fee FROM fills ORDER BY id DESC LIMIT 2")
    return sorted((r["liquidity"], r["fee"]) for r in rows)


async def test_lowered_fees_apply_to_the_next_fill_and_shrink_resting_holds_while_it_trades(desk: Desk) -> None:
    seller = await desk.trader("seller", base="5")
    buyer = await desk.trader("buyer")
    leveraged = await desk.trader("leveraged", kind="margin")
    await seller.place("sell", "1", "100.00")
    await buyer.place("buy", "1", "100.00")
    resting = await buyer.place("buy", "1", "99.00")
    on_margin = await leveraged.place("buy", "2", "98.00")
    await desk.pump()
    assert await fees_of(desk) == [("maker", D("0.02")), ("taker", D("0.05"))]  # 100 x 2 bp / 5 bp
    assert await desk.held(resting) == held_for_buy("cash", "1", "99.00", "0.0002", "0.0005", "0.10") == D("99.05")
    engine = desk.worker.engine

    await change(desk, LOWER)  # open, with open orders: a lowering needs no halt

    # the holds of the resting orders are re-priced in the change's own transaction
    assert await desk.held(resting) == held_for_buy("cash", "1", "99.00", "0.0001", "0.0003", "0.05") == D("99.03")
    assert await desk.held(on_margin) == held_for_buy("margin", "2", "98.00", "0.0001", "0.0003", "0.05")
    assert await desk.held(on_margin) < held_for_buy("margin", "2", "98.00", "0.0002", "0.0005", "0.10")
    await desk.check()

    # the same engine, not rebuilt, charges the new rates from the next fill on
    await seller.place("sell", "1", "99.00")  # takes the resting buy
    await desk.pump()
    assert desk.worker.engine is engine
    assert await fees_of(desk) == [("maker", D("0.00")), ("taker", D("0.02"))]  # 99 x 1 bp -> 0.00, x 3 bp
    assert await desk.held(resting) == 0
    await desk.check()


async def test_a_raise_waits_for_a_halted_empty_book_then_applies_without_a_restart(
    desk: Desk, monkeypatch: pytest.MonkeyPatch
) -> None:
    seller = await desk.trader("seller", base="5")
    buyer = await desk.trader("buyer")
    bid = await buyer.place("buy", "1", "99.00")
    await desk.pump()
    raise_taker = InstrumentChanges(taker_fee_rate=D("0.001"))
    with pytest.raises(Conflict) as refused:
        await change(desk, raise_taker)
    assert refused.value.code == "open_orders"
    await buyer.cancel(bid)
    await desk.pump()
    with pytest.raises(Conflict) as refused:
        await change(desk, raise_taker)
    assert refused.value.code == "instrument_open"
    async with desk.db.transaction("test.operator") as conn:
        await set_status(conn, desk.symbol, "halted")
        await adjust_instrument(conn, desk.symbol, raise_taker)
    async with desk.db.transaction("test.operator") as conn:
        with pytest.raises(Conflict) as refused:
            await set_status(conn, desk.symbol, "open")  # the api's catalogs may still price at 5 bp
    assert refused.value.code == "fee_change_settling"
    monkeypatch.setattr(instruments, "FEE_CHANGE_SETTLE_S", 0.0)  # as if the api processes had reloaded
    async with desk.db.transaction("test.operator") as conn:
        await set_status(conn, desk.symbol, "open")

    await seller.place("sell", "1", "100.00")
    await buyer.place("buy", "1", "100.00")
    await desk.pump()
    assert await fees_of(desk) == [("maker", D("0.02")), ("taker", D("0.10"))]  # 10 bp taker, same engine
    await desk.check()


async def test_a_change_committed_while_a_batch_waits_is_the_one_the_batch_settles_at(desk: Desk) -> None:
    """The operator's transaction has re-priced the holds but not committed when the engine starts its batch: the
    batch waits on the instrument row, then fills at the new rates, so no fill costs more than its hold and every
    hold at rest is exactly what its order reserves."""
    seller = await desk.trader("seller", base="5")
    buyer = await desk.trader("buyer", cash="199.10")  # the two buys' holds at 5 bp, to the cent
    await seller.place("sell", "1", "100.00")
    await desk.pump()
    resting = await buyer.place("buy", "1", "99.00")
    crossing = await buyer.place("buy", "1", "100.00")  # placed at 5 bp: holds 100.05
    await desk.relay_all()

    async with desk.db.transaction("test.operator") as conn:
        await adjust_instrument(conn, desk.symbol, LOWER)
        batch = asyncio.create_task(desk.settle_published())
        for _ in range(500):  # until the engine's batch waits for this transaction's lock
            waiting = await desk.value(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            if waiting or batch.done():
                break
            await asyncio.sleep(0.01)
        assert waiting and not batch.done(), "the engine's batch did not wait for the fee change"
    await batch

    assert await fees_of(desk) == [("maker", D("0.01")), ("taker", D("0.03"))]
    assert await desk.held(crossing) == 0
    assert await desk.held(resting) == D("99.03")
    assert await buyer.cash() == D("199.10") - D("100.03")
    await desk.check()
