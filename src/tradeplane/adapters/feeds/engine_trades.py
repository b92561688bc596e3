"""The matching engine's own trades as market data: Redis pub/sub ``tp:trades:<symbol>``.

The engine publishes each trade after its batch commits, as ``{"channel": "trades", "symbol": ...,
"data": {"trade_id", "price", "qty", "aggressor_side", "ts"}}`` with decimals as strings and ``ts`` ISO 8601
UTC. A trade becomes a trade-only tick: ``last = price`` and ``volume = qty`` (in lots), no bid or ask, so
it updates candles, the last price and ``price:{symbol}`` but not the quote's sides.

Pub/sub is at most once: a trade published while this feed is disconnected is not seen here (the trades
table stays the record of it).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from decimal import Decimal

import redis.asyncio as aioredis

from tradeplane.adapters.feeds import FeedBatch
from tradeplane.adapters.feeds.bus import _price, to_lots
from tradeplane.adapters.feeds.replay import MalformedValue, parse_ts_ns
from tradeplane.domain.ticks import DropReason, Tick, TickValidator

TRADES_PATTERN = "tp:trades:*"


def trade_to_tick(payload: bytes, validator: TickValidator, lot_sizes: Mapping[str, Decimal]) -> Tick | None:
    """The accepted tick of one trade message, or None (the drop is counted by the validator)."""
    try:
        envelope = json.loads(payload)
        data = envelope["data"]
        symbol = envelope.get("symbol") or data.get("symbol")
        if not isinstance(symbol, str):
            raise MalformedValue("no symbol")
        lot_size = lot_sizes.get(symbol)
        if lot_size is None:
            validator.reject(DropReason.UNKNOWN_SYMBOL, envelope)
            return None
        result = validator.normalize(
            parse_ts_ns(data["ts"]),
            symbol,
            None,
            None,
            0,
            0,
            _price(data["price"]),
            to_lots(data["qty"], lot_size),
        )
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        validator.reject(DropReason.MALFORMED_ROW, payload[:200])
        return None
    return result if isinstance(result, Tick) else None


class EngineTradesFeed:
    """Subscribes ``tp:trades:*`` and yields batches of trade ticks (at most ``batch`` or every
    ``max_wait_s``). Iteration runs until cancelled; the subscription is closed on the way out."""

    def __init__(
        self,
        client: aioredis.Redis,
        validator: TickValidator,
        lot_sizes: Mapping[str, Decimal],
        *,
        batch: int = 1000,
        max_wait_s: float = 0.05,
    ) -> None:
        self.client = client
        self.validator = validator
        self.lot_sizes = dict(lot_sizes)
        self.batch = batch
        self.max_wait_s = max_wait_s
        self.rows_read = 0
        self.subscribed = asyncio.Event()

    async def __aiter__(self) -> AsyncIterator[FeedBatch]:
        pubsub = self.client.pubsub()
        await pubsub.psubscribe(TRADES_PATTERN)
        # Wait for Redis's confirmation, so a trade published once `subscribed` is set is never missed.
        while True:
            message = await pubsub.get_message(timeout=1.0)
            if message is not None and message.get("type") == "psubscribe":
                break
        self.subscribed.set()
        loop = asyncio.get_running_loop()
        try:
            while True:
                ticks: list[Tick] = []
                deadline = loop.time() + self.max_wait_s
                read = 0
                while read < self.batch:
                    timeout = deadline - loop.time()
                    if timeout <= 0:
                        break
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=timeout)
                    if message is None or message.get("type") != "pmessage":
                        continue
                    read += 1
                    tick = trade_to_tick(message["data"], self.validator, self.lot_sizes)
                    if tick is not None:
                        ticks.append(tick)
                if read:
                    self.rows_read += read
                    yield FeedBatch(ticks, self.rows_read)
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]
