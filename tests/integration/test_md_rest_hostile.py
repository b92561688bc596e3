"""Market data REST under hostile input, over real PostgreSQL and Redis: a symbol no instrument can have, a
tampered page cursor, a cache entry that is not a quote, and Redis (and PostgreSQL) going away and coming back.
Each is answered with data or a 4xx/503 carrying a machine-readable reason, never a 500, at a cost bounded by the
page."""

from __future__ import annotations

import base64
import tracemalloc
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from urllib.parse import quote, urlsplit

import httpx
import pytest
from prometheus_client import REGISTRY

from tests.integration.conftest import Actor, make_actor
from tests.integration.tcp_proxy import TcpProxy, tcp_proxy
from tests.integration.test_ingest import T0, list_instrument, reader  # noqa: F401 - the reader fixture
from tests.integration.test_marketdata_api import ingest
from tradeplane.adapters.cache import Cache
from tradeplane.adapters.db.marketdata import ListedInstrument
from tradeplane.bootstrap import Platform, build_platform
from tradeplane.config import Settings
from tradeplane.domain.ticks import NS_PER_SECOND, Tick
from tradeplane.entrypoints.api.app import create_app
from tradeplane.services.identity import Role
from tradeplane.services.ingest import MarketDataPipeline

SECOND = NS_PER_SECOND
PATHS = ("quote", "ticks", "candles", "spreads")
RANGE = {"start": "2024-03-05T22:00:00Z", "end": "2024-03-05T23:00:00Z"}


@pytest.fixture
async def listed(platform: Platform) -> ListedInstrument:
    return await list_instrument(platform)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "symbol",
    [
        "BTC\x00-USD",  # PostgreSQL refuses NUL in text: it used to reach the query and fail there (500)
        "\x00",
        "BTC-USD\n",  # `$` of a plain re.match accepts a trailing newline
        "X" * 33,
        "btc usd",
    ],
    ids=["nul-inside", "nul", "trailing-newline", "too-long", "space"],
)
async def test_text_no_instrument_can_be_named_is_refused_with_a_reason(
    client: httpx.AsyncClient,
    reader: Actor,  # noqa: F811
    path: str,
    symbol: str,
) -> None:
    response = await client.get(f"/api/v1/marketdata/{quote(symbol, safe='')}/{path}", headers=reader.headers)
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "invalid_symbol"


@pytest.mark.parametrize("path", PATHS)
async def test_symbols_are_upper_case_and_a_lower_case_one_is_told_so(
    client: httpx.AsyncClient,
    reader: Actor,  # noqa: F811
    listed: ListedInstrument,
    path: str,
) -> None:
    response = await client.get(f"/api/v1/marketdata/{listed.symbol.lower()}/{path}", headers=reader.headers)
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "invalid_symbol"
    assert repr(listed.symbol) in response.json()["detail"]  # "did you mean 'T...-USD'?"


# ------------------------------------------------------------------------------------ tampered cursor


def cursor_at(ts_ns: int, skip: int) -> str:
    return base64.urlsafe_b64encode(f"{ts_ns // 1000}:{skip}".encode()).decode().rstrip("=")


async def test_a_tampered_cursor_skip_passes_over_only_the_rows_at_its_instant(
    platform: Platform,
    client: httpx.AsyncClient,
    reader: Actor,  # noqa: F811
    listed: ListedInstrument,
) -> None:
    """A skip of 2**62 (allowed: it is how many equal-timestamp rows a cursor passes over) used to make
    the server read every tick of the range and throw them away to return one; it now skips the rows at the
    cursor's instant and the page goes on after them, as the cursor means."""
    n = 30_000
    ticks = [Tick(T0 + i * 100_000, listed.symbol, 999, 1001, 1, 1, None, 0) for i in range(n)]  # 0.1 ms apart
    await ingest(platform, listed, ticks)
    url = f"/api/v1/marketdata/{listed.symbol}/ticks"
    query = {**RANGE, "limit": "2", "cursor": cursor_at(T0, 2**62)}
    tracemalloc.start()
    try:
        response = await client.get(url, params=query, headers=reader.headers)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert response.status_code == 200, response.text
    assert [t["ts"] for t in response.json()["ticks"]] == ["2024-03-05T22:30:00.000100Z", "2024-03-05T22:30:00.000200Z"]
    # reading the 30,000 rows of the range took ~20 MiB; two rows take a few hundred KiB
    assert peak < 4 * 2**20, f"the request peaked at {peak / 2**20:.1f} MiB"


async def test_pages_through_a_run_of_equal_timestamps_and_past_it(
    platform: Platform,
    client: httpx.AsyncClient,
    reader: Actor,  # noqa: F811
    listed: ListedInstrument,
) -> None:
    """Every tick once: 5 at one instant, then 3 later ones, read 2 at a time (cursors inside and at the end of
    the run)."""
    ticks = [Tick(T0, listed.symbol, 900 + i, 1001, 1, 1, None, 0) for i in range(5)]
    ticks += [Tick(T0 + (i + 1) * SECOND, listed.symbol, 950 + i, 1001, 1, 1, None, 0) for i in range(3)]
    await ingest(platform, listed, ticks)
    seen: list[str] = []
    query = {**RANGE, "limit": "2"}
    for _ in range(10):
        response = await client.get(f"/api/v1/marketdata/{listed.symbol}/ticks", params=query, headers=reader.headers)
        assert response.status_code == 200, response.text
        seen += [t["bid"] for t in response.json()["ticks"]]
        if response.json()["next_cursor"] is None:
            break
        query["cursor"] = response.json()["next_cursor"]
    assert sorted(seen) == sorted(str(Decimal(t.bid or 0) / 100) for t in ticks)


# ---------------------------------------------------------------------------------- cached quote


@pytest.mark.parametrize(
    "value",
    [
        b"not json",
        b"[1, 2]",
        b'"9.95"',
        b'{"symbol": "%s", "ts": "2024-03-05T22:30:01Z", "bid": 9.95, "ask": 10.05, "bid_size": "1", "ask_size": "1"}',
        b'{"symbol": "%s", "ts": "2024-03-05T22:30:01Z", "bid": "NaN", "ask": "x", "bid_size": "1", "ask_size": "1"}',
        b'{"symbol": "%s", "ts": "2024-03-05T22:30:01", "bid": "9.95", "ask": "9.97"}',  # no UTC offset
        b'{"symbol": "%s", "ts": "2024-03-05T22:30:01Z", "bid": null, "ask": null, "last": null}',
        b'{"price": "9.95"}',  # another writer's shape: no quote in it
    ],
    ids=["not-json", "a-list", "a-string", "float-prices", "not-decimals", "naive-ts", "no-price", "other-shape"],
)
async def test_a_cached_value_that_is_not_a_quote_is_passed_over_for_the_stored_one(
    platform: Platform,
    client: httpx.AsyncClient,
    reader: Actor,  # noqa: F811
    listed: ListedInstrument,
    value: bytes,
) -> None:
    """``market_data:{symbol}`` is a seed-named key other services may write: what is not a quote in the
    ingester's shape (exact decimal strings) is a cache miss, not a 500 nor a float price passed on."""
    await ingest(platform, listed, [Tick(T0, listed.symbol, 999, 1001, 2, 3, 1000, 4)])
    value = value.replace(b"%s", listed.symbol.encode())
    await platform.cache.client.set(f"market_data:{listed.symbol}", value, ex=60)
    response = await client.get(f"/api/v1/marketdata/{listed.symbol}/quote", headers=reader.headers)
    assert response.status_code == 200, response.text
    assert response.json() == {
        "symbol": listed.symbol,
        "ts": "2024-03-05T22:30:00Z",
        "bid": "9.99",
        "ask": "10.01",
        "bid_size": "0.002",
        "ask_size": "0.003",
        "last": "10",
        "source": "ticks",
    }


# ------------------------------------------------------------------------------------- exact values


async def test_every_endpoint_keeps_exact_decimals_as_strings(
    platform: Platform,
    client: httpx.AsyncClient,
    reader: Actor,  # noqa: F811
) -> None:
    """19 significant digits (a float keeps 15 to 17) and a whole number with trailing zeros."""
    fine = await list_instrument(platform, tick="0.00000001", lot="0.00000001")
    price, other = 1_234_567_890_123_456_789, 1_234_567_890_123_456_800  # 12345678901.23456789, ...23456800
    await ingest(platform, fine, [Tick(T0, fine.symbol, price, other, 10**10, 1, price, 100_000_000_000)])
    headers = reader.headers
    base = f"/api/v1/marketdata/{fine.symbol}"
    live = (await client.get(f"{base}/quote", headers=headers)).json()
    assert (live["bid"], live["ask"], live["bid_size"], live["ask_size"], live["last"]) == (
        "12345678901.23456789",
        "12345678901.234568",
        "100",
        "0.00000001",
        "12345678901.23456789",
    )
    await platform.cache.client.delete(f"market_data:{fine.symbol}")
    stored = (await client.get(f"{base}/quote", headers=headers)).json()
    assert {**stored, "source": "cache"} == live
    tick = (await client.get(f"{base}/ticks", params=RANGE, headers=headers)).json()["ticks"][0]
    assert (tick["bid"], tick["last"], tick["volume"]) == ("12345678901.23456789", "12345678901.23456789", "1000")
    candle = (await client.get(f"{base}/candles", params=RANGE, headers=headers)).json()["candles"][0]
    assert (candle["open"], candle["close"], candle["volume"]) == ("12345678901.23456789",) * 2 + ("1000",)
    spread = (await client.get(f"{base}/spreads", params=RANGE, headers=headers)).json()["spreads"][0]
    assert spread["spread"] == "0.00000011"


# -------------------------------------------------------------------------------------- Redis outage


@dataclass
class Outage:
    """A platform whose Redis and PostgreSQL connections pass through proxies the test can cut and refuse, and
    an ingester that writes to both directly (the servers stay up: only the api's path to them fails)."""

    platform: Platform
    http: httpx.AsyncClient
    redis: TcpProxy
    postgres: TcpProxy
    direct_cache: Cache

    async def ingest(self, instrument: ListedInstrument, ticks: list[Tick]) -> None:
        pipeline = MarketDataPipeline(self.platform.db, [instrument], cache=self.direct_cache, commit_interval_s=0.02)
        async with pipeline:
            await pipeline.submit(ticks)
            await pipeline.flush()

    def down(self, proxy: TcpProxy) -> None:
        proxy.accepting.clear()
        proxy.cut()


def _via(url: str, proxy: TcpProxy) -> str:
    parts = urlsplit(url)
    user = parts.netloc.rpartition("@")[0]
    return parts._replace(netloc=f"{user}@127.0.0.1:{proxy.port}" if user else f"127.0.0.1:{proxy.port}").geturl()


@pytest.fixture
async def outage(settings: Settings) -> AsyncIterator[Outage]:
    redis_at, postgres_at = urlsplit(settings.redis_url), urlsplit(settings.database_url)
    async with (
        tcp_proxy(redis_at.hostname or "127.0.0.1", redis_at.port or 6379) as redis,
        tcp_proxy(postgres_at.hostname or "127.0.0.1", postgres_at.port or 5432) as postgres,
    ):
        proxied = settings.model_copy(
            update={"redis_url": _via(settings.redis_url, redis), "database_url": _via(settings.database_url, postgres)}
        )
        platform = build_platform(proxied)
        await platform.start()
        direct_cache = Cache(settings.redis_url)
        try:
            transport = httpx.ASGITransport(app=create_app(platform))
            async with httpx.AsyncClient(transport=transport, base_url="http://tradeplane") as http:
                yield Outage(platform, http, redis, postgres, direct_cache)
        finally:
            redis.accepting.set()
            postgres.accepting.set()
            await direct_cache.close()
            await platform.stop()


def hit_ratio() -> float | None:
    return REGISTRY.get_sample_value("cache_hit_ratio")


async def test_with_redis_down_the_quote_comes_from_the_stored_ticks_and_from_redis_again_once_it_is_back(
    outage: Outage,
) -> None:
    """While Redis is gone the quote is the newest stored quote and trade (``source`` "ticks", ticks stored
    meanwhile included), ticks, candles and spreads keep answering, and the live quote is served again once
    Redis is back, without a restart. Reads that could not reach Redis are neither hits nor misses."""
    platform, http = outage.platform, outage.http
    listed = await list_instrument(platform)
    actor = await make_actor(platform, "md-reader", Role.READONLY)
    url = f"/api/v1/marketdata/{listed.symbol}/quote"

    async def quote() -> dict[str, object]:
        response = await http.get(url, headers=actor.headers)
        assert response.status_code == 200, response.text
        body: dict[str, object] = response.json()
        return body

    await outage.ingest(listed, [Tick(T0, listed.symbol, 999, 1001, 1, 1, 1000, 2)])
    live = await quote()
    assert live == {
        "symbol": listed.symbol,
        "ts": "2024-03-05T22:30:00Z",
        "bid": "9.99",
        "ask": "10.01",
        "bid_size": "0.001",
        "ask_size": "0.001",
        "last": "10",
        "source": "cache",
    }
    assert hit_ratio() == 1.0  # this platform's one read so far: a hit

    outage.down(outage.redis)
    assert await quote() == {**live, "source": "ticks"}
    await outage.ingest(listed, [Tick(T0 + SECOND, listed.symbol, 1009, 1011, 2, 3, 1010, 1)])
    newer = {
        "symbol": listed.symbol,
        "ts": "2024-03-05T22:30:01Z",
        "bid": "10.09",
        "ask": "10.11",
        "bid_size": "0.002",
        "ask_size": "0.003",
        "last": "10.1",
    }
    assert await quote() == {**newer, "source": "ticks"}
    assert hit_ratio() == 1.0  # not 1/3: the two reads that met the outage are not misses
    for path in ("ticks", "candles", "spreads"):
        response = await http.get(f"/api/v1/marketdata/{listed.symbol}/{path}", params=RANGE, headers=actor.headers)
        assert response.status_code == 200, (path, response.text)
    assert outage.redis.refused > 0  # the api did try Redis, and was turned away

    outage.redis.accepting.set()
    assert await quote() == {**newer, "source": "cache"}
    assert hit_ratio() == 1.0
    await outage.direct_cache.client.delete(f"market_data:{listed.symbol}")  # as after its 5 s TTL
    assert await quote() == {**newer, "source": "ticks"}
    assert hit_ratio() == pytest.approx(2 / 3)  # counting goes on: two hits, one miss


async def test_the_quote_is_503_only_when_neither_redis_nor_postgresql_can_say_it(outage: Outage) -> None:
    platform, http = outage.platform, outage.http
    quoted, silent = await list_instrument(platform), await list_instrument(platform)
    actor = await make_actor(platform, "md-reader", Role.READONLY)
    await outage.ingest(quoted, [Tick(T0, quoted.symbol, 999, 1001, 1, 1, 1000, 2)])
    for listed in (quoted, silent):  # the api knows the key and both symbols (as it would in service)
        await http.get(f"/api/v1/marketdata/{listed.symbol}/quote", headers=actor.headers)

    outage.down(outage.redis)
    # Nothing stored: Redis may hold a quote another service wrote, so this is not "no market data" (404).
    response = await http.get(f"/api/v1/marketdata/{silent.symbol}/quote", headers=actor.headers)
    assert response.status_code == 503, response.text
    assert response.json()["error"] == "unavailable"
    response = await http.get(f"/api/v1/marketdata/{quoted.symbol}/quote", headers=actor.headers)
    assert (response.status_code, response.json()["source"]) == (200, "ticks")

    outage.down(outage.postgres)
    response = await http.get(f"/api/v1/marketdata/{quoted.symbol}/quote", headers=actor.headers)
    assert response.status_code == 503, response.text
    assert response.json()["error"] == "unavailable"

    outage.postgres.accepting.set()
    response = await http.get(f"/api/v1/marketdata/{quoted.symbol}/quote", headers=actor.headers)
    assert (response.status_code, response.json()["source"]) == (200, "ticks")
    outage.redis.accepting.set()
    response = await http.get(f"/api/v1/marketdata/{silent.symbol}/quote", headers=actor.headers)
    assert (response.status_code, response.json()["error"]) == (404, "no_market_data")
