"""OHLC candles M1..D1 built incrementally from ticks, plus fill-forward and resampling.

Definitions every path (this aggregator, the native SQL path, TimescaleDB continuous aggregates, a pandas
resample) must agree on:

- Buckets are half-open ``[start, start + width)`` in UTC epoch nanoseconds with ``start % width == 0``; every
  width divides a day, so H4 buckets start at 00, 04, ... 20 UTC and D1 buckets at UTC midnight.
- A candle is built from trades only: ticks with a ``last`` price. A quote-only tick (``last is None``) does
  not touch candles. We do not fall back to the mid: half of all mids are off the tick grid, and candles that
  mix trade and quote prices are not comparable across instruments.
- ``open`` is the price of the tick with the smallest ``ts_ns`` in the bucket, ``close`` the one with the
  largest; among ticks with equal ``ts_ns`` the first to arrive is the open and the last to arrive the close.
  ``high``/``low`` are the extremes, ``volume`` the sum of tick volumes, ``tick_count`` the number of trades.
  So a late tick (within the out-of-order tolerance) always updates high, low, volume and count of its own
  bucket, and moves open/close only if its timestamp is earlier/later than theirs.
- Empty intervals produce no candle. ``fill_previous`` carries the last close forward only when asked.
- A higher timeframe equals the resample of its M1 candles (``resample``), which is how the aggregator builds
  them: only the M1 bar is touched per tick, higher timeframes are merged from the changed M1 bars when
  changes are drained. That keeps the per-tick path to one dict lookup at most.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from itertools import pairwise

from tradeplane.domain.ticks import NS_PER_SECOND, Tick

_NS_PER_MINUTE = 60 * NS_PER_SECOND


class Timeframe(StrEnum):
    """Candle widths; the value is the label used in the API, the database and channel names."""

    M1 = "M1"
    M5 = "M5"
    M15 = "M15"
    H1 = "H1"
    H4 = "H4"
    D1 = "D1"

    @property
    def width_ns(self) -> int:
        return _WIDTH_NS[self]

    def bucket_start(self, ts_ns: int) -> int:
        """Start of the bucket holding ``ts_ns`` (floor to the width, aligned to the UTC epoch)."""
        return ts_ns - ts_ns % _WIDTH_NS[self]


_WIDTH_NS: dict[Timeframe, int] = {
    Timeframe.M1: _NS_PER_MINUTE,
    Timeframe.M5: 5 * _NS_PER_MINUTE,
    Timeframe.M15: 15 * _NS_PER_MINUTE,
    Timeframe.H1: 60 * _NS_PER_MINUTE,
    Timeframe.H4: 240 * _NS_PER_MINUTE,
    Timeframe.D1: 1440 * _NS_PER_MINUTE,
}
_M1_NS = _WIDTH_NS[Timeframe.M1]
_HIGHER: tuple[tuple[Timeframe, int], ...] = tuple((tf, _WIDTH_NS[tf]) for tf in Timeframe if tf is not Timeframe.M1)
_TF_ORDER = {tf: i for i, tf in enumerate(Timeframe)}


@dataclass(frozen=True, slots=True)
class Candle:
    """OHLC of one instrument over one bucket, prices in integer ticks of the instrument's price scale.

    Invariants: ``low <= open, close <= high``; ``tick_count >= 1`` for a candle built from trades, ``0`` only
    for a carried-forward candle from ``fill_previous`` (then open = high = low = close, volume 0).
    """

    instrument: str
    timeframe: Timeframe
    bucket_start_ns: int
    open: int
    high: int
    low: int
    close: int
    volume: int
    tick_count: int

    @property
    def bucket_end_ns(self) -> int:
        return self.bucket_start_ns + _WIDTH_NS[self.timeframe]


class _Bar:
    """Mutable state of one bucket; remembers the timestamps of its open and close for the tie rules."""

    __slots__ = (
        "close",
        "close_ts",
        "dirty",
        "end",
        "high",
        "low",
        "merged_count",
        "merged_volume",
        "open",
        "open_ts",
        "start",
        "symbol",
        "tick_count",
        "timeframe",
        "volume",
    )

    def __init__(self, symbol: _SymbolBars, timeframe: Timeframe, start: int, end: int, price: int, ts: int) -> None:
        self.symbol = symbol
        self.timeframe = timeframe
        self.start = start
        self.end = end
        self.open = self.high = self.low = self.close = price
        self.open_ts = self.close_ts = ts
        self.volume = 0
        self.tick_count = 0
        # How much of this M1 bar's volume/count has already been merged into the higher timeframes.
        self.merged_volume = 0
        self.merged_count = 0
        self.dirty = False

    def to_candle(self) -> Candle:
        return Candle(
            self.symbol.instrument,
            self.timeframe,
            self.start,
            self.open,
            self.high,
            self.low,
            self.close,
            self.volume,
            self.tick_count,
        )


class _SymbolBars:
    __slots__ = ("higher", "hot", "instrument", "m1", "watermark")

    def __init__(self, instrument: str) -> None:
        self.instrument = instrument
        self.watermark = -(2**63)
        self.hot: _Bar | None = None  # the newest M1 bar: where almost every tick lands
        self.m1: dict[int, _Bar] = {}
        self.higher: dict[Timeframe, dict[int, _Bar]] = {tf: {} for tf, _ in _HIGHER}


class CandleAggregator:
    """Maintains M1..D1 candles from a stream of accepted ticks; ``drain_changed`` returns what to upsert.

    Late ticks are handled exactly within ``max_out_of_order_ns`` of the per-symbol watermark (the newest
    ``ts_ns`` seen), the same rule ``TickValidator`` applies, so every accepted tick lands in a bucket that is
    still in memory. A tick older than that is not applied (counted in ``too_late``): its bucket may already
    have been evicted, and re-creating it would overwrite the stored candle with a partial one.

    Buckets that end at or before ``watermark - max_out_of_order_ns`` can no longer change; they are evicted
    when changes are drained, after being returned, so memory stays bounded by the tolerance (plus one D1
    bar per symbol).

    After a restart the aggregator starts empty: a bucket that already holds stored ticks must be merged with
    the stored candle by the writer (or recomputed from stored ticks), not overwritten.
    """

    __slots__ = ("_dirty_m1", "_symbols", "_tolerance_ns", "too_late")

    def __init__(self, *, max_out_of_order_ns: int) -> None:
        if max_out_of_order_ns < 0:
            raise ValueError("max_out_of_order_ns must be >= 0")
        self._tolerance_ns = max_out_of_order_ns
        self._symbols: dict[str, _SymbolBars] = {}
        self._dirty_m1: list[_Bar] = []
        self.too_late = 0

    def add(self, tick: Tick) -> None:
        """Apply one tick; see ``add_batch``."""
        self.add_batch((tick,))

    def add_batch(self, ticks: Iterable[Tick]) -> int:
        """Apply ticks in arrival order to their M1 bars; returns how many were applied (trades in tolerance).

        This is the hot path: ints, one attribute read per field, and usually no dict lookup beyond the
        symbol because the tick lands in the symbol's newest M1 bar.
        """
        symbols = self._symbols
        tolerance = self._tolerance_ns
        dirty = self._dirty_m1
        m1_tf = Timeframe.M1
        applied = 0
        for tick in ticks:
            price = tick.last
            if price is None:
                continue
            ts = tick.ts_ns
            state = symbols.get(tick.symbol)
            if state is None:
                state = symbols[tick.symbol] = _SymbolBars(tick.symbol)
            if ts > state.watermark:
                state.watermark = ts
            elif ts < state.watermark - tolerance:
                self.too_late += 1
                continue
            bar = state.hot
            if bar is None or ts >= bar.end or ts < bar.start:
                start = ts - ts % _M1_NS
                bar = state.m1.get(start)
                if bar is None:
                    bar = _Bar(state, m1_tf, start, start + _M1_NS, price, ts)
                    state.m1[start] = bar
                hot = state.hot
                if hot is None or start > hot.start:
                    state.hot = bar
            if price > bar.high:
                bar.high = price
            elif price < bar.low:
                bar.low = price
            if ts >= bar.close_ts:
                bar.close = price
                bar.close_ts = ts
            elif ts < bar.open_ts:
                bar.open = price
                bar.open_ts = ts
            bar.volume += tick.volume
            bar.tick_count += 1
            if not bar.dirty:
                bar.dirty = True
                dirty.append(bar)
            applied += 1
        return applied

    def drain_changed(self) -> list[Candle]:
        """Every candle (all timeframes) changed since the last call, once each, ordered by instrument,
        timeframe (M1 first) and bucket start. Then evicts buckets that can no longer change."""
        dirty_m1, self._dirty_m1 = self._dirty_m1, []
        changed: list[_Bar] = []
        for m1 in dirty_m1:
            m1.dirty = False
            changed.append(m1)
            volume_delta = m1.volume - m1.merged_volume
            count_delta = m1.tick_count - m1.merged_count
            m1.merged_volume = m1.volume
            m1.merged_count = m1.tick_count
            higher = m1.symbol.higher
            for tf, width in _HIGHER:
                start = m1.start - m1.start % width
                bars = higher[tf]
                bar = bars.get(start)
                if bar is None:
                    bar = bars[start] = _Bar(m1.symbol, tf, start, start + width, m1.open, m1.open_ts)
                    bar.high = m1.high
                    bar.low = m1.low
                    bar.close = m1.close
                    bar.close_ts = m1.close_ts
                else:
                    # M1 buckets are disjoint in time, so equal timestamps can only come from the same M1 bar,
                    # whose open/close are already the right ones for that timestamp.
                    if m1.high > bar.high:
                        bar.high = m1.high
                    if m1.low < bar.low:
                        bar.low = m1.low
                    if m1.open_ts <= bar.open_ts:
                        bar.open = m1.open
                        bar.open_ts = m1.open_ts
                    if m1.close_ts >= bar.close_ts:
                        bar.close = m1.close
                        bar.close_ts = m1.close_ts
                bar.volume += volume_delta
                bar.tick_count += count_delta
                if not bar.dirty:
                    bar.dirty = True
                    changed.append(bar)
        candles = []
        for bar in changed:
            bar.dirty = False
            candles.append(bar.to_candle())
        candles.sort(key=lambda c: (c.instrument, _TF_ORDER[c.timeframe], c.bucket_start_ns))
        self._evict({m1.symbol for m1 in dirty_m1})
        return candles

    def _evict(self, touched: Iterable[_SymbolBars]) -> None:
        for state in touched:
            horizon = state.watermark - self._tolerance_ns
            for start in [s for s, bar in state.m1.items() if bar.end <= horizon and not bar.dirty]:
                del state.m1[start]
            if state.hot is not None and state.hot.end <= horizon:
                state.hot = None
            for bars in state.higher.values():
                for start in [s for s, bar in bars.items() if bar.end <= horizon and not bar.dirty]:
                    del bars[start]

    def current(self, instrument: str, timeframe: Timeframe) -> Candle | None:
        """The newest candle in memory for ``instrument`` at ``timeframe`` (higher timeframes as of the last
        drain), or ``None``."""
        state = self._symbols.get(instrument)
        if state is None:
            return None
        bars = state.m1 if timeframe is Timeframe.M1 else state.higher[timeframe]
        if not bars:
            return None
        return bars[max(bars)].to_candle()


def _check_uniform(candles: Sequence[Candle]) -> tuple[str, Timeframe] | None:
    if not candles:
        return None
    first = candles[0]
    for candle in candles:
        if candle.instrument != first.instrument or candle.timeframe is not first.timeframe:
            raise ValueError("candles must share one instrument and one timeframe")
    return first.instrument, first.timeframe


def fill_previous(
    candles: Iterable[Candle], start_ns: int, end_ns: int, timeframe: Timeframe, *, limit: int | None = None
) -> list[Candle]:
    """Candles of one instrument for every bucket starting in ``[start_ns, end_ns)``, empty buckets filled
    with the previous close (open = high = low = close, volume 0, tick_count 0); only the first ``limit``.

    With a ``limit`` the work is bounded by it and the candles given, never by the width of the range: a
    range of centuries of M1 buckets (a client may ask for one) costs what its first ``limit`` candles cost.

    Nothing is invented before the first real candle: buckets before it stay absent. Real candles that start
    before ``start_ns`` are not returned but seed the carry, so pass the last candle before the range to fill
    its beginning. Candles must share ``timeframe`` and one instrument; duplicates are refused.
    """
    ordered = sorted(candles, key=lambda c: c.bucket_start_ns)
    ident = _check_uniform(ordered)
    if ident is None:
        return []
    instrument, candle_tf = ident
    if candle_tf is not timeframe:
        raise ValueError(f"candles are {candle_tf}, asked to fill {timeframe}")
    for earlier, later in pairwise(ordered):
        if earlier.bucket_start_ns == later.bucket_start_ns:
            raise ValueError(f"duplicate candle at {later.bucket_start_ns}")
    width = timeframe.width_ns
    if any(candle.bucket_start_ns % width for candle in ordered):
        raise ValueError(f"candles are not aligned to {timeframe} buckets")
    out: list[Candle] = []
    previous: Candle | None = None
    bucket = start_ns - start_ns % width
    if bucket < start_ns:
        bucket += width
    index = 0
    while index < len(ordered) and ordered[index].bucket_start_ns < bucket:
        previous = ordered[index]
        index += 1
    while bucket < end_ns and (limit is None or len(out) < limit):
        if index < len(ordered) and ordered[index].bucket_start_ns == bucket:
            previous = ordered[index]
            out.append(previous)
            index += 1
        elif previous is not None:
            price = previous.close
            out.append(Candle(instrument, timeframe, bucket, price, price, price, price, 0, 0))
        elif index < len(ordered):  # nothing to carry yet: go straight to the first real candle
            bucket = ordered[index].bucket_start_ns
            continue
        else:
            break
        bucket += width
    return out


def resample(candles: Iterable[Candle], timeframe: Timeframe) -> list[Candle]:
    """Higher-timeframe candles from finer ones (normally M1), equal to aggregating the ticks directly.

    Exact because finer buckets nest in the coarser ones and are disjoint in time: the open is the open of the
    earliest finer bucket, the close that of the latest. Carried-forward fill candles (``tick_count == 0``)
    hold no trades and are ignored. Output is ordered by instrument and bucket start.
    """
    width = timeframe.width_ns
    grouped: dict[tuple[str, int], list[Candle]] = {}
    for candle in candles:
        source_width = candle.timeframe.width_ns
        if source_width > width or width % source_width:
            raise ValueError(f"cannot resample {candle.timeframe} candles to {timeframe}")
        if candle.tick_count == 0:
            continue
        key = (candle.instrument, candle.bucket_start_ns - candle.bucket_start_ns % width)
        grouped.setdefault(key, []).append(candle)
    out = []
    for (instrument, start), parts in sorted(grouped.items()):
        parts.sort(key=lambda c: c.bucket_start_ns)
        out.append(
            Candle(
                instrument,
                timeframe,
                start,
                parts[0].open,
                max(c.high for c in parts),
                min(c.low for c in parts),
                parts[-1].close,
                sum(c.volume for c in parts),
                sum(c.tick_count for c in parts),
            )
        )
    return out
