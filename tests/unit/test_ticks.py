"""Ticks: exact Decimal <-> integer tick conversion, and the validator that keeps bad ticks out of storage."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tradeplane.domain.ticks import (
    DropReason,
    InstrumentGrid,
    OffTickGrid,
    PriceScale,
    Tick,
    TickValidator,
)

EURUSD = InstrumentGrid.of("EURUSD", "0.00001")
ES = InstrumentGrid.of("ES", "0.25")
AAPL = InstrumentGrid.of("AAPL", "0.01")
TOLERANCE_NS = 5_000_000_000
T0 = 1_700_000_000_000_000_000


def validator() -> TickValidator:
    return TickValidator([EURUSD, ES, AAPL], max_out_of_order_ns=TOLERANCE_NS)


# --- PriceScale --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tick_size", "price", "ticks"),
    [
        ("0.01", "123.45", 12345),
        ("0.01", "123.450000", 12345),
        ("0.01", "1E+3", 100000),
        ("0.25", "4501.75", 18007),
        ("0.00001", "1.08345", 108345),
        ("0.5", "0", 0),
        ("5", "1250", 250),
        ("0.01", "98765432109876543210.12", 9876543210987654321012),
    ],
)
def test_price_to_ticks_is_exact(tick_size: str, price: str, ticks: int) -> None:
    scale = PriceScale(Decimal(tick_size))
    assert scale.to_ticks(Decimal(price)) == ticks
    assert scale.to_price(ticks) == Decimal(price)


def test_ticks_to_price_keeps_the_tick_size_exponent() -> None:
    assert str(PriceScale(Decimal("0.01")).to_price(12345)) == "123.45"
    assert str(PriceScale(Decimal("0.25")).to_price(7)) == "1.75"
    assert str(PriceScale(Decimal("0.00001")).to_price(100000)) == "1.00000"


@pytest.mark.parametrize(("tick_size", "price"), [("0.01", "123.455"), ("0.25", "1.1"), ("5", "1252")])
def test_off_grid_prices_are_refused_not_rounded(tick_size: str, price: str) -> None:
    with pytest.raises(OffTickGrid):
        PriceScale(Decimal(tick_size)).to_ticks(Decimal(price))


def test_non_decimal_and_non_finite_prices_are_refused() -> None:
    scale = PriceScale(Decimal("0.01"))
    with pytest.raises(TypeError):
        scale.to_ticks(1.1)  # type: ignore[arg-type]
    for text in ("NaN", "Infinity", "-Infinity"):
        with pytest.raises(ValueError):
            scale.to_ticks(Decimal(text))


@pytest.mark.parametrize("tick_size", ["0", "-0.01", "NaN"])
def test_tick_size_must_be_positive(tick_size: str) -> None:
    with pytest.raises(ValueError):
        PriceScale(Decimal(tick_size))


@given(
    ticks=st.integers(min_value=-(10**18), max_value=10**18),
    tick_size=st.sampled_from(["0.01", "0.25", "0.00001", "0.5", "1", "10", "0.0000001"]),
)
def test_conversion_round_trips_for_every_tick_count(ticks: int, tick_size: str) -> None:
    scale = PriceScale(Decimal(tick_size))
    price = scale.to_price(ticks)
    assert scale.to_ticks(price) == ticks
    assert price == ticks * Decimal(tick_size)


# --- TickValidator: each drop reason -----------------------------------------------------------------------


def test_a_good_quote_and_trade_is_accepted() -> None:
    gate = validator()
    tick = Tick(T0, "AAPL", 18990, 18992, 100, 200, 18991, 50)
    assert gate.accept(tick) is None
    assert gate.accepted == 1
    assert not gate.drops
    assert gate.watermark("AAPL") == T0


def test_a_locked_quote_is_accepted_but_a_crossed_one_is_dropped() -> None:
    gate = validator()
    assert gate.accept(Tick(T0, "AAPL", 100, 100)) is None
    assert gate.accept(Tick(T0, "AAPL", 101, 100)) is DropReason.CROSSED_QUOTE
    assert gate.drops == {DropReason.CROSSED_QUOTE: 1}


def test_unknown_symbol_is_dropped() -> None:
    gate = validator()
    assert gate.accept(Tick(T0, "MSFT", 100, 101)) is DropReason.UNKNOWN_SYMBOL
    assert gate.normalize(T0, "MSFT", Decimal(1), Decimal(2), 1, 1, None, 0) is DropReason.UNKNOWN_SYMBOL
    assert gate.drops[DropReason.UNKNOWN_SYMBOL] == 2


@pytest.mark.parametrize(
    "tick",
    [
        Tick(T0, "AAPL", 0, 101),
        Tick(T0, "AAPL", -5, 101),
        Tick(T0, "AAPL", 100, 0),
        Tick(T0, "AAPL", None, None, last=0, volume=1),
    ],
)
def test_non_positive_prices_are_dropped(tick: Tick) -> None:
    assert validator().accept(tick) is DropReason.NON_POSITIVE_PRICE


@pytest.mark.parametrize("bad", ["NaN", "Infinity", "-Infinity", "sNaN"])
def test_non_finite_prices_are_dropped(bad: str) -> None:
    gate = validator()
    assert gate.normalize(T0, "AAPL", Decimal(bad), Decimal("1"), 1, 1, None, 0) is DropReason.NON_FINITE_PRICE
    assert gate.normalize(T0, "AAPL", None, None, 0, 0, Decimal(bad), 1) is DropReason.NON_FINITE_PRICE


def test_off_grid_prices_are_dropped() -> None:
    gate = validator()
    result = gate.normalize(T0, "ES", Decimal("4500.10"), Decimal("4500.25"), 1, 1, None, 0)
    assert result is DropReason.OFF_TICK_GRID
    assert gate.accepted == 0


def test_normalize_converts_exactly_and_accepts() -> None:
    gate = validator()
    tick = gate.normalize(T0, "EURUSD", Decimal("1.08345"), Decimal("1.08347"), 3, 4, Decimal("1.08346"), 2)
    assert tick == Tick(T0, "EURUSD", 108345, 108347, 3, 4, 108346, 2)
    assert gate.accepted == 1
    crossed = gate.normalize(T0, "EURUSD", Decimal("1.1"), Decimal("1.0"), 1, 1, None, 0)
    assert crossed is DropReason.CROSSED_QUOTE


@pytest.mark.parametrize(
    "tick",
    [
        Tick(T0, "AAPL", None, None),  # no price at all
        Tick(T0, "AAPL", 100, 101, bid_size=-1),
        Tick(T0, "AAPL", None, None, last=100, volume=-3),
        Tick(-1, "AAPL", 100, 101),
        Tick(2**63, "AAPL", 100, 101),
    ],
)
def test_impossible_rows_are_malformed(tick: Tick) -> None:
    assert validator().accept(tick) is DropReason.MALFORMED_ROW


def test_out_of_order_is_judged_against_the_newest_accepted_tick_minus_tolerance() -> None:
    gate = validator()
    assert gate.accept(Tick(T0, "AAPL", 100, 101)) is None
    assert gate.accept(Tick(T0 - TOLERANCE_NS, "AAPL", 100, 101)) is None  # exactly at the limit: accepted
    assert gate.accept(Tick(T0 - TOLERANCE_NS - 1, "AAPL", 100, 101)) is DropReason.OUT_OF_ORDER
    # A late tick inside the tolerance does not pull the watermark back.
    assert gate.watermark("AAPL") == T0
    # Watermarks are per symbol: an old ES tick is fine while AAPL has moved on.
    assert gate.accept(Tick(T0 - 10 * TOLERANCE_NS, "ES", 4, 5)) is None
    assert gate.drops == {DropReason.OUT_OF_ORDER: 1}


def test_a_tick_from_the_future_is_dropped_and_does_not_silence_its_symbol() -> None:
    now = [T0]
    gate = TickValidator([AAPL], max_out_of_order_ns=TOLERANCE_NS, max_future_ns=TOLERANCE_NS, clock=lambda: now[0])
    century = 100 * 365 * 86_400 * 1_000_000_000
    assert gate.accept(Tick(T0, "AAPL", 100, 101)) is None
    assert gate.accept(Tick(T0 + century, "AAPL", 100, 101)) is DropReason.TIMESTAMP_IN_FUTURE
    assert gate.accept(Tick(T0 + TOLERANCE_NS + 1, "AAPL", 100, 101)) is DropReason.TIMESTAMP_IN_FUTURE
    assert gate.watermark("AAPL") == T0
    assert gate.accept(Tick(T0 + TOLERANCE_NS, "AAPL", 100, 101)) is None  # within the allowed skew
    now[0] = T0 + 60 * TOLERANCE_NS  # the clock moves on: so does the bound
    assert gate.accept(Tick(T0 + 61 * TOLERANCE_NS, "AAPL", 100, 101)) is None
    assert gate.normalize(T0 + century, "AAPL", Decimal(1), None, 0, 0, None, 0) is DropReason.TIMESTAMP_IN_FUTURE
    assert gate.drops == {DropReason.TIMESTAMP_IN_FUTURE: 3}


def test_without_a_future_bound_any_representable_timestamp_is_accepted() -> None:
    assert validator().accept(Tick(2**63 - 1, "AAPL", 100, 101)) is None


def test_dropped_ticks_do_not_move_the_watermark() -> None:
    gate = validator()
    assert gate.accept(Tick(T0 + 10**12, "AAPL", 101, 100)) is DropReason.CROSSED_QUOTE
    assert gate.watermark("AAPL") is None
    assert gate.accept(Tick(T0, "AAPL", 100, 101)) is None


def test_drops_are_counted_per_reason_with_one_sample_each() -> None:
    gate = validator()
    gate.accept(Tick(T0, "MSFT", 1, 2))
    gate.accept(Tick(T0, "NFLX", 1, 2))
    gate.accept(Tick(T0, "AAPL", 3, 2))
    gate.reject(DropReason.MALFORMED_ROW, ["garbage", "row"])
    assert gate.drops == {
        DropReason.UNKNOWN_SYMBOL: 2,
        DropReason.CROSSED_QUOTE: 1,
        DropReason.MALFORMED_ROW: 1,
    }
    samples = gate.drain_samples()
    assert set(samples) == {DropReason.UNKNOWN_SYMBOL, DropReason.CROSSED_QUOTE, DropReason.MALFORMED_ROW}
    assert "MSFT" in samples[DropReason.UNKNOWN_SYMBOL]  # the first one is kept
    assert "garbage" in samples[DropReason.MALFORMED_ROW]
    # Samples restart after a drain (one log line per interval); the counters keep counting.
    assert gate.drain_samples() == {}
    gate.accept(Tick(T0, "NFLX", 1, 2))
    assert "NFLX" in gate.drain_samples()[DropReason.UNKNOWN_SYMBOL]
    assert gate.drops[DropReason.UNKNOWN_SYMBOL] == 3


def test_samples_are_bounded_in_size() -> None:
    gate = validator()
    gate.reject(DropReason.MALFORMED_ROW, "x" * 10_000)
    assert len(gate.drain_samples()[DropReason.MALFORMED_ROW]) <= 300


def test_accept_batch_keeps_order_and_drops_the_bad() -> None:
    gate = validator()
    good1 = Tick(T0, "AAPL", 100, 101)
    good2 = Tick(T0 + 1, "ES", 4, 5, last=5, volume=1)
    batch = [good1, Tick(T0, "AAPL", 102, 101), Tick(T0, "ZZZ", 1, 2), good2]
    assert gate.accept_batch(batch) == [good1, good2]
    assert gate.accepted == 2
    assert sum(gate.drops.values()) == 2


def test_drop_reason_values_are_the_fixed_label_set() -> None:
    assert {reason.value for reason in DropReason} == {
        "unknown_symbol",
        "non_positive_price",
        "non_finite_price",
        "crossed_quote",
        "malformed_row",
        "out_of_order",
        "off_tick_grid",
        "timestamp_in_future",
    }


def test_the_engines_instrument_specs_can_be_used_directly() -> None:
    from tradeplane.domain.book import InstrumentSpec

    engine_spec = InstrumentSpec("AAPL", Decimal("0.01"), Decimal("1"))
    gate = TickValidator([engine_spec], max_out_of_order_ns=0)
    tick = gate.normalize(T0, "AAPL", Decimal("189.90"), Decimal("189.92"), 1, 1, None, 0)
    assert tick == Tick(T0, "AAPL", 18990, 18992, 1, 1)
    assert gate.price_scales["AAPL"] == PriceScale(Decimal("0.01"))


def test_instrument_grid_refuses_a_bad_tick_size() -> None:
    with pytest.raises(ValueError):
        InstrumentGrid.of("AAPL", "0")
