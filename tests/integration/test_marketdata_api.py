"""Market data REST over real PostgreSQL and Redis: quote (cache, then stored ticks), ticks with cursor
pagination, candles with fill=previous, spreads; 404 for an unknown symbol, 422 for a bad timeframe, and
the readonly role may read; ticks exported from ``/ticks`` replay (CSV and Parquet) into the same rows."""

from __future__ import annotations

import base64
import csv
from collections.abc import AsyncIterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from prometheus_client import REGISTRY

from tests.conftest import create_database, drop_database, with_database
from tests.integration.conftest import Actor
from tests.integration.test_ingest import (  # noqa: F401 - the reader fixture
    T0,
    list_instrument,
    list_instrument_in,
    reader,
)
from tradeplane.adapters.db.marketdata import ListedInstrument
from tradeplane.adapters.feeds.replay import COLUMNS, ReplayFeed
from tradeplane.adapters.postgres import Database
from tradeplane.bootstrap import Platform
from tradeplane.domain.ticks import NS_PER_SECOND, Tick
from tradeplane.entrypoints.api.marketdata import CandleSeries
from tradeplane.services.ingest import MarketDataPipeline

SECOND = NS_PER_SECOND
MINUTE = 60 * SECOND


@pytest.fixture
async def listed(platform: Platform) -> ListedInstrument:
    return await list_instrument(platform)


async def ingest(platform: Platform, instrument: ListedInstrument, ticks: list[Tick]) -> None:
    pipeline = MarketDataPipeline(platform.db, [instrument], cache=platform.cache, commit_interval_s=0.02)
    async with pipeline:
        await pipeline.submit(ticks)
        await pipeline.flush()


@pytest.fixture
async def gappy(platform: Platform, listed: ListedInstrument) -> AsyncIterator[ListedInstrument]:
    """Trades in minutes 0, 1 and 4 after T0 (none in 2 and 3), a quote at minute 5."""
    ticks = [
        Tick(T0 + 5 * SECOND, listed.symbol, 999, 1001, 1, 1, 1000, 2),
        Tick(T0 + 50 * SECOND, listed.symbol, 1009, 1011, 1, 1, 1010, 1),
        Tick(T0 + MINUTE + 1 * SECOND, listed.symbol, 1019, 1021, 1, 1, 1020, 3),
        Tick(T0 + 4 * MINUTE, listed.symbol, 989, 991, 1, 1, 990, 4),
        Tick(T0 + 5 * MINUTE, listed.symbol, 995, 997, 2, 3, None, 0),
    ]
    await ingest(platform, listed, ticks)
    yield listed


def params(**extra: str) -> dict[str, str]:
    return {"start": "2024-03-05T22:30:00Z", "end": "2024-03-05T22:40:00Z", **extra}


async def test_unknown_symbol_is_404(client: httpx.AsyncClient, reader: Actor) -> None:  # noqa: F811
    for path in ("quote", "ticks", "candles", "spreads"):
        response = await client.get(f"/api/v1/marketdata/NOPE-USD/{path}", headers=reader.headers)
        assert response.status_code == 404, path
        assert response.json()["error"] == "unknown_symbol"


async def test_bad_timeframe_and_fill_are_422(
    client: httpx.AsyncClient,
    reader: Actor,  # noqa: F811
    listed: ListedInstrument,
) -> None:
    url = f"/api/v1/marketdata/{listed.symbol}/candles"
    assert (await client.get(url, params={"timeframe": "M2"}, headers=reader.headers)).status_code == 422
    assert (await client.get(url, params={"fill": "zero"}, headers=reader.headers)).status_code == 422
    naive = await client.get(url, params={"start": "2024-03-05T00:00:00"}, headers=reader.headers)
    assert naive.status_code == 422


async def test_reading_needs_a_key(client: httpx.AsyncClient, listed: ListedInstrument) -> None:
    assert (await client.get(f"/api/v1/marketdata/{listed.symbol}/quote")).status_code == 401


async def test_quote_comes_from_redis_then_from_stored_ticks(
    client: httpx.AsyncClient,
    reader: Actor,  # noqa: F811
    platform: Platform,
    gappy: ListedInstrument,
) -> None:
    def ratio() -> float:
        return REGISTRY.get_sample_value("cache_hit_ratio") or 0.0

    url = f"/api/v1/marketdata/{gappy.symbol}/quote"
    live = await client.get(url, headers=reader.headers)
    assert live.status_code == 200
    assert live.json() == {
        "symbol": gappy.symbol,
        "ts": "2024-03-05T22:35:00Z",
        "bid": "9.95",
        "ask": "9.97",
        "bid_size": "0.002",
        "ask_size": "0.003",
        "last": "9.9",
        "source": "cache",
    }
    assert ratio() > 0
    await platform.cache.client.delete(f"market_data:{gappy.symbol}")  # as after its 5 s TTL
    stored = await client.get(url, headers=reader.headers)
    assert stored.status_code == 200
    assert stored.json()["source"] == "ticks"
    # the same quote as the cache held: the newest quote, and the last trade price before it
    assert stored.json() == {**live.json(), "source": "ticks"}


async def test_a_stored_quote_is_not_hidden_by_a_newer_trade_only_tick(
    client: httpx.AsyncClient,
    reader: Actor,  # noqa: F811
    platform: Platform,
    gappy: ListedInstrument,
) -> None:
    await ingest(platform, gappy, [Tick(T0 + 6 * MINUTE, gappy.symbol, None, None, 0, 0, 1002, 1)])
    await platform.cache.client.delete(f"market_data:{gappy.symbol}")
    stored = await client.get(f"/api/v1/marketdata/{gappy.symbol}/quote", headers=reader.headers)
    assert stored.status_code == 200
    assert stored.json() == {
        "symbol": gappy.symbol,
        "ts": "2024-03-05T22:36:00Z",
        "bid": "9.95",
        "ask": "9.97",
        "bid_size": "0.002",
        "ask_size": "0.003",
        "last": "10.02",
        "source": "ticks",
    }


async def test_tick_pages_return_every_tick_once_even_with_equal_timestamps(
    client: httpx.AsyncClient,
    reader: Actor,  # noqa: F811
    platform: Platform,
    listed: ListedInstrument,
) -> None:
    # 7 ticks at each of 5 instants: page boundaries fall inside runs of equal timestamps
    ticks = [Tick(T0 + (i // 7) * SECOND, listed.symbol, 100 + i, 200, 1, 1, None, 0) for i in range(35)]
    await ingest(platform, listed, ticks)
    seen: list[dict[str, Any]] = []
    cursor = None
    pages = 0
    while True:
        query = params(limit="4", **({"cursor": cursor} if cursor else {}))
        response = await client.get(f"/api/v1/marketdata/{listed.symbol}/ticks", params=query, headers=reader.headers)
        assert response.status_code == 200, response.text
        body = response.json()
        seen += body["ticks"]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert pages == 9
    assert sorted(Decimal(t["bid"]) for t in seen) == [Decimal(100 + i) / 100 for i in range(35)]
    assert [t["ts"] for t in seen] == sorted(t["ts"] for t in seen)
    bad = await client.get(f"/api/v1/marketdata/{listed.symbol}/ticks", params={"cursor": "!!"}, headers=reader.headers)
    assert bad.status_code == 422


@pytest.mark.parametrize(
    "raw",
    [
        b"99999999999999999999:0",  # well-formed, but far beyond any datetime
        b"-99999999999999999999:0",
        f"{T0 // 1000}:{2**63}".encode(),  # a skip no bigint holds
    ],
)
async def test_a_well_formed_cursor_out_of_range_is_refused_not_a_server_error(
    client: httpx.AsyncClient,
    reader: Actor,  # noqa: F811
    listed: ListedInstrument,
    raw: bytes,
) -> None:
    cursor = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    response = await client.get(
        f"/api/v1/marketdata/{listed.symbol}/ticks", params=params(cursor=cursor), headers=reader.headers
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "invalid_cursor"


async def test_candles_leave_gaps_unless_fill_previous(
    client: httpx.AsyncClient,
    reader: Actor,  # noqa: F811
    gappy: ListedInstrument,
) -> None:
    url = f"/api/v1/marketdata/{gappy.symbol}/candles"

    def shape(body: dict[str, Any]) -> list[tuple[str, str, str, str, str, str, int]]:
        return [
            (c["bucket"][11:16], c["open"], c["high"], c["low"], c["close"], c["volume"], c["tick_count"])
            for c in body["candles"]
        ]

    plain = await client.get(url, params=params(timeframe="M1"), headers=reader.headers)
    assert plain.headers["content-type"] == "application/json"
    # built without pydantic on the hot path: the body must still be exactly the documented model
    assert CandleSeries.model_validate(plain.json()).model_dump(mode="json") == plain.json()
    assert shape(plain.json()) == [
        ("22:30", "10", "10.1", "10", "10.1", "0.003", 2),
        ("22:31", "10.2", "10.2", "10.2", "10.2", "0.003", 1),
        ("22:34", "9.9", "9.9", "9.9", "9.9", "0.004", 1),
    ]
    filled = await client.get(url, params=params(timeframe="M1", fill="previous"), headers=reader.headers)
    assert shape(filled.json()) == [
        ("22:30", "10", "10.1", "10", "10.1", "0.003", 2),
        ("22:31", "10.2", "10.2", "10.2", "10.2", "0.003", 1),
        ("22:32", "10.2", "10.2", "10.2", "10.2", "0", 0),
        ("22:33", "10.2", "10.2", "10.2", "10.2", "0", 0),
        ("22:34", "9.9", "9.9", "9.9", "9.9", "0.004", 1),
        *((f"22:{m}", "9.9", "9.9", "9.9", "9.9", "0", 0) for m in range(35, 40)),
    ]
    # a range starting in a gap is carried from the candle before it; nothing before the first candle
    late = await client.get(
        url,
        params={"timeframe": "M1", "fill": "previous", "start": "2024-03-05T22:32:00Z", "end": "2024-03-05T22:35:00Z"},
        headers=reader.headers,
    )
    assert [c[0] for c in shape(late.json())] == ["22:32", "22:33", "22:34"]
    early = await client.get(
        url,
        params={"timeframe": "M5", "fill": "previous", "start": "2024-03-05T22:00:00Z", "end": "2024-03-05T22:40:00Z"},
        headers=reader.headers,
    )
    assert shape(early.json()) == [
        ("22:30", "10", "10.2", "9.9", "9.9", "0.01", 4),
        ("22:35", "9.9", "9.9", "9.9", "9.9", "0", 0),
    ]


async def test_spreads_are_listed(
    client: httpx.AsyncClient,
    reader: Actor,  # noqa: F811
    gappy: ListedInstrument,
) -> None:
    response = await client.get(f"/api/v1/marketdata/{gappy.symbol}/spreads", params=params(), headers=reader.headers)
    assert response.status_code == 200
    assert [(s["ts"], s["spread"]) for s in response.json()["spreads"]] == [
        ("2024-03-05T22:30:05Z", "0.02"),
        ("2024-03-05T22:30:50Z", "0.02"),
        ("2024-03-05T22:31:01Z", "0.02"),
        ("2024-03-05T22:34:00Z", "0.02"),
        ("2024-03-05T22:35:00Z", "0.02"),
    ]


# ------------------------------------------------------------------------------- export and replay


async def export_ticks(client: httpx.AsyncClient, actor: Actor, symbol: str) -> list[dict[str, Any]]:
    """Every tick of ``symbol`` in 2024-03-05/06 through ``/ticks``, page by page."""
    out: list[dict[str, Any]] = []
    query = {"start": "2024-03-05T00:00:00Z", "end": "2024-03-07T00:00:00Z", "limit": "7"}
    while True:
        response = await client.get(f"/api/v1/marketdata/{symbol}/ticks", params=query, headers=actor.headers)
        assert response.status_code == 200, response.text
        body = response.json()
        out += body["ticks"]
        if body["next_cursor"] is None:
            return out
        query["cursor"] = body["next_cursor"]


def write_export(path: Path, symbol: str, exported: list[dict[str, Any]]) -> None:
    """The ``/ticks`` rows as a replay file, values as the API gave them (CSV: the strings; Parquet: decimals)."""
    if path.suffix == ".csv":
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(COLUMNS)
            for tick in exported:
                writer.writerow([tick["ts"], symbol, *("" if tick[k] is None else tick[k] for k in COLUMNS[2:])])
        return

    def decimals(name: str) -> pa.Array:
        return pa.array([None if t[name] is None else Decimal(t[name]) for t in exported], type=pa.decimal128(38, 18))

    times = [datetime.fromisoformat(t["ts"]) for t in exported]
    table = pa.table(
        {
            "ts": pa.array(times, type=pa.timestamp("us", tz="UTC")),
            "symbol": [symbol] * len(exported),
            **{name: decimals(name) for name in COLUMNS[2:]},
        }
    )
    pq.write_table(table, path)


@pytest.fixture
async def fresh_db(pg_server_url: str, migrated_template: str) -> AsyncIterator[Database]:
    """A second database built by the migrations, beside the platform's: where an export is replayed."""
    name = await create_database(pg_server_url, template=migrated_template)
    db = Database(with_database(pg_server_url, name), min_size=1, max_size=4)
    await db.connect()
    yield db
    await db.close()
    await drop_database(pg_server_url, name)


async def tick_rows(db: Database, symbol: str) -> list[tuple[Any, ...]]:
    async with db.connection("test.ticks") as conn:
        rows = await conn.fetch(
            "SELECT t.ts, t.bid, t.ask, t.bid_size, t.ask_size, t.last, t.volume FROM ticks t"
            " JOIN instruments i ON i.id = t.instrument_id WHERE i.symbol = $1 ORDER BY t.ts",
            symbol,
        )
    return [tuple(row) for row in rows]


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
async def test_ticks_exported_from_the_api_replay_into_the_same_rows(
    platform: Platform,
    client: httpx.AsyncClient,
    reader: Actor,  # noqa: F811
    fresh_db: Database,
    tmp_path: Path,
    suffix: str,
) -> None:
    """Quantities are instrument units everywhere: what ``/ticks`` returns replays as it was (lot size 0.001)."""
    listed = await list_instrument(platform, tick="0.01", lot="0.001")
    ticks = [
        Tick(T0 + 1_001, listed.symbol, 10_000, 10_002, 1, 1_500, 10_001, 3),  # 0.001, 1.5, 0.003 units
        Tick(T0 + SECOND + 7_000, listed.symbol, 10_001, None, 250, 0, None, 0),  # no ask, no trade
        Tick(T0 + 2 * SECOND, listed.symbol, None, None, 0, 0, 9_990, 1_000_000),  # a trade of 1,000 units
        Tick(T0 + MINUTE + 5, listed.symbol, None, 10_004, 0, 7, None, 0),  # no bid
        *(
            Tick(T0 + 2 * MINUTE + i * SECOND, listed.symbol, 10_000 + i, 10_030, i, 2 * i, 10_005, i)
            for i in range(20)
        ),
    ]
    await ingest(platform, listed, ticks)
    exported = await export_ticks(client, reader, listed.symbol)
    assert len(exported) == len(ticks)
    assert (exported[0]["bid_size"], exported[0]["ask_size"], exported[0]["volume"]) == ("0.001", "1.5", "0.003")
    path = tmp_path / f"export{suffix}"
    write_export(path, listed.symbol, exported)

    replica = await list_instrument_in(fresh_db, listed.symbol, "0.01", "0.001")
    async with MarketDataPipeline(fresh_db, [replica], commit_interval_s=0.02) as pipeline:
        await pipeline.run_feed(ReplayFeed(path, pipeline.validator, pipeline.lot_sizes), validated=True)
        await pipeline.flush()
    assert pipeline.stats.dropped == {}
    assert await tick_rows(fresh_db, listed.symbol) == await tick_rows(platform.db, listed.symbol)
