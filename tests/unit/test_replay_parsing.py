"""What a tick file's fields may hold: numbers as feeds write them (not every text ``Decimal`` accepts), float
Parquet columns read at their own width, and a file with nothing in it refused rather than replayed as nothing."""

from __future__ import annotations

import json
import math
from decimal import Decimal
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tradeplane.adapters.feeds.bus import parse_tick_message
from tradeplane.adapters.feeds.replay import MalformedValue, ReplayFeed, parse_ts_ns, to_lots
from tradeplane.domain.ticks import DropReason, InstrumentGrid, Tick, TickValidator
from tradeplane.errors import InvalidRequest

AAPL = InstrumentGrid.of("AAPL", "0.01")
EURUSD = InstrumentGrid.of("EURUSD", "0.00001")
BTC = InstrumentGrid.of("BTC-USD", "0.5")
LOT_SIZES = {"AAPL": Decimal(1), "EURUSD": Decimal(1000), "BTC-USD": Decimal("0.001")}
HEADER = "ts,symbol,bid,ask,bid_size,ask_size,last,volume\n"
T0 = 1_709_596_800_000_000_000  # 2024-03-05T00:00:00Z


def gate() -> TickValidator:
    return TickValidator([AAPL, EURUSD, BTC], max_out_of_order_ns=10**18)


def replay(path: Path, validator: TickValidator) -> list[Tick]:
    return [tick for batch in ReplayFeed(path, validator, LOT_SIZES).iter_batches() for tick in batch.ticks]


# --- numbers in text fields ---------------------------------------------------------------------------------

# Decimal() reads each of these as a number; no feed writes one, so a row holding one is malformed.
NOT_FEED_NUMBERS = [
    "1_000",  # Python's digit grouping (PEP 515)
    "1e1_0",  # grouping in the exponent too
    "\u0663",  # ARABIC-INDIC DIGIT THREE
    "\uff13",  # FULLWIDTH DIGIT THREE
    "\u00a03",  # a no-break space before the digit
]


@pytest.mark.parametrize("text", NOT_FEED_NUMBERS)
def test_quantities_decimal_reads_but_no_feed_writes_are_malformed(text: str) -> None:
    with pytest.raises(MalformedValue):
        to_lots(text, Decimal(1))


@pytest.mark.parametrize(
    ("bid", "bid_size"),
    [
        ("189_90.00", "3"),
        ("10_0.5", "3"),
        ("\uff11\uff18\uff19.\uff19\uff10", "3"),
        ("189.90", "1_000"),
        ("189.90", "\u0663"),
    ],
)
def test_csv_numbers_with_digit_grouping_or_non_ascii_digits_are_malformed_rows(
    tmp_path: Path, bid: str, bid_size: str
) -> None:
    path = tmp_path / "ticks.csv"
    path.write_text(HEADER + f"{T0},AAPL,{bid},189.92,{bid_size},1,,\n", encoding="utf-8")
    validator = gate()
    assert replay(path, validator) == []
    assert validator.drops == {DropReason.MALFORMED_ROW: 1}


def test_csv_numbers_in_every_plain_decimal_form_still_read(tmp_path: Path) -> None:
    path = tmp_path / "ticks.csv"
    rows = [
        f"{T0},AAPL, 189.90 ,189.92,3,4,189.91,5",  # spaces around a field
        f"{T0 + 1},AAPL,+189.90,1.8992E2,3.,.4e1,18991e-2,5",  # sign, exponent, bare point
        f"{T0 + 2},EURUSD,1.08345,1.08347,1e6,2E+6,,",
    ]
    path.write_text(HEADER + "\n".join(rows) + "\n")
    validator = gate()
    assert replay(path, validator) == [
        Tick(T0, "AAPL", 18990, 18992, 3, 4, 18991, 5),
        Tick(T0 + 1, "AAPL", 18990, 18992, 3, 4, 18991, 5),
        Tick(T0 + 2, "EURUSD", 108345, 108347, 1_000, 2_000, None, 0),
    ]
    assert not validator.drops


def test_csv_nan_and_infinity_stay_non_finite_prices(tmp_path: Path) -> None:
    path = tmp_path / "ticks.csv"
    path.write_text(HEADER + f"{T0},AAPL,NaN,189.92,1,1,,\n{T0},AAPL,189.90,Infinity,1,1,,\n{T0},AAPL,sNaN,1,1,1,,\n")
    validator = gate()
    assert replay(path, validator) == []
    assert validator.drops == {DropReason.NON_FINITE_PRICE: 3}


def test_epoch_timestamps_are_ascii_digits_only() -> None:
    assert parse_ts_ns(str(T0)) == T0
    arabic_indic = str(T0).translate({ord(d): chr(0x0660 + int(d)) for d in "0123456789"})
    with pytest.raises(MalformedValue):
        parse_ts_ns(arabic_indic)
    with pytest.raises(MalformedValue):
        parse_ts_ns(f"{T0:_}")


def test_bus_messages_read_numbers_by_the_same_rule() -> None:
    validator = gate()
    row = {"ts": T0, "symbol": "AAPL", "bid": "189.90", "ask": "189.92", "bid_size": "3", "ask_size": "4"}
    out: list[Tick] = []
    grouped = {**row, "bid": "189_90.00"}
    fullwidth = {**row, "ask": "\uff11\uff18\uff19.\uff19\uff12"}
    assert parse_tick_message(json.dumps([row, grouped, fullwidth]).encode(), validator, LOT_SIZES, out) == 3
    assert out == [Tick(T0, "AAPL", 18990, 18992, 3, 4, None, 0)]
    assert validator.drops == {DropReason.MALFORMED_ROW: 2}


# --- empty files --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"", b"\xef\xbb\xbf"], ids=["zero-bytes", "only-a-byte-order-mark"])
def test_a_csv_with_no_header_is_refused_as_empty(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "ticks.csv"
    path.write_bytes(content)
    with pytest.raises(InvalidRequest, match="empty"):
        list(ReplayFeed(path, gate(), LOT_SIZES).iter_batches())


def test_a_header_only_csv_is_an_empty_replay(tmp_path: Path) -> None:
    path = tmp_path / "ticks.csv"
    path.write_text(HEADER)
    feed = ReplayFeed(path, gate(), LOT_SIZES)
    assert list(feed.iter_batches()) == []
    assert feed.rows_read == 0


# --- float Parquet columns ----------------------------------------------------------------------------------


def float_table(float_type: pa.DataType, bid: list[float], ask: list[float], sizes: list[float]) -> pa.Table:
    count = len(bid)
    numpy_type = {16: np.float16, 32: np.float32, 64: np.float64}[float_type.bit_width]
    column = lambda values: pa.array(np.array(values, dtype=numpy_type), type=float_type)  # noqa: E731
    return pa.table(
        {
            "ts": pa.array([T0 + i for i in range(count)], type=pa.int64()).cast(pa.timestamp("ns", tz="UTC")),
            "symbol": ["BTC-USD"] * count,
            "bid": column(bid),
            "ask": column(ask),
            "bid_size": column(sizes),
            "ask_size": column(sizes),
            "last": pa.array([None] * count, type=float_type),
            "volume": column(sizes),
        }
    )


@pytest.mark.parametrize("float_type", [pa.float32(), pa.float64()], ids=["float32", "float64"])
def test_float_parquet_prices_read_as_the_shortest_decimal_of_their_own_width(
    tmp_path: Path, float_type: pa.DataType
) -> None:
    # 65000.5 and 0.125 are exact in binary; 1.1 and 0.1 are not, least of all in 32 bits
    # (1.1 as float32 is 1.10000002384185791015625).
    prices = InstrumentGrid.of("EURUSD", "0.1")
    table = float_table(float_type, [1.1, 65000.5], [1.2, 65001.0], [1000.0, 2000.0])
    table = table.set_column(1, "symbol", pa.array(["EURUSD", "EURUSD"]))
    path = tmp_path / "floats.parquet"
    pq.write_table(table, path)
    validator = TickValidator([prices], max_out_of_order_ns=10**18)
    read = [t for b in ReplayFeed(path, validator, {"EURUSD": Decimal(1000)}).iter_batches() for t in b.ticks]
    assert read == [
        Tick(T0, "EURUSD", 11, 12, 1, 1, None, 1),
        Tick(T0 + 1, "EURUSD", 650005, 650010, 2, 2, None, 2),
    ]
    assert not validator.drops


def test_float32_and_float16_quantities_are_whole_lots_at_their_own_width(tmp_path: Path) -> None:
    for float_type in (pa.float32(), pa.float16()):
        path = tmp_path / f"sizes-{float_type}.parquet"
        pq.write_table(float_table(float_type, [6.5], [7.0], [0.1]), path)
        validator = gate()
        lots = {"BTC-USD": Decimal("0.1")}
        read = [t for b in ReplayFeed(path, validator, lots).iter_batches() for t in b.ticks]
        assert read == [Tick(T0, "BTC-USD", 13, 14, 1, 1, None, 1)], float_type
        assert not validator.drops, float_type


def test_float32_prices_off_the_grid_are_dropped_never_rounded(tmp_path: Path) -> None:
    # 189.905 is off a 0.01 grid at any width; NaN and a crossed quote keep their own reasons.
    table = float_table(pa.float32(), [189.905, 189.9, math.nan, 190.0], [189.92, 189.92, 189.92, 189.92], [1.0] * 4)
    table = table.set_column(1, "symbol", pa.array(["AAPL"] * 4))
    path = tmp_path / "f32.parquet"
    pq.write_table(table, path)
    validator = gate()
    read = [t for b in ReplayFeed(path, validator, LOT_SIZES).iter_batches() for t in b.ticks]
    assert read == [Tick(T0 + 1, "AAPL", 18990, 18992, 1, 1, None, 1)]
    assert validator.drops == {
        DropReason.OFF_TICK_GRID: 1,
        DropReason.NON_FINITE_PRICE: 1,
        DropReason.CROSSED_QUOTE: 1,
    }
