"""Ticks from external publishers on the bus subject ``md.ticks.<symbol>`` (JetStream ``MD_TICKS`` or the
RabbitMQ ``market_data`` exchange).

Message format: UTF-8 JSON, one tick object or an array of them::

    {"ts": "2024-03-05T12:00:00.123456789Z" | 1709640000123456789, "symbol": "BTC-USD",
     "bid": "65000.00", "ask": "65000.50", "bid_size": "0.5", "ask_size": "1.2",
     "last": "65000.25", "volume": "0.01"}

Prices are decimals (strings, read as a tick file's fields are, or JSON numbers read exactly as decimals) on
the instrument's tick grid; sizes and volume are quantities in the instrument's units, whole multiples of its
lot size. Absent or null fields are an absent side (prices) or 0 (quantities). Every row goes through the
``TickValidator``; a message that is not JSON, or a row that is not an object, is one ``malformed_row`` drop.
Nothing raises.

Trade prints: a row with ``last`` and a ``volume`` above 0 is a trade on the publisher's venue. Batches are
``external_prints``, so once stored those trades are also announced on the public ``trades`` channel
(``tp:trades:<symbol>``, the engine trades' envelope with ``"source": "external"``, see ``services.ingest``).

Delivery: a batch's messages are acked by ``on_stored`` after the ticks are committed, so a crash
redelivers them. Ticks have no key, so the feed itself keeps a redelivered message from being stored twice
when it is given ``committed_offset`` (the worker does on NATS): each batch carries a ``ConsumerOffset``, the
highest stream sequence in it, which the pipeline writes in the transaction that commits the batch's ticks.
A delivery at or below the higher of that stored offset and the highest sequence already handed to the
pipeline (``FeedPosition``, kept across restarts of the feed in one process) is already stored or on its
way: it is not parsed again, only acked after the batch it arrived in commits (so after its original).

That rule needs stream sequences that grow in delivery order, each message delivered to this one consumer:
JetStream's stream sequence, with the durable consumer restarted after the stored offset whenever the feed
starts (``subscribe(start_after=...)``), read by one market data worker (like one engine per shard).
RabbitMQ's sequences come from each publisher's clock, so there the feed stays at least once; ``msg_id``
de-duplication at publish time (JetStream's ``Nats-Msg-Id``) covers a publisher's own retries.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from tradeplane.adapters.bus import MD_TICKS_ALL, Delivery, MessageBus
from tradeplane.adapters.feeds import ConsumerOffset, FeedBatch
from tradeplane.adapters.feeds.replay import MalformedValue, decimal_text, parse_ts_ns, to_lots
from tradeplane.domain.ticks import DropReason, Tick, TickValidator


@dataclass(slots=True)
class SettledBatch(FeedBatch):
    """A feed batch whose source messages are settled by ``on_stored`` once the ticks are committed."""

    on_stored: Callable[[], Awaitable[None]] | None = None
    offset: ConsumerOffset | None = None


@dataclass(slots=True)
class FeedPosition:
    """The highest stream sequence a bus feed handed to the pipeline (stored, or queued to be): shared by the
    successive feeds the worker starts after failures, since the pipeline outlives them."""

    through: int = 0


def _price(value: object) -> Decimal | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise MalformedValue(f"not a price: {value!r}")
    if isinstance(value, Decimal | int):
        return Decimal(value)
    if isinstance(value, str):
        return decimal_text(value)  # what a tick file's field may hold: no ``1_000``, ASCII digits only
    raise MalformedValue(f"not a price: {value!r}")


def parse_tick_message(data: bytes, validator: TickValidator, lot_sizes: Mapping[str, Decimal], out: list[Tick]) -> int:
    """Append the accepted ticks of one bus message to ``out``; returns the rows it held (drops included)."""
    try:
        payload = json.loads(data, parse_float=Decimal)
    except (ValueError, UnicodeDecodeError):
        validator.reject(DropReason.MALFORMED_ROW, data[:200])
        return 1
    rows = payload if isinstance(payload, list) else [payload]
    for row in rows:
        tick = parse_tick_object(row, validator, lot_sizes)
        if tick is not None:
            out.append(tick)
    return len(rows)


def parse_tick_object(row: Any, validator: TickValidator, lot_sizes: Mapping[str, Decimal]) -> Tick | None:
    if not isinstance(row, dict):
        validator.reject(DropReason.MALFORMED_ROW, row)
        return None
    symbol = row.get("symbol")
    if not isinstance(symbol, str) or not symbol:
        validator.reject(DropReason.MALFORMED_ROW, row)
        return None
    lot_size = lot_sizes.get(symbol)
    if lot_size is None:
        validator.reject(DropReason.UNKNOWN_SYMBOL, row)
        return None
    try:
        if "ts" not in row:
            raise MalformedValue("no ts")
        result = validator.normalize(
            parse_ts_ns(row["ts"]),
            symbol,
            _price(row.get("bid")),
            _price(row.get("ask")),
            to_lots(row.get("bid_size"), lot_size),
            to_lots(row.get("ask_size"), lot_size),
            _price(row.get("last")),
            to_lots(row.get("volume"), lot_size),
        )
    except (MalformedValue, InvalidOperation):
        validator.reject(DropReason.MALFORMED_ROW, row)
        return None
    return result if isinstance(result, Tick) else None


class BusTickFeed:
    """Consumes ``md.ticks.>`` with a durable consumer and yields ``SettledBatch``es of accepted ticks.

    Iteration runs until cancelled. An empty fetch yields nothing. Deliveries are acked after their
    batch's ticks are committed (``on_stored``); if the consumer stops first they are redelivered.
    """

    def __init__(
        self,
        bus: MessageBus,
        validator: TickValidator,
        lot_sizes: Mapping[str, Decimal],
        *,
        durable: str = "marketdata",
        batch: int = 500,
        fetch_timeout: float = 0.5,
        committed_offset: Callable[[str], Awaitable[int]] | None = None,
        position: FeedPosition | None = None,
    ) -> None:
        """``committed_offset(consumer)``: the stored ConsumerOffset (``MarketDataPipeline.committed_offset``);
        without it redelivered messages are stored again (see the module docstring)."""
        self.bus = bus
        self.validator = validator
        self.lot_sizes = dict(lot_sizes)
        self.durable = durable
        self.batch = batch
        self.fetch_timeout = fetch_timeout
        self.committed_offset = committed_offset
        self.position = position if position is not None else FeedPosition()
        self.consumer = f"marketdata.bus.{durable}"
        self.rows_read = 0
        self.duplicates = 0

    async def __aiter__(self) -> AsyncIterator[SettledBatch]:
        deduplicate = self.committed_offset is not None
        if self.committed_offset is None:
            subscription = await self.bus.subscribe(MD_TICKS_ALL, self.durable)
        else:
            stored = await self.committed_offset(self.consumer)
            self.position.through = max(self.position.through, stored)
            # Everything after the stored offset again, in stream order: a crashed worker's unacked messages
            # cannot come back behind later ones, which the sequence rule below would take for duplicates.
            subscription = await self.bus.subscribe(MD_TICKS_ALL, self.durable, start_after=stored)
        try:
            while True:
                deliveries = await subscription.fetch(self.batch, self.fetch_timeout)
                if not deliveries:
                    continue
                ticks: list[Tick] = []
                through = self.position.through
                newest = 0
                for delivery in deliveries:
                    sequence = delivery.sequence
                    if deduplicate and sequence > 0:
                        if sequence <= through:
                            self.duplicates += 1
                            continue
                        through = newest = sequence  # also skips a second copy within this fetch
                    self.rows_read += parse_tick_message(delivery.data, self.validator, self.lot_sizes, ticks)
                offset = ConsumerOffset(self.consumer, newest) if newest else None
                yield SettledBatch(
                    ticks, self.rows_read, external_prints=True, on_stored=_acker(deliveries), offset=offset
                )
                # Resumed only once the pipeline has queued the batch: now it counts as handed over.
                self.position.through = max(self.position.through, newest)
        finally:
            await subscription.close()


def _acker(deliveries: list[Delivery]) -> Callable[[], Awaitable[None]]:
    async def ack() -> None:
        for delivery in deliveries:
            await delivery.ack()

    return ack
