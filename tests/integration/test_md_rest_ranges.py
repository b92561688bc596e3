"""Market data REST ranges at the edges of what a timestamp can be: every request that names a time is
answered with data or a 4xx carrying a machine-readable reason, never a 500; a filled candle page costs its
``limit``, not the width of its range."""

from __future__ import annotations

import tracemalloc

import httpx
import pytest

from tests.integration.conftest import Actor
from tests.integration.test_ingest import T0, list_instrument, reader  # noqa: F401 - the reader fixture
from tests.integration.test_marketdata_api import ingest
from tradeplane.bootstrap import Platform
from tradeplane.domain.ticks import NS_PER_SECOND, Tick

SECOND = NS_PER_SECOND

CASES = [
    ("ticks", {"end": "0001-01-01T12:00:00Z"}),
    ("spreads", {"end": "0001-01-01T12:00:00Z"}),
    ("candles", {"timeframe": "D1", "end": "0002-01-01T00:00:00Z"}),
    ("candles", {"timeframe": "M1", "end": "0001-01-01T00:10:00Z", "fill": "previous"}),
    ("ticks", {"start": "0001-01-01T00:00:00+01:00", "end": "2024-01-01T00:00:00Z"}),
    ("ticks", {"start": "2024-01-01T00:00:00Z", "end": "9999-12-31T23:00:00-05:00"}),
    ("candles", {"timeframe": "H4", "start": "0001-01-01T00:00:00+01:00", "end": "2024-01-01T00:00:00Z"}),
    ("candles", {"start": "2024-01-01T00:00:00Z", "end": "9999-12-31T23:59:59Z", "fill": "previous"}),
    # the extreme offsets put both instants outside what a datetime (and a timestamptz) holds once in UTC
    ("ticks", {"start": "0001-01-01T00:00:00+14:00", "end": "9999-12-31T23:00:00-14:00"}),
    ("spreads", {"start": "0001-01-01T00:00:00+14:00", "end": "9999-12-31T23:00:00-14:00"}),
    ("candles", {"start": "0001-01-01T00:00:00+14:00", "end": "9999-12-31T23:00:00-14:00", "fill": "previous"}),
    ("candles", {"timeframe": "D1", "start": "9999-12-31T23:00:00-14:00"}),  # after now: a reversed range
    ("ticks", {"start": "9999-12-31T23:00:00-14:00", "end": "0001-01-01T00:00:00+14:00"}),
]


@pytest.mark.parametrize(("path", "query"), CASES)
async def test_extreme_timestamps_are_answered_never_a_server_error(
    platform: Platform,
    client: httpx.AsyncClient,
    reader: Actor,  # noqa: F811
    path: str,
    query: dict[str, str],
) -> None:
    listed = await list_instrument(platform)
    response = await client.get(f"/api/v1/marketdata/{listed.symbol}/{path}", params=query, headers=reader.headers)
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert response.json()["error"] in ("invalid_range", "validation_error"), response.text


async def test_a_filled_page_costs_its_limit_not_the_width_of_the_range(
    platform: Platform,
    client: httpx.AsyncClient,
    reader: Actor,  # noqa: F811
) -> None:
    """``fill=previous`` over two years of M1 buckets with ``limit=5``: five candles, and the request never
    builds the million carried-forward candles of the range (peak memory of the request stays small)."""
    listed = await list_instrument(platform)
    await ingest(platform, listed, [Tick(T0 + SECOND, listed.symbol, 999, 1001, 1, 1, 1000, 2)])
    query = {"timeframe": "M1", "fill": "previous", "limit": "5"}
    query |= {"start": "2024-03-05T00:00:00Z", "end": "2026-03-05T00:00:00Z"}
    tracemalloc.start()
    try:
        response = await client.get(f"/api/v1/marketdata/{listed.symbol}/candles", params=query, headers=reader.headers)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert response.status_code == 200, response.text
    candles = response.json()["candles"]
    assert [(c["bucket"], c["close"], c["tick_count"]) for c in candles] == [
        ("2024-03-05T22:30:00Z", "10", 1),
        *((f"2024-03-05T22:3{m}:00Z", "10", 0) for m in range(1, 5)),
    ]
    assert peak < 20 * 2**20, f"the request peaked at {peak / 2**20:.0f} MiB"
