"""Redis: hot caches with the seed TTLs, rate counters and pub/sub fan-out.

redis-py reconnects on the next command after a lost connection, so health returns by itself.
"""

from __future__ import annotations

import time
import uuid
from typing import cast
from urllib.parse import urlsplit

import redis.asyncio as aioredis
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
        if value is None:
            self._misses += 1
        else:
            self._hits += 1
        CACHE_HIT_RATIO.set(self._hits / (self._hits + self._misses))
        return value

    async def set_cached(self, key: str, value: bytes, ttl: int) -> None:
        try:
            await self.client.set(key, value, ex=ttl)
        except REDIS_ERRORS as exc:
            raise InfrastructureUnavailable(f"Redis unavailable: {exc}") from exc
