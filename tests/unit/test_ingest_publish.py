"""What the market data pipeline publishes, without servers: the candle buckets a commit reads back on the
TimescaleDB path, and the public ``trades`` envelope of an external venue's print."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from tradeplane.adapters.db.marketdata import CandleBucket, ListedInstrument, datetime_to_ns
from tradeplane.adapters.postgres import Database
from tradeplane.domain.candles import Timeframe
from tradeplane.domain.orders import Side
from tradeplane.domain.ticks import Tick
from tradeplane.services.ingest import MarketDataPipeline, candle_buckets
from tradeplane.services.settlement import TradeRecord

# As loaded from the instruments table: NUMERIC(38, 18), trailing zeros and all.
BTC = ListedInstrument(7, "BTC-USD", Decimal("0.010000000000000000"), Decimal("0.001000000000000000"))
ETH = ListedInstrument(9, "ETH-USD", Decimal("0.05"), Decimal("1"))


def ns(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> int:
    return datetime_to_ns(datetime(year, month, day, hour, minute, second, tzinfo=UTC))


def pipeline() -> MarketDataPipeline:
    return MarketDataPipeline(Database("postgresql://nowhere/unused"), [BTC, ETH])  # never connected


def test_candle_buckets_are_the_buckets_of_the_newest_trade_in_every_timeframe() -> None:
    ts = ns(2024, 3, 5, 22, 47, 31) + 500_000_000
    assert candle_buckets({7: ts}) == [
        CandleBucket(7, Timeframe.M1, ns(2024, 3, 5, 22, 47), ns(2024, 3, 5, 22, 48)),
        CandleBucket(7, Timeframe.M5, ns(2024, 3, 5, 22, 45), ns(2024, 3, 5, 22, 50)),
        CandleBucket(7, Timeframe.M15, ns(2024, 3, 5, 22, 45), ns(2024, 3, 5, 23, 0)),
        CandleBucket(7, Timeframe.H1, ns(2024, 3, 5, 22, 0), ns(2024, 3, 5, 23, 0)),
        CandleBucket(7, Timeframe.H4, ns(2024, 3, 5, 20, 0), ns(2024, 3, 6, 0, 0)),
        CandleBucket(7, Timeframe.D1, ns(2024, 3, 5, 0, 0), ns(2024, 3, 6, 0, 0)),
    ]


def test_on_timescaledb_a_commit_reads_back_the_bucket_of_each_symbols_newest_trade() -> None:
    md = pipeline()
    md.candles_enabled, md.candles_from_aggregates = False, True  # what start() decides on a hypertable
    t = ns(2024, 3, 5, 22, 59, 58)
    first, _ = md._encode_chunk(
        [
            Tick(t, "BTC-USD", 100, 101, 1, 1, 100, 1),
            Tick(t + 3_000_000_000, "BTC-USD", 100, 101, 1, 1, None, 0),  # a later quote is not a trade
            Tick(t, "ETH-USD", 100, 101, 1, 1, None, 0),  # ETH: quotes only, no candle changes
        ]
    )
    second, _ = md._encode_chunk([Tick(t - 1_000_000_000, "BTC-USD", None, None, 0, 0, 99, 1)])  # late trade
    assert md._touched_buckets([first, second]) == candle_buckets({7: t})


def test_an_external_print_is_the_engine_trade_envelope_marked_external() -> None:
    ts = ns(2024, 3, 5, 22, 30, 0) + 123_456_789
    envelope = pipeline().print_envelope(0, ts, 10_050, 1_250)
    engine = TradeRecord(
        "BTC-USD-1-0",
        "BTC-USD",
        Decimal("100.50"),
        Decimal("1.250"),
        Side.BUY,
        datetime(2024, 3, 5, 22, 30, 0, 123_456, tzinfo=UTC),
    ).to_public()
    assert (envelope["channel"], envelope["symbol"]) == ("trades", "BTC-USD")
    assert envelope["data"] == {**engine, "trade_id": None, "aggressor_side": None, "source": "external"}
    assert envelope["data"]["price"] == "100.50" and envelope["data"]["qty"] == "1.250"
