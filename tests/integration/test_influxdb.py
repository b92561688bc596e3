"""The optional InfluxDB sink against a real InfluxDB 1.x (Debian's ``influxdb`` package, ``influxd``): points
land queryable with exact values and faithful escaping, and an outage costs only the oldest points beyond the
buffer bound, counted, with everything retained written once InfluxDB is back.

Each server runs from a temporary directory on free ports. Without ``influxd`` on PATH the tests skip, except
under CI (CI=1), where that is a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY

from tests.conftest import UNDER_CI
from tests.integration.test_ingest import list_instrument
from tradeplane.adapters.db.marketdata import ns_to_datetime
from tradeplane.adapters.db.timeseries import ensure_daily_partitions_async
from tradeplane.adapters.influxdb import UNATTRIBUTED, InfluxSink, Point
from tradeplane.bootstrap import Platform, build_platform
from tradeplane.config import Settings
from tradeplane.domain.ticks import Tick
from tradeplane.entrypoints.api.app import create_app
from tradeplane.entrypoints.workers.marketdata import run_marketdata

START_TIMEOUT_S = 60.0
#: Waits for the sink bounded by this, so a broken sink fails the test instead of hanging it.
SETTLE_TIMEOUT_S = 60.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class InfluxServer:
    """``influxd`` with a throwaway config and data directory; ``stop``/``start`` keep port and data."""

    def __init__(self, binary: str, root: Path, http_options: str = "") -> None:
        self.binary = binary
        self.root = root
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = root / "influxdb.conf"
        self.config.write_text(
            f"""reporting-disabled = true
bind-address = "127.0.0.1:{_free_port()}"
[meta]
  dir = "{root / "meta"}"
[data]
  dir = "{root / "data"}"
  wal-dir = "{root / "wal"}"
  query-log-enabled = false
[http]
  bind-address = "127.0.0.1:{self.port}"
  log-enabled = false
{http_options}
[monitor]
  store-enabled = false
[logging]
  level = "warn"
"""
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = (self.root / "influxd.log").open("ab")
        self.process = subprocess.Popen([self.binary, "-config", str(self.config)], stdout=log, stderr=log)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                if httpx.get(f"{self.url}/ping", timeout=1.0).status_code == 204:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        pytest.fail("influxd did not start:\n" + (self.root / "influxd.log").read_text()[-3000:])

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


def _influxd() -> str:
    binary = shutil.which("influxd")
    if binary is None:
        reason = "influxd not found: install Debian's influxdb package (apt-get install influxdb) for these tests"
        if UNDER_CI:
            pytest.fail(reason)
        pytest.skip(reason)
    return binary


@pytest.fixture
def make_influxdb() -> Iterator[Callable[[str], InfluxServer]]:
    """Starts servers of the test's own, with extra lines for the config's ``[http]`` section."""
    servers: list[InfluxServer] = []

    def make(http_options: str = "") -> InfluxServer:
        server = InfluxServer(_influxd(), Path(tempfile.mkdtemp(prefix="tradeplane-influxdb-")), http_options)
        servers.append(server)
        server.start()
        return server

    yield make
    for server in servers:
        server.stop()
        shutil.rmtree(server.root, ignore_errors=True)


@pytest.fixture
def influxdb(make_influxdb: Callable[[str], InfluxServer]) -> InfluxServer:
    """A server of the test's own: tests stop and start it, and query its whole database."""
    return make_influxdb("")


@pytest.fixture
async def sink(influxdb: InfluxServer) -> AsyncIterator[InfluxSink]:
    sink = InfluxSink(
        influxdb.url,
        "tp_test",
        max_points=50,
        batch_size=10,
        flush_interval_s=0.05,
        initial_backoff_s=0.05,
        max_backoff_s=0.2,
    )
    await sink.start()
    yield sink
    await sink.close(drain_timeout_s=1.0)


async def query(
    server: InfluxServer, q: str, database: str = "tp_test", auth: tuple[str, str] | None = None
) -> list[dict[str, Any]]:
    """Rows of an InfluxQL query as dicts (timestamps in epoch ns), across all returned series."""
    async with httpx.AsyncClient(auth=auth) as http:
        response = await http.get(f"{server.url}/query", params={"db": database, "q": q, "epoch": "ns"})
    response.raise_for_status()
    rows: list[dict[str, Any]] = []
    for result in response.json()["results"]:
        assert "error" not in result, result
        for series in result.get("series", []):
            rows += [dict(zip(series["columns"], values, strict=True)) for values in series.get("values", [])]
    return rows


async def settled(sink: InfluxSink) -> None:
    async with asyncio.timeout(SETTLE_TIMEOUT_S):
        await sink.wait_written()


def dropped(measurement: str, reason: str) -> float:
    value = REGISTRY.get_sample_value("influxdb_points_dropped_total", {"measurement": measurement, "reason": reason})
    return value or 0.0


# ------------------------------------------------------------------------------------------------- writes

T0 = 1_763_700_000_000_000_000  # 2025-11-21T04:40:00Z, in ns


async def test_all_four_measurements_are_written_and_queryable_with_exact_values(
    influxdb: InfluxServer, sink: InfluxSink
) -> None:
    # 2**53 + 1 ticks: no float64 holds it, so a float field would come back changed.
    huge = 2**53 + 1
    ticks = [Tick(T0 + i, "BTC-USD", 6_500_000 + i, 6_500_010 + i, 3, 4, 6_500_005 + i, 2) for i in range(25)]
    ticks.append(Tick(T0 + 100, "BTC-USD", huge, huge + 1, 1, 1))  # quote only: no last, no volume
    for tick in ticks:
        sink.write_tick(tick, tick_size=Decimal("0.01"), lot_size=Decimal("0.001"))
    sink.write_trade(
        symbol="BTC-USD",
        trade_id="T-1",
        price=6_500_007,
        quantity=1_500,
        aggressor_side="buy",
        ts_ns=T0 + 7,
        tick_size=Decimal("0.01"),
        lot_size=Decimal("0.001"),
    )
    sink.write_performance({"strategy": "mm-1"}, {"pnl": Decimal("-1234567890.123456789012"), "trades": 42}, T0)
    sink.write_system_metric({"service": "engine", "shard": "0"}, {"latency_ms": 0.25, "healthy": True}, T0)
    await settled(sink)
    assert sink.stats.written == len(ticks) + 3

    market = await query(influxdb, "SELECT * FROM market_data ORDER BY time")
    assert len(market) == len(ticks)
    first, quote_only = market[0], market[-1]
    assert (first["time"], first["bid"], first["ask"], first["last"], first["volume"]) == (
        T0,
        6_500_000,
        6_500_010,
        6_500_005,
        2,
    )
    assert (first["symbol"], first["tick_size"], first["lot_size"]) == ("BTC-USD", "0.01", "0.001")
    assert (quote_only["bid"], quote_only["ask"], quote_only["last"], quote_only["volume"]) == (
        huge,
        huge + 1,
        None,
        None,
    )
    # Integer ticks aggregate exactly in InfluxQL.
    (totals,) = await query(influxdb, f"SELECT max(bid), sum(volume) FROM market_data WHERE time < {T0 + 100}")
    assert (totals["max"], totals["sum"]) == (6_500_024, 50)

    (trade,) = await query(influxdb, "SELECT * FROM trades")
    assert (trade["price"], trade["quantity"], trade["trade_id"], trade["side"]) == (6_500_007, 1_500, "T-1", "buy")
    (performance,) = await query(influxdb, "SELECT * FROM performance")
    assert Decimal(performance["pnl"]) == Decimal("-1234567890.123456789012")
    assert (performance["trades"], performance["strategy"]) == (42, "mm-1")
    (metric,) = await query(influxdb, "SELECT * FROM system_metrics")
    assert (metric["latency_ms"], metric["healthy"], metric["service"], metric["shard"]) == (0.25, True, "engine", "0")


async def test_a_lone_point_is_written_within_the_flush_interval_not_held_for_a_full_batch(
    influxdb: InfluxServer, sink: InfluxSink
) -> None:
    sink.write(Point("market_data", {"symbol": "ONE"}, {"seq": 1}, T0))
    async with asyncio.timeout(SETTLE_TIMEOUT_S):
        while sink.stats.written < 1:  # noqa: ASYNC110 - no flush asked for: the sink must send it by itself
            await asyncio.sleep(0.02)
    assert await query(influxdb, "SELECT seq FROM market_data WHERE symbol = 'ONE'") == [{"time": T0, "seq": 1}]


async def test_names_tags_and_strings_round_trip_through_line_protocol_escaping(
    influxdb: InfluxServer, sink: InfluxSink
) -> None:
    tag = 'EUR/USD, spot=1 "x" C:\\fx'
    text = 'a "quoted" \\ backslash,\nnew line = end'
    sink.write(Point("odd measurement,1", {"venue name": tag, "empty": ""}, {"note field": text, "n": 1}, T0))
    await settled(sink)

    rows = await query(influxdb, 'SELECT * FROM "odd measurement,1"')
    assert rows == [{"time": T0, "venue name": tag, "note field": text, "n": 1}]
    tags = await query(influxdb, 'SHOW TAG KEYS FROM "odd measurement,1"')
    assert [row["tagKey"] for row in tags] == ["venue name"]  # an empty tag value is left out


def test_unwritable_names_are_refused_when_written_not_later() -> None:
    with pytest.raises(ValueError, match="line break"):
        Point("m", {"symbol": "A\nB"}, {"x": 1}, 0).to_line()
    with pytest.raises(ValueError, match="ends with a backslash"):
        Point("m", {"path": "C:\\"}, {"x": 1}, 0).to_line()
    with pytest.raises(ValueError, match="no fields"):
        Point("m", {}, {}, 0).to_line()
    with pytest.raises(ValueError, match="int64"):
        Point("m", {}, {"x": 2**63}, 0).to_line()
    with pytest.raises(ValueError, match="not finite"):
        Point("m", {}, {"x": float("nan")}, 0).to_line()
    assert Point("m x,y", {"k=1": "v 1,2"}, {"f": 1.5, "b": False, "i": -3}, 5).to_line() == (
        "m\\ x\\,y,k\\=1=v\\ 1\\,2 f=1.5,b=false,i=-3i 5"
    )


# ------------------------------------------------------------------------------------------------- outage


async def test_an_outage_keeps_the_newest_points_within_the_bound_and_counts_the_rest(
    influxdb: InfluxServer, sink: InfluxSink
) -> None:
    def point(i: int) -> Point:
        return Point("market_data", {"symbol": "OUT"}, {"seq": i}, T0 + i)

    for i in range(10):
        sink.write(point(i))
    await settled(sink)
    overflow_before = dropped("market_data", "overflow")

    influxdb.stop()
    for i in range(10, 210):
        sink.write(point(i))  # synchronous: returns without touching the network
    assert sink.pending == sink.max_points == 50
    assert sink.stats.dropped == {"overflow": 150}
    assert dropped("market_data", "overflow") - overflow_before == 150
    async with asyncio.timeout(SETTLE_TIMEOUT_S):
        while sink.stats.failures < 3:  # noqa: ASYNC110 - polls the sink's retry count: it keeps retrying
            await asyncio.sleep(0.05)
    assert sink.pending == 50

    influxdb.start()
    await settled(sink)
    rows = await query(influxdb, "SELECT seq FROM market_data WHERE symbol = 'OUT' ORDER BY time")
    assert [row["seq"] for row in rows] == [*range(10), *range(160, 210)]
    assert sink.stats.dropped == {"overflow": 150}


# ------------------------------------------------------------------------------------------ partial writes


def written(measurement: str) -> float:
    return REGISTRY.get_sample_value("influxdb_points_written_total", {"measurement": measurement}) or 0.0


def unconfirmed(measurement: str) -> float:
    return REGISTRY.get_sample_value("influxdb_points_unconfirmed_total", {"measurement": measurement}) or 0.0


async def test_a_field_type_conflict_drops_only_the_conflicting_points_of_a_batch(
    influxdb: InfluxServer, sink: InfluxSink
) -> None:
    sink.write(Point("conflict", {"symbol": "C"}, {"x": 0}, T0))  # x is an integer field from now on
    await settled(sink)
    written_before, rejected_before = written("conflict"), dropped("conflict", "rejected")

    conflicting = {2, 5, 7}
    for i in range(1, 11):  # one batch (batch_size 10): InfluxDB writes 7 points and drops 3
        sink.write(Point("conflict", {"symbol": "C"}, {"x": i + 0.5 if i in conflicting else i}, T0 + i))
    await settled(sink)

    rows = await query(influxdb, "SELECT x FROM conflict ORDER BY time")
    assert [row["x"] for row in rows] == [i for i in range(11) if i not in conflicting]
    assert (sink.stats.written, sink.stats.dropped) == (8, {"rejected": 3})
    assert sink.stats.unconfirmed == 0
    assert written("conflict") - written_before == 7
    assert dropped("conflict", "rejected") - rejected_before == 3


async def test_points_beyond_the_retention_policy_are_the_only_ones_counted_dropped(
    influxdb: InfluxServer, sink: InfluxSink
) -> None:
    async with httpx.AsyncClient() as http:
        for q in (
            "CREATE DATABASE tp_test",
            "CREATE RETENTION POLICY hour ON tp_test DURATION 1h REPLICATION 1 DEFAULT",
        ):
            (await http.post(f"{influxdb.url}/query", params={"q": q})).raise_for_status()
    now = time.time_ns()
    stamps = [T0, now, T0 + 1, now + 1, now + 2]  # T0 (2025) is far beyond an hour's retention
    mixed = [Point("retained", {}, {"n": i}, ts) for i, ts in enumerate(stamps)]
    mixed[2] = Point("trades", {}, {"n": 2}, T0 + 1)  # two measurements: InfluxDB does not say whose were dropped
    for point in mixed:
        sink.write(point)
    unknown_before = dropped(UNATTRIBUTED, "rejected")
    await settled(sink)

    assert [row["n"] for row in await query(influxdb, "SELECT n FROM retained ORDER BY time")] == [1, 3, 4]
    assert (sink.stats.written, sink.stats.dropped) == (3, {"rejected": 2})
    assert dropped(UNATTRIBUTED, "rejected") - unknown_before == 2


async def test_a_partial_write_that_does_not_count_its_drops_is_reported_unconfirmed_not_guessed(
    influxdb: InfluxServer, sink: InfluxSink
) -> None:
    before = unconfirmed("parsed")
    # InfluxDB cannot parse a timestamp past its range; it stores the other points and answers dropped=0.
    for i, ts in enumerate([T0, 2**63 - 1, T0 + 2]):
        sink.write(Point("parsed", {}, {"n": i}, ts))
    await settled(sink)

    assert [row["n"] for row in await query(influxdb, "SELECT n FROM parsed ORDER BY time")] == [0, 2]
    assert (sink.stats.written, sink.stats.dropped) == (0, {})
    assert sink.stats.unconfirmed == 3
    assert unconfirmed("parsed") - before == 3

    # A batch refused whole is still counted as rejected, point by point.
    sink.write(Point("parsed", {}, {"n": 9}, 2**63 - 1))
    await settled(sink)
    assert (sink.stats.written, sink.stats.dropped, sink.stats.unconfirmed) == (0, {"rejected": 1}, 3)


# --------------------------------------------------------------------------------- refusals by status


class InfluxDB2Answers(httpx.AsyncBaseTransport):
    """The sink's HTTP edge to a real InfluxDB 1.x, answering a partial write the way InfluxDB 2.x does: HTTP 422
    with ``{"code": "unprocessable entity", "message": "failure writing points to database: partial write: ...
    dropped=N"}`` (and, after points beyond retention, the database and policy). Which points are dropped is
    still the real server's decision."""

    def __init__(self) -> None:
        self.forward = httpx.AsyncHTTPTransport()
        self.answered_422 = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.forward.handle_async_request(request)
        if response.status_code != 400 or request.url.path != "/write":
            return response
        await response.aread()
        error = response.json()["error"]
        if not error.startswith("partial write: "):
            return response
        message = f"failure writing points to database: {error}"
        if "retention policy" in error:
            message += f" for database: {request.url.params['db']} for retention policy: hour"
        self.answered_422 += 1
        return httpx.Response(422, json={"code": "unprocessable entity", "message": message})

    async def aclose(self) -> None:
        await self.forward.aclose()


async def test_points_influxdb_2_refuses_for_good_are_counted_rejected_and_the_sink_moves_on(
    influxdb: InfluxServer,
) -> None:
    transport = InfluxDB2Answers()
    sink = InfluxSink(influxdb.url, "tp_test", batch_size=10, flush_interval_s=0.05, transport=transport)
    await sink.start()
    try:
        async with httpx.AsyncClient() as http:
            for q in (
                "CREATE DATABASE tp_test",
                "CREATE RETENTION POLICY hour ON tp_test DURATION 1h REPLICATION 1 DEFAULT",
            ):
                (await http.post(f"{influxdb.url}/query", params={"q": q})).raise_for_status()
        rejected_before = dropped("expired", "rejected")

        for i in range(5):  # all beyond the hour's retention: InfluxDB 2.x answers 422 for the whole batch
            sink.write(Point("expired", {}, {"n": i}, T0 + i))
        await settled(sink)
        assert (sink.stats.written, sink.stats.dropped, sink.stats.failures) == (0, {"rejected": 5}, 0)

        now = time.time_ns()
        for i, ts in enumerate([now, T0 + 10, now + 1]):  # then a batch written in part
            sink.write(Point("expired", {}, {"n": 10 + i}, ts))
        await settled(sink)
    finally:
        await sink.close(drain_timeout_s=1.0)

    assert transport.answered_422 == 2
    assert [row["n"] for row in await query(influxdb, "SELECT n FROM expired ORDER BY time")] == [10, 12]
    assert (sink.stats.written, sink.stats.dropped, sink.stats.unconfirmed) == (2, {"rejected": 6}, 0)
    assert dropped("expired", "rejected") - rejected_before == 6


async def test_a_batch_too_large_for_the_server_goes_in_halves_and_a_point_too_large_alone_is_rejected(
    make_influxdb: Callable[[str], InfluxServer], caplog: pytest.LogCaptureFixture
) -> None:
    influxdb = make_influxdb("  max-body-size = 2000")
    sink = InfluxSink(influxdb.url, "tp_test", batch_size=10, flush_interval_s=0.05)
    await sink.start()
    try:
        rejected_before = dropped("large", "rejected")
        padding = "p" * 200  # ten points of ~240 bytes: more than the 2000 the server takes in one request
        for i in range(10):
            text = "x" * 3000 if i == 3 else padding  # a point larger than a whole request may be
            sink.write(Point("large", {"symbol": "BIG"}, {"n": i, "text": text}, T0 + i))
        await settled(sink)
    finally:
        await sink.close(drain_timeout_s=1.0)

    rows = await query(influxdb, "SELECT n FROM large ORDER BY time")
    assert [row["n"] for row in rows] == [i for i in range(10) if i != 3]
    assert (sink.stats.written, sink.stats.dropped) == (9, {"rejected": 1})
    assert dropped("large", "rejected") - rejected_before == 1
    messages = [record.getMessage() for record in caplog.records if record.name == "tradeplane.influxdb"]
    assert any("HTTP 413" in m and "max-body-size" in m for m in messages), messages
    (alone,) = [m for m in messages if "too large even alone" in m]
    assert "large,symbol=BIG n=3i" in alone  # the refused point, as a sample


async def _logged(caplog: pytest.LogCaptureFixture, *words: str) -> None:
    """Wait until the sink has logged an error holding all of ``words``."""

    def found() -> bool:
        return any(
            record.name == "tradeplane.influxdb"
            and record.levelname == "ERROR"
            and all(word in record.getMessage() for word in words)
            for record in caplog.records
        )

    async with asyncio.timeout(SETTLE_TIMEOUT_S):
        while not found():  # noqa: ASYNC110 - polls the captured log records
            await asyncio.sleep(0.02)


ADMIN = ("admin", "admin-secret")  # the first user of an auth-enabled test server (``first_admin``)


async def first_admin(influxdb: InfluxServer) -> Callable[[str], Awaitable[None]]:
    """Create the first user of an ``auth-enabled`` server, an admin (that one needs no credentials); a function
    that runs a query as that admin and fails on any error."""
    async with httpx.AsyncClient() as http:
        q = "CREATE USER admin WITH PASSWORD 'admin-secret' WITH ALL PRIVILEGES"
        (await http.post(f"{influxdb.url}/query", params={"q": q})).raise_for_status()

    async def as_admin(q: str) -> None:
        async with httpx.AsyncClient(auth=ADMIN) as http:
            response = await http.post(f"{influxdb.url}/query", params={"q": q})
        response.raise_for_status()
        assert "error" not in response.json()["results"][0], response.text

    return as_admin


async def test_credentials_permissions_and_a_missing_database_are_retried_with_what_to_fix(
    make_influxdb: Callable[[str], InfluxServer], caplog: pytest.LogCaptureFixture
) -> None:
    influxdb = make_influxdb("  auth-enabled = true")
    as_admin = await first_admin(influxdb)
    url = influxdb.url.replace("http://", "http://writer:writer-secret@")
    sink = InfluxSink(url, "tp_auth", batch_size=10, flush_interval_s=0.05, initial_backoff_s=0.02, max_backoff_s=0.1)
    await sink.start()
    try:
        for i in range(5):
            sink.write(Point("guarded", {}, {"n": i}, T0 + i))

        await _logged(caplog, "HTTP 401", "TRADEPLANE_INFLUXDB_URL")  # no such user yet
        await as_admin("CREATE USER writer WITH PASSWORD 'writer-secret'")  # not an admin: cannot create a database
        await _logged(caplog, "HTTP 404", "CREATE DATABASE")
        await as_admin("CREATE DATABASE tp_auth")
        await _logged(caplog, "HTTP 403", 'GRANT WRITE ON "tp_auth" TO "writer"')
        assert (sink.pending, sink.stats.written, sink.stats.dropped) == (5, 0, {})  # held all along
        assert sink.stats.last_failure is not None and sink.stats.consecutive_failures > 0
        assert (sink.stats.last_failure.status, sink.stats.last_written_at) == (403, None)
        await as_admin("GRANT WRITE ON tp_auth TO writer")
        await settled(sink)
        assert sink.stats.consecutive_failures == 0 and sink.stats.last_written_at is not None
    finally:
        await sink.close(drain_timeout_s=1.0)

    rows = await query(influxdb, "SELECT n FROM guarded ORDER BY time", "tp_auth", auth=ADMIN)
    assert [row["n"] for row in rows] == list(range(5))
    assert (sink.stats.written, sink.stats.dropped) == (5, {})


# ------------------------------------------------------------------------------------------------- health


def platform_for(url: str, database: str, database_url: str, redis_url: str, nats_url: str) -> Platform:
    """A platform, as one process of a deployment builds it, whose sink writes to ``database`` at ``url``."""
    settings = Settings(
        database_url=database_url,
        redis_url=redis_url,
        bus_url=nats_url,
        influxdb_url=url,
        influxdb_database=database,
        secret_key="test-secret-key-not-for-production",
        db_pool_min=1,
    )
    return build_platform(settings)


@contextlib.asynccontextmanager
async def market_data_worker(platform: Platform) -> AsyncIterator[None]:
    """The market data worker on ``platform``: it writes its figures to InfluxDB and publishes its sink's status,
    both often; stopped cleanly on exit."""
    await list_instrument(platform)
    stop = asyncio.Event()
    worker = asyncio.create_task(
        run_marketdata(
            platform,
            stop,
            simulate_rate=None,
            bus_feed=False,
            engine_books=False,
            influx_interval_s=0.05,
            sink_status_interval_s=0.05,
        )
    )
    try:
        yield
    finally:
        stop.set()
        await worker


@contextlib.asynccontextmanager
async def api_client(platform: Platform) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(platform))
    async with httpx.AsyncClient(transport=transport, base_url="http://tradeplane") as client:
        yield client


async def influx_health_until(
    client: httpx.AsyncClient, wanted: Callable[[int, dict[str, Any]], bool]
) -> tuple[int, dict[str, Any]]:
    """Ask ``/health/influxdb`` until its answer is ``wanted`` (status code, body); fails after the timeout."""
    answer: tuple[int, dict[str, Any]] | None = None
    try:
        async with asyncio.timeout(SETTLE_TIMEOUT_S):
            while True:
                response = await client.get("/health/influxdb")
                answer = response.status_code, response.json()
                if wanted(*answer):
                    return answer
                await asyncio.sleep(0.05)
    except TimeoutError:
        pytest.fail(f"/health/influxdb never answered as wanted; last: {answer}")


async def test_health_influxdb_follows_the_server(
    influxdb: InfluxServer, database_url: str, redis_url: str, nats_url: str
) -> None:
    # One process, as under `tradeplane up`: the api reports the worker's sink, which is its own.
    platform = platform_for(influxdb.url, f"tp_health_{uuid.uuid4().hex[:8]}", database_url, redis_url, nats_url)
    assert platform.influx is not None
    await platform.start()
    try:
        async with api_client(platform) as client, market_data_worker(platform):
            status, health = await influx_health_until(client, lambda _, body: body["writer"] is not None)
            assert (status, health["status"], health["unconfirmed_points"]) == (200, "ok", 0)

            # a batch InfluxDB writes in part without counting its drops (a timestamp past its range); the
            # worker's figures may share it, and are then unconfirmed too
            for i, ts in enumerate([T0, 2**63 - 1, T0 + 2]):
                platform.influx.write(Point("parsed", {}, {"n": i}, ts))
            async with asyncio.timeout(SETTLE_TIMEOUT_S):
                while platform.influx.stats.unconfirmed < 3:  # noqa: ASYNC110 - polls the sink's count
                    await asyncio.sleep(0.02)
            unconfirmed = platform.influx.stats.unconfirmed
            _, health = await influx_health_until(client, lambda _, body: body["unconfirmed_points"] == unconfirmed)
            assert health["dropped_points"] == 0

            influxdb.stop()
            response = await client.get("/health/influxdb")
            assert response.status_code == 503
            assert (response.json()["status"], response.json()["reason"]) == ("fail", "unreachable")
            # An optional sink being down does not make the platform unhealthy.
            assert (await client.get("/health")).status_code == 200

            influxdb.start()
            status, health = await influx_health_until(client, lambda status, _: status == 200)
            assert health["writer"]["consecutive_failures"] == 0
    finally:
        await platform.stop()


async def test_health_influxdb_reports_the_writer_running_in_another_process(
    influxdb: InfluxServer, database_url: str, redis_url: str, nats_url: str
) -> None:
    # `tradeplane run api` and `tradeplane run marketdata`: two platforms on the same servers.
    database = f"tp_split_{uuid.uuid4().hex[:8]}"
    api = platform_for(influxdb.url, database, database_url, redis_url, nats_url)
    writer = platform_for(influxdb.url, database, database_url, redis_url, nats_url)
    assert api.influx is not None and writer.influx is not None
    await api.start()
    await writer.start()
    try:
        async with api_client(api) as client:
            response = await client.get("/health/influxdb")
            assert response.status_code == 503  # InfluxDB answers its ping, but nobody writes to it
            health = response.json()
            assert (health["status"], health["reason"], health["writer"]) == ("fail", "writer_not_reporting", None)
            assert "market data worker" in health["detail"]

            async with market_data_worker(writer):
                status, health = await influx_health_until(
                    client, lambda _, body: body["writer"] is not None and body["writer"]["written_points"] > 0
                )
                assert (status, health["status"]) == (200, "ok")
                reporter = health["writer"]
                assert (reporter["service"], reporter["host"], reporter["pid"]) == (
                    "marketdata",
                    socket.gethostname(),
                    os.getpid(),
                )
                assert (reporter["consecutive_failures"], reporter["last_failure"]) == (0, None)
                assert reporter["last_written_at"] is not None and reporter["age_s"] >= 0
                assert health["dropped_points"] == 0 and health["buffered_points"] is not None
                # The figures are the writer's: the api's own sink has written nothing.
                assert api.influx.stats.written == 0 and writer.influx.stats.written >= reporter["written_points"]

            # The worker stopped cleanly: its report went with it.
            response = await client.get("/health/influxdb")
            assert (response.status_code, response.json()["reason"]) == (503, "writer_not_reporting")
    finally:
        await writer.stop()
        await api.stop()


async def test_health_influxdb_is_503_while_the_writer_s_writes_are_refused_and_200_once_fixed(
    make_influxdb: Callable[[str], InfluxServer], database_url: str, redis_url: str, nats_url: str
) -> None:
    influxdb = make_influxdb("  auth-enabled = true")
    as_admin = await first_admin(influxdb)
    database = f"tp_refused_{uuid.uuid4().hex[:8]}"
    url = influxdb.url.replace("http://", "http://writer:writer-secret@")  # no such user yet
    api = platform_for(url, database, database_url, redis_url, nats_url)
    writer = platform_for(url, database, database_url, redis_url, nats_url)
    await api.start()
    await writer.start()
    try:
        async with api_client(api) as client, market_data_worker(writer):

            def failing_with(code: int) -> Callable[[int, dict[str, Any]], bool]:
                def wanted(_: int, body: dict[str, Any]) -> bool:
                    failure = (body["writer"] or {}).get("last_failure")
                    return body.get("reason") == "writes_failing" and failure is not None and failure["status"] == code

                return wanted

            # /ping needs no credentials: it answers while every write is refused.
            status, health = await influx_health_until(client, failing_with(401))
            assert (status, health["status"]) == (503, "fail")
            assert "latency_ms" in health and "error" not in health
            assert health["writer"]["last_failure"]["error"] == "authorization failed"
            assert health["writer"]["consecutive_failures"] > 0 and health["writer"]["last_written_at"] is None
            assert "HTTP 401" in health["detail"]

            await as_admin("CREATE USER writer WITH PASSWORD 'writer-secret'")
            await as_admin(f"CREATE DATABASE {database}")
            status, health = await influx_health_until(client, failing_with(403))  # no grant yet
            assert status == 503

            await as_admin(f"GRANT WRITE ON {database} TO writer")
            status, health = await influx_health_until(client, lambda status, _: status == 200)
            assert (health["status"], health["writer"]["consecutive_failures"]) == ("ok", 0)
            assert health["writer"]["last_written_at"] is not None
            assert health["writer"]["last_failure"]["status"] == 403  # the last failure stays on record
    finally:
        await writer.stop()
        await api.stop()
    rows = await query(influxdb, "SELECT * FROM system_metrics", database, auth=ADMIN)
    assert rows and rows[0]["service"] == "marketdata"  # what waited while refused was written once granted


async def test_health_influxdb_is_not_found_when_the_sink_is_not_configured(client: httpx.AsyncClient) -> None:
    response = await client.get("/health/influxdb")
    assert response.status_code == 404
    assert response.json()["error"] == "not_found"


# ------------------------------------------------------------------------------------------------- pipeline


@pytest.fixture
async def influx_platform(
    influxdb: InfluxServer, database_url: str, redis_url: str, nats_url: str
) -> AsyncIterator[Platform]:
    """A platform whose InfluxDB sink writes to the test's own server (database ``tp_pipeline``)."""
    settings = Settings(
        database_url=database_url,
        redis_url=redis_url,
        bus_url=nats_url,
        influxdb_url=influxdb.url,
        influxdb_database="tp_pipeline",
        secret_key="test-secret-key-not-for-production",
        db_pool_min=1,
    )
    platform = build_platform(settings)
    await platform.start()
    yield platform
    await platform.stop()


async def test_the_market_data_worker_writes_ticks_trades_and_its_figures_to_influxdb(
    influxdb: InfluxServer, influx_platform: Platform
) -> None:
    platform = influx_platform
    sink = platform.influx
    assert sink is not None
    a = await list_instrument(platform)
    now_ns = time.time_ns()
    trade_us = now_ns // 1000 - 10_000_000  # 10 s ago, whole microseconds as PostgreSQL keeps them
    async with platform.db.transaction("test.engine") as conn:
        await ensure_daily_partitions_async(conn, "trades", datetime.now(UTC).date() - timedelta(days=1), 3)
        for seq in (1, 2):  # one engine batch: both trades in the same microsecond
            await conn.execute(
                "INSERT INTO trades (trade_id, instrument_id, price, quantity, aggressor_side, ts)"
                " VALUES ($1, $2, 100.05, 0.003, 'sell', to_timestamp($3::numeric / 1000000))",
                f"{a.symbol}-{seq}-0",
                a.instrument_id,
                trade_us,
            )
    stop = asyncio.Event()
    worker = asyncio.create_task(
        run_marketdata(platform, stop, simulate_rate=200, bus_feed=False, engine_books=False, influx_interval_s=0.1)
    )
    try:
        async with asyncio.timeout(SETTLE_TIMEOUT_S):
            # The sink creates the database before its first write.
            while "tp_pipeline" not in [row["name"] for row in await query(influxdb, "SHOW DATABASES")]:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
            while True:
                await asyncio.sleep(0.2)
                ticks = await query(
                    influxdb, f"SELECT * FROM market_data WHERE symbol = '{a.symbol}' AND bid > 0", "tp_pipeline"
                )
                trades = await query(influxdb, f"SELECT * FROM trades WHERE symbol = '{a.symbol}'", "tp_pipeline")
                figures = await query(influxdb, "SELECT * FROM performance", "tp_pipeline")
                system = await query(influxdb, "SELECT * FROM system_metrics", "tp_pipeline")
                if len(ticks) >= 5 and len(trades) == 2 and len(figures) >= 2 and system:
                    break
    finally:
        stop.set()
        pipeline = await worker
    # The ticks are the committed ones, prices in ticks of the instrument, sizes in lots.
    first = ticks[0]
    assert (first["tick_size"], first["lot_size"]) == ("0.01", "0.001")
    async with platform.db.connection("test.ticks") as conn:
        stored = await conn.fetch(
            "SELECT bid, ask, bid_size FROM ticks WHERE instrument_id = $1 AND ts = $2",
            a.instrument_id,
            ns_to_datetime(first["time"]),  # PostgreSQL keeps microseconds
        )
    assert (a.price(first["bid"]), a.price(first["ask"]), a.quantity(first["bid_size"])) in [
        (row["bid"], row["ask"], row["bid_size"]) for row in stored
    ]
    # Both trades of the batch are kept: stamped a nanosecond apart in match order.
    assert [(row["time"], row["trade_id"], row["price"], row["quantity"], row["side"]) for row in trades] == [
        (trade_us * 1000, f"{a.symbol}-1-0", 10_005, 3, "sell"),
        (trade_us * 1000 + 1, f"{a.symbol}-2-0", 10_005, 3, "sell"),
    ]
    assert pipeline.stats.stored > 0
    assert figures[-1]["service"] == "marketdata" and figures[-1]["ticks_stored"] > 0
    assert any(row.get("ticks_stored_per_s") is not None for row in figures)
    assert system[-1]["rss_bytes"] > 0 and system[-1]["cpu_seconds"] > 0
