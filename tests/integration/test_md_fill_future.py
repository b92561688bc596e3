"""``fill=previous`` carries the last close into empty buckets that have begun, never into the future: a range
ending tomorrow gets no candles for minutes that have not happened yet."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import httpx

from tests.integration.conftest import Actor
from tests.integration.test_ingest import list_instrument, reader  # noqa: F401 - the reader fixture
from tests.integration.test_marketdata_api import ingest
from tradeplane.bootstrap import Platform
from tradeplane.domain.candles import Timeframe
from tradeplane.domain.ticks import NS_PER_SECOND, Tick


async def test_fill_previous_stops_at_the_bucket_in_progress(
    platform: Platform,
    client: httpx.AsyncClient,
    reader: Actor,  # noqa: F811
) -> None:
    listed = await list_instrument(platform)
    traded = time.time_ns() - 3 * 60 * NS_PER_SECOND
    await ingest(platform, listed, [Tick(traded, listed.symbol, 999, 1001, 1, 1, 1000, 2)])
    for timeframe in (Timeframe.M1, Timeframe.H1):
        start = datetime.fromtimestamp(timeframe.bucket_start(traded) // NS_PER_SECOND, UTC)
        response = await client.get(
            f"/api/v1/marketdata/{listed.symbol}/candles",
            params={
                "timeframe": timeframe.value,
                "fill": "previous",
                "start": start.isoformat(),
                "end": (start + timedelta(days=2)).isoformat(),
            },
            headers=reader.headers,
        )
        asked_at = datetime.now(UTC)
        assert response.status_code == 200, response.text
        buckets = [datetime.fromisoformat(c["bucket"]) for c in response.json()["candles"]]
        assert buckets, "the traded bucket at least"
        assert buckets[0] == start
        future = [b for b in buckets if b > asked_at]
        assert future == [], f"{timeframe}: {len(future)} candles for buckets that have not begun, from {future[0]}"
