"""Feed adapters: sources of market data ticks, each an async iterator of ``FeedBatch``.

Contract shared by every feed:

- A batch holds ``Tick`` objects in integer price ticks, in the order the source produced them.
- ``rows_read`` is the running total of source rows consumed so far (including rows that were dropped), so a
  replay can report rows read, stored (ticks yielded and written) and dropped (``TickValidator.drops``).
- Feeds that parse external data (file replay) take the ``TickValidator``: they need its price scales to
  turn ``Decimal`` prices into ticks, and they yield only accepted ticks; every bad row is counted there with
  its ``DropReason`` instead of raising. The simulated feed produces integer ticks that are valid by
  construction; an ingester that wants one code path can still run them through
  ``TickValidator.accept_batch``.
- ``external_prints``: the batch's trades (``last`` with ``volume`` > 0) are prints from an external venue
  happening now, so once they are committed the pipeline announces them on the public ``trades`` channel
  (``tp:trades:<symbol>``, beside the engine's own trades; see ``services.ingest``). Only the bus feed sets
  it. A replay is history (announcing it would put old trades on a live channel), the simulated market's
  trades never happened, and the engine publishes its own trades itself before the engine trades feed
  stores them: none of those sets it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from tradeplane.domain.ticks import Tick

#: ``data.source`` of a ``trades`` envelope announcing an external venue's print (engine trades carry none).
EXTERNAL_SOURCE = "external"


@dataclass(slots=True)
class FeedBatch:
    """Ticks from one read of a feed, the running count of source rows read so far, and whether its trades
    are live external prints (see the module docstring)."""

    ticks: list[Tick] = field(default_factory=list)
    rows_read: int = 0
    external_prints: bool = False


@dataclass(frozen=True, slots=True)
class ConsumerOffset:
    """How far a feed's bus consumer got: every message up to ``sequence`` is in this batch or stored before it.

    The pipeline records it in the transaction that commits the batch's ticks, so after a crash the feed
    knows exactly which redelivered messages are already stored.
    """

    consumer: str
    sequence: int


class TickFeed(Protocol):
    """Anything that yields batches of ticks asynchronously."""

    def __aiter__(self) -> AsyncIterator[FeedBatch]: ...


__all__ = ["EXTERNAL_SOURCE", "ConsumerOffset", "FeedBatch", "TickFeed"]
