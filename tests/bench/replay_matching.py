"""Replay a command stream recorded by ``bench_matching.py --record FILE``: digests, or instructions per operation.

Run: ``.venv/bin/python tests/bench/replay_matching.py FILE [--skip N]``

Prints the SHA-256 of the events (their reprs, in order) and of the final book (resting orders, depth,
positions, last price, pending L2 changes): two versions of the engine that print the same digests for the same
stream produced byte-identical events. ``--skip`` (default 1,000, the bench's book building) commands are
applied first and left out of the count.

Instruction counts do not depend on the load on the machine, unlike wall-clock time. Under callgrind, every
``engine.process`` call runs inside ``map``'s C ``map_next`` and nothing else does, so collecting only there
counts the engine's own work (the events are freed outside it, as in the bench's timed call)::

    PYTHONHASHSEED=0 valgrind --tool=callgrind --collect-atstart=no --toggle-collect=map_next \\
        .venv/bin/python tests/bench/replay_matching.py FILE

and divide callgrind's "Collected" by the number of replayed operations printed. (This holds while the domain
code itself never calls ``map``.) This is a benchmark tool, not a test.
"""

from __future__ import annotations

import argparse
import hashlib
import pickle

from tradeplane.domain.matching import Cancel, MatchingEngine, NewOrder

SYMBOL = "BENCH"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stream", help="a file written by bench_matching.py --record")
    parser.add_argument("--skip", type=int, default=1_000, help="commands applied first and not counted")
    args = parser.parse_args()

    with open(args.stream, "rb") as f:
        commands: list[NewOrder | Cancel] = pickle.load(f)
    engine = MatchingEngine([SYMBOL])
    events = hashlib.sha256()
    count = 0
    for command in commands[: args.skip]:
        for event in engine.process(command):
            events.update(repr(event).encode() + b"\n")
            count += 1

    replayed = commands[args.skip :]
    for batch in map(engine.process, replayed):  # see the module docstring
        for event in batch:
            events.update(repr(event).encode() + b"\n")
        count += len(batch)

    book = engine.book(SYMBOL)
    final = (book.resting_orders(), book.depth(), book.positions(), book.last_price, book.take_level_changes())
    print(f"replayed {len(replayed):,} operations after {args.skip:,}; {count:,} events")
    print(f"events sha256 {events.hexdigest()}")
    print(f"book   sha256 {hashlib.sha256(repr(final).encode()).hexdigest()}")


if __name__ == "__main__":
    main()
