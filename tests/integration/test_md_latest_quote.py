"""The latest quote in Redis (``market_data:{symbol}``, ``price:{symbol}``) is the newest one by tick time,
whatever the batching: a tick that arrives late (inside the out-of-order tolerance) never replaces a newer
one, and one-sided updates fold in arrival order, in one submitted batch as in separate ones."""

from __future__ import annotations

from typing import Any

import orjson

from tests.integration.test_ingest import T0, list_instrument, pipeline_factory  # noqa: F401 - fixture
from tradeplane.bootstrap import Platform
from tradeplane.domain.ticks import NS_PER_SECOND, Tick

SECOND = NS_PER_SECOND


async def latest(platform: Platform, symbol: str) -> tuple[dict[str, Any], bytes | None]:
    raw = await platform.cache.client.get(f"market_data:{symbol}")
    assert raw is not None
    return orjson.loads(raw), await platform.cache.client.get(f"price:{symbol}")


async def test_a_late_tick_in_the_same_batch_does_not_replace_the_newer_quote_or_price(
    platform: Platform,
    pipeline_factory: Any,  # noqa: F811
) -> None:
    for batched in (True, False):
        a = await list_instrument(platform)
        newer = Tick(T0 + 10 * SECOND, a.symbol, 10_000, 10_002, 5, 6, 10_001, 7)
        late = Tick(T0 + 8 * SECOND, a.symbol, 9_000, 9_002, 1, 1, 9_001, 1)  # 2 s late: accepted
        pipeline = await pipeline_factory([a])
        for batch in [[newer, late]] if batched else [[newer], [late]]:
            await pipeline.submit(batch)
            await pipeline.flush()
        assert pipeline.stats.stored == 2
        quote, price = await latest(platform, a.symbol)
        assert (quote["ts"], quote["bid"], quote["ask"], quote["last"], price) == (
            "2024-03-05T22:30:10Z",
            "100",
            "100.02",
            "100.01",
            b"100.01",
        ), f"batched={batched}"


async def test_one_sided_updates_fold_in_arrival_order_within_a_batch(
    platform: Platform,
    pipeline_factory: Any,  # noqa: F811
) -> None:
    for batched in (True, False):
        a = await list_instrument(platform)
        ticks = [
            Tick(T0, a.symbol, 10_000, 10_010, 1, 1, None, 0),
            Tick(T0 + SECOND, a.symbol, None, 10_005, 0, 2, None, 0),  # the ask moves
            Tick(T0 + 2 * SECOND, a.symbol, 10_001, None, 3, 0, None, 0),  # then the bid
        ]
        pipeline = await pipeline_factory([a])
        for batch in [ticks] if batched else [[t] for t in ticks]:
            await pipeline.submit(batch)
            await pipeline.flush()
        quote, _ = await latest(platform, a.symbol)
        assert (quote["ts"], quote["bid"], quote["bid_size"], quote["ask"], quote["ask_size"]) == (
            "2024-03-05T22:30:02Z",
            "100.01",
            "0.003",
            "100.05",
            "0.002",
        ), f"batched={batched}"
