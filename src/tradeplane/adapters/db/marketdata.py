"""Market data SQL: binary COPY of ticks, candle upserts, spreads and depth rows, and the read queries.

Prices travel the pipeline as integer ticks and quantities as integer lots; here they become exact
``NUMERIC`` values (``ticks x tick_size``, ``lots x lot_size``) without ever being a ``Decimal`` or a float:
:class:`TickCopyEncoder` writes PostgreSQL's binary COPY format with numpy, one vectorised pass per column.
A NUMERIC is sent as a fixed five base-10000 digits with the instrument's display scale; the server strips
the leading and trailing zero digits (``make_result``), so the stored value is the exact one. That makes a
100,000-row COPY buffer cost milliseconds instead of the seconds ``Decimal`` encoding takes.

Candle upserts merge with whatever is stored for the bucket (an earlier run of the ingester, another
feed): ``high``/``low`` by max/min, ``volume``/``tick_count`` by adding the *delta* since this writer's last
upsert of the bucket, ``open`` from the earlier of the two first-trade timestamps (``open_ts_ns``) and
``close`` from the later of the last-trade timestamps (a tie keeps the stored open and takes the new close:
first to arrive opens, last to arrive closes), so the stored candle is the aggregate of every stored trade.

A stored candle without trade timestamps (NULL, written by something else) keeps its open and takes the
new close.

Timestamps are stored with PostgreSQL's microsecond resolution (the nanoseconds are floored); candle
buckets are whole minutes, so no tick changes bucket.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_DOWN, Decimal
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import numpy.typing as npt

from tradeplane.domain.candles import Candle, Timeframe
from tradeplane.domain.ticks import PriceScale, Tick
from tradeplane.errors import InvalidRequest

I64 = npt.NDArray[np.int64]

TICK_COLUMNS: tuple[str, ...] = ("ts", "instrument_id", "bid", "ask", "bid_size", "ask_size", "last", "volume")
COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x00"
COPY_TRAILER = b"\xff\xff"

#: Microseconds from the Unix epoch to PostgreSQL's (2000-01-01T00:00:00Z).
_PG_EPOCH_US = 946_684_800_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: Base-10000 digits sent per NUMERIC: 20 decimal digits, more than an int64 mantissa has.
_NUMERIC_DIGITS = 5
#: Largest mantissa (value x 10^f, f the scale rounded up to whole base-10000 digits) we encode.
_MANTISSA_LIMIT = 2**63 - 1
#: NUMERIC(38, 18): a price or quantity needing more decimals would be rounded by the column.
MAX_SCALE = 18


def mantissa_scale(value: Decimal) -> tuple[int, int]:
    """``(m, s)`` with ``value == m x 10^-s``, ``s >= 0`` and ``m`` an int: 0.01 -> (1, 2), 1000 -> (1000, 0)."""
    sign, digits, exponent = value.as_tuple()
    if not isinstance(exponent, int):
        raise ValueError(f"{value} is not finite")
    mantissa = int("".join(map(str, digits)) or "0") * (-1 if sign else 1)
    if exponent >= 0:
        return mantissa * 10**exponent, 0
    return mantissa, -exponent


@dataclass(frozen=True, slots=True)
class ListedInstrument:
    """An instrument as market data needs it: its id, symbol and the grids of its prices and quantities.

    Ticks carry prices in integer ticks of ``tick_size`` and sizes/volume in integer lots of ``lot_size``;
    stored and published values are ``ticks x tick_size`` and ``lots x lot_size``.
    """

    instrument_id: int
    symbol: str
    tick_size: Decimal
    lot_size: Decimal

    def __post_init__(self) -> None:
        for name, value in (("tick_size", self.tick_size), ("lot_size", self.lot_size)):
            if not value.is_finite() or value <= 0:
                raise ValueError(f"{self.symbol}: {name} must be positive, got {value}")
            if mantissa_scale(value.normalize())[1] > MAX_SCALE:
                raise ValueError(f"{self.symbol}: {name} {value} has more than {MAX_SCALE} decimals")

    @property
    def price_scale(self) -> PriceScale:
        return PriceScale(self.tick_size)

    def price(self, ticks: int) -> Decimal:
        return ticks * self.tick_size

    def quantity(self, lots: int) -> Decimal:
        return lots * self.lot_size


async def load_instruments(conn: asyncpg.Connection) -> list[ListedInstrument]:
    rows = await conn.fetch("SELECT id, symbol, tick_size, lot_size FROM instruments ORDER BY id")
    return [ListedInstrument(r["id"], r["symbol"], r["tick_size"], r["lot_size"]) for r in rows]


# --------------------------------------------------------------------------------------- binary COPY


class _NumericGrid:
    """Per-instrument constants turning an integer count of a grid step into NUMERIC wire fields."""

    __slots__ = ("dscale", "multiplier", "weight")

    def __init__(self, steps: Sequence[Decimal]) -> None:
        multipliers, dscales, weights = [], [], []
        for step in steps:
            mantissa, scale = mantissa_scale(step.normalize())
            padded = -(-scale // 4) * 4  # the scale rounded up to whole base-10000 digits
            multipliers.append(mantissa * 10 ** (padded - scale))
            dscales.append(scale)
            weights.append(_NUMERIC_DIGITS - 1 - padded // 4)
        self.multiplier = np.array(multipliers, dtype=np.int64)
        self.dscale = np.array(dscales, dtype=np.int16)
        self.weight = np.array(weights, dtype=np.int16)

    def in_range(self, counts: I64, index: I64) -> npt.NDArray[np.bool_]:
        """True where ``count x multiplier`` fits the encoder (no int64 overflow)."""
        limit = _MANTISSA_LIMIT // self.multiplier
        return np.asarray(counts <= limit[index])


def _numeric_fields(name: str) -> list[tuple[str, str]]:
    return [
        (f"{name}_len", ">i4"),
        (f"{name}_ndigits", ">i2"),
        (f"{name}_weight", ">i2"),
        (f"{name}_sign", ">u2"),
        (f"{name}_dscale", ">i2"),
        *((f"{name}_d{j}", ">i2") for j in range(_NUMERIC_DIGITS)),
    ]


# The NUMERIC columns of a tick row, and which presence bit (bid, ask, last) makes each one NULL.
_NUMERIC_COLUMNS: tuple[tuple[str, int], ...] = (
    ("bid", 0),
    ("ask", 1),
    ("bid_size", 0),
    ("ask_size", 1),
    ("last", 2),
    ("volume", 2),
)


def _row_dtype(present: int) -> np.dtype[Any]:
    fields: list[tuple[str, str]] = [
        ("nfields", ">i2"),
        ("ts_len", ">i4"),
        ("ts", ">i8"),
        ("id_len", ">i4"),
        ("id", ">i8"),
    ]
    for name, bit in _NUMERIC_COLUMNS:
        fields += _numeric_fields(name) if present >> bit & 1 else [(f"{name}_len", ">i4")]
    return np.dtype(fields)


_ROW_DTYPES = {present: _row_dtype(present) for present in range(8)}
_DIGIT_POWERS = [np.int64(10_000 ** (_NUMERIC_DIGITS - 1 - j)) for j in range(_NUMERIC_DIGITS)]


@dataclass(slots=True)
class TickColumns:
    """A batch of ticks as int64 columns; absent prices are 0 (a stored price is always > 0)."""

    ts_ns: I64
    instrument: I64  # index into the encoder's instruments
    bid: I64
    ask: I64
    bid_size: I64
    ask_size: I64
    last: I64
    volume: I64

    def __len__(self) -> int:
        return len(self.ts_ns)

    def take(self, keep: npt.NDArray[np.bool_]) -> TickColumns:
        return TickColumns(
            self.ts_ns[keep],
            self.instrument[keep],
            self.bid[keep],
            self.ask[keep],
            self.bid_size[keep],
            self.ask_size[keep],
            self.last[keep],
            self.volume[keep],
        )


class TickCopyEncoder:
    """Builds binary COPY rows for ``ticks`` from ``Tick`` objects, vectorised with numpy.

    Invariant of every row produced: the stored NUMERIC equals ``ticks x tick_size`` (prices) and
    ``lots x lot_size`` (sizes, volume) exactly. A side with no price (bid, ask or last is None) is stored
    as NULL together with its size (or the volume).
    """

    def __init__(self, instruments: Sequence[ListedInstrument]) -> None:
        self.instruments = list(instruments)
        self.index = {instrument.symbol: i for i, instrument in enumerate(self.instruments)}
        self._ids = np.array([instrument.instrument_id for instrument in self.instruments], dtype=np.int64)
        self._prices = _NumericGrid([instrument.tick_size for instrument in self.instruments])
        self._quantities = _NumericGrid([instrument.lot_size for instrument in self.instruments])

    def columns(self, ticks: Sequence[Tick]) -> TickColumns:
        """The ticks as int64 columns. Raises ``OverflowError`` for a value beyond int64 (see ``storable``)."""
        n = len(ticks)
        index = self.index
        return TickColumns(
            np.fromiter([t.ts_ns for t in ticks], np.int64, n),
            np.fromiter([index[t.symbol] for t in ticks], np.int64, n),
            np.fromiter([t.bid or 0 for t in ticks], np.int64, n),
            np.fromiter([t.ask or 0 for t in ticks], np.int64, n),
            np.fromiter([t.bid_size for t in ticks], np.int64, n),
            np.fromiter([t.ask_size for t in ticks], np.int64, n),
            np.fromiter([t.last or 0 for t in ticks], np.int64, n),
            np.fromiter([t.volume for t in ticks], np.int64, n),
        )

    def storable(self, ticks: Sequence[Tick]) -> list[bool]:
        """Per tick: can it be encoded (every value fits the NUMERIC wire format)? Slow path, for the rare
        batch where ``columns`` overflowed or ``in_range`` found a value too large."""
        limit = _MANTISSA_LIMIT
        out = []
        for tick in ticks:
            i = self.index[tick.symbol]
            price_mult = int(self._prices.multiplier[i])
            qty_mult = int(self._quantities.multiplier[i])
            ok = all(v is None or v * price_mult <= limit for v in (tick.bid, tick.ask, tick.last)) and all(
                v * qty_mult <= limit for v in (tick.bid_size, tick.ask_size, tick.volume)
            )
            out.append(ok)
        return out

    def in_range(self, cols: TickColumns) -> npt.NDArray[np.bool_]:
        """True for rows whose every value fits the encoder."""
        ok = self._prices.in_range(cols.bid, cols.instrument)
        ok &= self._prices.in_range(cols.ask, cols.instrument)
        ok &= self._prices.in_range(cols.last, cols.instrument)
        ok &= self._quantities.in_range(cols.bid_size, cols.instrument)
        ok &= self._quantities.in_range(cols.ask_size, cols.instrument)
        ok &= self._quantities.in_range(cols.volume, cols.instrument)
        return ok

    def encode(self, cols: TickColumns) -> bytes:
        """COPY rows (no header or trailer) for ``cols``; rows are grouped by which sides are present."""
        present = (cols.bid > 0).astype(np.int8)
        present |= (cols.ask > 0).astype(np.int8) << 1
        present |= (cols.last > 0).astype(np.int8) << 2
        first = int(present[0]) if len(present) else 7
        if not len(present) or bool((present == first).all()):
            return self._encode_group(cols, first)
        parts = []
        for pattern in np.unique(present):
            parts.append(self._encode_group(cols.take(present == pattern), int(pattern)))
        return b"".join(parts)

    def _encode_group(self, cols: TickColumns, present: int) -> bytes:
        rows = np.empty(len(cols), dtype=_ROW_DTYPES[present])
        rows["nfields"] = len(TICK_COLUMNS)
        rows["ts_len"] = 8
        rows["ts"] = cols.ts_ns // 1000 - _PG_EPOCH_US
        rows["id_len"] = 8
        rows["id"] = self._ids[cols.instrument]
        values = {
            "bid": cols.bid,
            "ask": cols.ask,
            "bid_size": cols.bid_size,
            "ask_size": cols.ask_size,
            "last": cols.last,
            "volume": cols.volume,
        }
        for name, bit in _NUMERIC_COLUMNS:
            if not present >> bit & 1:
                rows[f"{name}_len"] = -1
                continue
            grid = self._prices if name in ("bid", "ask", "last") else self._quantities
            self._put_numeric(rows, name, values[name], grid, cols.instrument)
        return rows.tobytes()

    @staticmethod
    def _put_numeric(rows: npt.NDArray[Any], name: str, counts: I64, grid: _NumericGrid, index: I64) -> None:
        mantissa = counts * grid.multiplier[index]
        rows[f"{name}_len"] = 8 + 2 * _NUMERIC_DIGITS
        rows[f"{name}_ndigits"] = _NUMERIC_DIGITS
        rows[f"{name}_weight"] = grid.weight[index]
        rows[f"{name}_sign"] = 0
        rows[f"{name}_dscale"] = grid.dscale[index]
        for j, power in enumerate(_DIGIT_POWERS):
            rows[f"{name}_d{j}"] = (mantissa // power) % 10_000


async def copy_tick_rows(conn: asyncpg.Connection, source: AsyncIterator[bytes] | bytes | io.BytesIO) -> int:
    """Binary COPY into ``ticks``; ``source`` yields the header, row chunks and the trailer (or is all of
    them). Returns the number of rows the server reports."""
    if isinstance(source, bytes):
        source = io.BytesIO(source)  # asyncpg would take plain bytes for a file name
    status = await conn.copy_to_table("ticks", source=source, columns=list(TICK_COLUMNS), format="binary")
    return int(status.split()[-1])


# ------------------------------------------------------------------------------------------- candles


@dataclass(frozen=True, slots=True)
class CandleWrite:
    """One candle upsert: the aggregator's candle plus the volume/count *added* since the last upsert."""

    instrument_id: int
    timeframe: str
    bucket: datetime
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    volume_delta: Decimal
    count_delta: int
    open_ts_ns: int
    close_ts_ns: int


_UPSERT_CANDLES = """
INSERT INTO candles AS c
    (instrument_id, timeframe, bucket, open, high, low, close, volume, tick_count, open_ts_ns, close_ts_ns)
SELECT * FROM unnest($1::bigint[], $2::text[], $3::timestamptz[], $4::numeric[], $5::numeric[], $6::numeric[],
                     $7::numeric[], $8::numeric[], $9::bigint[], $10::bigint[], $11::bigint[])
ON CONFLICT (instrument_id, timeframe, bucket) DO UPDATE SET
    high = GREATEST(c.high, EXCLUDED.high),
    low = LEAST(c.low, EXCLUDED.low),
    open = CASE WHEN EXCLUDED.open_ts_ns < c.open_ts_ns THEN EXCLUDED.open ELSE c.open END,
    open_ts_ns = CASE WHEN c.open_ts_ns IS NULL THEN NULL ELSE LEAST(c.open_ts_ns, EXCLUDED.open_ts_ns) END,
    close = CASE WHEN c.close_ts_ns IS NULL OR EXCLUDED.close_ts_ns >= c.close_ts_ns
                 THEN EXCLUDED.close ELSE c.close END,
    close_ts_ns = GREATEST(c.close_ts_ns, EXCLUDED.close_ts_ns),
    volume = c.volume + EXCLUDED.volume,
    tick_count = c.tick_count + EXCLUDED.tick_count
RETURNING instrument_id, timeframe, bucket, open, high, low, close, volume, tick_count
"""


async def upsert_candles(conn: asyncpg.Connection, writes: Sequence[CandleWrite]) -> list[asyncpg.Record]:
    """Merge ``writes`` into ``candles`` in one statement (see the module docstring for the rules);
    returns the stored candles as merged, which is what subscribers are sent."""
    if not writes:
        return []
    rows: list[asyncpg.Record] = await conn.fetch(
        _UPSERT_CANDLES,
        [w.instrument_id for w in writes],
        [w.timeframe for w in writes],
        [w.bucket for w in writes],
        [w.open for w in writes],
        [w.high for w in writes],
        [w.low for w in writes],
        [w.close for w in writes],
        [w.volume_delta for w in writes],
        [w.count_delta for w in writes],
        [w.open_ts_ns for w in writes],
        [w.close_ts_ns for w in writes],
    )
    return rows


@dataclass(frozen=True, slots=True)
class CandleBucket:
    """One candle bucket of one instrument: ``[start_ns, end_ns)`` of ``timeframe``."""

    instrument_id: int
    timeframe: Timeframe
    start_ns: int
    end_ns: int


_TOUCHED_CANDLES = """
SELECT k.instrument_id, k.timeframe, c.bucket, c.open, c.high, c.low, c.close, c.volume, c.tick_count
  FROM unnest($1::bigint[], $2::text[], $3::timestamptz[], $4::timestamptz[]) AS k(instrument_id, timeframe, lo, hi)
 CROSS JOIN LATERAL tp_candles(k.instrument_id, k.timeframe, k.lo, k.hi, 1) AS c
"""


async def touched_candles(conn: asyncpg.Connection, buckets: Sequence[CandleBucket]) -> list[asyncpg.Record]:
    """The candles of ``buckets`` as ``tp_candles`` (so ``/candles``) serves them, in the columns the candle
    upsert returns (``instrument_id, timeframe, bucket, open, high, low, close, volume, tick_count``); a bucket
    without a trade has no row. One statement for all of them: on TimescaleDB, what a commit's ticks made of
    the continuous aggregates, read in that commit's transaction."""
    if not buckets:
        return []
    rows: list[asyncpg.Record] = await conn.fetch(
        _TOUCHED_CANDLES,
        [b.instrument_id for b in buckets],
        [b.timeframe.value for b in buckets],
        [ns_to_datetime(b.start_ns) for b in buckets],
        [ns_to_datetime(b.end_ns) for b in buckets],
    )
    return rows


def ns_to_datetime(ts_ns: int) -> datetime:
    """Epoch nanoseconds to an aware UTC datetime, floored to the microsecond."""
    seconds, rest = divmod(ts_ns, 1_000_000_000)
    return datetime.fromtimestamp(seconds, UTC).replace(microsecond=rest // 1000)


def datetime_to_ns(moment: datetime) -> int:
    if moment.tzinfo is None:
        raise InvalidRequest(f"timestamp without a UTC offset: {moment.isoformat()}")
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000


# ------------------------------------------------------------------------------------ spreads, depth


async def insert_spreads(conn: asyncpg.Connection, rows: Sequence[tuple[datetime, int, Decimal]]) -> None:
    """``(ts, instrument_id, spread)`` rows, by COPY (sampled, so a few per symbol and second)."""
    if rows:
        await conn.copy_records_to_table("spreads", records=rows, columns=["ts", "instrument_id", "spread"])


async def insert_depth_snapshots(
    conn: asyncpg.Connection, rows: Sequence[tuple[datetime, int, str, str, int | None]]
) -> None:
    """``(ts, instrument_id, bids_json, asks_json, sequence)`` rows; bids/asks are ``[[price, size], ...]``."""
    if rows:
        await conn.executemany(
            "INSERT INTO depth_snapshots (ts, instrument_id, bids, asks, sequence)"
            " VALUES ($1, $2, $3::jsonb, $4::jsonb, $5)",
            rows,
        )


# ------------------------------------------------------------------------------------- bus offsets


async def record_consumer_offsets(conn: asyncpg.Connection, offsets: Mapping[str, int]) -> None:
    """Raise each consumer's ``engine_offsets`` row to ``offsets[consumer]`` (never lower it), in the caller's
    transaction: the ticks and the mark of how far their stream was stored commit or roll back together."""
    if offsets:
        await conn.executemany(
            "INSERT INTO engine_offsets (consumer, last_sequence, updated_at) VALUES ($1, $2, now())"
            " ON CONFLICT (consumer) DO UPDATE SET"
            " last_sequence = greatest(engine_offsets.last_sequence, EXCLUDED.last_sequence),"
            " updated_at = EXCLUDED.updated_at",
            list(offsets.items()),
        )


async def consumer_offset(conn: asyncpg.Connection, consumer: str) -> int:
    """The last bus sequence ``consumer`` committed, 0 if none."""
    value = await conn.fetchval("SELECT last_sequence FROM engine_offsets WHERE consumer = $1", consumer)
    return int(value) if value is not None else 0


# ------------------------------------------------------------------------------- engine trades cursor


@dataclass(frozen=True, slots=True)
class EngineTradePage:
    """Trades read after an ``xact_id`` cursor, whole transactions only, and the cursor after them: every
    trade whose ``xact_id`` is below ``next_cursor`` is in ``rows`` or was read before (migration 0007)."""

    rows: list[asyncpg.Record]
    next_cursor: int


_ENGINE_TRADES = (
    "SELECT t.xact_id, t.trade_id, t.instrument_id, t.price, t.quantity, t.aggressor_side, t.ts FROM trades t"
    " WHERE t.xact_id >= $1 AND t.xact_id < $2 ORDER BY t.xact_id, t.ts, t.trade_id"
)


async def engine_trades_after(conn: asyncpg.Connection, cursor: int, *, limit: int = 5_000) -> EngineTradePage:
    """The trades of transactions ``>= cursor`` that have finished, at most about ``limit`` rows.

    Exact under concurrent commits (several engine shards): only transactions below the snapshot's ``xmin``
    are read, and all of those have committed or aborted, so nothing below the returned cursor can appear
    later. A page ends on a transaction boundary, so the cursor never splits one; a transaction larger than
    ``limit`` is read whole. A writing transaction left open anywhere on the server holds the cursor back
    (delays, never loses) until it ends.
    """
    horizon = int(await conn.fetchval("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint"))
    if horizon <= cursor:
        return EngineTradePage([], cursor)
    rows = await conn.fetch(f"{_ENGINE_TRADES} LIMIT {int(limit) + 1}", cursor, horizon)
    if len(rows) <= limit:
        return EngineTradePage(list(rows), horizon)
    last = rows[-1]["xact_id"]
    whole = [row for row in rows if row["xact_id"] != last]
    if whole:
        return EngineTradePage(whole, last)
    # one transaction holds more than a page: take all of it
    return EngineTradePage(list(await conn.fetch(_ENGINE_TRADES, last, last + 1)), last + 1)


# ---------------------------------------------------------------------------------------- read side


#: A cursor skips at most this many equal-timestamp rows (an OFFSET, so a bigint).
MAX_CURSOR_SKIP = 2**62


@dataclass(frozen=True, slots=True)
class TickCursor:
    """Where a page of ticks ended: the last timestamp returned and how many rows at exactly that
    timestamp were returned (ticks have no key; equal timestamps are read in index order)."""

    ts: datetime
    skip: int

    def encode(self) -> str:
        raw = f"{datetime_to_ns(self.ts) // 1000}:{self.skip}".encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, token: str) -> TickCursor:
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
            micros, skip = (int(part) for part in raw.split(":"))
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise InvalidRequest("malformed cursor", code="invalid_cursor") from None
        if not 0 <= skip <= MAX_CURSOR_SKIP:
            raise InvalidRequest("malformed cursor", code="invalid_cursor")
        try:  # well-formed but beyond what a datetime (and a timestamptz) can hold
            ts = ns_to_datetime(micros * 1000)
        except (OverflowError, ValueError, OSError):
            raise InvalidRequest("malformed cursor", code="invalid_cursor") from None
        return cls(ts, skip)


_TICK_COLUMNS_READ = "SELECT ts, bid, ask, bid_size, ask_size, last, volume FROM ticks"
# Ticks have no key: rows at one instant are ordered by their values, so every query reads them in the same
# order whatever its plan (rows equal in every column are interchangeable). The (instrument_id, ts) index gives
# the ts order and an incremental sort the rest, one instant at a time.
_TICK_ORDER = "ORDER BY ts, bid, ask, bid_size, ask_size, last, volume"


async def fetch_ticks(
    conn: asyncpg.Connection,
    instrument_id: int,
    start: datetime,
    end: datetime,
    limit: int,
    cursor: TickCursor | None = None,
) -> tuple[list[asyncpg.Record], TickCursor | None]:
    """Ticks in ``[start, end)`` oldest first, at most ``limit``; the cursor of the next page or None.

    A cursor's ``skip`` passes over rows at exactly its timestamp and nothing else, so a tampered one (a skip of
    2**62) costs the rows stored at that one instant, never the whole range read and thrown away."""
    skip = 0
    if cursor is not None:
        start = max(start, cursor.ts)
        skip = cursor.skip if cursor.ts >= start else 0
    rows: list[asyncpg.Record] = []
    if skip:
        rows = await conn.fetch(
            f"{_TICK_COLUMNS_READ} WHERE instrument_id = $1 AND ts = $2 AND ts < $3 {_TICK_ORDER} OFFSET $4 LIMIT $5",
            instrument_id,
            start,
            end,
            skip,
            limit + 1,
        )
    if len(rows) <= limit:
        rows += await conn.fetch(
            f"{_TICK_COLUMNS_READ} WHERE instrument_id = $1 AND ts {'>' if skip else '>='} $2 AND ts < $3"
            f" {_TICK_ORDER} LIMIT $4",
            instrument_id,
            start,
            end,
            limit + 1 - len(rows),
        )
    more = len(rows) > limit
    rows = rows[:limit]
    if not more or not rows:
        return rows, None
    last_ts = rows[-1]["ts"]
    same = sum(1 for row in rows if row["ts"] == last_ts)
    if last_ts == start:
        same += skip
    return rows, TickCursor(last_ts, same)


# Prices and volume as PostgreSQL's own exact text, trailing zeros trimmed ("190.5", not "190.500000000000000000"):
# what the API sends anyway, and decoding 5,000 NUMERICs into Decimals was half the time of a 1,000-candle read.
_CANDLE_TEXT_COLUMNS = (
    "bucket, trim_scale(open)::text AS open, trim_scale(high)::text AS high, trim_scale(low)::text AS low,"
    " trim_scale(close)::text AS close, trim_scale(volume)::text AS volume, tick_count"
)


async def fetch_candles(
    conn: asyncpg.Connection,
    instrument_id: int,
    timeframe: Timeframe,
    start: datetime,
    end: datetime,
    limit: int,
) -> list[asyncpg.Record]:
    """Candles with ``start <= bucket < end``, oldest first, at most ``limit``: through ``tp_candles``
    (migration 0003), which reads the ``candles`` table natively and the continuous aggregates on TimescaleDB.
    Prices and volume come as exact decimal text."""
    rows: list[asyncpg.Record] = await conn.fetch(
        f"SELECT {_CANDLE_TEXT_COLUMNS} FROM tp_candles($1, $2, $3, $4, $5)",
        instrument_id,
        timeframe.value,
        start,
        end,
        limit,
    )
    return rows


async def candle_before(
    conn: asyncpg.Connection, instrument_id: int, timeframe: Timeframe, before: datetime
) -> asyncpg.Record | None:
    """The last candle starting before ``before``: what ``fill=previous`` carries into a range."""
    row: asyncpg.Record | None = await conn.fetchrow(
        f"SELECT {_CANDLE_TEXT_COLUMNS} FROM tp_candles($1, $2, '-infinity', $3, 1, true)",
        instrument_id,
        timeframe.value,
        before,
    )
    return row


async def fetch_spreads(
    conn: asyncpg.Connection, instrument_id: int, start: datetime, end: datetime, limit: int
) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(
        "SELECT ts, spread FROM spreads WHERE instrument_id = $1 AND ts >= $2 AND ts < $3 ORDER BY ts LIMIT $4",
        instrument_id,
        start,
        end,
        limit,
    )
    return rows


# The newest stored quote and the newest stored trade, as the live quote in Redis keeps them: a trade-only tick
# does not hide the bid and ask before it, nor a quote-only tick the last price. Each is one backward index scan.
_LATEST_QUOTE = """
SELECT greatest(q.ts, t.ts) AS ts, q.bid, q.ask, q.bid_size, q.ask_size, t.last
FROM (SELECT 1) AS one
LEFT JOIN LATERAL (
    SELECT ts, bid, ask, bid_size, ask_size FROM ticks
    WHERE instrument_id = $1 AND (bid IS NOT NULL OR ask IS NOT NULL) ORDER BY ts DESC LIMIT 1
) q ON TRUE
LEFT JOIN LATERAL (
    SELECT ts, last FROM ticks WHERE instrument_id = $1 AND last IS NOT NULL ORDER BY ts DESC LIMIT 1
) t ON TRUE
WHERE q.ts IS NOT NULL OR t.ts IS NOT NULL
"""


async def latest_quote(conn: asyncpg.Connection, instrument_id: int) -> asyncpg.Record | None:
    """The stored quote (newest bid/ask with sizes) and last price of an instrument, at the newer one's time."""
    row: asyncpg.Record | None = await conn.fetchrow(_LATEST_QUOTE, instrument_id)
    return row


def candle_from_row(symbol: str, timeframe: Timeframe, row: asyncpg.Record, scale: PriceScale) -> Candle:
    """A stored candle in integer ticks (volume left at 0: only prices matter to ``fill_previous``)."""
    return Candle(
        symbol,
        timeframe,
        datetime_to_ns(row["bucket"]),
        scale.to_ticks(Decimal(row["open"])),
        scale.to_ticks(Decimal(row["high"])),
        scale.to_ticks(Decimal(row["low"])),
        scale.to_ticks(Decimal(row["close"])),
        0,
        int(row["tick_count"]),
    )


# ------------------------------------------------------------------------------------------ archive


async def archive_tick_partition(
    conn: asyncpg.Connection,
    partition: str,
    path: Path,
    instruments: Iterable[ListedInstrument],
    *,
    batch_rows: int = 100_000,
) -> int:
    """Write one ``ticks`` partition to Parquet in the replay format (``ts, symbol, bid, ask, bid_size,
    ask_size, last, volume``; prices, sizes and volume decimal, quantities in instrument units as stored and as
    ``/ticks`` returns them), streaming it in row groups.

    So an archived day replays with ``tradeplane md replay`` into the rows it was archived from. The decimal
    columns have the scale of the finest tick and lot size listed; a row of an instrument no longer listed is
    written under ``#<instrument_id>`` (a replay drops it as an unknown symbol) with its values rounded down to
    those scales. Returns the rows written.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    by_id = {instrument.instrument_id: instrument for instrument in instruments}
    price_digits = max([mantissa_scale(i.tick_size.normalize())[1] for i in by_id.values()], default=0)
    quantity_digits = max([mantissa_scale(i.lot_size.normalize())[1] for i in by_id.values()], default=0)
    price_type = pa.decimal128(38, price_digits)
    quantity_type = pa.decimal128(38, quantity_digits)
    schema = pa.schema(
        [
            ("ts", pa.timestamp("ns", tz="UTC")),
            ("symbol", pa.string()),
            ("bid", price_type),
            ("ask", price_type),
            ("bid_size", quantity_type),
            ("ask_size", quantity_type),
            ("last", price_type),
            ("volume", quantity_type),
        ]
    )
    quote = '"' + partition.replace('"', '""') + '"'
    written = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".partial")
    with pq.ParquetWriter(tmp, schema) as writer:
        async with conn.transaction():
            cursor = conn.cursor(
                f"SELECT ts, instrument_id, bid, ask, bid_size, ask_size, last, volume FROM {quote} ORDER BY ts"
            )
            batch: list[asyncpg.Record] = []
            async for row in cursor:
                batch.append(row)
                if len(batch) >= batch_rows:
                    writer.write_table(_archive_table(pa, schema, batch, by_id))
                    written += len(batch)
                    batch = []
            if batch:
                writer.write_table(_archive_table(pa, schema, batch, by_id))
                written += len(batch)
    tmp.replace(path)
    return written


def _archive_table(pa: Any, schema: Any, rows: list[asyncpg.Record], by_id: dict[int, ListedInstrument]) -> Any:
    def symbol(row: asyncpg.Record) -> str:
        instrument = by_id.get(row["instrument_id"])
        return instrument.symbol if instrument is not None else f"#{row['instrument_id']}"

    def on_scale(name: str) -> Any:
        # Exact for listed instruments (their values are multiples of their tick and lot sizes); rounded
        # down only for the rows of instruments no longer listed (see archive_tick_partition).
        quantum = Decimal(1).scaleb(-schema.field(name).type.scale)
        return lambda value: None if value is None else value.quantize(quantum, rounding=ROUND_DOWN)

    price, quantity = on_scale("bid"), on_scale("bid_size")
    columns = {
        "ts": [datetime_to_ns(r["ts"]) for r in rows],
        "symbol": [symbol(r) for r in rows],
        "bid": [price(r["bid"]) for r in rows],
        "ask": [price(r["ask"]) for r in rows],
        # A side without a price is stored with a NULL size: an absent side, 0 in the replay format.
        "bid_size": [quantity(r["bid_size"] or Decimal(0)) for r in rows],
        "ask_size": [quantity(r["ask_size"] or Decimal(0)) for r in rows],
        "last": [price(r["last"]) for r in rows],
        "volume": [quantity(r["volume"] or Decimal(0)) for r in rows],
    }
    arrays = [
        pa.array(columns["ts"], type=pa.int64()).cast(pa.timestamp("ns", tz="UTC")),
        *(pa.array(columns[name], type=schema.field(name).type) for name in schema.names[1:]),
    ]
    return pa.Table.from_arrays(arrays, schema=schema)
