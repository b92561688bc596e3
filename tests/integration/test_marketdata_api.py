"""Market data REST over real PostgreSQL and Redis: quote (cache, then stored ticks), ticks with cursor
pagination, candles with fill=previous, spreads; 404 for an unknown symbol, 422 for a bad timeframe, and
the readonly role may read."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY

from tests.integration.conftest import Actor
from tests.integration.test_ingest import T0, list_instrument, reader  # noqa: F401 - the reader fixture
from tradeplane.adapters.db.marketdata import ListedInstrument
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
    assert (stored.json()["bid"], stored.json()["last"]) == ("9.95", None)  # the newest tick, as stored


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
