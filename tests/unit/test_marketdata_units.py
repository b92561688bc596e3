"""Market data pieces that need no server: NUMERIC grids, the tick cursor, bus and engine-trade messages,
the COPY encoder's bounds and row layout."""

from __future__ import annotations

import struct
from decimal import Decimal

import orjson
import pytest

from tradeplane.adapters.db.marketdata import (
    ListedInstrument,
    TickCopyEncoder,
    TickCursor,
    mantissa_scale,
    ns_to_datetime,
)
from tradeplane.adapters.feeds.bus import parse_tick_message, to_lots
from tradeplane.adapters.feeds.engine_trades import trade_to_tick
from tradeplane.adapters.feeds.replay import MalformedValue
from tradeplane.domain.ticks import DropReason, InstrumentGrid, Tick, TickValidator
from tradeplane.errors import InvalidRequest

T0 = 1_709_596_800_000_000_000  # 2024-03-05T00:00:00Z
BTC = ListedInstrument(1, "BTC-USD", Decimal("0.01"), Decimal("0.0001"))
EUR = ListedInstrument(2, "EUR-USD", Decimal("0.00001"), Decimal("1000"))


def gate() -> TickValidator:
    return TickValidator([InstrumentGrid(i.symbol, i.tick_size) for i in (BTC, EUR)], max_out_of_order_ns=0)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("0.01", (1, 2)), ("0.05", (5, 2)), ("1000", (1000, 0)), ("1E+3", (1000, 0)), ("0.00001", (1, 5))],
)
def test_mantissa_scale(value: str, expected: tuple[int, int]) -> None:
    assert mantissa_scale(Decimal(value)) == expected


def test_instruments_finer_than_the_column_are_refused() -> None:
    with pytest.raises(ValueError, match="decimals"):
        ListedInstrument(3, "DUST", Decimal("1E-19"), Decimal(1))


def test_tick_cursor_round_trips_and_refuses_garbage() -> None:
    cursor = TickCursor(ns_to_datetime(T0 + 123_456_000), 7)
    assert TickCursor.decode(cursor.encode()) == cursor
    for token in ("!!", "bm9wZQ", "MTox"[:-1] + "=", "LTE6LTE"):
        with pytest.raises(InvalidRequest):
            TickCursor.decode(token)


def _numeric_from_wire(field: bytes) -> Decimal:
    ndigits, weight, sign, dscale = struct.unpack(">hhHh", field[:8])
    digits = struct.unpack(f">{ndigits}h", field[8:])
    value = sum((Decimal(d) * Decimal(10000) ** (weight - i) for i, d in enumerate(digits)), Decimal(0))
    assert sign == 0
    return value.quantize(Decimal(1).scaleb(-dscale))


def test_copy_rows_carry_exact_numerics_and_null_sides() -> None:
    encoder = TickCopyEncoder([BTC, EUR])
    ticks = [
        Tick(T0 + 1_999, "EUR-USD", 108_001, 108_003, 2, 3, None, 0),  # quote only: last and volume NULL
        Tick(T0, "BTC-USD", None, None, 0, 0, 6_500_012, 5_000),
    ]
    data = encoder.encode(encoder.columns(ticks))
    rows = []
    offset = 0
    while offset < len(data):
        (count,) = struct.unpack_from(">h", data, offset)
        offset += 2
        fields: list[bytes | None] = []
        for _ in range(count):
            (length,) = struct.unpack_from(">i", data, offset)
            offset += 4
            fields.append(None if length < 0 else data[offset : offset + length])
            offset += max(length, 0)
        rows.append(fields)
    decoded = {
        struct.unpack(">q", row[1] or b"")[0]: [None if f is None else _numeric_from_wire(f) for f in row[2:]]
        + [struct.unpack(">q", row[0] or b"")[0]]
        for row in rows
    }
    pg_epoch_us = 946_684_800_000_000
    assert decoded[1] == [None, None, None, None, Decimal("65000.12"), Decimal("0.5000"), T0 // 1000 - pg_epoch_us]
    assert decoded[2] == [
        Decimal("1.08001"),
        Decimal("1.08003"),
        Decimal("2000"),
        Decimal("3000"),
        None,
        None,
        (T0 + 1_999) // 1000 - pg_epoch_us,
    ]


def test_values_beyond_the_wire_format_are_found() -> None:
    encoder = TickCopyEncoder([BTC])
    ticks = [Tick(T0, "BTC-USD", 2**62, 2**62 + 1, 1, 1, None, 0), Tick(T0, "BTC-USD", 1, 2, 1, 1, None, 0)]
    assert encoder.storable(ticks) == [False, True]
    assert encoder.in_range(encoder.columns(ticks)).tolist() == [False, True]


def test_quantities_must_be_whole_lots() -> None:
    assert to_lots("0.0003", Decimal("0.0001")) == 3
    assert to_lots(None, Decimal("0.0001")) == 0
    with pytest.raises(MalformedValue):
        to_lots("0.00015", Decimal("0.0001"))


def test_bus_messages_become_ticks_or_counted_drops() -> None:
    validator = gate()
    lots = {"BTC-USD": BTC.lot_size, "EUR-USD": EUR.lot_size}
    out: list[Tick] = []
    message = [
        {"ts": T0, "symbol": "BTC-USD", "bid": "65000.01", "ask": "65000.02", "bid_size": "0.5", "last": 65000.01},
        {"ts": T0 + 1, "symbol": "XRP-USD", "last": "1"},
        {"symbol": "BTC-USD", "last": "1"},
        "nonsense",
    ]
    assert parse_tick_message(orjson.dumps(message), validator, lots, out) == 4
    assert parse_tick_message(b"{not json", validator, lots, out) == 1
    assert out == [Tick(T0, "BTC-USD", 6_500_001, 6_500_002, 5000, 0, 6_500_001, 0)]
    assert validator.drops == {DropReason.UNKNOWN_SYMBOL: 1, DropReason.MALFORMED_ROW: 3}


def test_engine_trades_are_trade_only_ticks() -> None:
    validator = gate()
    lots = {"BTC-USD": BTC.lot_size}
    trade = {"trade_id": "t1", "price": "65000.50", "qty": "0.25", "aggressor_side": "sell",
             "ts": "2024-03-05T00:00:00.000001+00:00"}  # fmt: skip
    envelope = orjson.dumps({"channel": "trades", "symbol": "BTC-USD", "data": trade})
    assert trade_to_tick(envelope, validator, lots) == Tick(T0 + 1000, "BTC-USD", None, None, 0, 0, 6_500_050, 2500)
    assert trade_to_tick(b"[]", validator, lots) is None
    assert validator.drops == {DropReason.MALFORMED_ROW: 1}
