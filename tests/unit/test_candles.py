"""Candles M1..D1: the incremental aggregator, resampling and fill-forward, checked against pandas."""

from __future__ import annotations

from datetime import UTC, datetime

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tradeplane.domain.candles import Candle, CandleAggregator, Timeframe, fill_previous, resample
from tradeplane.domain.ticks import InstrumentGrid, Tick, TickValidator

MINUTE = 60_000_000_000
HOUR = 60 * MINUTE
DAY = 24 * HOUR
TOLERANCE_NS = 5 * MINUTE
# 2024-03-05 00:00:00 UTC, a Tuesday, and a UTC midnight.
MIDNIGHT = int(datetime(2024, 3, 5, tzinfo=UTC).timestamp()) * 1_000_000_000


def ns(text: str) -> int:
    moment = datetime.fromisoformat(text)
    return int(moment.timestamp()) * 1_000_000_000 + moment.microsecond * 1000


def trade(ts: int, price: int, volume: int = 1, symbol: str = "AAPL") -> Tick:
    return Tick(ts, symbol, price - 1, price + 1, 1, 1, price, volume)


def drain_by_key(aggregator: CandleAggregator) -> dict[tuple[str, Timeframe, int], Candle]:
    return {(c.instrument, c.timeframe, c.bucket_start_ns): c for c in aggregator.drain_changed()}


# --- timeframes --------------------------------------------------------------------------------------------


def test_timeframe_widths() -> None:
    assert [tf.width_ns // MINUTE for tf in Timeframe] == [1, 5, 15, 60, 240, 1440]
    assert Timeframe("H4") is Timeframe.H4


def test_buckets_align_to_the_utc_epoch_and_midnight() -> None:
    ts = ns("2024-03-05T13:47:31.250000+00:00")
    assert Timeframe.M1.bucket_start(ts) == ns("2024-03-05T13:47:00+00:00")
    assert Timeframe.M5.bucket_start(ts) == ns("2024-03-05T13:45:00+00:00")
    assert Timeframe.M15.bucket_start(ts) == ns("2024-03-05T13:45:00+00:00")
    assert Timeframe.H1.bucket_start(ts) == ns("2024-03-05T13:00:00+00:00")
    assert Timeframe.H4.bucket_start(ts) == ns("2024-03-05T12:00:00+00:00")
    assert Timeframe.D1.bucket_start(ts) == ns("2024-03-05T00:00:00+00:00")
    # A bucket is half-open: its end belongs to the next one.
    assert Timeframe.H1.bucket_start(ns("2024-03-05T14:00:00+00:00")) == ns("2024-03-05T14:00:00+00:00")


# --- the aggregator ----------------------------------------------------------------------------------------


def test_open_is_the_earliest_tick_and_close_the_latest_with_ties_by_arrival() -> None:
    agg = CandleAggregator(max_out_of_order_ns=TOLERANCE_NS)
    t = MIDNIGHT + 10 * MINUTE
    agg.add_batch(
        [
            trade(t + 5, 100, 2),
            trade(t + 5, 101, 3),  # same ts as the first: arrives later, so it is the close, not the open
            trade(t + 1, 98, 1),  # late but within tolerance: earlier ts, becomes the open
            trade(t + 9, 97, 4),
            trade(t + 9, 99, 5),  # ties at the latest ts: last to arrive closes
            trade(t + 3, 105, 6),  # late: new high, but neither open nor close
        ]
    )
    candles = drain_by_key(agg)
    m1 = candles[("AAPL", Timeframe.M1, t)]
    assert (m1.open, m1.high, m1.low, m1.close, m1.volume, m1.tick_count) == (98, 105, 97, 99, 21, 6)
    # Every higher timeframe holds the same single-minute data here.
    for tf in Timeframe:
        candle = candles[("AAPL", tf, tf.bucket_start(t))]
        assert (candle.open, candle.high, candle.low, candle.close, candle.volume, candle.tick_count) == (
            98,
            105,
            97,
            99,
            21,
            6,
        )
    assert len(candles) == 6


def test_a_late_tick_at_the_open_timestamp_does_not_replace_the_open() -> None:
    agg = CandleAggregator(max_out_of_order_ns=TOLERANCE_NS)
    t = MIDNIGHT + 10 * MINUTE
    agg.add_batch([trade(t, 100), trade(t + 9, 103), trade(t, 101), trade(t + 9, 102)])
    m1 = drain_by_key(agg)[("AAPL", Timeframe.M1, t)]
    assert (m1.open, m1.close) == (100, 102)


def test_quote_only_ticks_do_not_make_candles() -> None:
    agg = CandleAggregator(max_out_of_order_ns=TOLERANCE_NS)
    assert agg.add_batch([Tick(MIDNIGHT, "AAPL", 100, 101, 5, 5)]) == 0
    assert agg.drain_changed() == []


def test_drain_returns_only_what_changed_since_the_last_drain() -> None:
    agg = CandleAggregator(max_out_of_order_ns=TOLERANCE_NS)
    agg.add(trade(MIDNIGHT + 30 * MINUTE, 100))
    assert len(agg.drain_changed()) == 6
    assert agg.drain_changed() == []
    agg.add(trade(MIDNIGHT + 31 * MINUTE + 1, 104, 7))
    changed = agg.drain_changed()
    assert [(c.timeframe, c.bucket_start_ns) for c in changed] == [
        (Timeframe.M1, MIDNIGHT + 31 * MINUTE),
        (Timeframe.M5, MIDNIGHT + 30 * MINUTE),
        (Timeframe.M15, MIDNIGHT + 30 * MINUTE),
        (Timeframe.H1, MIDNIGHT),
        (Timeframe.H4, MIDNIGHT),
        (Timeframe.D1, MIDNIGHT),
    ]
    m5 = changed[1]
    assert (m5.open, m5.high, m5.low, m5.close, m5.volume, m5.tick_count) == (100, 104, 100, 104, 8, 2)


def test_a_late_tick_updates_its_own_older_bucket() -> None:
    agg = CandleAggregator(max_out_of_order_ns=TOLERANCE_NS)
    agg.add_batch([trade(MIDNIGHT + 59 * MINUTE, 100), trade(MIDNIGHT + 60 * MINUTE + 1, 110)])
    agg.drain_changed()
    agg.add(trade(MIDNIGHT + 59 * MINUTE + 30 * 1_000_000_000, 90, 4))  # back into the 00:59 minute
    changed = drain_by_key(agg)
    m1 = changed[("AAPL", Timeframe.M1, MIDNIGHT + 59 * MINUTE)]
    assert (m1.open, m1.low, m1.close, m1.volume, m1.tick_count) == (100, 90, 90, 5, 2)
    h1 = changed[("AAPL", Timeframe.H1, MIDNIGHT)]
    assert (h1.open, h1.low, h1.close, h1.volume) == (100, 90, 90, 5)
    assert ("AAPL", Timeframe.H1, MIDNIGHT + HOUR) not in changed  # the newer hour did not change
    assert agg.current("AAPL", Timeframe.H1) == Candle("AAPL", Timeframe.H1, MIDNIGHT + HOUR, 110, 110, 110, 110, 1, 1)


def test_ticks_older_than_the_tolerance_are_not_applied() -> None:
    agg = CandleAggregator(max_out_of_order_ns=TOLERANCE_NS)
    agg.add(trade(MIDNIGHT + HOUR, 100))
    agg.drain_changed()
    assert agg.add_batch([trade(MIDNIGHT + HOUR - TOLERANCE_NS - 1, 50)]) == 0
    assert agg.too_late == 1
    assert agg.drain_changed() == []


def test_symbols_are_independent() -> None:
    agg = CandleAggregator(max_out_of_order_ns=0)
    agg.add_batch([trade(MIDNIGHT + HOUR, 100, symbol="AAPL"), trade(MIDNIGHT, 7, symbol="ES")])
    candles = drain_by_key(agg)
    assert candles[("ES", Timeframe.M1, MIDNIGHT)].close == 7
    assert candles[("AAPL", Timeframe.M1, MIDNIGHT + HOUR)].close == 100
    assert agg.too_late == 0


# --- property: the aggregator equals a pandas resample of the same ticks ----------------------------------

PANDAS_RULE = {
    Timeframe.M1: "1min",
    Timeframe.M5: "5min",
    Timeframe.M15: "15min",
    Timeframe.H1: "1h",
    Timeframe.H4: "4h",
    Timeframe.D1: "1D",
}
OHLCV = tuple[int, int, int, int, int, int]


def pandas_candles(ticks: list[Tick], timeframe: Timeframe) -> dict[tuple[str, int], OHLCV]:
    """Independent reference: sort trades by (ts, arrival), resample on epoch-aligned buckets."""
    rows = [(t.ts_ns, i, t.symbol, t.last, t.volume) for i, t in enumerate(ticks) if t.last is not None]
    if not rows:
        return {}
    frame = pd.DataFrame(rows, columns=["ts_ns", "arrival", "symbol", "price", "volume"])
    frame = frame.sort_values(["ts_ns", "arrival"], kind="stable")
    # Naive (implicitly UTC) so that origin="epoch" also anchors the day buckets at UTC midnight.
    frame["ts"] = pd.to_datetime(frame["ts_ns"], unit="ns")
    out: dict[tuple[str, int], OHLCV] = {}
    for symbol, group in frame.groupby("symbol"):
        bars = (
            group.set_index("ts")
            .resample(PANDAS_RULE[timeframe], origin="epoch", closed="left", label="left")
            .agg(
                open=("price", "first"),
                high=("price", "max"),
                low=("price", "min"),
                close=("price", "last"),
                volume=("volume", "sum"),
                count=("price", "size"),
            )
        )
        for start, bar in bars[bars["count"] > 0].iterrows():
            key = (str(symbol), int(pd.Timestamp(start).as_unit("ns").value))
            out[key] = (
                int(bar["open"]),
                int(bar["high"]),
                int(bar["low"]),
                int(bar["close"]),
                int(bar["volume"]),
                int(bar["count"]),
            )
    return out


def ohlcv(candle: Candle) -> OHLCV:
    return (candle.open, candle.high, candle.low, candle.close, candle.volume, candle.tick_count)


STEPS = st.sampled_from([0, 0, 1, 7, 1_000_000_000, 20_000_000_000, MINUTE, 7 * MINUTE, HOUR, 5 * HOUR, DAY])
RAW_TICK = st.tuples(
    STEPS,  # advance of the feed's clock
    st.one_of(  # lateness of this tick: some beyond the tolerance, some landing exactly on an earlier ts
        st.integers(min_value=-2 * TOLERANCE_NS, max_value=0),
        st.sampled_from([-1, -7, -1_000_000_000, -MINUTE, -TOLERANCE_NS, -TOLERANCE_NS - 1]),
    ),
    st.booleans(),  # late or on time
    st.sampled_from(["AAPL", "ES"]),
    st.integers(min_value=1, max_value=50),  # price in ticks
    st.integers(min_value=0, max_value=1000),  # volume
    st.integers(min_value=0, max_value=9),  # 0 means a quote-only tick
    st.booleans(),  # drain after this tick
)


def build_ticks(raw: list[tuple[int, int, bool, str, int, int, int, bool]], start: int) -> list[Tick]:
    clock = start
    ticks = []
    for step, lateness, late, symbol, price, volume, kind, _ in raw:
        clock += step
        ts = clock + lateness if late else clock
        last = None if kind == 0 else price + 1
        ticks.append(Tick(ts, symbol, price, price + 2, 1, 1, last, volume if last is not None else 0))
    return ticks


def assert_matches_pandas(ticks: list[Tick], drains: list[bool], tolerance_ns: int) -> None:
    """Validate, aggregate with drains where asked, upsert what each drain returns, compare with pandas."""
    gate = TickValidator(
        [InstrumentGrid.of("AAPL", "0.01"), InstrumentGrid.of("ES", "0.25")], max_out_of_order_ns=tolerance_ns
    )
    agg = CandleAggregator(max_out_of_order_ns=tolerance_ns)
    accepted: list[Tick] = []
    upserted: dict[tuple[str, Timeframe, int], Candle] = {}  # what a writer upserting each drain would hold
    for tick, drain_now in zip(ticks, drains, strict=True):
        if gate.accept(tick) is None:
            accepted.append(tick)
            agg.add(tick)
        if drain_now:
            upserted.update(((c.instrument, c.timeframe, c.bucket_start_ns), c) for c in agg.drain_changed())
    upserted.update(((c.instrument, c.timeframe, c.bucket_start_ns), c) for c in agg.drain_changed())
    assert agg.too_late == 0  # same tolerance as the validator: every accepted tick is applied

    for timeframe in Timeframe:
        ours = {(i, start): ohlcv(c) for (i, tf, start), c in upserted.items() if tf is timeframe}
        assert ours == pandas_candles(accepted, timeframe), timeframe


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=st.lists(RAW_TICK, min_size=1, max_size=120), start_offset=st.integers(0, 3 * DAY))
def test_aggregator_equals_pandas_resample_for_every_timeframe(
    raw: list[tuple[int, int, bool, str, int, int, int, bool]], start_offset: int
) -> None:
    ticks = build_ticks(raw, MIDNIGHT + start_offset)
    assert_matches_pandas(ticks, [drain for *_, drain in raw], TOLERANCE_NS)


DENSE_TICK = st.tuples(
    st.integers(min_value=0, max_value=12),  # slot: few distinct timestamps, so many ties and late arrivals
    st.sampled_from(["AAPL", "ES"]),
    st.integers(min_value=1, max_value=9),
    st.integers(min_value=0, max_value=5),
    st.booleans(),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    raw=st.lists(DENSE_TICK, min_size=1, max_size=60),
    unit=st.sampled_from([1, 10_000_000_000, 61_000_000_000, 7 * MINUTE, 3 * HOUR]),
)
def test_aggregator_equals_pandas_with_equal_timestamps_and_late_arrivals(
    raw: list[tuple[int, str, int, int, bool]], unit: int
) -> None:
    ticks = [Tick(MIDNIGHT + slot * unit, sym, p, p + 1, 1, 1, p, vol) for slot, sym, p, vol, _ in raw]
    assert_matches_pandas(ticks, [drain for *_, drain in raw], 12 * unit)


def final_candles(ticks: list[Tick]) -> dict[Timeframe, list[Candle]]:
    agg = CandleAggregator(max_out_of_order_ns=DAY * 10)
    agg.add_batch(ticks)
    by_tf: dict[Timeframe, list[Candle]] = {tf: [] for tf in Timeframe}
    for candle in agg.drain_changed():
        by_tf[candle.timeframe].append(candle)
    return by_tf


@settings(max_examples=60, deadline=None)
@given(raw=st.lists(RAW_TICK, min_size=1, max_size=150), start_offset=st.integers(0, DAY))
def test_resampling_m1_equals_aggregating_ticks_directly(
    raw: list[tuple[int, int, bool, str, int, int, int, bool]], start_offset: int
) -> None:
    by_tf = final_candles(build_ticks(raw, MIDNIGHT + start_offset))
    for timeframe in Timeframe:
        assert resample(by_tf[Timeframe.M1], timeframe) == by_tf[timeframe]
    # Chained resampling (M1 -> M15 -> H1 -> D1) is exact too, as every width divides the next.
    assert (
        resample(resample(resample(by_tf[Timeframe.M1], Timeframe.M15), Timeframe.H1), Timeframe.D1)
        == (by_tf[Timeframe.D1])
    )


def test_resample_refuses_to_go_finer_or_across_a_non_dividing_width() -> None:
    h1 = Candle("AAPL", Timeframe.H1, MIDNIGHT, 1, 1, 1, 1, 1, 1)
    with pytest.raises(ValueError):
        resample([h1], Timeframe.M15)


def test_resample_ignores_carried_forward_fill_candles() -> None:
    real = Candle("AAPL", Timeframe.M1, MIDNIGHT, 10, 12, 9, 11, 5, 2)
    filled = Candle("AAPL", Timeframe.M1, MIDNIGHT + MINUTE, 11, 11, 11, 11, 0, 0)
    late = Candle("AAPL", Timeframe.M1, MIDNIGHT + 2 * MINUTE, 13, 13, 13, 13, 1, 1)
    assert resample([late, filled, real], Timeframe.M5) == [Candle("AAPL", Timeframe.M5, MIDNIGHT, 10, 13, 9, 13, 6, 3)]


# --- fill_previous ------------------------------------------------------------------------------------------


def m1(minute: int, close: int, symbol: str = "AAPL") -> Candle:
    return Candle(symbol, Timeframe.M1, MIDNIGHT + minute * MINUTE, close - 1, close + 2, close - 3, close, 9, 3)


def test_fill_previous_carries_the_last_close_into_empty_buckets() -> None:
    candles = [m1(2, 100), m1(5, 105)]
    filled = fill_previous(candles, MIDNIGHT, MIDNIGHT + 8 * MINUTE, Timeframe.M1)
    assert [c.bucket_start_ns for c in filled] == [MIDNIGHT + k * MINUTE for k in range(2, 8)]
    assert filled[0] == candles[0]
    assert filled[3] == candles[1]
    for carried, close in ((filled[1], 100), (filled[2], 100), (filled[4], 105), (filled[5], 105)):
        assert (carried.open, carried.high, carried.low, carried.close) == (close, close, close, close)
        assert (carried.volume, carried.tick_count) == (0, 0)


def test_fill_previous_never_invents_candles_before_the_first_real_one() -> None:
    assert fill_previous([m1(5, 105)], MIDNIGHT, MIDNIGHT + 6 * MINUTE, Timeframe.M1) == [m1(5, 105)]
    assert fill_previous([], MIDNIGHT, MIDNIGHT + 6 * MINUTE, Timeframe.M1) == []


def test_fill_previous_is_seeded_by_a_candle_before_the_range_but_does_not_return_it() -> None:
    filled = fill_previous([m1(0, 100), m1(4, 104)], MIDNIGHT + 2 * MINUTE, MIDNIGHT + 5 * MINUTE, Timeframe.M1)
    assert [(c.bucket_start_ns - MIDNIGHT) // MINUTE for c in filled] == [2, 3, 4]
    assert [c.close for c in filled] == [100, 100, 104]
    assert [c.tick_count for c in filled] == [0, 0, 3]


def test_fill_previous_range_is_half_open_and_starts_at_the_next_aligned_bucket() -> None:
    filled = fill_previous([m1(0, 100)], MIDNIGHT + 1, MIDNIGHT + 3 * MINUTE, Timeframe.M1)
    assert [(c.bucket_start_ns - MIDNIGHT) // MINUTE for c in filled] == [1, 2]


def test_fill_previous_refuses_mixed_or_inconsistent_input() -> None:
    with pytest.raises(ValueError):
        fill_previous([m1(0, 1), m1(1, 1, symbol="ES")], MIDNIGHT, MIDNIGHT + HOUR, Timeframe.M1)
    with pytest.raises(ValueError):
        fill_previous([m1(0, 1)], MIDNIGHT, MIDNIGHT + HOUR, Timeframe.M5)
    with pytest.raises(ValueError):
        fill_previous([m1(0, 1), m1(0, 2)], MIDNIGHT, MIDNIGHT + HOUR, Timeframe.M1)


def test_fill_previous_works_on_higher_timeframes() -> None:
    d1 = Candle("AAPL", Timeframe.D1, MIDNIGHT, 1, 5, 1, 4, 10, 2)
    filled = fill_previous([d1], MIDNIGHT, MIDNIGHT + 3 * DAY, Timeframe.D1)
    assert [c.bucket_start_ns for c in filled] == [MIDNIGHT, MIDNIGHT + DAY, MIDNIGHT + 2 * DAY]
    assert filled[2] == Candle("AAPL", Timeframe.D1, MIDNIGHT + 2 * DAY, 4, 4, 4, 4, 0, 0)
