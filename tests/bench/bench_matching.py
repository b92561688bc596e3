"""Matching engine benchmark: a mixed add / cancel / marketable flow on a book about 1,000 orders deep.

Run: ``.venv/bin/python tests/bench/bench_matching.py [--ops N] [--seed S] [--depth D] [--record FILE]``

The flow is drawn from a seeded RNG, so every run offers the engine the same commands: 60% passive limit
adds (GTC, one of 100 accounts, within 50 ticks of the touch), 30% cancels of a random resting order, 10%
marketable orders (half IOC limits through the touch, half market orders) big enough to take a few orders.
To keep the book near the target depth an add becomes a cancel above 120% of it and a cancel an add below
80%; the actual mix is printed.

Each operation is one ``MatchingEngine.process(command)`` call timed with ``time.perf_counter_ns``; building
the command and tracking which orders rest (to pick cancels) happen outside the timed call. Figures: ops/s
over the summed engine time, ops/s over wall-clock time (generation included), and per-op percentiles.
The last line is a one-line JSON summary. This is a benchmark, not a test: nothing here asserts on time.

``--record FILE`` also pickles every command the engine was given, book building first, as a list: the same
stream can then be replayed under a tool that counts instructions (``valgrind --tool=callgrind``), which
load on the machine does not change.
"""

from __future__ import annotations

import argparse
import gc
import json
import pickle
import platform
import random
import sys
import time

from tradeplane.domain.matching import Cancel, Fill, MatchingEngine, NewOrder, OrderCanceled
from tradeplane.domain.orders import OrderType, Side, TimeInForce

SYMBOL = "BENCH"
MID = 100_000  # ticks
LEVELS_PER_SIDE = 50
ACCOUNTS = 100


class LiveOrders:
    """The ids of resting orders, with O(1) random pick and removal (swap with the last)."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.index: dict[int, int] = {}

    def add(self, order_id: int) -> None:
        self.index[order_id] = len(self.ids)
        self.ids.append(order_id)

    def discard(self, order_id: int) -> None:
        i = self.index.pop(order_id, None)
        if i is None:
            return
        last = self.ids.pop()
        if last != order_id:
            self.ids[i] = last
            self.index[last] = i

    def __len__(self) -> int:
        return len(self.ids)


def percentile(sorted_ns: list[int], q: float) -> int:
    return sorted_ns[min(len(sorted_ns) - 1, int(q * len(sorted_ns)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=20240601)
    parser.add_argument("--depth", type=int, default=1_000, help="target resting orders")
    parser.add_argument("--record", metavar="FILE", help="pickle the command stream (book building first) here")
    args = parser.parse_args()

    rng = random.Random(args.seed)
    engine = MatchingEngine([SYMBOL])
    book = engine.book(SYMBOL)
    live = LiveOrders()
    seq = 0
    next_id = 1
    recorded: list[NewOrder | Cancel] = []

    def track(events: list[object]) -> None:
        for ev in events:
            if type(ev) is Fill:
                if ev.maker_leaves_qty == 0:
                    live.discard(ev.maker_order_id)
            elif type(ev) is OrderCanceled:
                live.discard(ev.order_id)

    # Build the book: `depth` orders spread evenly over LEVELS_PER_SIDE levels on each side of MID.
    for i in range(args.depth):
        seq += 1
        side = Side.BUY if i % 2 == 0 else Side.SELL
        offset = 1 + (i // 2) % LEVELS_PER_SIDE
        price = MID - offset if side is Side.BUY else MID + offset
        new = NewOrder(
            seq=seq,
            ts_ns=seq,
            symbol=SYMBOL,
            order_id=next_id,
            account_id=rng.randrange(ACCOUNTS),
            side=side,
            order_type=OrderType.LIMIT,
            qty=rng.randint(1, 10),
            price=price,
        )
        engine.process(new)
        if args.record:
            recorded.append(new)
        live.add(next_id)
        next_id += 1

    gc.collect()
    low, high = args.depth * 8 // 10, args.depth * 12 // 10
    mix = {"add": 0, "cancel": 0, "marketable": 0}
    fills = 0
    latencies = [0] * args.ops
    process = engine.process
    perf = time.perf_counter_ns
    wall_start = perf()
    for n in range(args.ops):
        seq += 1
        r = rng.random()
        kind = "add" if r < 0.6 else ("cancel" if r < 0.9 else "marketable")
        if kind == "add" and len(live) > high:
            kind = "cancel"
        elif kind == "cancel" and (len(live) < low or not live.ids):
            kind = "add"
        mix[kind] += 1
        cmd: NewOrder | Cancel
        if kind == "cancel":
            order_id = live.ids[rng.randrange(len(live))]
            cmd = Cancel(seq=seq, ts_ns=seq, symbol=SYMBOL, order_id=order_id)
        else:
            side = Side.BUY if rng.random() < 0.5 else Side.SELL
            best_bid, best_ask = book.best_bid, book.best_ask
            if kind == "add":
                if side is Side.BUY:
                    price = (best_ask if best_ask is not None else MID + 1) - rng.randint(1, LEVELS_PER_SIDE)
                else:
                    price = (best_bid if best_bid is not None else MID - 1) + rng.randint(1, LEVELS_PER_SIDE)
                cmd = NewOrder(
                    seq=seq,
                    ts_ns=seq,
                    symbol=SYMBOL,
                    order_id=next_id,
                    account_id=rng.randrange(ACCOUNTS),
                    side=side,
                    order_type=OrderType.LIMIT,
                    qty=rng.randint(1, 10),
                    price=price,
                )
            elif rng.random() < 0.5:
                touch = best_ask if side is Side.BUY else best_bid
                through = rng.randint(0, 3)
                price = (touch + through if side is Side.BUY else touch - through) if touch is not None else MID
                cmd = NewOrder(
                    seq=seq,
                    ts_ns=seq,
                    symbol=SYMBOL,
                    order_id=next_id,
                    account_id=rng.randrange(ACCOUNTS),
                    side=side,
                    order_type=OrderType.LIMIT,
                    qty=rng.randint(5, 30),
                    price=price,
                    time_in_force=TimeInForce.IOC,
                )
            else:
                cmd = NewOrder(
                    seq=seq,
                    ts_ns=seq,
                    symbol=SYMBOL,
                    order_id=next_id,
                    account_id=rng.randrange(ACCOUNTS),
                    side=side,
                    order_type=OrderType.MARKET,
                    qty=rng.randint(5, 30),
                )
            next_id += 1
        t0 = perf()
        events = process(cmd)
        latencies[n] = perf() - t0
        if args.record:
            recorded.append(cmd)
        if kind == "add" and cmd.order_id in book:
            live.add(cmd.order_id)
        for ev in events:
            if type(ev) is Fill:
                fills += 1
        track(events)  # type: ignore[arg-type]
    wall_ns = perf() - wall_start
    if args.record:
        with open(args.record, "wb") as f:
            pickle.dump(recorded, f, protocol=pickle.HIGHEST_PROTOCOL)

    engine_ns = sum(latencies)
    latencies.sort()
    p50, p99, p999 = (percentile(latencies, q) for q in (0.50, 0.99, 0.999))
    bids, asks = book.depth()
    summary = {
        "bench": "matching",
        "ops": args.ops,
        "seed": args.seed,
        "mix": mix,
        "fills": fills,
        "final_resting_orders": len(book),
        "final_levels": [len(bids), len(asks)],
        "engine_ops_per_s": round(args.ops / (engine_ns / 1e9)),
        "wall_ops_per_s": round(args.ops / (wall_ns / 1e9)),
        "p50_us": p50 / 1000,
        "p99_us": p99 / 1000,
        "p999_us": p999 / 1000,
        "max_us": latencies[-1] / 1000,
        "python": sys.version.split()[0],
        "machine": platform.machine(),
    }
    print(f"ops                {args.ops:,} (mix {mix}), fills {fills:,}")
    print(f"book at end        {len(book):,} resting orders, {len(bids)} bid / {len(asks)} ask levels")
    print(f"engine throughput  {summary['engine_ops_per_s']:,} ops/s (sum of per-op engine time)")
    print(f"wall throughput    {summary['wall_ops_per_s']:,} ops/s (command generation included)")
    print(f"latency per op     p50 {p50 / 1000:.2f} us  p99 {p99 / 1000:.2f} us  p99.9 {p999 / 1000:.2f} us")
    print(json.dumps(summary, separators=(",", ":")))


if __name__ == "__main__":
    main()
