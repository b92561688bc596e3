"""The market data pipeline against real PostgreSQL, Redis and the bus: what is stored, what is refused,
candles equal to an independent pandas computation (read back through the REST API), restart merging,
quotes and pub/sub in Redis, the bus feed, depth snapshots and retention with archive (the engine's trades
and books as market data: test_engine_marketdata.py).

Every test lists its own instruments with fresh symbols, so Redis keys and channels never collide with
another test session sharing the server.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pandas as pd
import pyarrow.parquet as pq
import pytest
from prometheus_client import REGISTRY

from tests.integration.conftest import Actor, make_actor
from tradeplane.adapters.bus import MD_TICKS_ALL, create_bus, md_ticks_stream
from tradeplane.adapters.db.marketdata import ListedInstrument
from tradeplane.adapters.db.timeseries import ensure_daily_partitions_async
from tradeplane.adapters.feeds.bus import BusTickFeed, parse_tick_message
from tradeplane.adapters.feeds.engine_trades import EngineTradesFeed
from tradeplane.adapters.feeds.replay import ReplayFeed, write_csv
from tradeplane.adapters.feeds.simulated import SimulatedFeed, SimulatedInstrument
from tradeplane.adapters.postgres import Database
from tradeplane.bootstrap import Platform
from tradeplane.domain.candles import Timeframe
from tradeplane.domain.ticks import NS_PER_SECOND, InstrumentGrid, Tick
from tradeplane.entrypoints.workers.marketdata import run_marketdata, store_depth_snapshots
from tradeplane.errors import InfrastructureUnavailable
from tradeplane.services import demo
from tradeplane.services.identity import Role
from tradeplane.services.ingest import MarketDataPipeline, apply_retention

WAIT_S = 20.0  # a hang guard for things that must arrive, not a timing assertion
T0 = 1_709_677_800_000_000_000  # 2024-03-05T22:30:00Z: the runs below cross H4 and D1 boundaries
SECOND = NS_PER_SECOND


async def until(condition: Callable[[], Awaitable[Any] | bool]) -> None:
    """Poll ``condition`` (a bool or an awaitable of one) until it holds; fail after WAIT_S."""
    async with asyncio.timeout(WAIT_S):
        while True:
            result = condition()
            if await result if inspect.isawaitable(result) else result:
                return
            await asyncio.sleep(0.05)


async def list_instrument(platform: Platform, tick: str = "0.01", lot: str = "0.001") -> ListedInstrument:
    return await list_instrument_in(platform.db, f"T{uuid.uuid4().hex[:10].upper()}-USD", tick, lot)


async def list_instrument_in(db: Database, symbol: str, tick: str, lot: str) -> ListedInstrument:
    async with db.transaction("test.instrument") as conn:
        await demo.load_reference_data(conn)
        instrument_id = await conn.fetchval(
            "INSERT INTO instruments (symbol, base_asset, quote_asset, tick_size, lot_size, min_qty, max_qty,"
            " price_band_pct, reference_price) VALUES ($1, 'BTC', 'USD', $2::numeric, $3::numeric, $3::numeric,"
            " 1000000, 10, 100) RETURNING id",
            symbol,
            Decimal(tick),
            Decimal(lot),
        )
    return ListedInstrument(instrument_id, symbol, Decimal(tick), Decimal(lot))


@pytest.fixture
async def reader(platform: Platform) -> Actor:
    return await make_actor(platform, f"reader-{uuid.uuid4().hex[:8]}", Role.READONLY)


@pytest.fixture
async def api(client: httpx.AsyncClient) -> httpx.AsyncClient:
    return client


def simulated(instruments: list[ListedInstrument], n: int, *, seed: int = 7, rate: int = 2) -> list[Tick]:
    walks = [
        SimulatedInstrument(InstrumentGrid(i.symbol, i.tick_size), Decimal(100), trade_percent=70) for i in instruments
    ]
    return SimulatedFeed(walks, seed=seed, rate=rate, start_ns=T0, paced=False).next_ticks(n)


def pandas_candles(ticks: list[Tick], instrument: ListedInstrument, timeframe: Timeframe) -> list[dict[str, Any]]:
    """The independent computation: a pandas resample of the trades (ties keep arrival order)."""
    trades = [t for t in ticks if t.symbol == instrument.symbol and t.last is not None]
    frame = pd.DataFrame(
        {
            "ts": pd.to_datetime([t.ts_ns for t in trades], unit="ns"),  # naive UTC: origin="epoch" works for D1
            "price": [t.last for t in trades],
            "volume": [t.volume for t in trades],
        }
    )
    frame = frame.sort_values("ts", kind="stable").set_index("ts")
    rule = {"M1": "1min", "M5": "5min", "M15": "15min", "H1": "1h", "H4": "4h", "D1": "1D"}[timeframe.value]
    bars = frame.resample(rule, origin="epoch", label="left", closed="left").agg(
        {"price": ["first", "max", "min", "last", "count"], "volume": "sum"}
    )
    bars = bars[bars[("price", "count")] > 0]
    return [
        {
            "bucket": bucket.tz_localize("UTC").to_pydatetime(),
            "open": instrument.price(int(row[("price", "first")])),
            "high": instrument.price(int(row[("price", "max")])),
            "low": instrument.price(int(row[("price", "min")])),
            "close": instrument.price(int(row[("price", "last")])),
            "volume": instrument.quantity(int(row[("volume", "sum")])),
            "tick_count": int(row[("price", "count")]),
        }
        for bucket, row in bars.iterrows()
    ]


async def api_candles(
    api: httpx.AsyncClient, actor: Actor, symbol: str, timeframe: Timeframe, **params: str
) -> list[dict[str, Any]]:
    response = await api.get(
        f"/api/v1/marketdata/{symbol}/candles",
        params={
            "timeframe": timeframe.value,
            "start": "2024-03-05T00:00:00Z",
            "end": "2024-03-07T00:00:00Z",
            "limit": "10000",
            **params,
        },
        headers=actor.headers,
    )
    assert response.status_code == 200, response.text
    return [
        {
            "bucket": datetime.fromisoformat(c["bucket"]),
            **{k: Decimal(c[k]) for k in ("open", "high", "low", "close", "volume")},
            "tick_count": c["tick_count"],
        }
        for c in response.json()["candles"]
    ]


@pytest.fixture
async def pipeline_factory(platform: Platform) -> AsyncIterator[Any]:
    started: list[MarketDataPipeline] = []

    async def make(instruments: list[ListedInstrument], **options: Any) -> MarketDataPipeline:
        options.setdefault("commit_interval_s", 0.05)
        options.setdefault("chunk_rows", 1000)
        pipeline = MarketDataPipeline(platform.db, instruments, cache=platform.cache, **options)
        await pipeline.start()
        started.append(pipeline)
        return pipeline

    yield make
    for pipeline in started:
        await pipeline.close()


async def stored_ticks(platform: Platform, instrument: ListedInstrument) -> list[Any]:
    async with platform.db.connection("test.ticks") as conn:
        return list(
            await conn.fetch(
                "SELECT ts, bid, ask, bid_size, ask_size, last, volume FROM ticks WHERE instrument_id = $1 ORDER BY ts",
                instrument.instrument_id,
            )
        )


# ------------------------------------------------------------------------------------------- storage


async def test_candles_through_the_database_equal_a_pandas_resample(
    platform: Platform, pipeline_factory: Any, api: httpx.AsyncClient, reader: Actor
) -> None:
    a = await list_instrument(platform)
    b = await list_instrument(platform, tick="0.00001", lot="1000")
    ticks = simulated([a, b], 12_000)  # 0.5 s apart: 100 minutes, across 00:00Z
    # late ticks within the 5 s tolerance: swap neighbours so some arrive after a newer one
    for i in range(10, len(ticks) - 1, 97):
        ticks[i], ticks[i + 1] = ticks[i + 1], ticks[i]
    pipeline = await pipeline_factory([a, b], chunk_rows=2500)  # chunks this large are encoded in a thread
    for start in range(0, len(ticks), 2500):
        await pipeline.submit(ticks[start : start + 2500])
    await pipeline.flush()
    assert pipeline.stats.stored == len(ticks) and pipeline.stats.dropped == {}
    for instrument in (a, b):
        for timeframe in Timeframe:
            expected = pandas_candles(ticks, instrument, timeframe)
            assert expected, "the run must produce candles"
            assert await api_candles(api, reader, instrument.symbol, timeframe) == expected, timeframe


async def test_ticks_are_stored_exactly(platform: Platform, pipeline_factory: Any) -> None:
    a = await list_instrument(platform, tick="0.05", lot="0.0001")
    ticks = [
        Tick(T0, a.symbol, 2_000_001, 2_000_003, 7, 9, 2_000_002, 3),
        Tick(T0 + 1_500, a.symbol, None, 2_000_004, 0, 11, None, 0),  # ask-only quote
        Tick(T0 + 2_000, a.symbol, None, None, 0, 0, 10**15, 123_456_789),  # a trade without a quote
    ]
    pipeline = await pipeline_factory([a])
    await pipeline.submit(ticks)
    await pipeline.flush()
    rows = await stored_ticks(platform, a)
    assert [tuple(r.values())[1:] for r in rows] == [
        (Decimal("100000.05"), Decimal("100000.15"), Decimal("0.0007"), Decimal("0.0009"), Decimal("100000.10"),
         Decimal("0.0003")),
        (None, Decimal("100000.20"), None, Decimal("0.0011"), None, None),
        (None, None, None, None, Decimal("50000000000000.00"), Decimal("12345.6789")),
    ]  # fmt: skip
    assert [r["ts"] for r in rows] == [
        datetime(2024, 3, 5, 22, 30, tzinfo=UTC),
        datetime(2024, 3, 5, 22, 30, 0, 1, tzinfo=UTC),  # 1,500 ns floors to 1 us
        datetime(2024, 3, 5, 22, 30, 0, 2, tzinfo=UTC),
    ]


async def test_bad_ticks_never_reach_storage_and_are_counted(platform: Platform, pipeline_factory: Any) -> None:
    a = await list_instrument(platform)

    def dropped(reason: str) -> float:
        return REGISTRY.get_sample_value("market_data_ticks_dropped_total", {"reason": reason}) or 0.0

    before = {r: dropped(r) for r in ("unknown_symbol", "crossed_quote", "non_positive_price", "out_of_order")}
    good = [Tick(T0 + i * SECOND, a.symbol, 100, 101, 1, 1, 100, 1) for i in range(20)]
    bad = [
        Tick(T0 + 20 * SECOND, "NOPE", 100, 101, 1, 1, 100, 1),
        Tick(T0 + 20 * SECOND, a.symbol, 102, 101, 1, 1, None, 0),
        Tick(T0 + 20 * SECOND, a.symbol, 0, 101, 1, 1, None, 0),
        Tick(T0 + 20 * SECOND, a.symbol, 100, 101, 1, 1, -5, 1),
        Tick(T0, a.symbol, 100, 101, 1, 1, 100, 1),  # 19 s behind the watermark
    ]
    pipeline = await pipeline_factory([a])
    await pipeline.submit(good + bad)
    await pipeline.flush()
    assert len(await stored_ticks(platform, a)) == 20
    assert pipeline.stats.stored == 20
    assert pipeline.stats.dropped == {
        "unknown_symbol": 1,
        "crossed_quote": 1,
        "non_positive_price": 2,
        "out_of_order": 1,
    }
    assert dropped("unknown_symbol") - before["unknown_symbol"] == 1
    assert dropped("non_positive_price") - before["non_positive_price"] == 2
    assert dropped("out_of_order") - before["out_of_order"] == 1


async def test_drops_of_a_validated_batch_with_nothing_accepted_are_counted(
    platform: Platform, pipeline_factory: Any
) -> None:
    """A bus, replay or engine-trades batch arrives already validated; all of it may have been refused."""
    a = await list_instrument(platform)

    def dropped() -> float:
        return REGISTRY.get_sample_value("market_data_ticks_dropped_total", {"reason": "unknown_symbol"}) or 0.0

    before = dropped()
    pipeline = await pipeline_factory([a])
    out: list[Tick] = []
    parse_tick_message(b'{"ts": 1, "symbol": "NOPE-USD", "bid": "1"}', pipeline.validator, {a.symbol: a.lot_size}, out)
    assert out == []
    await pipeline.submit(out, validated=True)
    assert pipeline.stats.dropped == {"unknown_symbol": 1}
    assert dropped() - before == 1


async def test_a_tick_from_the_future_is_refused_and_the_symbol_keeps_ticking(
    platform: Platform, pipeline_factory: Any
) -> None:
    a = await list_instrument(platform)
    now = time.time_ns()
    century = 100 * 365 * 86_400 * SECOND
    pipeline = await pipeline_factory([a])
    await pipeline.submit([Tick(now + century, a.symbol, 100, 101, 1, 1, None, 0)])
    await pipeline.submit([Tick(now + i * SECOND // 10, a.symbol, 100 + i, 102 + i, 1, 1, None, 0) for i in range(3)])
    await pipeline.flush()
    assert pipeline.stats.dropped == {"timestamp_in_future": 1}
    assert [r["bid"] for r in await stored_ticks(platform, a)] == [Decimal("1.00"), Decimal("1.01"), Decimal("1.02")]


async def test_a_replay_of_history_creates_its_partitions_and_reports_what_it_did(
    platform: Platform, pipeline_factory: Any, tmp_path: Path
) -> None:
    a = await list_instrument(platform)
    old = 1_262_304_000_000_000_000  # 2010-01-01T00:00:00Z: no partition exists for these days
    ticks = [Tick(old + i * 3600 * SECOND, a.symbol, 100 + i, 102 + i, 1, 1, 101 + i, 2) for i in range(60)]
    path = tmp_path / "history.csv"
    write_csv(path, ticks, [a])
    with path.open("a") as handle:
        handle.write(f"2010-01-03T12:00:00Z,{a.symbol},1.005,1.02,0.001,0.001,,\n")  # off the tick grid
        handle.write("not,a,row\n")
        handle.write(f"2010-01-03T12:00:00Z,{a.symbol},nan,1.02,0.001,0.001,,\n")
    pipeline = await pipeline_factory([a])
    await pipeline.run_feed(ReplayFeed(path, pipeline.validator, pipeline.lot_sizes, batch_size=16), validated=True)
    await pipeline.flush()
    assert pipeline.stats.rows_read == 63
    assert pipeline.stats.stored == 60
    assert pipeline.stats.dropped == {"off_tick_grid": 1, "malformed_row": 1, "non_finite_price": 1}
    assert len(await stored_ticks(platform, a)) == 60
    async with platform.db.connection("test") as conn:
        days = await conn.fetchval(
            "SELECT count(*) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'ticks'::regclass AND c.relname LIKE 'ticks_p201001%'"
        )
    assert days >= 3


async def test_candles_merge_with_stored_ones_after_a_restart(
    platform: Platform, pipeline_factory: Any, api: httpx.AsyncClient, reader: Actor
) -> None:
    a = await list_instrument(platform)
    minute = T0 + 30 * SECOND
    first_run = [
        Tick(minute + 10 * SECOND, a.symbol, None, None, 0, 0, 500, 1),
        Tick(minute + 20 * SECOND, a.symbol, None, None, 0, 0, 520, 2),
        Tick(minute + 20 * SECOND, a.symbol, None, None, 0, 0, 510, 3),  # same instant, later: the close
    ]
    second_run = [
        Tick(minute + 5 * SECOND, a.symbol, None, None, 0, 0, 490, 4),  # earlier than the stored open
        Tick(minute + 20 * SECOND, a.symbol, None, None, 0, 0, 505, 5),  # ties the stored close, arrives later
        Tick(minute + 15 * SECOND, a.symbol, None, None, 0, 0, 530, 6),
    ]
    one = await pipeline_factory([a])
    await one.submit(first_run)
    await one.flush()
    await one.close()
    two = await pipeline_factory([a])  # a fresh aggregator, as after a restart
    await two.submit(second_run)
    await two.flush()
    for timeframe in Timeframe:
        assert await api_candles(api, reader, a.symbol, timeframe) == pandas_candles(
            first_run + second_run, a, timeframe
        )


# ------------------------------------------------------------------------------------------- Redis


async def test_quotes_and_candles_go_to_redis(platform: Platform, pipeline_factory: Any) -> None:
    a = await list_instrument(platform)
    pubsub = platform.cache.client.pubsub()
    await pubsub.subscribe(f"tp:quotes:{a.symbol}", f"tp:candles:M1:{a.symbol}")
    for _ in range(2):
        await pubsub.get_message(timeout=WAIT_S)  # the two subscribe confirmations
    pipeline = await pipeline_factory([a])
    await pipeline.submit(
        [
            Tick(T0, a.symbol, 10_000, 10_002, 5, 6, 10_001, 7),
            Tick(T0 + SECOND, a.symbol, 10_001, 10_003, 8, 9, None, 0),
        ]
    )
    await pipeline.flush()
    raw = await platform.cache.client.get(f"market_data:{a.symbol}")
    assert raw is not None
    quote = orjson.loads(raw)
    assert quote == {
        "symbol": a.symbol,
        "ts": "2024-03-05T22:30:01Z",
        "bid": "100.01",
        "ask": "100.03",
        "bid_size": "0.008",
        "ask_size": "0.009",
        "last": "100.01",
    }
    assert 0 < await platform.cache.client.ttl(f"market_data:{a.symbol}") <= 5
    assert await platform.cache.client.get(f"price:{a.symbol}") == b"100.01"
    messages: dict[str, Any] = {}
    async with asyncio.timeout(WAIT_S):
        while len(messages) < 2:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if message is not None:
                messages[message["channel"].decode()] = orjson.loads(message["data"])
    await pubsub.aclose()  # type: ignore[no-untyped-call]
    assert messages[f"tp:quotes:{a.symbol}"] == {"channel": "quotes", "symbol": a.symbol, "data": quote}
    assert messages[f"tp:candles:M1:{a.symbol}"] == {
        "channel": "candles:M1",
        "symbol": a.symbol,
        "data": {
            "timeframe": "M1",
            "bucket": "2024-03-05T22:30:00Z",
            "open": "100.01",
            "high": "100.01",
            "low": "100.01",
            "close": "100.01",
            "volume": "0.007",
            "tick_count": 1,
        },
    }


async def test_published_candles_equal_what_the_candles_api_returns(
    platform: Platform, pipeline_factory: Any, api: httpx.AsyncClient, reader: Actor
) -> None:
    """Every timeframe's envelope carries the stored candle as /candles writes it: 100.00 is "100", not "1E+2"."""
    a = await list_instrument(platform, tick="0.01", lot="0.001")
    channels = [f"tp:candles:{tf.value}:{a.symbol}" for tf in Timeframe]
    pubsub = platform.cache.client.pubsub()
    await pubsub.subscribe(*channels)
    for _ in channels:
        await pubsub.get_message(timeout=WAIT_S)  # the subscribe confirmations
    pipeline = await pipeline_factory([a])
    await pipeline.submit(
        [
            Tick(T0 + SECOND, a.symbol, None, None, 0, 0, 10_000, 1_000),  # 100.00 x 1.000
            Tick(T0 + 2 * SECOND, a.symbol, None, None, 0, 0, 12_000, 2_500),  # 120.00 x 2.500
            Tick(T0 + 3 * SECOND, a.symbol, None, None, 0, 0, 11_000, 500),
        ]
    )
    await pipeline.flush()
    published: dict[str, Any] = {}
    async with asyncio.timeout(WAIT_S):
        while len(published) < len(channels):
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if message is not None:
                envelope = orjson.loads(message["data"])
                published[envelope["data"]["timeframe"]] = envelope["data"]
    await pubsub.aclose()  # type: ignore[no-untyped-call]
    for timeframe in Timeframe:
        response = await api.get(
            f"/api/v1/marketdata/{a.symbol}/candles",
            params={"timeframe": timeframe.value, "start": "2024-03-05T00:00:00Z", "end": "2024-03-06T00:00:00Z"},
            headers=reader.headers,
        )
        (served,) = response.json()["candles"]
        assert published[timeframe.value] == {"timeframe": timeframe.value, **served}
        assert (served["open"], served["high"], served["volume"]) == ("100", "120", "4")


async def test_external_trade_prints_are_announced_once_and_history_and_engine_trades_are_not(
    platform: Platform, pipeline_factory: Any, nats_url: str, tmp_path: Path
) -> None:
    """tp:trades:<symbol> carries the engine's trades (published by the engine) and, from the market data
    worker, only the trades of live external feeds, in the engine's envelope, each once."""
    a = await list_instrument(platform, tick="0.01", lot="0.001")
    channel = f"tp:trades:{a.symbol}"
    pubsub = platform.cache.client.pubsub()
    await pubsub.subscribe(channel)
    await pubsub.get_message(timeout=WAIT_S)
    pipeline = await pipeline_factory([a])

    # history: a replayed trade makes candles but is not announced
    path = tmp_path / "history.csv"
    path.write_text(f"ts,symbol,bid,ask,bid_size,ask_size,last,volume\n{T0},{a.symbol},,,,,100.00,0.004\n")
    await pipeline.run_feed(ReplayFeed(path, pipeline.validator, pipeline.lot_sizes), validated=True)
    await pipeline.flush()

    # an engine trade: the engine announces it itself; the engine trades feed only stores it
    engine_ts = datetime(2024, 3, 5, 22, 30, 10, tzinfo=UTC)
    async with platform.db.transaction("test.engine") as conn:
        await ensure_daily_partitions_async(conn, "trades", engine_ts.date(), 2)
        await conn.execute(
            "INSERT INTO trades (trade_id, instrument_id, price, quantity, aggressor_side, ts)"
            " VALUES ($1, $2, 100.50, 0.002, 'buy', $3)",
            f"{a.symbol}-1-0",
            a.instrument_id,
            engine_ts,
        )
    engine_envelope = {
        "channel": "trades",
        "symbol": a.symbol,
        "data": {"trade_id": f"{a.symbol}-1-0", "price": "100.50", "qty": "0.002", "aggressor_side": "buy",
                 "ts": engine_ts.isoformat()},
    }  # fmt: skip
    await platform.cache.client.publish(channel, orjson.dumps(engine_envelope))
    engine_feed = EngineTradesFeed(platform.db, platform.cache.client, pipeline.validator, [a])
    engine_task = asyncio.create_task(pipeline.run_feed(engine_feed, validated=True))
    try:
        await until(lambda: pipeline.stats.stored >= 2)
    finally:
        engine_task.cancel()
        await asyncio.gather(engine_task, return_exceptions=True)

    # an external venue on the bus: its trades are announced after they are stored, its quotes are not
    bus = create_bus(nats_url, namespace=f"md{uuid.uuid4().hex[:8]}")
    await bus.connect()
    await bus.setup(1)
    messages = [
        {"ts": "2024-03-05T22:30:20.000001500Z", "symbol": a.symbol, "bid": "100.00", "ask": "100.02",
         "bid_size": "1", "ask_size": "2", "last": "100.01", "volume": "0.003"},
        {"ts": T0 + 21 * SECOND, "symbol": a.symbol, "bid": "100.00", "ask": "100.02"},  # a quote: no print
        {"ts": T0 + 22 * SECOND, "symbol": a.symbol, "last": "100.02", "volume": "0"},  # no quantity: no print
        {"ts": T0 + 23 * SECOND, "symbol": a.symbol, "last": "100.00", "volume": "1.25"},
    ]  # fmt: skip
    try:
        for number, message in enumerate(messages):
            await bus.publish(md_ticks_stream(a.symbol), orjson.dumps(message), msg_id=f"{a.symbol}-{number}")
        bus_task = asyncio.create_task(
            pipeline.run_feed(BusTickFeed(bus, pipeline.validator, pipeline.lot_sizes), validated=True)
        )
        try:
            await until(lambda: pipeline.stats.stored >= 6)
            await pipeline.flush()
        finally:
            bus_task.cancel()
            await asyncio.gather(bus_task, return_exceptions=True)
    finally:
        await bus.destroy(1)
        await bus.close()

    await platform.cache.client.publish(channel, b'"end"')  # everything published before it has arrived
    announced: list[Any] = []
    async with asyncio.timeout(WAIT_S):
        while not announced or announced[-1] != "end":
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if message is not None:
                decoded = orjson.loads(message["data"])
                announced += decoded if isinstance(decoded, list) else [decoded]
    await pubsub.aclose()  # type: ignore[no-untyped-call]

    def external(ts: str, price: str, qty: str) -> dict[str, Any]:
        data = {"trade_id": None, "price": price, "qty": qty, "aggressor_side": None, "ts": ts, "source": "external"}
        return {"channel": "trades", "symbol": a.symbol, "data": data}

    assert announced == [
        engine_envelope,
        external("2024-03-05T22:30:20.000001+00:00", "100.01", "0.003"),
        external("2024-03-05T22:30:23+00:00", "100.00", "1.250"),
        "end",
    ]
    assert len(await stored_ticks(platform, a)) == 6


async def test_spreads_are_sampled_once_per_second(platform: Platform, pipeline_factory: Any) -> None:
    a = await list_instrument(platform)
    ticks = [Tick(T0 + i * SECOND // 4, a.symbol, 100, 100 + 1 + i % 3, 1, 1, None, 0) for i in range(40)]
    pipeline = await pipeline_factory([a], chunk_rows=7)
    await pipeline.submit(ticks)
    await pipeline.flush()
    async with platform.db.connection("test") as conn:
        rows = await conn.fetch("SELECT ts, spread FROM spreads WHERE instrument_id = $1 ORDER BY ts", a.instrument_id)
    # the first quote of each second of tick time, however the ticks were chunked: ticks 0, 4, 8, ...
    assert [(r["ts"], r["spread"]) for r in rows] == [
        (datetime(2024, 3, 5, 22, 30, s, tzinfo=UTC), Decimal("0.01") * (1 + 4 * s % 3)) for s in range(10)
    ]


# ------------------------------------------------------------------------------------------- feeds


async def test_bus_feed_stores_published_ticks_and_acks_them(
    platform: Platform, pipeline_factory: Any, nats_url: str
) -> None:
    a = await list_instrument(platform, lot="0.5")
    pipeline = await pipeline_factory([a])
    stream = md_ticks_stream(a.symbol)
    bus = create_bus(nats_url, namespace=f"md{uuid.uuid4().hex[:8]}")  # its own MD_TICKS stream
    await bus.connect()
    await bus.setup(1)
    messages = [
        {"ts": "2024-03-05T22:30:00.000000001Z", "symbol": a.symbol, "bid": "99.99", "ask": "100.01",
         "bid_size": "1.5", "ask_size": "2", "last": "100.00", "volume": "0.5"},
        [{"ts": T0 + SECOND, "symbol": a.symbol, "bid": 100, "ask": "100.02"},
         {"ts": T0 + SECOND, "symbol": a.symbol, "bid": "100.001", "ask": "100.02"}],  # off the grid
        "not json",
        {"ts": T0 + 2 * SECOND, "symbol": a.symbol, "last": "100.00", "volume": "0.3"},  # not whole lots
    ]  # fmt: skip
    for number, message in enumerate(messages):
        data = message.encode() if isinstance(message, str) else orjson.dumps(message)
        await bus.publish(stream, data, msg_id=f"{a.symbol}-{number}")
    feed = BusTickFeed(bus, pipeline.validator, {a.symbol: a.lot_size})
    task = asyncio.create_task(pipeline.run_feed(feed, validated=True))
    try:
        await until(lambda: pipeline.stats.stored >= 2 and pipeline.stats.dropped_total >= 3)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    try:
        # every delivery was acked after its commit: the durable consumer has nothing to hand out again
        subscription = await bus.subscribe(MD_TICKS_ALL, feed.durable)
        assert await subscription.fetch(10, 1.0) == []
        await subscription.close()
    finally:
        await bus.destroy(1)
        await bus.close()
    rows = await stored_ticks(platform, a)
    assert [(r["bid"], r["ask"], r["bid_size"], r["last"], r["volume"]) for r in rows] == [
        (Decimal("99.99"), Decimal("100.01"), Decimal("1.5"), Decimal("100.00"), Decimal("0.5")),
        (Decimal("100.00"), Decimal("100.02"), Decimal("0"), None, None),
    ]
    assert pipeline.stats.dropped == {"off_tick_grid": 1, "malformed_row": 2}


async def publish_quotes(bus: Any, instrument: ListedInstrument, seconds: range) -> None:
    """One quote per message, at T0 + each of `seconds`: a stored duplicate shows as a repeated ts."""
    for second in seconds:
        tick = {"ts": T0 + second * SECOND, "symbol": instrument.symbol, "bid": "99.99", "ask": "100.01"}
        await bus.publish(
            md_ticks_stream(instrument.symbol), orjson.dumps(tick), msg_id=f"{instrument.symbol}-{second}"
        )


async def assert_nothing_left_to_deliver(bus: Any, durable: str) -> None:
    subscription = await bus.subscribe(MD_TICKS_ALL, durable)
    try:
        assert await subscription.fetch(10, 1.0) == []
    finally:
        await subscription.close()


async def test_a_bus_batch_redelivered_after_a_crash_is_stored_once(
    platform: Platform, pipeline_factory: Any, nats_url: str
) -> None:
    """A worker commits a batch and dies before acking it; the next worker must not store it again."""
    a = await list_instrument(platform, lot="0.5")
    bus = create_bus(nats_url, namespace=f"md{uuid.uuid4().hex[:8]}")
    await bus.connect()
    await bus.setup(1)
    try:
        await publish_quotes(bus, a, range(4))
        crashed = await pipeline_factory([a])
        feed = BusTickFeed(bus, crashed.validator, {a.symbol: a.lot_size}, committed_offset=crashed.committed_offset)
        batches = aiter(feed)
        batch = await anext(batches)
        assert batch.offset is not None
        await crashed.submit(batch.ticks, validated=True, offset=batch.offset)  # no on_stored: never acked
        await crashed.flush()
        await batches.aclose()  # closing hands the unacked messages straight back to the consumer
        first_run = len(batch.ticks)
        assert first_run > 0 and len(await stored_ticks(platform, a)) == first_run

        await publish_quotes(bus, a, range(4, 6))
        restarted = await pipeline_factory([a])  # a new process: nothing in memory, only what was committed
        feed = BusTickFeed(
            bus, restarted.validator, {a.symbol: a.lot_size}, committed_offset=restarted.committed_offset
        )
        task = asyncio.create_task(restarted.run_feed(feed, validated=True))
        try:
            await until(lambda: restarted.stats.stored >= 6 - first_run)
            await restarted.flush()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await assert_nothing_left_to_deliver(bus, feed.durable)
    finally:
        await bus.destroy(1)
        await bus.close()
    rows = await stored_ticks(platform, a)
    assert [row["ts"] for row in rows] == [datetime.fromtimestamp((T0 + s * SECOND) / 1e9, UTC) for s in range(6)]


async def test_a_bus_batch_redelivered_while_its_commit_is_pending_is_stored_once(
    platform: Platform, pipeline_factory: Any, nats_url: str
) -> None:
    """A worker that stalls past the ack wait gets its own batch again while the first copy is still on its
    way to storage: it must skip the copy, and settle it once the original is committed."""
    a = await list_instrument(platform, lot="0.5")
    bus = create_bus(nats_url, namespace=f"md{uuid.uuid4().hex[:8]}", ack_wait=1.0)
    await bus.connect()
    await bus.setup(1)
    pipeline = await pipeline_factory([a])
    feed = BusTickFeed(bus, pipeline.validator, {a.symbol: a.lot_size}, committed_offset=pipeline.committed_offset)

    async def stalled_first_ack() -> None:
        first = True
        async for batch in feed:
            # The first batch's acks are lost, as if the worker stalled past ack_wait; later ones ack normally.
            on_stored = None if first else batch.on_stored
            first = False
            await pipeline.submit(batch.ticks, validated=True, on_stored=on_stored, offset=batch.offset)

    try:
        await publish_quotes(bus, a, range(4))
        task = asyncio.create_task(stalled_first_ack())
        try:
            await until(lambda: feed.duplicates >= 4)
            await publish_quotes(bus, a, range(4, 6))
            await until(lambda: pipeline.stats.stored >= 6)
            await pipeline.flush()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await assert_nothing_left_to_deliver(bus, feed.durable)
    finally:
        await bus.destroy(1)
        await bus.close()
    rows = await stored_ticks(platform, a)
    assert [row["ts"] for row in rows] == [datetime.fromtimestamp((T0 + s * SECOND) / 1e9, UTC) for s in range(6)]


async def test_depth_snapshots_are_stored_when_the_book_changed(platform: Platform) -> None:
    a = await list_instrument(platform)
    key = f"tp:book:{a.symbol}:snapshot"
    snapshot = {"seq": 4, "bids": [["100.00", "1.5"]], "asks": [["100.02", "2"]]}
    await platform.cache.client.set(key, orjson.dumps(snapshot), ex=60)
    seen: dict[str, int] = {}
    assert await store_depth_snapshots(platform, [a], seen) == 1
    assert await store_depth_snapshots(platform, [a], seen) == 0  # same sequence: nothing new
    async with platform.db.connection("test") as conn:
        row = await conn.fetchrow(
            "SELECT bids, asks, sequence FROM depth_snapshots WHERE instrument_id = $1", a.instrument_id
        )
    assert (orjson.loads(row["bids"]), orjson.loads(row["asks"]), row["sequence"]) == (
        snapshot["bids"],
        snapshot["asks"],
        4,
    )


@pytest.mark.parametrize("failure", ["postgres-down", "insert-refused"])
async def test_a_depth_snapshot_whose_insert_failed_is_stored_by_the_next_attempt(
    platform: Platform, failure: str
) -> None:
    a = await list_instrument(platform)
    snapshot = {"seq": 7, "bids": [["100.00", "1"]], "asks": [["100.02", "3"]]}
    await platform.cache.client.set(f"tp:book:{a.symbol}:snapshot", orjson.dumps(snapshot), ex=60)
    seen: dict[str, int] = {}
    if failure == "postgres-down":
        await platform.db.close()
        with pytest.raises(InfrastructureUnavailable):
            await store_depth_snapshots(platform, [a], seen)
        await platform.db.connect()
    else:
        async with platform.db.connection("test") as conn:
            await conn.execute("ALTER TABLE depth_snapshots ADD CONSTRAINT test_refused CHECK (sequence < 0)")
        with pytest.raises(asyncpg.CheckViolationError):
            await store_depth_snapshots(platform, [a], seen)
        async with platform.db.connection("test") as conn:
            await conn.execute("ALTER TABLE depth_snapshots DROP CONSTRAINT test_refused")

    assert await store_depth_snapshots(platform, [a], seen) == 1  # the same snapshot, now stored
    async with platform.db.connection("test") as conn:
        sequences = await conn.fetch("SELECT sequence FROM depth_snapshots WHERE instrument_id = $1", a.instrument_id)
    assert [row["sequence"] for row in sequences] == [7]
    assert seen == {a.symbol: 7}


async def test_retention_archives_then_drops_old_partitions_and_the_archive_replays_back(
    platform: Platform, pipeline_factory: Any, tmp_path: Path, api: httpx.AsyncClient, reader: Actor
) -> None:
    a = await list_instrument(platform, lot="0.001")
    old = 1_104_537_600_000_000_000  # 2005-01-01T00:00:00Z
    ticks = [Tick(old + i * 60 * SECOND, a.symbol, 100, 101, 3 + i, 1_500, 100 + i % 2, 5) for i in range(30)]
    ticks += [Tick(old + 31 * 60 * SECOND, a.symbol, None, 102, 0, 4, None, 0)]  # one side only, no trade
    pipeline = await pipeline_factory([a])
    await pipeline.submit(ticks)
    await pipeline.flush()
    before = await stored_ticks(platform, a)
    response = await api.get(
        f"/api/v1/marketdata/{a.symbol}/ticks",
        params={"start": "2005-01-01T00:00:00Z", "end": "2005-01-02T00:00:00Z"},
        headers=reader.headers,
    )
    exported = response.json()["ticks"]
    result = await apply_retention(
        platform.db, retention_days=30, instruments=[a], archive_dir=tmp_path, today=date(2005, 3, 1)
    )
    assert "ticks_p20050101" in result.dropped
    assert await stored_ticks(platform, a) == []
    archive = tmp_path / "ticks_p20050101.parquet"
    assert archive in result.archived

    # The archive holds what /ticks returned: prices and quantities in instrument units (0.003, 1.5 here).
    def numbers(row: dict[str, Any]) -> tuple[Any, ...]:
        prices = tuple(None if row[k] is None else Decimal(row[k]) for k in ("bid", "ask", "last"))
        sizes = tuple(Decimal(row[k] or 0) for k in ("bid_size", "ask_size", "volume"))
        return prices + sizes

    archived = pq.read_table(archive).to_pylist()
    assert [numbers(row) for row in archived] == [numbers(row) for row in exported]
    assert (archived[0]["bid_size"], archived[0]["ask_size"]) == (Decimal("0.003"), Decimal("1.5"))
    # ... and replays into the rows it was archived from
    fresh = await pipeline_factory([a])
    await fresh.run_feed(ReplayFeed(archive, fresh.validator, fresh.lot_sizes), validated=True)
    await fresh.flush()
    assert fresh.stats.dropped == {}
    assert await stored_ticks(platform, a) == before


# ------------------------------------------------------------------------------------------- worker


async def test_the_worker_runs_a_simulated_feed_until_stopped(platform: Platform) -> None:
    a = await list_instrument(platform)
    stop = asyncio.Event()
    task = asyncio.create_task(run_marketdata(platform, stop, simulate_rate=200, bus_feed=False, engine_trades=False))
    try:
        await until(lambda: platform.cache.client.exists(f"market_data:{a.symbol}"))
    finally:
        stop.set()
        pipeline = await task
    assert pipeline.stats.stored > 0
    assert pipeline.stats.stored == pipeline.stats.rows_read  # a simulated market has no bad ticks
    async with platform.db.connection("test") as conn:
        assert await conn.fetchval("SELECT count(*) FROM ticks WHERE instrument_id = $1", a.instrument_id) > 0


# ------------------------------------------------------------------------------------------- CLI

MD_CLI = [
    sys.executable,
    "-c",
    "from tradeplane.entrypoints.cli_md import md_app; md_app(prog_name='tradeplane md')",
]


def run_md(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("TRADEPLANE_") or k.startswith("TRADEPLANE_TEST")}
    base["COLUMNS"] = "200"
    return subprocess.run([*MD_CLI, *args], env={**base, **env}, capture_output=True, text=True, timeout=300)


@pytest.fixture
async def md_env(database_url: str, redis_url: str) -> dict[str, str]:
    conn = await asyncpg.connect(database_url)
    try:
        await demo.load_reference_data(conn)
    finally:
        await conn.close()
    return {"TRADEPLANE_DATABASE_URL": database_url, "TRADEPLANE_REDIS_URL": redis_url}


async def test_cli_replay_reports_rows_read_stored_and_dropped(md_env: dict[str, str], tmp_path: Path) -> None:
    path = tmp_path / "ticks.csv"
    lines = ["ts,symbol,bid,ask,bid_size,ask_size,last,volume"]
    lines += [f"2024-03-05T12:00:{s:02d}Z,AAPL,190.00,190.02,3,4,190.01,5" for s in range(50)]
    lines += ["2024-03-05T12:01:00Z,NOPE,1,2,1,1,,", "2024-03-05T12:01:00Z,AAPL,190.05,190.02,1,1,,", "garbage"]
    path.write_text("\n".join(lines) + "\n")
    result = await asyncio.to_thread(run_md, "replay", str(path), env=md_env)
    assert result.returncode == 0, result.stderr
    cells = [[c.strip() for c in line.strip().strip("│").split("│")] for line in result.stdout.splitlines()]
    summary = {row[0]: row[1] for row in cells if len(row) == 2}
    assert summary["rows read"] == "53"
    assert summary["stored"] == "50"
    assert summary["dropped"] == "3"
    assert (summary["unknown_symbol"], summary["crossed_quote"], summary["malformed_row"]) == ("1", "1", "1")
    conn = await asyncpg.connect(md_env["TRADEPLANE_DATABASE_URL"])
    try:
        assert await conn.fetchval("SELECT count(*) FROM ticks") == 50
        assert await conn.fetchval("SELECT tick_count FROM candles WHERE timeframe = 'D1'") == 50
    finally:
        await conn.close()


async def test_cli_simulate_stores_rate_times_duration(md_env: dict[str, str]) -> None:
    result = await asyncio.to_thread(
        run_md, "simulate", "--rate", "400", "--duration", "1.5", "--seed", "3", env=md_env
    )
    assert result.returncode == 0, result.stderr
    assert re.search(r"stored\s+│\s+600\b", result.stdout), result.stdout
    conn = await asyncpg.connect(md_env["TRADEPLANE_DATABASE_URL"])
    try:
        assert await conn.fetchval("SELECT count(*) FROM ticks") == 600
    finally:
        await conn.close()
