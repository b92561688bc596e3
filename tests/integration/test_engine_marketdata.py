"""The matching engine as a market data source, against real PostgreSQL and Redis: its trades reach ticks and
candles exactly once from the ``trades`` table (made while the worker was down, committed out of order by
concurrent transactions, announced on pub/sub or not), and its books quote symbols no external feed quotes.

Trades are written the way the engine's batch transaction writes them (``INSERT INTO trades`` in one
transaction per batch, then a ``tp:trades:<symbol>`` message), so the order of commits is under the test's
control.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import orjson
import pytest

from tests.integration.test_ingest import T0, WAIT_S, list_instrument, pandas_candles, stored_ticks, until
from tradeplane.adapters.db import marketdata as sql
from tradeplane.adapters.db.marketdata import ListedInstrument
from tradeplane.adapters.db.timeseries import ensure_daily_partitions_async
from tradeplane.adapters.feeds.engine_trades import CONSUMER, EngineTradesFeed, match_order
from tradeplane.bootstrap import Platform
from tradeplane.domain.candles import Timeframe
from tradeplane.domain.ticks import NS_PER_SECOND, Tick
from tradeplane.entrypoints.workers.marketdata import book_top, run_marketdata
from tradeplane.services.ingest import MarketDataPipeline

SECOND = NS_PER_SECOND
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Trade:
    instrument: ListedInstrument
    seq: int
    match: int
    price: str
    qty: str
    ts_ns: int

    @property
    def trade_id(self) -> str:
        return f"{self.instrument.symbol}-{self.seq}-{self.match}"

    def row(self) -> tuple[Any, ...]:
        ts = EPOCH + timedelta(microseconds=self.ts_ns // 1000)
        return (self.trade_id, self.instrument.instrument_id, Decimal(self.price), Decimal(self.qty), ts)

    def tick(self) -> Tick:
        i = self.instrument
        return Tick(self.ts_ns, i.symbol, None, None, 0, 0, int(Decimal(self.price) / i.tick_size),
                    int(Decimal(self.qty) / i.lot_size))  # fmt: skip


INSERT_TRADE = (
    "INSERT INTO trades (trade_id, instrument_id, price, quantity, aggressor_side, ts)"
    " VALUES ($1, $2, $3, $4, 'buy', $5)"
)


async def insert_trades(conn: asyncpg.Connection, trades: list[Trade]) -> None:
    await conn.executemany(INSERT_TRADE, [t.row() for t in trades])


async def engine_batch(platform: Platform, trades: list[Trade], *, announce: bool = True) -> None:
    """One engine batch: its trades committed in one transaction, then (unless lost) announced on pub/sub."""
    async with platform.db.transaction("test.engine") as conn:
        await insert_trades(conn, trades)
    if announce:
        for t in trades:
            data = {"trade_id": t.trade_id, "price": t.price, "qty": t.qty, "aggressor_side": "buy", "ts": "-"}
            envelope = {"channel": "trades", "symbol": t.instrument.symbol, "data": data}
            await platform.cache.client.publish(f"tp:trades:{t.instrument.symbol}", orjson.dumps(envelope))


@pytest.fixture
async def trade_days(platform: Platform) -> None:
    async with platform.db.connection("test.partitions") as conn:
        await ensure_daily_partitions_async(conn, "trades", date(2024, 3, 5), 2)


async def tick_count(platform: Platform, *instruments: ListedInstrument) -> int:
    async with platform.db.connection("test.count") as conn:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM ticks WHERE instrument_id = ANY($1::bigint[])", [i.instrument_id for i in instruments]
        )
        return count


async def stored_candles(
    platform: Platform, instrument: ListedInstrument, timeframe: Timeframe
) -> list[dict[str, Any]]:
    async with platform.db.connection("test.candles") as conn:
        rows = await conn.fetch(
            "SELECT bucket, open, high, low, close, volume, tick_count FROM candles"
            " WHERE instrument_id = $1 AND timeframe = $2 ORDER BY bucket",
            instrument.instrument_id,
            timeframe.value,
        )
    return [dict(row) for row in rows]


def expected_ticks(trades: list[Trade], instrument: ListedInstrument) -> list[tuple[datetime, None, Decimal, Decimal]]:
    mine = sorted((t for t in trades if t.instrument == instrument), key=lambda t: (t.ts_ns, t.seq, t.match))
    return [(t.row()[4], None, Decimal(t.price), Decimal(t.qty)) for t in mine]


def as_stored(rows: list[Any]) -> list[tuple[datetime, None, Decimal, Decimal]]:
    return [(r["ts"], r["bid"], r["last"], r["volume"]) for r in rows]


async def run_worker(platform: Platform, stop: asyncio.Event) -> asyncio.Task[MarketDataPipeline]:
    return asyncio.create_task(
        run_marketdata(platform, stop, simulate_rate=None, bus_feed=False, engine_books=False, depth_interval_s=60)
    )


# ----------------------------------------------------------------------------------------- trades


async def test_trades_made_while_the_worker_was_down_reach_ticks_and_candles_once(platform: Platform) -> None:
    a = await list_instrument(platform)
    b = await list_instrument(platform, tick="0.5", lot="1")
    made: list[Trade] = []
    # Recent trades: the worker applies retention (30 days) when it starts.
    now_ns = time.time_ns()
    start = now_ns - now_ns % (60 * SECOND) - 10 * 60 * SECOND
    async with platform.db.connection("test.partitions") as conn:
        await ensure_daily_partitions_async(conn, "trades", (EPOCH + timedelta(microseconds=start // 1000)).date(), 2)

    async def batch(trades: list[Trade], *, announce: bool = True) -> None:
        await engine_batch(platform, trades, announce=announce)
        made.extend(trades)

    # Before the worker ever ran: two batches, one with two matches at one timestamp (one engine batch).
    await batch([Trade(a, 1, 1, "100.00", "0.5", start), Trade(a, 1, 2, "100.05", "0.002", start)])
    await batch([Trade(b, 2, 1, "250.5", "3", start + SECOND)])
    stop = asyncio.Event()
    task = await run_worker(platform, stop)
    try:
        await until(lambda: _at_least(platform, 3, a, b))
    finally:
        stop.set()
        await task

    # While it is stopped: a trade in the same minute as stored ones (its candles must merge), and more.
    await batch([Trade(a, 3, 1, "99.90", "0.010", start + 20 * SECOND)], announce=False)
    await batch(
        [Trade(b, 4, 1, "251", "1", start + 70 * SECOND), Trade(a, 4, 1, "100.10", "0.001", start + 70 * SECOND)]
    )
    stop = asyncio.Event()
    task = await run_worker(platform, stop)
    try:
        await until(lambda: _at_least(platform, 6, a, b))
        # While it runs: a batch whose pub/sub message was lost, then an announced one.
        await batch([Trade(a, 5, 1, "100.20", "0.004", start + 80 * SECOND)], announce=False)
        await until(lambda: _at_least(platform, 7, a, b))
        await batch(
            [Trade(b, 6, 1, "252", "2", start + 90 * SECOND), Trade(b, 6, 2, "252.5", "5", start + 90 * SECOND)]
        )
        await until(lambda: _at_least(platform, 9, a, b))
    finally:
        stop.set()
        pipeline = await task

    assert pipeline.stats.dropped == {}
    for instrument in (a, b):
        assert as_stored(await stored_ticks(platform, instrument)) == expected_ticks(made, instrument)
        ticks = sorted((t for t in made if t.instrument == instrument), key=lambda t: (t.ts_ns, t.seq, t.match))
        for timeframe in Timeframe:
            assert await stored_candles(platform, instrument, timeframe) == pandas_candles(
                [t.tick() for t in ticks], instrument, timeframe
            ), timeframe
    async with platform.db.connection("test.offset") as conn:
        newest = await conn.fetchval("SELECT max(xact_id) FROM trades")
        assert await sql.consumer_offset(conn, CONSUMER) > newest


async def _at_least(platform: Platform, n: int, *instruments: ListedInstrument) -> bool:
    count = await tick_count(platform, *instruments)
    assert count <= n, f"{count} ticks stored, only {n} trades made"  # a duplicate fails at once
    return count == n


async def test_a_trade_committed_after_a_later_one_is_not_skipped(
    platform: Platform, trade_days: None, database_url: str
) -> None:
    """Two engine shards: shard 1's batch (earlier id, earlier ts) commits after shard 2's. A cursor over ids
    or timestamps would pass it by; the transaction cursor waits for it."""
    a = await list_instrument(platform)
    b = await list_instrument(platform)
    early, late = Trade(a, 10, 1, "100.00", "0.001", T0), Trade(b, 11, 1, "101.00", "0.002", T0 + SECOND)
    pipeline = MarketDataPipeline(platform.db, [a, b], cache=platform.cache, commit_interval_s=0.05)
    await pipeline.start()
    feed = EngineTradesFeed(platform.db, platform.cache.client, pipeline.validator, [a, b], poll_interval_s=0.05)
    shard1 = await asyncpg.connect(database_url)
    task = asyncio.create_task(pipeline.run_feed(feed, validated=True))
    try:
        async with asyncio.timeout(WAIT_S):
            await feed.caught_up.wait()
        open_batch = shard1.transaction()
        await open_batch.start()
        await insert_trades(shard1, [early])
        early_xact = int(await shard1.fetchval("SELECT pg_current_xact_id()::text::bigint"))
        await engine_batch(platform, [late])
        async with platform.db.connection("test.read") as conn:
            page = await sql.engine_trades_after(conn, 0)
            assert [r["trade_id"] for r in page.rows] == []  # `late` is committed, but not below the horizon
            assert page.next_cursor <= early_xact
        reads = feed.reads
        await until(lambda: feed.reads >= reads + 3)
        await pipeline.flush()
        assert await tick_count(platform, a, b) == 0
        await open_batch.commit()
        await until(lambda: _at_least(platform, 2, a, b))
        await pipeline.flush()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await pipeline.close()
        await shard1.close()
    assert as_stored(await stored_ticks(platform, a)) == expected_ticks([early], a)
    assert as_stored(await stored_ticks(platform, b)) == expected_ticks([late], b)


async def test_pages_end_on_transaction_boundaries(platform: Platform, trade_days: None) -> None:
    a = await list_instrument(platform)
    big = [Trade(a, 20, n, "100.00", "0.001", T0) for n in range(1, 4)]
    small = [Trade(a, 21, 1, "100.01", "0.001", T0 + SECOND)]
    await engine_batch(platform, big, announce=False)
    await engine_batch(platform, small, announce=False)
    seen: list[list[str]] = []
    cursor = 0
    async with platform.db.connection("test.read") as conn:
        async with asyncio.timeout(WAIT_S):
            while sum(len(page) for page in seen) < 4:
                page = await sql.engine_trades_after(conn, cursor, limit=2)
                assert page.next_cursor >= cursor
                if page.rows:
                    seen.append([r["trade_id"] for r in page.rows])
                cursor = page.next_cursor
        assert (await sql.engine_trades_after(conn, cursor)).rows == []
    # the three-trade transaction is read whole although the page holds two; nothing twice
    assert seen == [[t.trade_id for t in big], [small[0].trade_id]]


def test_trade_ids_order_by_command_sequence_then_match() -> None:
    ids = ["BTC-USD-10-2", "BTC-USD-9-1", "BTC-USD-10-10", "BTC-USD-10-1"]
    assert sorted(ids, key=match_order) == ["BTC-USD-9-1", "BTC-USD-10-1", "BTC-USD-10-2", "BTC-USD-10-10"]
    assert match_order("legacy") == (0, 0)


# ------------------------------------------------------------------------------------------ quotes


async def next_quote(pubsub: Any) -> dict[str, Any]:
    async with asyncio.timeout(WAIT_S):
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if message is not None:
                envelope: dict[str, Any] = orjson.loads(message["data"])
                return envelope


@pytest.fixture
async def quotes_of(platform: Platform) -> AsyncIterator[Any]:
    subscriptions: list[Any] = []

    async def subscribe(symbol: str) -> Any:
        pubsub = platform.cache.client.pubsub()
        await pubsub.subscribe(f"tp:quotes:{symbol}")
        await pubsub.get_message(timeout=WAIT_S)  # the confirmation
        subscriptions.append(pubsub)
        return pubsub

    yield subscribe
    for pubsub in subscriptions:
        await pubsub.aclose()


async def test_a_symbol_without_an_external_feed_is_quoted_from_the_engine_book(
    platform: Platform, quotes_of: Any
) -> None:
    a = await list_instrument(platform)
    client = platform.cache.client
    key = f"market_data:{a.symbol}"
    pubsub = await quotes_of(a.symbol)
    pipeline = MarketDataPipeline(platform.db, [a], cache=platform.cache, commit_interval_s=0.05)
    await pipeline.start()
    try:
        top = (Decimal("100.00"), Decimal("1.5")), (Decimal("100.02"), Decimal("2"))
        assert pipeline.note_engine_book(a.symbol, 1, *top)
        await pipeline.flush()
        quote = orjson.loads(await client.get(key))
        assert {k: quote[k] for k in ("bid", "ask", "bid_size", "ask_size", "last")} == {
            "bid": "100",
            "ask": "100.02",
            "bid_size": "1.5",
            "ask_size": "2",
            "last": None,
        }
        assert 0 < await client.ttl(key) <= 5
        assert await next_quote(pubsub) == {"channel": "quotes", "symbol": a.symbol, "data": quote}
        assert not pipeline.note_engine_book(a.symbol, 1, *top)  # same snapshot
        assert not pipeline.note_engine_book(a.symbol, 2, *top)  # a deeper level moved: same quote

        # A quiet book: the refresh puts the TTL back, without a new quotes message.
        await client.expire(key, 1)
        pipeline.refresh_book_quotes()
        await pipeline.flush()
        assert await client.ttl(key) > 1
        assert orjson.loads(await client.get(key)) == quote

        # The engine trades: the last price joins the book's sides.
        await pipeline.submit([Tick(T0, a.symbol, None, None, 0, 0, 10_001, 3)])
        await pipeline.flush()
        traded = (await next_quote(pubsub))["data"]
        assert (traded["bid"], traded["ask"], traded["last"]) == ("100", "100.02", "100.01")
        assert await client.get(f"price:{a.symbol}") == b"100.01"

        # The best bid is taken: the quote follows the book.
        assert pipeline.note_engine_book(a.symbol, 3, None, top[1])
        await pipeline.flush()
        emptied = (await next_quote(pubsub))["data"]
        assert (emptied["bid"], emptied["bid_size"], emptied["ask"], emptied["last"]) == (
            None,
            None,
            "100.02",
            "100.01",
        )

        # An external feed quotes the symbol: its sides win over the book's.
        await pipeline.submit([Tick(T0 + SECOND, a.symbol, 9_990, 9_995, 7, 8, None, 0)])
        await pipeline.flush()
        external = (await next_quote(pubsub))["data"]
        assert (external["bid"], external["ask"]) == ("99.9", "99.95")
        assert not pipeline.note_engine_book(a.symbol, 4, *top)
        pipeline.refresh_book_quotes()
        await pipeline.flush()
        assert (orjson.loads(await client.get(key))["bid"]) == "99.9"
    finally:
        await pipeline.close()


async def test_the_book_quotes_a_symbol_again_once_its_external_feed_went_quiet(
    platform: Platform, quotes_of: Any
) -> None:
    a = await list_instrument(platform)
    pubsub = await quotes_of(a.symbol)
    # the feed's window is long while the test checks that the book does not quote over it (a slow machine must
    # not see it end early), then ends: the feed has gone quiet
    pipeline = MarketDataPipeline(platform.db, [a], cache=platform.cache, commit_interval_s=0.05, external_quote_s=60)
    await pipeline.start()
    try:
        await pipeline.submit([Tick(T0, a.symbol, 9_990, 9_995, 7, 8, None, 0)])
        await pipeline.flush()
        assert ((await next_quote(pubsub))["data"]["bid"]) == "99.9"
        assert not pipeline.note_engine_book(a.symbol, 1, (Decimal("100"), Decimal("1")), None)
        pipeline.external_quote_s = 0.0
        await until(lambda: not pipeline._externally_quoted(0))
        pipeline.refresh_book_quotes()
        await pipeline.flush()
        quote = (await next_quote(pubsub))["data"]
        assert (quote["bid"], quote["ask"]) == ("100", None)
        assert orjson.loads(await platform.cache.client.get(f"market_data:{a.symbol}")) == quote
    finally:
        await pipeline.close()


async def test_the_worker_quotes_engine_books_and_keeps_the_quote_alive(platform: Platform, quotes_of: Any) -> None:
    a = await list_instrument(platform)
    client = platform.cache.client
    key = f"market_data:{a.symbol}"
    pubsub = await quotes_of(a.symbol)

    async def engine_publishes(seq: int, bids: list[list[str]], asks: list[list[str]]) -> None:
        snapshot = {"seq": seq, "bids": bids, "asks": asks}
        await client.set(f"tp:book:{a.symbol}:snapshot", orjson.dumps(snapshot), ex=60)
        increment = {"channel": "book", "symbol": a.symbol, "data": snapshot}
        await client.publish(f"tp:book:{a.symbol}", orjson.dumps(increment))

    stop = asyncio.Event()
    task = asyncio.create_task(
        run_marketdata(
            platform,
            stop,
            simulate_rate=None,
            bus_feed=False,
            engine_trades=False,
            depth_interval_s=60,
            book_refresh_s=0.2,
        )
    )
    try:
        await engine_publishes(1, [["99.50", "1"], ["100.00", "0.25"]], [["100.10", "4"], ["100.05", "0.5"]])
        quote = (await next_quote(pubsub))["data"]
        assert (quote["bid"], quote["bid_size"], quote["ask"], quote["ask_size"]) == ("100", "0.25", "100.05", "0.5")
        await engine_publishes(2, [["99.50", "1"]], [["100.05", "0.5"]])
        quote = (await next_quote(pubsub))["data"]
        assert (quote["bid"], quote["bid_size"], quote["ask"]) == ("99.5", "1", "100.05")
        await client.expire(key, 1)  # as if the book had stood still for four seconds
        await until(lambda: _ttl_above(platform, key, 1))
        assert orjson.loads(await client.get(key)) == quote
    finally:
        stop.set()
        await task


async def _ttl_above(platform: Platform, key: str, seconds: int) -> bool:
    ttl: int = await platform.cache.client.ttl(key)
    return ttl > seconds


def test_the_top_of_an_engine_book_snapshot() -> None:
    raw = orjson.dumps({"seq": 7, "bids": [["99.5", "1"], ["100", "2"]], "asks": []})
    assert book_top(raw) == (7, (Decimal("100"), Decimal("2")), None)
