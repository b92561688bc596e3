"""File replay: ticks from CSV or Parquet files with the columns
``ts,symbol,bid,ask,bid_size,ask_size,last,volume``.

- ``ts`` is ISO 8601 with an offset or ``Z`` (up to nanosecond fractions), or integer UTC epoch nanoseconds.
  A timestamp without an offset is a malformed row unless ``naive_is_utc=True``: guessing a zone would
  silently shift the data.
- Prices are read as ``Decimal`` (Parquet: decimal, string or integer columns; a float column is read through
  each value's shortest repr, so it must still land on the tick grid) and converted to integer ticks by the
  instrument's ``PriceScale``. An empty price is an absent side; empty sizes and volume are 0.
- Every row goes through the ``TickValidator``: bad rows are counted by ``DropReason`` and never raise. Only a
  file that is not a tick file at all (missing columns) raises ``InvalidRequest``. In a CSV, a row with bytes
  that are not UTF-8, or that ``csv`` cannot split (a field over its field size limit, a quote left open to
  the end of the file), is one ``malformed_row`` and the replay goes on with the next line.

Iterate with ``async for batch in ReplayFeed(...)`` (yields to the event loop between batches) or
``iter_batches()`` from synchronous code.
"""

from __future__ import annotations

import asyncio
import csv
import re
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal

from tradeplane.adapters.feeds import FeedBatch
from tradeplane.domain.ticks import DropReason, PricedInstrument, PriceScale, Tick, TickValidator
from tradeplane.errors import InvalidRequest

COLUMNS: tuple[str, ...] = ("ts", "symbol", "bid", "ask", "bid_size", "ask_size", "last", "volume")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_INTEGER = re.compile(r"-?\d+\Z")
_SECONDS_FRACTION = re.compile(r"(\d\d:\d\d:\d\d)[.,](\d+)")


class MalformedValue(ValueError):
    """A field that cannot be parsed; the row is dropped as ``malformed_row``."""


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


def _price(value: object) -> Decimal | None:
    if value is None or value == "":
        return None
    if isinstance(value, Decimal):
        return value
    if isinstance(value, bool):
        raise MalformedValue(f"not a price: {value!r}")
    if isinstance(value, int | float):
        return Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    if isinstance(value, str):
        try:
            return Decimal(value.strip())
        except InvalidOperation as exc:
            raise MalformedValue(f"not a price: {value!r}") from exc
    raise MalformedValue(f"not a price: {value!r}")


def _quantity(value: object) -> int:
    if value is None or value == "":
        return 0
    if isinstance(value, bool):
        raise MalformedValue(f"not a quantity: {value!r}")
    if isinstance(value, int):
        return value
    try:
        number = Decimal(value.strip()) if isinstance(value, str) else Decimal(repr(value))
    except (InvalidOperation, TypeError, ValueError) as exc:
        raise MalformedValue(f"not a quantity: {value!r}") from exc
    if not number.is_finite() or number != number.to_integral_value():
        raise MalformedValue(f"not a whole quantity: {value!r}")
    return int(number)


class ReplayFeed:
    """Replays a CSV or Parquet tick file through a ``TickValidator`` in batches of accepted ticks.

    ``rows_read`` counts data rows consumed (blank CSV lines are not rows); ``stored`` is up to the writer,
    and dropped rows are in ``validator.drops``.
    """

    def __init__(
        self,
        path: str | Path,
        validator: TickValidator,
        *,
        batch_size: int = 10_000,
        file_format: Literal["csv", "parquet"] | None = None,
        naive_is_utc: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.path = Path(path)
        self.validator = validator
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
            parsed = validator.normalize(
                parse_ts_ns(ts, naive_is_utc=self.naive_is_utc),
                symbol.strip(),
                _price(bid),
                _price(ask),
                _quantity(bid_size),
                _quantity(ask_size),
                _price(last),
                _quantity(volume),
            )
        except MalformedValue:
            validator.reject(DropReason.MALFORMED_ROW, row)
            return None
        return parsed if isinstance(parsed, Tick) else None

    def _csv_rows(self) -> Iterator[Sequence[str]]:
        # surrogateescape: a byte that is not UTF-8 becomes a lone surrogate in its field (so that row is
        # malformed, see _to_tick) instead of a decode error that would end the replay.
        with self.path.open(newline="", encoding="utf-8", errors="surrogateescape") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                return
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

        parquet = pq.ParquetFile(self.path)
        _column_order(list(parquet.schema_arrow.names), self.path)
        for record_batch in parquet.iter_batches(batch_size=self.batch_size, columns=list(COLUMNS)):
            columns: list[list[Any]] = []
            for name in COLUMNS:
                column = record_batch.column(name)
                if pa.types.is_timestamp(column.type):
                    columns.append(_timestamp_ns(pa, column, self.naive_is_utc))
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


def _timestamp_ns(pa: Any, column: Any, naive_is_utc: bool) -> list[int | None]:
    """Arrow timestamps as epoch ns ints (``to_pylist`` would truncate to microseconds)."""
    if column.type.tz is None and not naive_is_utc:
        raise InvalidRequest("Parquet ts column has no time zone: write it with tz=UTC or pass naive_is_utc")
    factor = _UNIT_NS[column.type.unit]
    values: list[int | None] = column.cast(pa.int64()).to_pylist()
    return [None if v is None else v * factor for v in values]


def write_csv(path: str | Path, ticks: Iterable[Tick], instruments: Iterable[PricedInstrument]) -> int:
    """Write ticks as a replayable CSV (ts in epoch ns, prices as exact decimals); returns rows written."""
    scales = {instrument.symbol: PriceScale(instrument.tick_size) for instrument in instruments}
    written = 0
    with Path(path).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        for tick in ticks:
            scale = scales[tick.symbol]
            writer.writerow(
                [
                    tick.ts_ns,
                    tick.symbol,
                    "" if tick.bid is None else scale.to_price(tick.bid),
                    "" if tick.ask is None else scale.to_price(tick.ask),
                    tick.bid_size,
                    tick.ask_size,
                    "" if tick.last is None else scale.to_price(tick.last),
                    tick.volume,
                ]
            )
            written += 1
    return written


def write_parquet(path: str | Path, ticks: Iterable[Tick], instruments: Iterable[PricedInstrument]) -> int:
    """Write ticks as Parquet: ts timestamp[ns, UTC], prices decimal128 exact at the finest instrument scale.

    Used for replay files and for archiving a partition before retention drops it. Returns rows written.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    scales = {instrument.symbol: PriceScale(instrument.tick_size) for instrument in instruments}
    scale_digits = max(
        [max(0, -int(scale.tick_size.normalize().as_tuple().exponent)) for scale in scales.values()],
        default=0,
    )
    columns: dict[str, list[Any]] = {name: [] for name in COLUMNS}
    for tick in ticks:
        scale = scales[tick.symbol]
        columns["ts"].append(tick.ts_ns)
        columns["symbol"].append(tick.symbol)
        for name, value in (("bid", tick.bid), ("ask", tick.ask), ("last", tick.last)):
            columns[name].append(None if value is None else scale.to_price(value))
        columns["bid_size"].append(tick.bid_size)
        columns["ask_size"].append(tick.ask_size)
        columns["volume"].append(tick.volume)
    price_type = pa.decimal128(38, scale_digits)
    table = pa.table(
        {
            "ts": pa.array(columns["ts"], type=pa.int64()).cast(pa.timestamp("ns", tz="UTC")),
            "symbol": pa.array(columns["symbol"], type=pa.string()),
            "bid": pa.array(columns["bid"], type=price_type),
            "ask": pa.array(columns["ask"], type=price_type),
            "bid_size": pa.array(columns["bid_size"], type=pa.int64()),
            "ask_size": pa.array(columns["ask_size"], type=pa.int64()),
            "last": pa.array(columns["last"], type=price_type),
            "volume": pa.array(columns["volume"], type=pa.int64()),
        }
    )
    pq.write_table(table, Path(path))
    return int(table.num_rows)
