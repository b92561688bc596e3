"""``fill_previous`` with a limit: the first ``limit`` candles of a range as wide as the timestamps allow,
equal to the head of the unlimited fill of a narrow range, and a property check against that reference."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tradeplane.domain.candles import Candle, Timeframe, fill_previous
from tradeplane.domain.ticks import TS_NS_MAX

MINUTE = 60_000_000_000
MIDNIGHT = 1_709_596_800_000_000_000  # 2024-03-05T00:00:00Z


def m1(minute: int, close: int) -> Candle:
    return Candle("AAPL", Timeframe.M1, MIDNIGHT + minute * MINUTE, close, close, close, close, 1, 1)


def test_a_limited_fill_over_every_storable_timestamp_returns_its_first_candles() -> None:
    # 1970 .. 2262 is 150 million M1 buckets, before and after the candles: only the first five are built
    filled = fill_previous([m1(3, 100), m1(5, 105)], 0, TS_NS_MAX, Timeframe.M1, limit=5)
    assert [((c.bucket_start_ns - MIDNIGHT) // MINUTE, c.close, c.tick_count) for c in filled] == [
        (3, 100, 1),
        (4, 100, 0),
        (5, 105, 1),
        (6, 105, 0),
        (7, 105, 0),
    ]
    assert fill_previous([], 0, TS_NS_MAX, Timeframe.M1, limit=5) == []


@given(
    minutes=st.lists(st.integers(0, 60), unique=True, max_size=8),
    start=st.integers(-5, 70),
    width=st.integers(1, 80),
    limit=st.integers(1, 90),
)
def test_a_limited_fill_is_the_head_of_the_unlimited_one(
    minutes: list[int], start: int, width: int, limit: int
) -> None:
    candles = [m1(minute, 100 + minute) for minute in minutes]
    lo, hi = MIDNIGHT + start * MINUTE, MIDNIGHT + (start + width) * MINUTE
    full = fill_previous(candles, lo, hi, Timeframe.M1)
    assert fill_previous(candles, lo, hi, Timeframe.M1, limit=limit) == full[:limit]
