"""Throughput of the per-tick market data path: validator, candle aggregator, and both together.

Run:  .venv/bin/python tests/bench/bench_candles.py [--ticks N] [--symbols S] [--batch B] [--repeat R]

Ticks are pre-built by the seeded simulated feed (1 ms apart per feed, trades on every tick unless
--trade-percent says otherwise) so only the measured path is timed. Each figure is the best of --repeat runs
on a fresh aggregator/validator; drains happen once per batch, as the ingester does per COPY batch. Prints one
line per measurement and a final one-line JSON summary. Not a test: no assertions on the numbers.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from decimal import Decimal

from tradeplane.adapters.feeds.simulated import SimulatedFeed, SimulatedInstrument
from tradeplane.domain.candles import CandleAggregator
from tradeplane.domain.ticks import NS_PER_SECOND, InstrumentGrid, Tick, TickValidator

T0 = 1_709_596_800_000_000_000  # 2024-03-05T00:00:00Z
TOLERANCE_NS = 5 * NS_PER_SECOND


def build(ticks: int, symbols: int, trade_percent: int) -> tuple[list[InstrumentGrid], list[Tick]]:
    specs = [InstrumentGrid.of(f"SYM{i:03d}", "0.01") for i in range(symbols)]
    instruments = [SimulatedInstrument(spec, Decimal("100.00"), trade_percent=trade_percent) for spec in specs]
    return specs, SimulatedFeed(instruments, seed=20240305, start_ns=T0).next_ticks(ticks)


def batches_of(ticks: list[Tick], size: int) -> list[list[Tick]]:
    return [ticks[i : i + size] for i in range(0, len(ticks), size)]


def best_of(repeat: int, run: Callable[[], int]) -> tuple[float, int]:
    """Best wall time over ``repeat`` runs, and the work count the run reports (checked to be stable)."""
    best = float("inf")
    work = -1
    for _ in range(repeat):
        started = time.perf_counter()
        done = run()
        elapsed = time.perf_counter() - started
        best = min(best, elapsed)
        work = done
    return best, work


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--ticks", type=int, default=1_000_000)
    parser.add_argument("--symbols", type=int, default=20)
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--trade-percent", type=int, default=100)
    args = parser.parse_args(argv)

    built = time.perf_counter()
    specs, ticks = build(args.ticks, args.symbols, args.trade_percent)
    generate_s = time.perf_counter() - built
    batches = batches_of(ticks, args.batch)
    n = len(ticks)

    def aggregate() -> int:
        aggregator = CandleAggregator(max_out_of_order_ns=TOLERANCE_NS)
        candles = 0
        for batch in batches:
            aggregator.add_batch(batch)
            candles += len(aggregator.drain_changed())
        return candles

    def validate() -> int:
        validator = TickValidator(specs, max_out_of_order_ns=TOLERANCE_NS)
        accepted = 0
        for batch in batches:
            accepted += len(validator.accept_batch(batch))
        return accepted

    def validate_and_aggregate() -> int:
        validator = TickValidator(specs, max_out_of_order_ns=TOLERANCE_NS)
        aggregator = CandleAggregator(max_out_of_order_ns=TOLERANCE_NS)
        candles = 0
        for batch in batches:
            aggregator.add_batch(validator.accept_batch(batch))
            candles += len(aggregator.drain_changed())
        return candles

    aggregate_s, candles_out = best_of(args.repeat, aggregate)
    validate_s, accepted = best_of(args.repeat, validate)
    both_s, _ = best_of(args.repeat, validate_and_aggregate)

    figures = {
        "bench": "candles",
        "ticks": n,
        "symbols": args.symbols,
        "batch": args.batch,
        "trade_percent": args.trade_percent,
        "simulated_feed_ticks_per_s": round(n / generate_s),
        "aggregator_ticks_per_s": round(n / aggregate_s),
        "validator_ticks_per_s": round(n / validate_s),
        "validator_plus_aggregator_ticks_per_s": round(n / both_s),
        "candles_upserted": candles_out,
        "accepted": accepted,
        "python": platform.python_version(),
    }
    print(f"ticks: {n:,} over {args.symbols} symbols, batches of {args.batch:,}, best of {args.repeat}")
    print(f"simulated feed generation      {figures['simulated_feed_ticks_per_s']:>12,} ticks/s")
    print(f"candle aggregator (M1..D1)     {figures['aggregator_ticks_per_s']:>12,} ticks/s")
    print(f"tick validator                 {figures['validator_ticks_per_s']:>12,} ticks/s")
    print(f"validator + aggregator         {figures['validator_plus_aggregator_ticks_per_s']:>12,} ticks/s")
    print(f"candle upserts per run         {candles_out:>12,}")
    print(json.dumps(figures, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
