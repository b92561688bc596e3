"""The market data worker's simulated market follows the instruments' status in PostgreSQL: an open instrument
walks, a halted or closed one makes no ticks, and a reopened one walks again, from where it stopped, or from its
reference price for one listed halted (it used to be passed over for good)."""

from __future__ import annotations

import asyncio
from decimal import Decimal

from tests.integration.test_engine_marketdata import tick_count
from tests.integration.test_ingest import until
from tests.integration.test_md_new_instrument import (  # noqa: F401 - md_platform is a fixture
    list_fresh_instrument,
    md_platform,
    simulating_worker,
)
from tradeplane.adapters.db.marketdata import ListedInstrument
from tradeplane.bootstrap import Platform
from tradeplane.domain.ticks import Tick
from tradeplane.entrypoints.workers.marketdata import SimulatedMarket
from tradeplane.services.instruments import set_status

REFERENCE_TICKS = 100  # list_fresh_instrument: reference price 50, tick size 0.5
MAX_STEP = 2  # the walks' largest step, in ticks


async def list_with_status(platform: Platform, prefix: str, status: str) -> ListedInstrument:
    instrument = await list_fresh_instrument(platform, prefix)
    await set_to(platform, instrument, status)
    return instrument


async def set_to(platform: Platform, instrument: ListedInstrument, status: str) -> None:
    async with platform.db.transaction("test.status") as conn:
        await set_status(conn, instrument.symbol, status)


def bids(ticks: list[Tick], instrument: ListedInstrument) -> list[int]:
    return [t.bid for t in ticks if t.symbol == instrument.symbol and t.bid is not None]


def symbols(ticks: list[Tick]) -> set[str]:
    return {t.symbol for t in ticks}


async def test_each_walk_follows_its_instruments_status_from_reload_to_reload(md_platform: Platform) -> None:  # noqa: F811
    platform = md_platform
    a = await list_with_status(platform, "A", "open")
    b = await list_with_status(platform, "B", "halted")
    adopted = [a, b]  # the worker's instrument directory
    market = SimulatedMarket(platform, adopted, rate=1000)
    await market.adopt()
    feed = market.start()
    assert symbols(feed.next_ticks(300)) == {a.symbol}  # listed halted: no ticks

    await set_to(platform, b, "open")
    await market.adopt()
    reopened = feed.next_ticks(300)
    assert symbols(reopened) == {a.symbol, b.symbol}
    assert abs(bids(reopened, b)[0] - REFERENCE_TICKS) <= MAX_STEP  # from its reference price

    # open -> halted -> open: paused, then on from its last price.
    last_bid_of_a = bids(reopened, a)[-1]
    await set_to(platform, a, "halted")
    await market.adopt()
    assert symbols(feed.next_ticks(300)) == {b.symbol}
    await set_to(platform, a, "open")
    await market.adopt()
    again = feed.next_ticks(300)
    assert symbols(again) == {a.symbol, b.symbol}
    assert abs(bids(again, a)[0] - last_bid_of_a) <= MAX_STEP

    # Listed halted while the feed runs: adopted, walking only once open. Closed is as halted.
    c = await list_with_status(platform, "C", "halted")
    adopted.append(c)
    await set_to(platform, b, "closed")
    await market.adopt()
    assert symbols(feed.next_ticks(300)) == {a.symbol}
    await set_to(platform, c, "open")
    await market.adopt()
    assert symbols(feed.next_ticks(300)) == {a.symbol, c.symbol}

    # A restarted feed (after a failure) starts with the same walks paused.
    assert symbols(market.start().next_ticks(300)) == {a.symbol, c.symbol}


async def test_the_worker_walks_an_instrument_listed_halted_once_it_reopens(md_platform: Platform) -> None:  # noqa: F811
    platform = md_platform
    known = await list_with_status(platform, "K", "open")
    halted = await list_with_status(platform, "H", "halted")
    stop = asyncio.Event()
    task = asyncio.create_task(simulating_worker(platform, stop))
    try:
        await until(lambda: _at_least(platform, known, 20))  # the simulation runs
        assert await tick_count(platform, halted) == 0

        await set_to(platform, halted, "open")
        await until(lambda: tick_count(platform, halted))  # picked up by the next reload
    finally:
        stop.set()
        pipeline = await task

    assert not pipeline.stats.dropped, pipeline.stats.dropped
    async with platform.db.connection("test.read") as conn:
        first_bid: Decimal = await conn.fetchval(
            "SELECT bid FROM ticks WHERE instrument_id = $1 ORDER BY ts LIMIT 1", halted.instrument_id
        )
    assert abs(first_bid - Decimal("50")) <= MAX_STEP * halted.tick_size


async def _at_least(platform: Platform, instrument: ListedInstrument, n: int) -> bool:
    return await tick_count(platform, instrument) >= n
