"""One typed, frozen Settings object read from TRADEPLANE_* variables and validated at start.

With no URLs set, `tradeplane up` starts embedded servers under `data_dir` and fills the URLs in
(`Settings.with_urls`); with URLs set, the same code talks to external servers.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tradeplane.adapters.bus.base import check_namespace
from tradeplane.errors import ConfigError

PLACEHOLDER_SECRETS = frozenset({"", "changeme", "change-me", "secret", "development-only-secret"})
DEVELOPMENT_SECRET = "development-only-secret"


class Environment(StrEnum):
    DEVELOPMENT = "development"
    PRODUCTION = "production"


def _url_checker(*schemes: str) -> AfterValidator:
    def check(value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in schemes:
            raise ValueError(f"must start with {' or '.join(s + '://' for s in schemes)} (got {value!r})")
        if not parts.hostname and "host=" not in parts.query:
            raise ValueError(f"has no host (got {value!r})")
        try:
            parts.port  # noqa: B018 - raises ValueError on a malformed port
        except ValueError as exc:
            raise ValueError(f"has a malformed port (got {value!r})") from exc
        return value

    return AfterValidator(check)


PostgresUrl = Annotated[str | None, _url_checker("postgresql", "postgres")]
RedisUrl = Annotated[str | None, _url_checker("redis", "rediss")]
BusUrl = Annotated[str | None, _url_checker("nats", "amqp", "amqps")]
HttpUrl = Annotated[str | None, _url_checker("http", "https")]
# The bus adapters' own rule, so a bad value fails at start rather than at the first connect.
BusNamespace = Annotated[str, AfterValidator(check_namespace)]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TRADEPLANE_", frozen=True, extra="ignore")

    env: Environment = Environment.DEVELOPMENT
    database_url: PostgresUrl = None
    redis_url: RedisUrl = None
    bus_url: BusUrl = None
    #: Prefix on every bus stream, exchange and queue name, so several platforms can share one NATS or
    #: RabbitMQ server; empty means the plain names of seed 000 (`trading`, `order_placement`, ...).
    bus_namespace: BusNamespace = ""
    influxdb_url: HttpUrl = None
    influxdb_database: str = Field(default="market_data", min_length=1)
    data_dir: Path = Path(".tradeplane")
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8000, ge=1, le=65535)
    secret_key: SecretStr = SecretStr(DEVELOPMENT_SECRET)
    log_level: str = Field(default="INFO", pattern="^(DEBUG|INFO|WARNING|ERROR)$")
    engine_shards: int = Field(default=1, ge=1, le=64)
    db_pool_min: int = Field(default=2, ge=1)
    db_pool_max: int = Field(default=20, ge=1)
    connect_timeout_s: float = Field(default=5.0, gt=0)
    demo: bool = True
    md_retention_days: int = Field(default=30, ge=1)
    md_archive_dir: Path | None = None

    @model_validator(mode="after")
    def _refuse_placeholder_secret(self) -> Settings:
        if self.env is not Environment.DEVELOPMENT and self.secret_key.get_secret_value() in PLACEHOLDER_SECRETS:
            raise ValueError("TRADEPLANE_SECRET_KEY is a placeholder outside development; set it to a random value")
        if self.db_pool_min > self.db_pool_max:
            raise ValueError("db_pool_min exceeds db_pool_max")
        return self

    @property
    def embedded(self) -> bool:
        """True when at least one server must be started from the pip-installed packages."""
        return self.database_url is None or self.redis_url is None or self.bus_url is None

    @property
    def bus_kind(self) -> str:
        scheme = urlsplit(self.bus_url).scheme if self.bus_url else "nats"
        return "amqp" if scheme.startswith("amqp") else "nats"

    def with_urls(self, **urls: str) -> Settings:
        """A copy with server URLs filled in (by the embedded servers or the test session)."""
        return self.model_copy(update=urls)

    def require_urls(self) -> tuple[str, str, str]:
        if self.database_url is None or self.redis_url is None or self.bus_url is None:
            missing = [
                name
                for name, value in (
                    ("TRADEPLANE_DATABASE_URL", self.database_url),
                    ("TRADEPLANE_REDIS_URL", self.redis_url),
                    ("TRADEPLANE_BUS_URL", self.bus_url),
                )
                if value is None
            ]
            raise ConfigError(f"{', '.join(missing)} not set; set them or use `tradeplane up` for embedded servers")
        return self.database_url, self.redis_url, self.bus_url


def load_settings() -> Settings:
    """Read the environment; a bad value becomes one ConfigError line naming the setting."""
    try:
        return Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = first.get("loc") or ()
        message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
        if loc:
            message = f"TRADEPLANE_{str(loc[0]).upper()}: {message}"
        raise ConfigError(message) from None
