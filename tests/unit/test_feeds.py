"""Feed adapters: file replay (CSV, Parquet) with bad rows counted, and the seeded simulated market."""

from __future__ import annotations

import json
import math
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tradeplane.adapters.db.marketdata import ListedInstrument
from tradeplane.adapters.feeds import FeedBatch
from tradeplane.adapters.feeds.bus import parse_tick_message
from tradeplane.adapters.feeds.replay import (
    MalformedValue,
    ReplayFeed,
    parse_ts_ns,
    to_lots,
    write_csv,
    write_parquet,
)
from tradeplane.adapters.feeds.simulated import SimulatedFeed, SimulatedInstrument
from tradeplane.domain.ticks import DropReason, InstrumentGrid, Tick, TickValidator
from tradeplane.errors import InvalidRequest

AAPL = InstrumentGrid.of("AAPL", "0.01")
ES = InstrumentGrid.of("ES", "0.25")
EURUSD = InstrumentGrid.of("EURUSD", "0.00001")
BTC = InstrumentGrid.of("BTC-USD", "0.5")
SPECS = [AAPL, ES, EURUSD, BTC]
#: Quantities in files are instrument units: EURUSD trades in lots of 1,000, BTC-USD in lots of 0.001.
LOT_SIZES = {"AAPL": Decimal(1), "ES": Decimal(1), "EURUSD": Decimal(1000), "BTC-USD": Decimal("0.001")}
LISTED = [ListedInstrument(n, i.symbol, i.tick_size, LOT_SIZES[i.symbol]) for n, i in enumerate(SPECS, 1)]
HEADER = "ts,symbol,bid,ask,bid_size,ask_size,last,volume\n"
T0 = 1_709_596_800_000_000_000  # 2024-03-05T00:00:00Z
SECOND = 1_000_000_000


def gate(tolerance_ns: int = 5 * SECOND) -> TickValidator:
    return TickValidator(SPECS, max_out_of_order_ns=tolerance_ns)


def replay_all(feed: ReplayFeed) -> tuple[list[Tick], list[FeedBatch]]:
    batches = list(feed.iter_batches())
    return [tick for batch in batches for tick in batch.ticks], batches


# --- timestamps ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-03-05T00:00:00Z", T0),
        ("2024-03-05T00:00:00+00:00", T0),
        ("2024-03-05 01:00:00+01:00", T0),
        ("2024-03-05T00:00:00.5Z", T0 + 500_000_000),
        ("2024-03-05T00:00:00.123456789Z", T0 + 123_456_789),
        ("2024-03-04T19:00:00.000000001-05:00", T0 + 1),
        (str(T0 + 42), T0 + 42),
        (" 1709596800000000007 ", T0 + 7),
    ],
)
def test_timestamps_parse_to_exact_epoch_nanoseconds(text: str, expected: int) -> None:
    assert parse_ts_ns(text) == expected


@pytest.mark.parametrize(
    "text",
    ["2024-03-05T00:00:00", "yesterday", "", "2024-13-01T00:00:00Z", "2024-03-05T00:00:00.1234567891Z"],
)
def test_naive_garbage_or_sub_nanosecond_timestamps_are_malformed(text: str) -> None:
    with pytest.raises(MalformedValue):
        parse_ts_ns(text)


def test_naive_timestamps_may_be_declared_utc() -> None:
    assert parse_ts_ns("2024-03-05T00:00:00.000000002", naive_is_utc=True) == T0 + 2


# --- CSV replay ---------------------------------------------------------------------------------------------


def test_csv_replay_reads_iso_and_epoch_timestamps_and_exact_prices(tmp_path: Path) -> None:
    path = tmp_path / "ticks.csv"
    path.write_text(
        HEADER
        + "2024-03-05T00:00:00Z,AAPL,189.90,189.92,100,200,189.91,50\n"
        + f"{T0 + 1},ES,4501.25,4501.50,3,4,,\n"
        + "2024-03-05T00:00:00.000000002+00:00,EURUSD,1.08345,1.08347,1000000,2000000,1.08346,500000\n"
        + f"{T0 + 3},AAPL,,189.95,,7,,\n"
    )
    validator = gate()
    ticks, batches = replay_all(ReplayFeed(path, validator, LOT_SIZES))
    assert ticks == [
        Tick(T0, "AAPL", 18990, 18992, 100, 200, 18991, 50),
        Tick(T0 + 1, "ES", 18005, 18006, 3, 4, None, 0),
        Tick(T0 + 2, "EURUSD", 108345, 108347, 1_000, 2_000, 108346, 500),  # lots of 1,000
        Tick(T0 + 3, "AAPL", None, 18995, 0, 7, None, 0),
    ]
    assert batches[-1].rows_read == 4
    assert not validator.drops


def test_csv_bad_rows_are_counted_by_reason_and_never_raise(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    rows = [
        f"{T0},AAPL,189.90,189.92,1,1,189.91,1",  # good
        f"{T0},MSFT,1,2,1,1,,",  # unknown_symbol
        f"{T0},AAPL,0,189.92,1,1,,",  # non_positive_price
        f"{T0},AAPL,-1.00,189.92,1,1,,",  # non_positive_price
        f"{T0},AAPL,NaN,189.92,1,1,,",  # non_finite_price
        f"{T0},AAPL,inf,189.92,1,1,,",  # non_finite_price
        f"{T0},AAPL,189.95,189.92,1,1,,",  # crossed_quote
        f"{T0},AAPL,189.905,189.92,1,1,,",  # off_tick_grid
        f"{T0},AAPL,189.90,189.92,1,1",  # malformed_row: a column short
        f"{T0},AAPL,abc,189.92,1,1,,",  # malformed_row: not a number
        f"{T0},AAPL,189.90,189.92,1.5,1,,",  # malformed_row: fractional size
        "2024-03-05T00:00:00,AAPL,189.90,189.92,1,1,,",  # malformed_row: no UTC offset
        f"{T0},AAPL,189.90,189.92,-1,1,,",  # malformed_row: negative size
        f"{T0},,189.90,189.92,1,1,,",  # malformed_row: no symbol
        f"{T0 + 10 * SECOND},AAPL,189.90,189.92,1,1,,",  # good, moves the watermark
        f"{T0 + 4 * SECOND},AAPL,189.90,189.92,1,1,,",  # out_of_order (6 s late, tolerance 5 s)
        f"{T0 + 6 * SECOND},AAPL,189.90,189.92,1,1,,",  # late but within tolerance: good
        "",  # a blank line is not a row
    ]
    path.write_text(HEADER + "\n".join(rows) + "\n")
    validator = gate()
    feed = ReplayFeed(path, validator, LOT_SIZES, batch_size=4)
    ticks, batches = replay_all(feed)
    assert [t.ts_ns for t in ticks] == [T0, T0 + 10 * SECOND, T0 + 6 * SECOND]
    assert validator.drops == {
        DropReason.UNKNOWN_SYMBOL: 1,
        DropReason.NON_POSITIVE_PRICE: 2,
        DropReason.NON_FINITE_PRICE: 2,
        DropReason.CROSSED_QUOTE: 1,
        DropReason.OFF_TICK_GRID: 1,
        DropReason.MALFORMED_ROW: 6,
        DropReason.OUT_OF_ORDER: 1,
    }
    assert feed.rows_read == 17 == len(ticks) + sum(validator.drops.values())
    assert [b.rows_read for b in batches] == [4, 8, 12, 16, 17]  # a running count per batch
    assert set(validator.drain_samples()) == set(validator.drops)


def test_csv_quantities_are_instrument_units_whole_multiples_of_the_lot_size(tmp_path: Path) -> None:
    path = tmp_path / "units.csv"
    rows = [
        f"{T0},BTC-USD,65000.0,65000.5,0.5,1.25,65000.5,0.003",  # good: 500, 1250 and 3 lots of 0.001
        f"{T0 + 1},BTC-USD,65000.0,65000.5,1E-3,2,,",  # good: exponent notation, a whole number of units
        f"{T0 + 2},BTC-USD,65000.0,65000.5,0.0005,1,,",  # malformed_row: half a lot
        f"{T0 + 3},BTC-USD,,,,,65000.5,0.0031",  # malformed_row: volume off the lot grid
        f"{T0 + 4},EURUSD,1.08345,1.08347,1500,1000,,",  # malformed_row: 1.5 lots of 1,000
        f"{T0 + 5},EURUSD,1.08345,1.08347,3000,1000,,",  # good
        f"{T0 + 6},DOGE-USD,1,2,1,1,,",  # unknown_symbol: no lot size for it
    ]
    path.write_text(HEADER + "\n".join(rows) + "\n")
    validator = gate()
    ticks, _ = replay_all(ReplayFeed(path, validator, LOT_SIZES))
    assert ticks == [
        Tick(T0, "BTC-USD", 130_000, 130_001, 500, 1_250, 130_001, 3),
        Tick(T0 + 1, "BTC-USD", 130_000, 130_001, 1, 2_000, None, 0),
        Tick(T0 + 5, "EURUSD", 108345, 108347, 3, 1, None, 0),
    ]
    assert validator.drops == {DropReason.MALFORMED_ROW: 3, DropReason.UNKNOWN_SYMBOL: 1}


def test_replay_and_the_bus_feed_read_the_same_row_as_the_same_tick(tmp_path: Path) -> None:
    """One unit rule for every external source: a file row and a bus message with the same fields agree."""
    fields = {"ts": str(T0), "symbol": "BTC-USD", "bid": "65000.0", "ask": "65000.5", "bid_size": "0.25",
              "ask_size": "0.004", "last": "65000.5", "volume": "0.002"}  # fmt: skip
    path = tmp_path / "one.csv"
    path.write_text(HEADER + ",".join(fields[name] for name in HEADER.strip().split(",")) + "\n")
    from_file, _ = replay_all(ReplayFeed(path, gate(), LOT_SIZES))
    from_bus: list[Tick] = []
    parse_tick_message(json.dumps(fields).encode(), gate(), LOT_SIZES, from_bus)
    assert from_file == from_bus == [Tick(T0, "BTC-USD", 130_000, 130_001, 250, 4, 130_001, 2)]


def test_quantities_become_lots_exactly_or_not_at_all() -> None:
    lot = Decimal("0.001")
    assert [to_lots(v, lot) for v in ("0.003", Decimal("0.0030"), 2, 0.25, "", None)] == [3, 3, 2000, 250, 0, 0]
    for bad in ("0.0031", "abc", "inf", "NaN", True, 1e-4, [1], "1" * 80):
        with pytest.raises(MalformedValue):
            to_lots(bad, lot)


def test_written_files_hold_quantities_in_units(tmp_path: Path) -> None:
    ticks = [Tick(T0, "BTC-USD", 130_000, 130_001, 500, 1_250, 130_001, 3), Tick(T0 + 1, "EURUSD", 1, 2, 3, 4)]
    csv_path, parquet_path = tmp_path / "units.csv", tmp_path / "units.parquet"
    write_csv(csv_path, ticks, LISTED)
    write_parquet(parquet_path, ticks, LISTED)
    lines = csv_path.read_text().splitlines()
    assert lines[1].split(",")[4:] == ["0.500", "1.250", "65000.5", "0.003"]
    assert lines[2].split(",")[4:] == ["3000", "4000", "", "0"]
    table = pq.read_table(parquet_path)
    assert table.column("bid_size").to_pylist() == [Decimal("0.5"), Decimal(3000)]
    assert table.column("volume").to_pylist() == [Decimal("0.003"), Decimal(0)]


def test_csv_rows_with_bad_bytes_or_unsplittable_fields_are_malformed_and_the_replay_goes_on(
    tmp_path: Path,
) -> None:
    def good(second: int) -> bytes:
        return f"{T0 + second * SECOND},AAPL,189.90,189.92,1,1,,\n".encode()

    path = tmp_path / "bytes.csv"
    path.write_bytes(
        HEADER.encode()
        + good(0)
        + f"{T0 + SECOND},AAPL\xe9,189.90,189.92,1,1,,\n".encode("latin-1")  # not UTF-8 (latin-1)
        + good(2)
        + f"{T0 + 3 * SECOND},AAPL,".encode() + b"1" * 200_000 + b",189.92,1,1,,\n"  # over csv's field limit
        + good(4)
        + f'{T0 + 5 * SECOND},"AAPL,189.90,189.92,1,1,,\n'.encode()  # a quote open to the end of the file
    )  # fmt: skip
    validator = gate()
    ticks, batches = replay_all(ReplayFeed(path, validator, LOT_SIZES, batch_size=2))
    assert [t.ts_ns for t in ticks] == [T0, T0 + 2 * SECOND, T0 + 4 * SECOND]
    assert validator.drops == {DropReason.MALFORMED_ROW: 3}
    assert batches[-1].rows_read == 6


def test_csv_columns_may_come_in_any_order_with_extra_columns(tmp_path: Path) -> None:
    path = tmp_path / "reordered.csv"
    path.write_text(
        "symbol,exchange,volume,last,ts,ask_size,bid_size,ask,bid\n"
        f"AAPL,XNAS,5,100.01,{T0},2,1,100.02,100.00\n"
        "AAPL,XNAS,5\n"
    )
    validator = gate()
    ticks, _ = replay_all(ReplayFeed(path, validator, LOT_SIZES))
    assert ticks == [Tick(T0, "AAPL", 10000, 10002, 1, 2, 10001, 5)]
    assert validator.drops == {DropReason.MALFORMED_ROW: 1}


def test_a_file_without_the_tick_columns_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "orders.csv"
    path.write_text("id,price\n1,2\n")
    with pytest.raises(InvalidRequest, match="missing columns"):
        list(ReplayFeed(path, gate(), LOT_SIZES).iter_batches())


async def test_csv_round_trip_through_the_async_iterator(tmp_path: Path) -> None:
    ticks = SimulatedFeed(simulated(), seed=3, start_ns=T0).next_ticks(2500)
    path = tmp_path / "sim.csv"
    assert write_csv(path, ticks, LISTED) == 2500
    feed = ReplayFeed(path, gate(), LOT_SIZES, batch_size=1000)
    read: list[Tick] = []
    counts = []
    async for batch in feed:
        read.extend(batch.ticks)
        counts.append(batch.rows_read)
    assert read == ticks
    assert counts == [1000, 2000, 2500]


# --- Parquet replay -----------------------------------------------------------------------------------------


def test_parquet_round_trip_is_exact(tmp_path: Path) -> None:
    ticks = SimulatedFeed(simulated(), seed=11, start_ns=T0 + 123).next_ticks(3000)
    ticks.append(Tick(T0 + 10**12, "EURUSD", None, 108350, 0, 9, None, 0))
    ticks.append(Tick(T0 + 10**12, "BTC-USD", 130_000, 130_001, 1, 2_500, 130_001, 7))
    path = tmp_path / "ticks.parquet"
    assert write_parquet(path, ticks, LISTED) == len(ticks)
    schema = pq.read_schema(path)
    assert schema.field("ts").type == pa.timestamp("ns", tz="UTC")
    assert pa.types.is_decimal(schema.field("bid").type)
    assert pa.types.is_decimal(schema.field("volume").type)  # quantities in units: 0.001 BTC, 1,000 EURUSD
    validator = gate()
    read, batches = replay_all(ReplayFeed(path, validator, LOT_SIZES, batch_size=1000))
    assert read == ticks
    assert batches[-1].rows_read == len(ticks)
    assert not validator.drops


def test_parquet_with_string_float_and_int_columns_and_bad_rows(tmp_path: Path) -> None:
    table = pa.table(
        {
            "ts": pa.array([str(T0), "2024-03-05T00:00:01.000000001Z", str(T0 + 2 * SECOND), "bad", str(T0)]),
            "symbol": ["AAPL", "AAPL", "AAPL", "AAPL", "ZZZ"],
            "bid": pa.array([189.9, 189.91, math.nan, 1.0, 1.0], type=pa.float64()),
            "ask": pa.array([189.92, 189.93, 190.0, 2.0, 2.0], type=pa.float64()),
            "bid_size": pa.array([1, 2, 3, 4, 5], type=pa.int64()),
            "ask_size": pa.array([1, 2, 3, 4, 5], type=pa.int64()),
            "last": pa.array(["189.91", None, None, None, None], type=pa.string()),
            "volume": pa.array([10, None, None, None, None], type=pa.int64()),
        }
    )
    path = tmp_path / "mixed.parquet"
    pq.write_table(table, path)
    validator = gate()
    read, _ = replay_all(ReplayFeed(path, validator, LOT_SIZES))
    assert read == [
        Tick(T0, "AAPL", 18990, 18992, 1, 1, 18991, 10),
        Tick(T0 + SECOND + 1, "AAPL", 18991, 18993, 2, 2, None, 0),
    ]
    assert validator.drops == {
        DropReason.NON_FINITE_PRICE: 1,
        DropReason.MALFORMED_ROW: 1,
        DropReason.UNKNOWN_SYMBOL: 1,
    }


def test_parquet_quantities_in_units_from_decimal_string_and_float_columns(tmp_path: Path) -> None:
    table = pa.table(
        {
            "ts": pa.array([T0, T0 + 1, T0 + 2], type=pa.int64()).cast(pa.timestamp("ns", tz="UTC")),
            "symbol": ["BTC-USD"] * 3,
            "bid": pa.array([Decimal("65000.0")] * 3, type=pa.decimal128(10, 1)),
            "ask": pa.array([Decimal("65000.5")] * 3, type=pa.decimal128(10, 1)),
            "bid_size": pa.array([Decimal("0.125"), Decimal("0.0005"), Decimal(2)], type=pa.decimal128(20, 4)),
            "ask_size": pa.array(["0.004", "1", "1"], type=pa.string()),
            "last": pa.array([Decimal("65000.5"), None, None], type=pa.decimal128(10, 1)),
            "volume": pa.array([0.25, None, None], type=pa.float64()),
        }
    )
    path = tmp_path / "units.parquet"
    pq.write_table(table, path)
    validator = gate()
    read, _ = replay_all(ReplayFeed(path, validator, LOT_SIZES))
    assert read == [
        Tick(T0, "BTC-USD", 130_000, 130_001, 125, 4, 130_001, 250),
        Tick(T0 + 2, "BTC-USD", 130_000, 130_001, 2_000, 1_000, None, 0),
    ]
    assert validator.drops == {DropReason.MALFORMED_ROW: 1}  # half a lot


def test_parquet_without_a_time_zone_is_refused_unless_declared_utc(tmp_path: Path) -> None:
    table = pa.table(
        {
            "ts": pa.array([T0 + 5], type=pa.int64()).cast(pa.timestamp("ns")),
            "symbol": ["ES"],
            "bid": [Decimal("4500.25")],
            "ask": [Decimal("4500.50")],
            "bid_size": [1],
            "ask_size": [1],
            "last": [Decimal("4500.50")],
            "volume": [2],
        }
    )
    path = tmp_path / "naive.parquet"
    pq.write_table(table, path)
    with pytest.raises(InvalidRequest):
        list(ReplayFeed(path, gate(), LOT_SIZES).iter_batches())
    read, _ = replay_all(ReplayFeed(path, gate(), LOT_SIZES, naive_is_utc=True))
    assert read == [Tick(T0 + 5, "ES", 18001, 18002, 1, 1, 18002, 2)]


# --- simulated feed -----------------------------------------------------------------------------------------


def simulated() -> list[SimulatedInstrument]:
    return [
        SimulatedInstrument(AAPL, Decimal("0.03"), max_step_ticks=3),  # starts near the floor on purpose
        SimulatedInstrument(ES, Decimal("4500.25"), max_spread_ticks=2, trade_percent=60),
        SimulatedInstrument(EURUSD, Decimal("1.08345"), max_size=1_000_000, max_volume=100_000),
    ]


def test_simulated_feed_is_deterministic_for_a_seed() -> None:
    first = SimulatedFeed(simulated(), seed=42, rate=1000, start_ns=T0).next_ticks(5000)
    again = SimulatedFeed(simulated(), seed=42, rate=1000, start_ns=T0).next_ticks(5000)
    other = SimulatedFeed(simulated(), seed=43, rate=1000, start_ns=T0).next_ticks(5000)
    assert first == again
    assert first != other
    # Pulling in different chunk sizes continues the same walk.
    feed = SimulatedFeed(simulated(), seed=42, rate=1000, start_ns=T0)
    assert feed.next_ticks(1234) + feed.next_ticks(3766) == first
    # Timestamps come from the rate, not the wall clock.
    assert [t.ts_ns for t in first[:3]] == [T0, T0 + 1_000_000, T0 + 2_000_000]


def test_simulated_ticks_are_never_crossed_or_non_positive_and_all_pass_the_validator() -> None:
    ticks = SimulatedFeed(simulated(), seed=7, start_ns=T0).next_ticks(30_000)
    assert {t.symbol for t in ticks} == {"AAPL", "ES", "EURUSD"}
    for tick in ticks:
        assert tick.bid is not None and tick.ask is not None
        assert 1 <= tick.bid < tick.ask
        assert tick.bid_size >= 1 and tick.ask_size >= 1
        if tick.last is not None:
            assert tick.bid <= tick.last <= tick.ask
            assert tick.volume >= 1
    # The AAPL walk starts 3 ticks above zero with steps of up to 3: it must have hit the floor and reflected.
    assert min(t.bid for t in ticks if t.symbol == "AAPL" and t.bid is not None) <= 3
    assert any(t.last is None for t in ticks if t.symbol == "ES")  # quote-only updates at 60% trades
    validator = gate(tolerance_ns=0)
    assert validator.accept_batch(ticks) == ticks


async def test_simulated_feed_iterates_in_batches_until_total_ticks() -> None:
    feed = SimulatedFeed(simulated(), seed=1, rate=None, total_ticks=2500, batch_size=1000, start_ns=T0)
    batches = [batch async for batch in feed]
    assert [len(b.ticks) for b in batches] == [1000, 1000, 500]
    assert [b.rows_read for b in batches] == [1000, 2000, 2500]
    reference = SimulatedFeed(simulated(), seed=1, start_ns=T0).next_ticks(2500)
    assert [t for b in batches for t in b.ticks] == reference


async def test_paced_simulated_feed_delivers_in_small_batches() -> None:
    feed = SimulatedFeed(simulated(), seed=1, rate=2000, total_ticks=300, start_ns=T0)
    assert feed.batch_size == 100  # about 1/20 s of ticks per batch at 2000 ticks/s
    batches = [batch async for batch in feed]
    assert sum(len(b.ticks) for b in batches) == 300


def test_simulated_instrument_refuses_an_off_grid_or_non_positive_start() -> None:
    with pytest.raises(ValueError):
        SimulatedInstrument(ES, Decimal("4500.10"))
    with pytest.raises(ValueError):
        SimulatedInstrument(ES, Decimal("0"))
