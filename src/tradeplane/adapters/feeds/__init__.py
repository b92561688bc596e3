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
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from tradeplane.domain.ticks import Tick


@dataclass(slots=True)
class FeedBatch:
    """Ticks from one read of a feed, and the running count of source rows read so far."""

    ticks: list[Tick] = field(default_factory=list)
    rows_read: int = 0


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


__all__ = ["ConsumerOffset", "FeedBatch", "TickFeed"]
