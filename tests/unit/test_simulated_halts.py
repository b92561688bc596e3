"""The simulated feed and halted instruments: a halted instrument's walk makes no ticks, and once reopened goes on
from the price where it stopped (or from its start price, for one halted from the start); a feed whose every
instrument is halted waits rather than ends."""

from __future__ import annotations

import asyncio
from decimal import Decimal

from tradeplane.adapters.feeds.simulated import SimulatedFeed, SimulatedInstrument
from tradeplane.domain.ticks import NS_PER_SECOND, InstrumentGrid, Tick

T0 = 1_709_677_800_000_000_000  # 2024-03-05T22:30:00Z
AAPL = InstrumentGrid.of("AAPL", "0.01")
ES = InstrumentGrid.of("ES", "0.25")
MAX_STEP = 2  # SimulatedInstrument's default, in ticks


def walks() -> list[SimulatedInstrument]:
    return [SimulatedInstrument(AAPL, Decimal("190.00")), SimulatedInstrument(ES, Decimal("4500.25"))]


def bids(ticks: list[Tick], symbol: str) -> list[int]:
    return [t.bid for t in ticks if t.symbol == symbol and t.bid is not None]


def test_an_instrument_halted_from_the_start_walks_from_its_start_price_once_reopened() -> None:
    feed = SimulatedFeed(walks(), seed=5, start_ns=T0, halted={"ES"})
    halted = feed.next_ticks(500)
    assert {t.symbol for t in halted} == {"AAPL"}

    feed.set_halted(())
    reopened = feed.next_ticks(500)
    assert {t.symbol for t in reopened} == {"AAPL", "ES"}
    assert abs(bids(reopened, "ES")[0] - 18_001) <= MAX_STEP  # 4500.25 is 18,001 ticks of 0.25


def test_a_halted_walk_pauses_and_goes_on_from_where_it_stopped_once_reopened() -> None:
    feed = SimulatedFeed(walks(), seed=9, start_ns=T0)
    before = feed.next_ticks(500)
    assert {t.symbol for t in before} == {"AAPL", "ES"}

    feed.set_halted({"AAPL"})
    during = feed.next_ticks(500)
    assert {t.symbol for t in during} == {"ES"}

    feed.set_halted(())
    after = feed.next_ticks(500)
    assert {t.symbol for t in after} == {"AAPL", "ES"}
    assert abs(bids(after, "AAPL")[0] - bids(before, "AAPL")[-1]) <= MAX_STEP
    # Timestamps stay strictly increasing across the halt.
    stamps = [t.ts_ns for t in before + during + after]
    assert stamps == sorted(set(stamps))


def test_halts_after_the_same_ticks_give_the_same_ticks() -> None:
    def run() -> list[Tick]:
        feed = SimulatedFeed(walks(), seed=3, start_ns=T0, halted={"ES"})
        out = feed.next_ticks(100)
        feed.set_halted(())
        out += feed.next_ticks(100)
        feed.set_halted({"AAPL"})
        out += feed.next_ticks(100)
        return out

    assert run() == run()


def test_a_new_instrument_of_a_halted_symbol_waits_for_it_to_reopen() -> None:
    feed = SimulatedFeed([SimulatedInstrument(AAPL, Decimal("190.00"))], seed=1, start_ns=T0)
    feed.set_halted({"ES"})
    feed.add([SimulatedInstrument(ES, Decimal("4500.25"))])
    assert {t.symbol for t in feed.next_ticks(300)} == {"AAPL"}
    feed.set_halted(())
    assert {t.symbol for t in feed.next_ticks(300)} == {"AAPL", "ES"}


async def test_while_every_instrument_is_halted_the_iteration_waits_instead_of_ending() -> None:
    feed = SimulatedFeed(walks(), seed=2, rate=None, start_ns=T0, halted={"AAPL", "ES"})
    assert feed.next_ticks(10) == []
    batches = aiter(feed)
    following = asyncio.ensure_future(anext(batches))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not following.done()  # still waiting, not ended (StopAsyncIteration) nor failed

    feed.set_halted({"ES"})
    batch = await following
    assert batch.ticks and {t.symbol for t in batch.ticks} == {"AAPL"}
    assert batch.ticks[0].ts_ns == T0  # unpaced: timestamps owe nothing to the wall clock
    await batches.aclose()


async def test_a_paced_feed_stamps_what_follows_a_halt_of_everything_from_when_it_resumed() -> None:
    feed = SimulatedFeed(walks(), seed=2, rate=1000, start_ns=T0, halted={"AAPL", "ES"})
    loop = asyncio.get_running_loop()
    batches = aiter(feed)
    following = asyncio.ensure_future(anext(batches))
    await asyncio.sleep(0)  # the feed meets the halt and waits
    paused = loop.time()
    await asyncio.sleep(0.2)
    resumed = loop.time()
    feed.set_halted(())
    batch = await following
    # Not T0 (as if no time had passed): at least the time it waited later, so its ticks are not stamped in the
    # past of the instruments' last quotes by however long the market was halted.
    assert batch.ticks[0].ts_ns >= T0 + int((resumed - paused) * NS_PER_SECOND)
    await batches.aclose()
