"""A seeded random-walk market for demos, load tests and benchmarks.

Everything is integer ticks drawn from ``random.Random(seed)``: the same seed, instruments and start time
give the same ticks, timestamps included (they advance by ``1s / rate`` per tick from ``start_ns``, not from
the wall clock), as long as the same instruments are ``add``-ed, and halted or reopened (``set_halted``), after
the same ticks. Wall-clock time only paces delivery, and moves a paced feed's timestamps on over a time when every
instrument was halted.

A halted instrument's walk pauses: no ticks, its price kept, and it goes on from that price once reopened.

Every tick is valid by construction: ``bid >= 1`` (the walk reflects off 1), ``ask = bid + spread`` with
``spread >= 1`` (never crossed, never locked), ``bid <= last <= ask``, sizes >= 1, and timestamps strictly
increase, so the ``TickValidator`` accepts all of them.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Collection, Sequence
from dataclasses import dataclass
from decimal import Decimal

from tradeplane.adapters.feeds import FeedBatch
from tradeplane.domain.ticks import NS_PER_SECOND, PricedInstrument, PriceScale, Tick

# Deliver about this many batches per second when paced, so a slow rate still flows smoothly.
_PACED_BATCHES_PER_SECOND = 20
# Extra random bits beyond the product of the ranges we draw from one number, so modulo bias is negligible.
_SPARE_BITS = 32


@dataclass(frozen=True, slots=True)
class SimulatedInstrument:
    """One instrument of the simulated market and the shape of its walk, all in ticks and lots."""

    instrument: PricedInstrument
    start_price: Decimal
    max_step_ticks: int = 2
    max_spread_ticks: int = 3
    max_size: int = 100
    max_volume: int = 10
    trade_percent: int = 100  # share of updates that carry a trade (last + volume); the rest are quote-only

    def __post_init__(self) -> None:
        if PriceScale(self.instrument.tick_size).to_ticks(self.start_price) < 1:
            raise ValueError(f"{self.instrument.symbol}: start price must be positive")
        if self.max_step_ticks < 0 or self.max_spread_ticks < 1 or self.max_size < 1 or self.max_volume < 1:
            raise ValueError(f"{self.instrument.symbol}: step >= 0, spread, size and volume >= 1 are required")
        if not 0 <= self.trade_percent <= 100:
            raise ValueError(f"{self.instrument.symbol}: trade_percent must be within 0..100")


class _Walk:
    __slots__ = (
        "bid",
        "max_size",
        "max_spread",
        "max_step",
        "max_volume",
        "step_span",
        "symbol",
        "trade_percent",
    )

    def __init__(self, instrument: SimulatedInstrument) -> None:
        self.symbol = instrument.instrument.symbol
        self.bid = PriceScale(instrument.instrument.tick_size).to_ticks(instrument.start_price)
        self.max_step = instrument.max_step_ticks
        self.step_span = 2 * instrument.max_step_ticks + 1
        self.max_spread = instrument.max_spread_ticks
        self.max_size = instrument.max_size
        self.max_volume = instrument.max_volume
        self.trade_percent = instrument.trade_percent

    def draw_span(self) -> int:
        # The product of every range drawn from one random number for this instrument.
        return (
            self.step_span
            * self.max_spread
            * (self.max_spread + 1)
            * self.max_size
            * self.max_size
            * self.max_volume
            * 100
        )


class SimulatedFeed:
    """Random walk per instrument; iterate with ``async for batch in feed`` or pull with ``next_ticks``.

    ``rate`` is ticks per second over all instruments not halted: it sets the timestamp spacing and, when
    ``paced``, the delivery speed. ``rate=None`` means unpaced with 1 ms timestamp spacing. ``total_ticks=None``
    runs until the consumer stops iterating (the CLI sets ``rate * duration``). ``halted``: symbols whose walks
    start paused (see ``set_halted``). While every instrument is halted the iteration waits, it does not end.
    """

    def __init__(
        self,
        instruments: Sequence[SimulatedInstrument],
        *,
        seed: int,
        rate: int | None = None,
        total_ticks: int | None = None,
        batch_size: int = 1000,
        start_ns: int | None = None,
        paced: bool = True,
        halted: Collection[str] = (),
    ) -> None:
        if not instruments:
            raise ValueError("the simulated feed needs at least one instrument")
        if rate is not None and rate < 1:
            raise ValueError("rate must be >= 1 tick/s")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self._walks = [_Walk(instrument) for instrument in instruments]
        self._halted = frozenset(halted)
        self._walking: list[_Walk] = []
        self._any_walking = asyncio.Event()
        self._sort_walks()
        self._random = random.Random(seed)
        self._draw_bits = max(walk.draw_span() for walk in self._walks).bit_length() + _SPARE_BITS
        self._rate = rate
        self._interval_ns = max(1, NS_PER_SECOND // rate) if rate is not None else NS_PER_SECOND // 1000
        self._total = total_ticks
        self._paced = paced and rate is not None
        if rate is not None and self._paced:
            batch_size = max(1, min(batch_size, rate // _PACED_BATCHES_PER_SECOND))
        self._batch_size = batch_size
        self._start_ns = start_ns
        self.ticks_emitted = 0

    @property
    def batch_size(self) -> int:
        return self._batch_size

    def add(self, instruments: Sequence[SimulatedInstrument]) -> None:
        """Walk ``instruments`` too, from the next tick on (an instrument listed while the feed runs), those of
        halted symbols once they reopen."""
        self._walks.extend(_Walk(instrument) for instrument in instruments)
        self._sort_walks()
        self._draw_bits = max(walk.draw_span() for walk in self._walks).bit_length() + _SPARE_BITS

    def set_halted(self, symbols: Collection[str]) -> None:
        """Pause the walks of ``symbols`` (their instruments are halted or closed: no ticks) from the next tick
        on, and go on with every other walk from the price where it stopped."""
        self._halted = frozenset(symbols)
        self._sort_walks()

    def _sort_walks(self) -> None:
        self._walking = [walk for walk in self._walks if walk.symbol not in self._halted]
        if self._walking:
            self._any_walking.set()
        else:
            self._any_walking.clear()

    def _finished(self) -> bool:
        return self._total is not None and self.ticks_emitted >= self._total

    def next_ticks(self, count: int) -> list[Tick]:
        """The next ``count`` ticks of the walk (fewer if ``total_ticks`` is reached, none while every instrument is
        halted). Deterministic."""
        if self._start_ns is None:
            self._start_ns = time.time_ns()
        if self._total is not None:
            count = max(0, min(count, self._total - self.ticks_emitted))
        walks = self._walking
        n_walks = len(walks)
        if not n_walks:
            return []
        getrandbits = self._random.getrandbits
        bits = self._draw_bits
        interval = self._interval_ns
        ts = self._start_ns + self.ticks_emitted * interval
        out: list[Tick] = []
        append = out.append
        for _ in range(count):
            draw = getrandbits(bits)
            walk = walks[draw % n_walks]
            draw //= n_walks
            bid = walk.bid + draw % walk.step_span - walk.max_step
            draw //= walk.step_span
            if bid < 1:
                bid = 2 - bid  # reflect off the floor so the walk never reaches zero
            walk.bid = bid
            spread = 1 + draw % walk.max_spread
            draw //= walk.max_spread
            ask = bid + spread
            last_offset = draw % (spread + 1)
            draw //= walk.max_spread + 1
            bid_size = 1 + draw % walk.max_size
            draw //= walk.max_size
            ask_size = 1 + draw % walk.max_size
            draw //= walk.max_size
            volume = 1 + draw % walk.max_volume
            draw //= walk.max_volume
            if draw % 100 < walk.trade_percent:
                append(Tick(ts, walk.symbol, bid, ask, bid_size, ask_size, bid + last_offset, volume))
            else:
                append(Tick(ts, walk.symbol, bid, ask, bid_size, ask_size, None, 0))
            ts += interval
        self.ticks_emitted += len(out)
        return out

    async def __aiter__(self) -> AsyncIterator[FeedBatch]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        emitted_here = 0
        while True:
            if not self._walking and not self._finished():
                # Every instrument is halted: wait for one to reopen. A paced feed's clock stands still meanwhile
                # (no burst to catch up, and its timestamps go on from when it resumes, not from when it paused).
                paused_at = loop.time()
                await self._any_walking.wait()
                if self._paced:
                    waited = loop.time() - paused_at
                    started += waited
                    if self._start_ns is not None:
                        self._start_ns += int(waited * NS_PER_SECOND)
                continue
            ticks = self.next_ticks(self._batch_size)
            if not ticks:
                return
            emitted_here += len(ticks)
            yield FeedBatch(ticks, self.ticks_emitted)
            if self._paced and self._rate is not None:
                delay = started + emitted_here / self._rate - loop.time()
                await asyncio.sleep(max(0.0, delay))
            else:
                await asyncio.sleep(0)
