"""A listed symbol that cannot be an InfluxDB tag (ending in a backslash, holding a line break) costs only its
own points in the optional InfluxDB sink: market data for every symbol, that one included, is still ingested,
and without a sink configured such a symbol is no concern at all."""

from __future__ import annotations

from decimal import Decimal

from tradeplane.adapters.db.marketdata import ListedInstrument
from tradeplane.adapters.influxdb import InfluxSink
from tradeplane.adapters.postgres import Database
from tradeplane.domain.ticks import Tick
from tradeplane.services.ingest import MarketDataPipeline

PLAIN = ListedInstrument(1, "BRK B,US", Decimal("0.01"), Decimal("1"))  # space and comma: escaped
ODD = ListedInstrument(2, "ODD\\", Decimal("0.01"), Decimal("1"))  # a trailing backslash: no tag can hold it


def nowhere() -> Database:
    return Database("postgresql://nowhere/unused")  # never connected


def test_an_untaggable_symbol_does_not_stop_the_pipeline_being_built() -> None:
    MarketDataPipeline(nowhere(), [PLAIN, ODD])


async def test_only_the_untaggable_symbols_ticks_stay_out_of_the_influx_buffer() -> None:
    sink = InfluxSink("http://127.0.0.1:9")  # not started: points stay buffered
    try:
        md = MarketDataPipeline(nowhere(), [PLAIN, ODD], influx=sink)
        chunk, _ = md._encode_chunk([Tick(1, PLAIN.symbol, 100, 101, 1, 1), Tick(2, ODD.symbol, 100, 101, 1, 1)])
        md._write_influx([chunk])
        assert sink.pending == 1
    finally:
        await sink.close(drain_timeout_s=0)
