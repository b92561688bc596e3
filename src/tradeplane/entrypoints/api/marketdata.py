"""Market data REST: latest quote, ticks (cursor-paginated), candles (optionally filled), spreads.

Any authenticated role may read, readonly included. Decimals are strings. Times are ISO 8601 UTC; ``start``
and ``end`` bound a half-open range ``[start, end)`` and default to the last day (ticks, spreads) or the last
1,000 buckets of the timeframe (candles). A symbol no instrument can have (lower case, NUL, over 32
characters) is 422 ``invalid_symbol``; a well-formed one that is not listed, 404 ``unknown_symbol``.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any

import asyncpg
import orjson
from fastapi import APIRouter, Query, Response
from pydantic import AfterValidator, BaseModel, ValidationError

from tradeplane.adapters.db import marketdata as sql
from tradeplane.adapters.db.marketdata import ListedInstrument, TickCursor
from tradeplane.bootstrap import Platform
from tradeplane.domain.candles import Candle, Timeframe, fill_previous
from tradeplane.domain.ticks import TS_NS_MAX, TS_NS_MIN, OffTickGrid
from tradeplane.entrypoints.api.deps import PlatformDep, PrincipalDep
from tradeplane.errors import InfrastructureUnavailable, InvalidRequest, NotFound
from tradeplane.services.ingest import market_data_key
from tradeplane.services.instruments import SYMBOL_PATTERN

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api/v1/marketdata", tags=["market data"])

INSTRUMENT_CACHE_SECONDS = 5.0
MAX_TICKS = 10_000
MAX_CANDLES = 10_000
MAX_SPREADS = 10_000

_instruments: dict[str, tuple[float, ListedInstrument]] = {}


def _aware(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        raise ValueError("must carry a UTC offset (e.g. 2024-03-05T00:00:00Z)")
    return value


AwareTime = Annotated[datetime | None, AfterValidator(_aware)]


def _plain(value: Decimal | None) -> str | None:
    return None if value is None else format(value.normalize(), "f")


async def instrument_of(platform: Platform, symbol: str) -> ListedInstrument:
    """The listed instrument ``symbol`` (cached a few seconds per process), else 404; 422 for text that no
    instrument can be named (checked first: some, such as NUL, PostgreSQL refuses to even compare)."""
    if SYMBOL_PATTERN.fullmatch(symbol) is None:
        hint = f"; did you mean {symbol.upper()!r}?" if SYMBOL_PATTERN.fullmatch(symbol.upper()) else ""
        raise InvalidRequest(
            f"{symbol!r} is not a symbol: symbols are 1 to 32 of A-Z 0-9 . _ - (upper case){hint}",
            code="invalid_symbol",
        )
    cached = _instruments.get(symbol)
    now = time.monotonic()
    if cached is not None and now - cached[0] < INSTRUMENT_CACHE_SECONDS:
        return cached[1]
    async with platform.db.connection("marketdata.instrument") as conn:
        row = await conn.fetchrow("SELECT id, symbol, tick_size, lot_size FROM instruments WHERE symbol = $1", symbol)
    if row is None:
        raise NotFound(f"unknown symbol {symbol!r}", code="unknown_symbol")
    instrument = ListedInstrument(row["id"], row["symbol"], row["tick_size"], row["lot_size"])
    _instruments[symbol] = (now, instrument)
    return instrument


#: Market data lives in int64 epoch nanoseconds (``TS_NS_MIN`` .. ``TS_NS_MAX``): nothing is stored outside
#: this window, so a range is clipped to it (losing nothing) before any date arithmetic or query, which both
#: overflow near year 1 and 9999.
EARLIEST = sql.ns_to_datetime(TS_NS_MIN)
LATEST = sql.ns_to_datetime(TS_NS_MAX)


def _clipped(moment: datetime) -> datetime:
    return min(max(moment, EARLIEST), LATEST).astimezone(UTC)


def _range(start: datetime | None, end: datetime | None, default: timedelta) -> tuple[datetime, datetime]:
    end = end or datetime.now(UTC)
    if start is not None and start >= end:
        raise InvalidRequest("start must be before end", code="invalid_range")
    end = _clipped(end)
    start = _clipped(start) if start is not None else max(end - default, EARLIEST)
    return start, end  # empty (start == end) when the whole range lies outside the window


class QuotePublic(BaseModel):
    symbol: str
    ts: datetime | None
    bid: str | None
    ask: str | None
    bid_size: str | None
    ask_size: str | None
    last: str | None
    # "cache": the live quote (Redis, at most 5 s old); "ticks": the newest stored quote and trade, of any age
    # (``ts`` says which), served when Redis has none or cannot be reached
    source: str


class TickPublic(BaseModel):
    ts: datetime
    bid: str | None
    ask: str | None
    bid_size: str | None
    ask_size: str | None
    last: str | None
    volume: str | None


class TickPage(BaseModel):
    symbol: str
    ticks: list[TickPublic]
    next_cursor: str | None


class CandlePublic(BaseModel):
    bucket: datetime
    open: str
    high: str
    low: str
    close: str
    volume: str
    tick_count: int


class CandleSeries(BaseModel):
    symbol: str
    timeframe: Timeframe
    candles: list[CandlePublic]


class SpreadPublic(BaseModel):
    ts: datetime
    spread: str


class SpreadSeries(BaseModel):
    symbol: str
    spreads: list[SpreadPublic]


@router.get("/{symbol}/quote", response_model=QuotePublic)
async def quote(symbol: str, principal: PrincipalDep, platform: PlatformDep) -> QuotePublic:
    """The live quote from Redis, else (a miss, a value that is not a quote, or Redis unreachable) the newest
    stored quote and trade, ``source`` telling which and ``ts`` how old. 503 only when neither can be read.

    ``cache_hit_ratio`` counts the reads Redis answered: a read that could not reach it is neither a hit nor a
    miss (the outage shows on ``/health/redis``, and would otherwise skew the lifetime ratio for good)."""
    instrument = await instrument_of(platform, symbol)
    redis_down: InfrastructureUnavailable | None = None
    try:
        cached = await platform.cache.get_cached(market_data_key(symbol))
    except InfrastructureUnavailable as exc:
        redis_down, cached = exc, None
    live = _cached_quote(symbol, cached) if cached is not None else None
    if live is not None:
        return live
    async with platform.db.connection("marketdata.quote") as conn:
        row = await sql.latest_quote(conn, instrument.instrument_id)
    if row is None:
        if redis_down is not None:  # nothing stored, and Redis may hold a quote some other service wrote
            raise redis_down
        raise NotFound(f"no market data for {symbol} yet", code="no_market_data")
    return QuotePublic(
        symbol=symbol,
        ts=row["ts"],
        bid=_plain(row["bid"]),
        ask=_plain(row["ask"]),
        bid_size=_plain(row["bid_size"]),
        ask_size=_plain(row["ask_size"]),
        last=_plain(row["last"]),
        source="ticks",
    )


def _cached_quote(symbol: str, cached: bytes) -> QuotePublic | None:
    """The quote a ``market_data:{symbol}`` value holds, or None for one that is not a quote as the ingester
    writes it (aware ``ts``, decimal strings, some price): the key is a seed-named interface other services may
    write too, and a float price is not exact. The caller then answers from the stored ticks, as after the TTL."""
    quote = None
    try:
        data = orjson.loads(cached)
        if isinstance(data, dict):
            fields = {k: data.get(k) for k in QuotePublic.model_fields if k not in ("symbol", "source")}
            quote = QuotePublic.model_validate({**fields, "symbol": symbol, "source": "cache"})
    except (orjson.JSONDecodeError, ValidationError):
        pass
    if quote is not None and quote.ts is not None and quote.ts.tzinfo is not None:
        values = (quote.bid, quote.ask, quote.bid_size, quote.ask_size, quote.last)
        if all(v is None or _is_decimal(v) for v in values) and (quote.bid or quote.ask or quote.last):
            return quote
    log.warning("ignoring a cached quote of %s that is not one: %r", symbol, cached[:200])
    return None


def _is_decimal(text: str) -> bool:
    try:
        return Decimal(text).is_finite()
    except ArithmeticError:  # decimal.InvalidOperation
        return False


@router.get("/{symbol}/ticks", response_model=TickPage)
async def ticks(
    symbol: str,
    principal: PrincipalDep,
    platform: PlatformDep,
    start: AwareTime = None,
    end: AwareTime = None,
    limit: Annotated[int, Query(ge=1, le=MAX_TICKS)] = 1000,
    cursor: str | None = None,
) -> TickPage:
    """Ticks oldest first; pass ``next_cursor`` back as ``cursor`` (with the same start/end) for the next page."""
    instrument = await instrument_of(platform, symbol)
    lower, upper = _range(start, end, timedelta(days=1))
    position = TickCursor.decode(cursor) if cursor else None
    async with platform.db.connection("marketdata.ticks") as conn:
        rows, following = await sql.fetch_ticks(conn, instrument.instrument_id, lower, upper, limit, position)
    return TickPage(
        symbol=symbol,
        ticks=[
            TickPublic(
                ts=r["ts"],
                bid=_plain(r["bid"]),
                ask=_plain(r["ask"]),
                bid_size=_plain(r["bid_size"]),
                ask_size=_plain(r["ask_size"]),
                last=_plain(r["last"]),
                volume=_plain(r["volume"]),
            )
            for r in rows
        ],
        next_cursor=following.encode() if following is not None else None,
    )


@router.get("/{symbol}/candles", response_model=CandleSeries)
async def candles(
    symbol: str,
    principal: PrincipalDep,
    platform: PlatformDep,
    timeframe: Timeframe = Timeframe.M1,
    start: AwareTime = None,
    end: AwareTime = None,
    fill: Annotated[str | None, Query(pattern="^previous$")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_CANDLES)] = 1000,
) -> Response:
    """Candles with ``start <= bucket < end``; empty buckets are absent unless ``fill=previous``, which
    carries the last close forward (volume 0, tick_count 0), never before the first real candle nor past the
    bucket in progress."""
    instrument = await instrument_of(platform, symbol)
    width = timedelta(microseconds=timeframe.width_ns // 1000)
    lower, upper = _range(start, end, width * 1000)
    async with platform.db.connection("marketdata.candles") as conn:
        rows = await sql.fetch_candles(conn, instrument.instrument_id, timeframe, lower, upper, limit)
        seed = await sql.candle_before(conn, instrument.instrument_id, timeframe, lower) if fill else None
    out = candle_items(rows)
    if fill:
        out = _filled(instrument, timeframe, rows, seed, out, lower, upper, limit)
    return Response(candle_series_json(symbol, timeframe, out), media_type="application/json")


def candle_items(rows: list[asyncpg.Record]) -> list[dict[str, Any]]:
    """Stored candles (exact decimal text from ``sql.fetch_candles``) as the items of ``CandleSeries``."""
    return [
        {
            "bucket": r["bucket"],
            "open": r["open"] or "0",
            "high": r["high"] or "0",
            "low": r["low"] or "0",
            "close": r["close"] or "0",
            "volume": r["volume"] or "0",
            "tick_count": r["tick_count"],
        }
        for r in rows
    ]


def candle_series_json(symbol: str, timeframe: Timeframe, candles: list[dict[str, Any]]) -> bytes:
    """The ``CandleSeries`` body, by orjson straight from the rows: building and dumping 1,000 pydantic models
    took longer than the query (the models document the shape; tests check the body against them)."""
    body = {"symbol": symbol, "timeframe": timeframe.value, "candles": candles}
    return orjson.dumps(body, option=orjson.OPT_UTC_Z)


def _filled(
    instrument: ListedInstrument,
    timeframe: Timeframe,
    rows: list[asyncpg.Record],
    seed: asyncpg.Record | None,
    real: list[dict[str, Any]],
    lower: datetime,
    upper: datetime,
    limit: int,
) -> list[dict[str, Any]]:
    """``fill_previous`` over the stored candles (in ticks), real buckets kept as stored."""
    scale = instrument.price_scale
    by_bucket = {candle["bucket"]: candle for candle in real}
    try:
        domain: list[Candle] = [
            sql.candle_from_row(instrument.symbol, timeframe, row, scale)
            for row in ([seed] if seed is not None else []) + rows
        ]
    except OffTickGrid as exc:  # the tick size changed since these candles were stored
        raise InvalidRequest(f"cannot fill {instrument.symbol}: {exc}", code="fill_unavailable") from None
    if len(rows) == limit:  # the page ends before `upper`: fill only up to its last bucket
        upper = real[-1]["bucket"] + timedelta(microseconds=timeframe.width_ns // 1000)
    # Nothing is carried into buckets that have not begun: the fill ends with the bucket in progress (or the
    # last real candle, whose ticks may be stamped a little ahead of this clock).
    begun = timeframe.bucket_start(time.time_ns()) + timeframe.width_ns
    if real:
        begun = max(begun, sql.datetime_to_ns(real[-1]["bucket"]) + timeframe.width_ns)
    end_ns = min(sql.datetime_to_ns(upper), begun)
    filled = fill_previous(domain, sql.datetime_to_ns(lower), end_ns, timeframe, limit=limit)
    out = []
    for candle in filled:
        moment = sql.ns_to_datetime(candle.bucket_start_ns)
        real_candle = by_bucket.get(moment)
        if real_candle is not None:
            out.append(real_candle)
        else:
            close = format(scale.to_price(candle.close).normalize(), "f")
            out.append(
                {
                    "bucket": moment,
                    "open": close,
                    "high": close,
                    "low": close,
                    "close": close,
                    "volume": "0",
                    "tick_count": 0,
                }
            )
    return out


@router.get("/{symbol}/spreads", response_model=SpreadSeries)
async def spreads(
    symbol: str,
    principal: PrincipalDep,
    platform: PlatformDep,
    start: AwareTime = None,
    end: AwareTime = None,
    limit: Annotated[int, Query(ge=1, le=MAX_SPREADS)] = 1000,
) -> SpreadSeries:
    """Sampled bid-ask spreads (at most one per symbol per second of tick time), oldest first."""
    instrument = await instrument_of(platform, symbol)
    lower, upper = _range(start, end, timedelta(days=1))
    async with platform.db.connection("marketdata.spreads") as conn:
        rows = await sql.fetch_spreads(conn, instrument.instrument_id, lower, upper, limit)
    return SpreadSeries(
        symbol=symbol, spreads=[SpreadPublic(ts=r["ts"], spread=_plain(r["spread"]) or "0") for r in rows]
    )
