"""File replay: ticks from CSV or Parquet files with the columns
``ts,symbol,bid,ask,bid_size,ask_size,last,volume``.

- ``ts`` is ISO 8601 with an offset or ``Z`` (up to nanosecond fractions), or integer UTC epoch nanoseconds.
  A timestamp without an offset is a malformed row unless ``naive_is_utc=True``: guessing a zone would
  silently shift the data.
- Prices are read as ``Decimal`` and converted to integer ticks by the instrument's ``PriceScale``; an empty
  price is an absent side. A number in text (CSV, or a Parquet string column) is ASCII: an optional sign,
  digits with an optional point and exponent, or NaN/Infinity (dropped as ``non_finite_price``), surrounding
  spaces ignored. What else ``Decimal()`` reads, digit grouping (``1_000``) and other scripts' digits
  (Arabic-Indic, full-width), no feed writes: such a field is a ``malformed_row``. Parquet decimal and integer
  columns are exact; a float column is read as the shortest decimal that is the same value at the column's
  own width (a float32 1.1, stored as 1.10000002384185791015625, is 1.1), so an intended on-grid value lands
  on the grid and one that is off the grid is still ``off_tick_grid``, never rounded onto it.
- ``bid_size``, ``ask_size`` and ``volume`` are quantities in the instrument's units, read the same way as
  prices, and must be whole multiples of its lot size (0.003 for three lots of 0.001): the units ``/ticks``
  returns and the bus feed (``md.ticks.<symbol>``) reads, so a file exported from the API, or archived by
  retention, replays as the rows it came from. A quantity off the lot grid is a ``malformed_row`` (never
  rounded); empty sizes and volume are 0.
- Every row goes through the ``TickValidator``: bad rows are counted by ``DropReason`` and never raise. Only a
  file that is not a tick file at all raises ``InvalidRequest``: missing columns, a header ``csv`` cannot
  split, a ``.parquet`` file that is not Parquet (or a damaged row group). In a CSV, a row with bytes that are
  not UTF-8, or that ``csv`` cannot split (a field over its field size limit, a quote left open to the end of
  the file), is one ``malformed_row`` and the replay goes on with the next line. A leading UTF-8 byte order
  mark is skipped. A CSV with no header at all (an empty file) is not a tick file either; one with only its
  header is a replay of no rows.

Iterate with ``async for batch in ReplayFeed(...)`` (yields to the event loop between batches) or
``iter_batches()`` from synchronous code.
"""

from __future__ import annotations

import asyncio
import csv
import decimal
import re
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal, Protocol

from tradeplane.adapters.feeds import FeedBatch
from tradeplane.domain.ticks import DropReason, PricedInstrument, PriceScale, Tick, TickValidator
from tradeplane.errors import InvalidRequest

COLUMNS: tuple[str, ...] = ("ts", "symbol", "bid", "ask", "bid_size", "ask_size", "last", "volume")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# ASCII digits only: \d alone also matches other scripts' digits, which int() would read.
_INTEGER = re.compile(r"-?\d+\Z", re.ASCII)
_SECONDS_FRACTION = re.compile(r"(\d\d:\d\d:\d\d)[.,](\d+)", re.ASCII)
# Quantity <-> lots conversions are exact or raise: a quotient that needs rounding is refused, not rounded.
_EXACT = decimal.Context(prec=60, traps=[decimal.InvalidOperation, decimal.Inexact, decimal.Overflow])


class MalformedValue(ValueError):
    """A field that cannot be parsed; the row is dropped as ``malformed_row``."""


class SizedInstrument(PricedInstrument, Protocol):
    """An instrument with its price grid and its lot size: what writing a replay file needs
    (``adapters.db.marketdata.ListedInstrument`` is one)."""

    @property
    def lot_size(self) -> Decimal: ...


def parse_ts_ns(value: object, *, naive_is_utc: bool = False) -> int:
    """UTC epoch nanoseconds from an int, an integer string, an ISO 8601 string or an aware ``datetime``."""
    if isinstance(value, bool):
        raise MalformedValue(f"not a timestamp: {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, datetime):
        return _datetime_ns(value, 0, naive_is_utc)
    if not isinstance(value, str):
        raise MalformedValue(f"not a timestamp: {value!r}")
    text = value.strip()
    if _INTEGER.match(text):
        return int(text)
    # datetime keeps microseconds only: take the fraction out and add it back in nanoseconds.
    extra_ns = 0
    match = _SECONDS_FRACTION.search(text)
    if match is not None:
        digits = match.group(2)
        if len(digits) > 9:
            raise MalformedValue(f"timestamp finer than a nanosecond: {value!r}")
        extra_ns = int(digits.ljust(9, "0"))
        text = text[: match.end(1)] + text[match.end(2) :]
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError as exc:
        raise MalformedValue(f"not an ISO 8601 timestamp: {value!r}") from exc
    return _datetime_ns(parsed, extra_ns, naive_is_utc)


def _datetime_ns(moment: datetime, extra_ns: int, naive_is_utc: bool) -> int:
    if moment.tzinfo is None:
        if not naive_is_utc:
            raise MalformedValue(f"timestamp without a UTC offset: {moment.isoformat()}")
        moment = moment.replace(tzinfo=UTC)
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1_000 + extra_ns


def decimal_text(text: str) -> Decimal:
    """A number written in text by a feed (see the module docstring); anything else raises ``MalformedValue``.

    ``Decimal()`` ignores surrounding whitespace itself, and reads ``NaN``/``Infinity`` (the validator drops
    those by their own reason); what it reads beyond a feed's numbers is refused first.
    """
    if "_" in text or not text.isascii():  # digit grouping, other scripts' digits or spaces
        raise MalformedValue(f"not a decimal number: {text!r}")
    try:
        return Decimal(text)
    except InvalidOperation as exc:
        raise MalformedValue(f"not a decimal number: {text!r}") from exc


def _price(value: object) -> Decimal | None:
    if isinstance(value, str):  # first: every CSV field is one
        return None if value == "" else decimal_text(value)
    if value is None:
        return None
    if isinstance(value, Decimal):
        return value
    if isinstance(value, bool):
        raise MalformedValue(f"not a price: {value!r}")
    if isinstance(value, int | float):
        return Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    raise MalformedValue(f"not a price: {value!r}")


def to_lots(value: object, lot_size: Decimal) -> int:
    """A quantity in instrument units as a whole number of lots of ``lot_size``; empty (None, "") is 0.

    Accepts a ``Decimal``, an int, a number in text (``decimal_text``) or a float (through its shortest repr);
    anything else, a non-finite value, or a quantity that is not a whole number of lots raises
    ``MalformedValue``.
    """
    if isinstance(value, str):  # first: every CSV field is one
        if value == "":
            return 0
        quantity = decimal_text(value)
    elif value is None:
        return 0
    elif isinstance(value, bool):
        raise MalformedValue(f"not a quantity: {value!r}")
    elif isinstance(value, Decimal):
        quantity = value
    elif isinstance(value, int):
        quantity = Decimal(value)
    elif isinstance(value, float):
        quantity = Decimal(repr(value))
    else:
        raise MalformedValue(f"not a quantity: {value!r}")
    try:
        if not quantity.is_finite():
            raise MalformedValue(f"not a quantity: {value!r}")
        lots, remainder = _EXACT.divmod(quantity, lot_size)
    except decimal.DecimalException as exc:  # not a number, or a quotient too large to be exact
        raise MalformedValue(f"not a quantity in lots of {lot_size}: {value!r}") from exc
    if remainder:
        raise MalformedValue(f"{quantity} is not a whole number of lots of {lot_size}")
    return int(lots)


def to_units(lots: int, lot_size: Decimal) -> Decimal:
    """``lots`` lots as an exact quantity in instrument units (3 lots of 0.001 -> 0.003)."""
    return _EXACT.multiply(Decimal(lots), lot_size)


class ReplayFeed:
    """Replays a CSV or Parquet tick file through a ``TickValidator`` in batches of accepted ticks.

    ``lot_sizes`` (symbol -> lot size) turns the file's quantities, in instrument units, into lots; a symbol
    without one is ``unknown_symbol``. ``rows_read`` counts data rows consumed (blank CSV lines are not rows);
    ``stored`` is up to the writer, and dropped rows are in ``validator.drops``.

    A replay is history: its batches are not ``external_prints`` (the pipeline does not announce its trades
    on the live ``trades`` channel).
    """

    def __init__(
        self,
        path: str | Path,
        validator: TickValidator,
        lot_sizes: Mapping[str, Decimal],
        *,
        batch_size: int = 10_000,
        file_format: Literal["csv", "parquet"] | None = None,
        naive_is_utc: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.path = Path(path)
        self.validator = validator
        self.lot_sizes = dict(lot_sizes)
        self.batch_size = batch_size
        self.naive_is_utc = naive_is_utc
        if file_format is None:
            file_format = "parquet" if self.path.suffix.lower() in (".parquet", ".pq") else "csv"
        self.file_format = file_format
        self.rows_read = 0

    def iter_batches(self) -> Iterator[FeedBatch]:
        rows = self._csv_rows() if self.file_format == "csv" else self._parquet_rows()
        ticks: list[Tick] = []
        for row in rows:
            self.rows_read += 1
            tick = self._to_tick(row)
            if tick is not None:
                ticks.append(tick)
            if self.rows_read % self.batch_size == 0:
                yield FeedBatch(ticks, self.rows_read)
                ticks = []
        if ticks or self.rows_read % self.batch_size:
            yield FeedBatch(ticks, self.rows_read)

    async def __aiter__(self) -> AsyncIterator[FeedBatch]:
        for batch in self.iter_batches():
            yield batch
            await asyncio.sleep(0)

    def _to_tick(self, row: Sequence[Any]) -> Tick | None:
        validator = self.validator
        if len(row) != len(COLUMNS):
            validator.reject(DropReason.MALFORMED_ROW, row)
            return None
        ts, symbol, bid, ask, bid_size, ask_size, last, volume = row
        try:
            if not isinstance(symbol, str) or not symbol:
                raise MalformedValue(f"not a symbol: {symbol!r}")
            if not symbol.isascii() and _has_undecodable(symbol):
                raise MalformedValue(f"not UTF-8: {symbol!r}")  # prices and ts with them fail to parse anyway
            symbol = symbol.strip()
            lot_size = self.lot_sizes.get(symbol)
            if lot_size is None:
                validator.reject(DropReason.UNKNOWN_SYMBOL, row)
                return None
            parsed = validator.normalize(
                parse_ts_ns(ts, naive_is_utc=self.naive_is_utc),
                symbol,
                _price(bid),
                _price(ask),
                to_lots(bid_size, lot_size),
                to_lots(ask_size, lot_size),
                _price(last),
                to_lots(volume, lot_size),
            )
        except MalformedValue:
            validator.reject(DropReason.MALFORMED_ROW, row)
            return None
        return parsed if isinstance(parsed, Tick) else None

    def _csv_rows(self) -> Iterator[Sequence[str]]:
        # surrogateescape: a byte that is not UTF-8 becomes a lone surrogate in its field (so that row is
        # malformed, see _to_tick) instead of a decode error that would end the replay. utf-8-sig: a byte order
        # mark (spreadsheet exports write one) is not part of the first column's name.
        with self.path.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as handle:
            reader = csv.reader(handle)
            try:
                header = next(reader, None)
            except csv.Error as exc:
                raise InvalidRequest(f"{self.path}: not a tick file, unreadable header: {exc}") from None
            if header is None:  # not even a header: whatever this was meant to be, it holds no ticks
                raise InvalidRequest(f"{self.path}: not a tick file: it is empty (no header row)")
            order = _column_order([name.strip() for name in header], self.path)
            identity = order == list(range(len(COLUMNS))) and len(header) == len(COLUMNS)
            width = len(header)
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    return
                except csv.Error as exc:  # the reader starts afresh on the next line
                    yield _Unreadable(f"line {reader.line_num}: {exc}")
                    continue
                if not row:
                    continue
                if identity:
                    yield row
                elif len(row) != width:
                    yield row  # wrong field count: reported as malformed by _to_tick
                else:
                    yield [row[i] for i in order]

    def _parquet_rows(self) -> Iterator[list[Any]]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(self.path)
        except (pa.ArrowException, OSError) as exc:  # not Parquet at all (empty, text, truncated)
            raise InvalidRequest(f"{self.path}: not a Parquet file: {exc}") from None
        _column_order(list(parquet.schema_arrow.names), self.path)
        batches = parquet.iter_batches(batch_size=self.batch_size, columns=list(COLUMNS))
        while True:
            try:
                record_batch = next(batches, None)
            except (pa.ArrowException, OSError) as exc:  # a damaged row group: what was read before stays
                raise InvalidRequest(f"{self.path}: unreadable Parquet after {self.rows_read} rows: {exc}") from None
            if record_batch is None:
                return
            columns: list[list[Any]] = []
            for name in COLUMNS:
                column = record_batch.column(name)
                if pa.types.is_timestamp(column.type):
                    columns.append(_timestamp_ns(pa, column, self.naive_is_utc))
                elif name in _NUMBER_COLUMNS and pa.types.is_floating(column.type):
                    columns.append(_shortest_decimals(pa, column))
                else:
                    columns.append(column.to_pylist())
            yield from (list(row) for row in zip(*columns, strict=True))


class _Unreadable(tuple[str]):
    """A CSV record ``csv`` could not split: one field (the error), so it is a malformed row."""

    def __new__(cls, error: str) -> _Unreadable:
        return super().__new__(cls, (error,))


def _has_undecodable(text: str) -> bool:
    """Whether ``text`` holds a byte that was not UTF-8 (a lone surrogate from ``surrogateescape``)."""
    return any("\udc80" <= char <= "\udcff" for char in text)


def _column_order(header: Sequence[str], path: Path) -> list[int]:
    missing = [name for name in COLUMNS if name not in header]
    if missing:
        raise InvalidRequest(f"{path}: not a tick file, missing columns {', '.join(missing)}")
    return [list(header).index(name) for name in COLUMNS]


_UNIT_NS = {"s": 1_000_000_000, "ms": 1_000_000, "us": 1_000, "ns": 1}
_NUMBER_COLUMNS = frozenset(COLUMNS[2:])


def _shortest_decimals(pa: Any, column: Any) -> list[str | None]:
    """A float column's values as text: for each, the shortest decimal that reads back as that value at the
    column's own width. A float32 1.1 is 1.10000002384185791015625, which ``to_pylist`` widens to the float64
    1.100000023841858 (off any 0.1 grid); the shortest float32 decimal is 1.1, what the writer meant. A value
    whose shortest decimal is off the grid (189.905 on a 0.01 grid) stays off it: dropped, never rounded.
    """
    if column.type.bit_width == 16:  # Arrow's cast writes a half float's exact value: numpy knows the width
        import numpy as np

        return [
            None if value is None else np.format_float_positional(np.float16(value), unique=True, trim="-")
            for value in column.to_pylist()
        ]
    return list(column.cast(pa.string()).to_pylist())  # float32 and float64: shortest at their width


def _timestamp_ns(pa: Any, column: Any, naive_is_utc: bool) -> list[int | None]:
    """Arrow timestamps as epoch ns ints (``to_pylist`` would truncate to microseconds)."""
    if column.type.tz is None and not naive_is_utc:
        raise InvalidRequest("Parquet ts column has no time zone: write it with tz=UTC or pass naive_is_utc")
    factor = _UNIT_NS[column.type.unit]
    values: list[int | None] = column.cast(pa.int64()).to_pylist()
    return [None if v is None else v * factor for v in values]


def _quantity_text(lots: int, lot_size: Decimal) -> str:
    return format(to_units(lots, lot_size), "f")


def write_csv(path: str | Path, ticks: Iterable[Tick], instruments: Iterable[SizedInstrument]) -> int:
    """Write ticks as a replayable CSV (ts in epoch ns, prices and quantities as exact decimals, quantities in
    instrument units); returns rows written."""
    grids = {i.symbol: (PriceScale(i.tick_size), i.lot_size.normalize()) for i in instruments}
    written = 0
    with Path(path).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        for tick in ticks:
            scale, lot = grids[tick.symbol]
            writer.writerow(
                [
                    tick.ts_ns,
                    tick.symbol,
                    "" if tick.bid is None else scale.to_price(tick.bid),
                    "" if tick.ask is None else scale.to_price(tick.ask),
                    _quantity_text(tick.bid_size, lot),
                    _quantity_text(tick.ask_size, lot),
                    "" if tick.last is None else scale.to_price(tick.last),
                    _quantity_text(tick.volume, lot),
                ]
            )
            written += 1
    return written


def decimal_digits(steps: Iterable[Decimal]) -> int:
    """The decimals a column needs to hold every multiple of every step exactly (0.001 and 0.5 -> 3)."""
    return max([max(0, -int(step.normalize().as_tuple().exponent)) for step in steps], default=0)


def write_parquet(path: str | Path, ticks: Iterable[Tick], instruments: Iterable[SizedInstrument]) -> int:
    """Write ticks as Parquet: ts timestamp[ns, UTC], prices and quantities (instrument units) decimal128,
    exact at the finest tick and lot size among ``instruments``. Returns rows written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    listed = list(instruments)
    grids = {i.symbol: (PriceScale(i.tick_size), i.lot_size.normalize()) for i in listed}
    price_type = pa.decimal128(38, decimal_digits(i.tick_size for i in listed))
    quantity_type = pa.decimal128(38, decimal_digits(i.lot_size for i in listed))
    quantum = Decimal(1).scaleb(-quantity_type.scale)
    columns: dict[str, list[Any]] = {name: [] for name in COLUMNS}
    for tick in ticks:
        scale, lot = grids[tick.symbol]
        columns["ts"].append(tick.ts_ns)
        columns["symbol"].append(tick.symbol)
        for name, value in (("bid", tick.bid), ("ask", tick.ask), ("last", tick.last)):
            columns[name].append(None if value is None else scale.to_price(value))
        for name, lots in (("bid_size", tick.bid_size), ("ask_size", tick.ask_size), ("volume", tick.volume)):
            columns[name].append(_EXACT.quantize(to_units(lots, lot), quantum))
    table = pa.table(
        {
            "ts": pa.array(columns["ts"], type=pa.int64()).cast(pa.timestamp("ns", tz="UTC")),
            "symbol": pa.array(columns["symbol"], type=pa.string()),
            "bid": pa.array(columns["bid"], type=price_type),
            "ask": pa.array(columns["ask"], type=price_type),
            "bid_size": pa.array(columns["bid_size"], type=quantity_type),
            "ask_size": pa.array(columns["ask_size"], type=quantity_type),
            "last": pa.array(columns["last"], type=price_type),
            "volume": pa.array(columns["volume"], type=quantity_type),
        }
    )
    pq.write_table(table, Path(path))
    return int(table.num_rows)
