"""The composition root: builds the platform's adapters and services from Settings, and nothing else does."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from tradeplane.adapters.bus import MessageBus, create_bus
from tradeplane.adapters.cache import Cache
from tradeplane.adapters.influxdb import InfluxSink
from tradeplane.adapters.postgres import Database
from tradeplane.config import Settings
from tradeplane.services.identity import ApiKeyAuthenticator

log = logging.getLogger("tradeplane.bootstrap")


@dataclass
class Platform:
    """Connected adapters shared by every entrypoint of one process."""

    settings: Settings
    db: Database
    cache: Cache
    bus: MessageBus
    authenticator: ApiKeyAuthenticator
    #: The optional InfluxDB sink (seed 002), present when TRADEPLANE_INFLUXDB_URL is set. It never fails
    #: start-up: InfluxDB may come later, and until then its points wait in a bounded buffer.
    influx: InfluxSink | None = None
    _started: bool = field(default=False, init=False)

    async def start(self) -> None:
        """Connect to every server; the first unreachable one raises InfrastructureUnavailable."""
        if self._started:
            return
        await self.db.connect()
        try:
            await self.cache.connect()
            await self.bus.connect()
        except BaseException:
            await self.db.close()
            raise
        if self.influx is not None:
            await self.influx.start()
        self._started = True
        log.info("connected to PostgreSQL, Redis and the %s bus", self.bus.kind)

    async def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        closing = [self.bus.close(), self.cache.close(), self.db.close()]
        if self.influx is not None:
            closing.append(self.influx.close())
        await asyncio.gather(*closing, return_exceptions=True)


def build_platform(settings: Settings) -> Platform:
    database_url, redis_url, bus_url = settings.require_urls()
    return Platform(
        settings=settings,
        db=Database(
            database_url,
            min_size=settings.db_pool_min,
            max_size=settings.db_pool_max,
            timeout=settings.connect_timeout_s,
        ),
        cache=Cache(redis_url, timeout=settings.connect_timeout_s),
        bus=create_bus(bus_url, namespace=settings.bus_namespace),
        authenticator=ApiKeyAuthenticator(settings.secret_key.get_secret_value()),
        influx=(
            InfluxSink(settings.influxdb_url, settings.influxdb_database, timeout_s=settings.connect_timeout_s)
            if settings.influxdb_url
            else None
        ),
    )
