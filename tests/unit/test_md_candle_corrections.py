"""On the TimescaleDB path a commit reads back from the continuous aggregates the candles it publishes: besides
the bucket of each symbol's newest trade, every bucket already published that the commit's trades reach (the
last trades of a finished minute, a late tick), so subscribers get that candle's corrected state as on the
native path (tests/integration/test_md_candle_stream.py)."""

from __future__ import annotations

from tests.unit.test_ingest_publish import BTC, ns, pipeline
from tradeplane.adapters.db.marketdata import CandleBucket
from tradeplane.domain.candles import Timeframe
from tradeplane.domain.ticks import NS_PER_SECOND, Tick
from tradeplane.services.ingest import candle_buckets

SECOND = NS_PER_SECOND


def test_a_published_bucket_the_commit_reaches_is_read_back_with_the_newest() -> None:
    md = pipeline()
    md.candles_enabled, md.candles_from_aggregates = False, True  # what start() decides on a hypertable
    sent = ns(2024, 3, 5, 22, 59)
    md._sent_candles[(Timeframe.M1.value, BTC.symbol)] = {sent}  # published by an earlier commit
    newest = ns(2024, 3, 5, 23, 0, 1)
    late, _ = md._encode_chunk(
        [
            Tick(newest, BTC.symbol, None, None, 0, 0, 100, 1),
            Tick(newest - 3 * SECOND, BTC.symbol, None, None, 0, 0, 90, 1),  # 22:59:58, late: the sent minute
        ]
    )
    assert md._touched_buckets([late]) == [
        *candle_buckets({BTC.instrument_id: newest}),
        CandleBucket(BTC.instrument_id, Timeframe.M1, sent, sent + Timeframe.M1.width_ns),
    ]
    on_time, _ = md._encode_chunk([Tick(newest + SECOND, BTC.symbol, None, None, 0, 0, 101, 1)])
    assert md._touched_buckets([on_time]) == candle_buckets({BTC.instrument_id: newest + SECOND})
