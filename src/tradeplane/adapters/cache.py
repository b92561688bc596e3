"""Redis: hot caches with the seed TTLs, rate counters and pub/sub fan-out.

redis-py reconnects on the next command after a lost connection, so health returns by itself.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import cast
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tradeplane.errors import InfrastructureUnavailable
from tradeplane.metrics import CACHE_HIT_RATIO

REDIS_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)

# Seed 000 / 002 key patterns and their time to live, in seconds.
TTL_SESSION = 24 * 3600
TTL_MARKET_DATA = 5
TTL_ORDER_BOOK = 30
TTL_POSITIONS = 30
TTL_HOLDINGS = 30

# Read-through caches that writers invalidate (order_book:, positions:) carry a generation counter next to the
# value, ``<key>:gen``: every invalidation bumps it, and a reader fills the cache only if the generation is the one
# it saw before reading PostgreSQL. Without it a read that started before a commit and finished after the
# writer's delete would put the old rows back for the whole TTL. It outlives any value and any read that fills one.
GENERATION_TTL = 300

# KEYS: the value, its generation; ARGV: the value, the generation the reader saw ('' for none), the TTL
_FILL_IF_UNCHANGED = """
if (redis.call('GET', KEYS[2]) or '') == ARGV[2] then
    redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
    return 1
end
return 0
"""


def generation_key(key: str) -> str:
    return f"{key}:gen"


# KEYS: the values to drop; ARGV: the generations' TTL, then, optionally, a channel to publish an empty message on
# once they are dropped. One command for any number of keys. In a pipeline it goes as EVAL, not EVALSHA: redis-py
# checks a pipeline's scripts with an extra round trip; Redis caches the compiled text by its hash.
_INVALIDATE = """
for _, key in ipairs(KEYS) do
    redis.call('DEL', key)
    local generation = key .. ':gen'  -- generation_key
    redis.call('INCR', generation)
    redis.call('EXPIRE', generation, ARGV[1])
end
if ARGV[2] then
    redis.call('PUBLISH', ARGV[2], '')
end
return #KEYS
"""


def invalidate(pipe: Pipeline, *keys: str) -> None:
    """Queue on ``pipe`` the invalidation of read-through ``keys`` after a commit that changed what they hold:
    drop the values and bump their generations, so a read already under way does not fill them with the old."""
    if keys:
        pipe.eval(_INVALIDATE, len(keys), *keys, GENERATION_TTL)


class Cache:
    def __init__(self, url: str, *, timeout: float = 2.0) -> None:
        self.url = url
        self.client: aioredis.Redis = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            health_check_interval=10,
            retry_on_timeout=False,
        )
        self._hits = 0
        self._misses = 0
        self._fill_if_unchanged = self.client.register_script(_FILL_IF_UNCHANGED)
        self._invalidate = self.client.register_script(_INVALIDATE)

    def _where(self) -> str:
        parts = urlsplit(self.url)
        return f"{parts.hostname}:{parts.port or 6379}"

    async def connect(self) -> None:
        try:
            await self.client.ping()
        except REDIS_ERRORS as exc:
            raise InfrastructureUnavailable(
                f"Redis at {self._where()} is unreachable ({exc}); "
                "check TRADEPLANE_REDIS_URL and that the server is running"
            ) from None

    async def close(self) -> None:
        await self.client.aclose()

    async def ping(self) -> float:
        started = time.perf_counter()
        try:
            await self.client.ping()
        except REDIS_ERRORS as exc:
            raise InfrastructureUnavailable(f"Redis unavailable: {exc}") from exc
        return time.perf_counter() - started

    async def roundtrip_test(self) -> None:
        key = f"system:check:{uuid.uuid4().hex}"
        try:
            await self.client.set(key, "probe", ex=10)
            value = await self.client.get(key)
            await self.client.delete(key)
        except REDIS_ERRORS as exc:
            raise InfrastructureUnavailable(f"Redis unavailable: {exc}") from exc
        if value != b"probe":
            raise InfrastructureUnavailable(f"Redis returned {value!r} for the written probe")

    async def get_cached(self, key: str) -> bytes | None:
        """A read that counts toward cache_hit_ratio."""
        try:
            value = cast(bytes | None, await self.client.get(key))
        except REDIS_ERRORS as exc:
            raise InfrastructureUnavailable(f"Redis unavailable: {exc}") from exc
        self._count(value is not None)
        return value

    def _count(self, hit: bool) -> None:
        if hit:
            self._hits += 1
        else:
            self._misses += 1
        CACHE_HIT_RATIO.set(self._hits / (self._hits + self._misses))

    async def read_through(self, key: str) -> tuple[bytes | None, bytes]:
        """A read of an invalidated cache (counts toward cache_hit_ratio): its value, or None, and its generation,
        to hand to ``fill`` after reading the source. One round trip."""
        try:
            replies = cast(list[bytes | None], await self.client.mget(key, generation_key(key)))
        except REDIS_ERRORS as exc:
            raise InfrastructureUnavailable(f"Redis unavailable: {exc}") from exc
        value, generation = replies
        self._count(value is not None)
        return value, generation or b""

    async def invalidate_and_publish(self, keys: Sequence[str], channel: str) -> None:
        """``invalidate`` of ``keys``, then an empty message on ``channel``, in one command (EVALSHA): a redis-py
        pipeline of the two costs the client more CPU than one command. Raises redis-py's errors."""
        await self._invalidate(keys=keys, args=[GENERATION_TTL, channel])

    async def fill(self, key: str, value: bytes, ttl: int, generation: bytes) -> bool:
        """Cache ``value`` unless the key was invalidated since ``read_through`` returned ``generation`` (then the
        value may predate the change: the next read goes to the source). Whether it was stored."""
        try:
            stored = await self._fill_if_unchanged(keys=[key, generation_key(key)], args=[value, generation, ttl])
        except REDIS_ERRORS as exc:
            raise InfrastructureUnavailable(f"Redis unavailable: {exc}") from exc
        return bool(stored)
