"""Optional InfluxDB sink (seed 002): market data, trades, performance and system metrics in line protocol.

Writes go to the InfluxDB 1.x HTTP API (``POST /write?db=<database>&precision=ns``; 2.x serves the same
endpoint for compatibility) in batches from a bounded in-memory buffer, so the trading path never waits for
InfluxDB:

- ``write*`` only appends to the buffer: synchronous, O(1) per point, never raises for a server problem, never
  blocks. ``write_ticks`` (the ingest pipeline's committed ticks) buffers the ticks themselves and encodes them
  only when a batch is sent, so a point that overflows is never encoded.
- One background task sends batches of up to ``batch_size`` points, as soon as a batch is full or
  ``flush_interval_s`` after the oldest point arrived.
- When InfluxDB is slow or down the batch is retried with exponential backoff (capped at ``max_backoff_s``)
  and the buffer keeps filling; beyond ``max_points`` the *oldest* points are dropped (fresh data is worth
  more than stale) and counted in ``influxdb_points_dropped_total{measurement, reason="overflow"}``.
- A batch the server refuses for good (HTTP 400 from 1.x, 422 from 2.x) is not retried, and the sink moves on.
  Refused whole, its points count as ``reason="rejected"`` (logged with a sample point). Written in part
  (``partial write: <reason> dropped=N``, which 2.x prefixes with ``failure writing points to database:``:
  points beyond the retention policy, a field type conflict, an invalid tag or field name), only the N points
  InfluxDB says it dropped are ``rejected`` and the rest count as written; by measurement where the batch held
  one, else under ``measurement="unknown"`` (the answer does not say which). Where InfluxDB does not count what
  it dropped (lines it could not parse: 1.x reports ``dropped=0``), the batch's points are counted in
  ``influxdb_points_unconfirmed_total``, neither written nor dropped. InfluxDB 1.x reports one cause per batch:
  a shard's field type conflict hides points the same batch had beyond retention, so N can fall short then.
- A request larger than the server takes (HTTP 413: InfluxDB's ``max-body-size``, or a proxy's body limit) is
  sent again in halves, halved again while refused; a single point still too large is ``rejected``.
- Credentials, permissions or the database being wrong (HTTP 401, 403, 404) is retried with backoff like an
  outage, since the points become writable once an operator fixes it: an error names what to fix. A user
  that may not ``CREATE DATABASE`` (not an admin) still writes into a database an admin made for it.
- When it comes back, the retained points are written, oldest first.
- ``stats`` keeps how writing goes (the last write InfluxDB took, the last failed attempt, failures in a row) and
  ``status()`` reports it: the market data worker, the one process that writes, publishes it under
  ``status_key(database)`` for ``/health/influxdb`` of every api process.

Exact values: InfluxDB stores numbers as float64 or int64. Floats would round prices (0.1 has no float64)
and could not be compared exactly, so prices and quantities are written as int64 counts of the instrument's
tick size and lot size, which is how the pipeline already carries them (``domain.ticks.Tick``); the points
carry ``tick_size`` and ``lot_size`` tags, so ``price = bid x tick_size`` is self-described, and max/min/
first/last/sum stay exact in InfluxQL. A ``Decimal`` in a generic point (performance, P&L) is written as a
string field with its exact text: lossless, though InfluxQL cannot aggregate it; convert to integer units
first where aggregation matters. Float fields are for measurements that are floats anyway (latencies).

Line protocol escaping (InfluxDB 1.x): measurement names escape commas and spaces; tag keys, tag values and
field keys escape commas, equals signs and spaces; string field values escape backslashes and double quotes.
InfluxDB 1.x does not unescape a backslash in names and tags, so one is written as it is, and a name or tag
ending in a backslash (which would escape the delimiter after it) or holding a newline is refused.

Not thread-safe: call ``write*`` from the event loop the sink was started on.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import re
import time
from collections import Counter as Tally
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import ClassVar, TypedDict
from urllib.parse import urlsplit, urlunsplit

import httpx
from prometheus_client import Counter, Gauge

from tradeplane.domain.ticks import Tick

log = logging.getLogger("tradeplane.influxdb")

MARKET_DATA = "market_data"
TRADES = "trades"
PERFORMANCE = "performance"
SYSTEM_METRICS = "system_metrics"

POINTS_DROPPED = Counter(
    "influxdb_points_dropped_total",
    "Points not written to InfluxDB: buffer overflow while it was slow or down, or refused by the server",
    ["measurement", "reason"],
)
POINTS_WRITTEN = Counter("influxdb_points_written_total", "Points written to InfluxDB", ["measurement"])
POINTS_UNCONFIRMED = Counter(
    "influxdb_points_unconfirmed_total",
    "Points of batches InfluxDB wrote only in part without counting what it dropped: each may or may not be stored",
    ["measurement"],
)
WRITE_FAILURES = Counter("influxdb_write_failures_total", "InfluxDB write attempts that failed (then retried)")
BUFFERED_POINTS = Gauge("influxdb_buffered_points", "Points waiting in the InfluxDB sink's buffer")

FieldValue = int | float | bool | str | Decimal
#: Overflow drops are logged at most this often (they are counted every time).
OVERFLOW_LOG_INTERVAL_S = 10.0
#: An error that needs an operator (bad credentials, a missing database) is logged again at most this often.
REFUSAL_LOG_INTERVAL_S = 60.0
#: The measurement label of points counted from a partial write of a batch of several measurements.
UNATTRIBUTED = "unknown"
#: A point or an answer in a log line is cut to this many characters.
SAMPLE_CHARS = 300
# The answer to a batch written in part (tsdb.PartialWriteError); the reason may span lines. 1.x sends it as is
# (HTTP 400); 2.x (HTTP 422) prefixes it, and after points beyond retention names the database and policy.
_PARTIAL_WRITE = re.compile(
    r"(?:failure writing points to database: )?partial write: (?P<reason>.*) dropped=(?P<dropped>[0-9]+)"
    r"(?: for database: \S+ for retention policy: .+)?",
    re.DOTALL,
)


# ------------------------------------------------------------------------------------------ line protocol


def _name(text: str, escaped: str, what: str) -> str:
    if not text:
        raise ValueError(f"{what} is empty")
    if "\n" in text or "\r" in text:
        raise ValueError(f"{what} {text!r} contains a line break")
    if text.endswith("\\"):
        raise ValueError(f"{what} {text!r} ends with a backslash")
    for char in escaped:
        text = text.replace(char, "\\" + char)
    return text


def escape_measurement(name: str) -> str:
    return _name(name, ", ", "measurement")


def escape_key(key: str) -> str:
    """A tag key, tag value or field key."""
    return _name(key, ",= ", "tag or field")


def _field_value(value: FieldValue) -> str:
    # bool before int: bool is an int subclass.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise ValueError(f"integer field {value} does not fit InfluxDB's int64")
        return f"{value}i"
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"float field {value} is not finite")
        return repr(value)
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError(f"decimal field {value} is not finite")
        value = str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    raise TypeError(f"unsupported field type {type(value).__name__}")


@dataclass(frozen=True, slots=True)
class Point:
    """One line of line protocol: ``measurement,tags fields timestamp`` with the timestamp in UTC epoch ns.

    Tags with an empty value are left out (InfluxDB has no empty tag); at least one field is required.
    """

    measurement: str
    tags: Mapping[str, str]
    fields: Mapping[str, FieldValue]
    ts_ns: int

    def to_line(self) -> str:
        if not self.fields:
            raise ValueError(f"point of {self.measurement!r} has no fields")
        fields = ",".join(f"{escape_key(key)}={_field_value(value)}" for key, value in self.fields.items())
        return f"{series_key(self.measurement, self.tags)} {fields} {self.ts_ns}"


def _plain(size: Decimal) -> str:
    """A tick or lot size tag as plain text without trailing zeros (NUMERIC(.., 18) 0.010000... -> "0.01"), so
    one instrument is one series whatever scale its size was read with."""
    return format(size.normalize(), "f")


def series_key(measurement: str, tags: Mapping[str, str]) -> str:
    """``measurement,tag=value,...`` escaped, tags sorted (InfluxDB's fastest path), empty values left out."""
    parts = [escape_measurement(measurement)]
    for key in sorted(tags):
        value = tags[key]
        if value:
            parts.append(f"{escape_key(key)}={escape_key(value)}")
    return ",".join(parts)


@dataclass(frozen=True, slots=True)
class TickSeries:
    """The ``market_data`` series of one instrument; its tags are escaped once here, not once per tick."""

    symbol: str
    tick_size: Decimal
    lot_size: Decimal
    key: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        tags = {"symbol": self.symbol, "tick_size": _plain(self.tick_size), "lot_size": _plain(self.lot_size)}
        object.__setattr__(self, "key", series_key(MARKET_DATA, tags))


@dataclass(frozen=True, slots=True)
class TickPoint:
    """A ``market_data`` point buffered as the tick itself and encoded only when sent, so buffering one costs
    an object, not a line: points dropped on overflow are never encoded. The tick's integers must fit int64
    (the pipeline's committed ticks do: they were COPYed as int64 columns)."""

    measurement: ClassVar[str] = MARKET_DATA
    series: TickSeries
    tick: Tick

    def to_line(self) -> str:
        tick = self.tick
        fields = f"bid_size={tick.bid_size}i,ask_size={tick.ask_size}i"
        if tick.bid is not None:
            fields += f",bid={tick.bid}i"
        if tick.ask is not None:
            fields += f",ask={tick.ask}i"
        if tick.last is not None:
            fields += f",last={tick.last}i,volume={tick.volume}i"
        return f"{self.series.key} {fields} {tick.ts_ns}"


Buffered = Point | TickPoint


def encode(points: Iterable[Buffered]) -> bytes:
    return "\n".join(point.to_line() for point in points).encode()


# ------------------------------------------------------------------------------------------------- sink


def status_key(database: str) -> str:
    """The Redis key (seed 000's ``system:*``) of the status published by the process writing to ``database``.
    Named by database, so platforms sharing one Redis with databases of their own do not read each other's."""
    return f"system:influxdb:{database}"


@dataclass(frozen=True, slots=True)
class WriteFailure:
    """A write attempt that failed and is retried: ``status`` is None when no answer came (refused, timed out)."""

    at: float  # time.time()
    status: int | None
    error: str


@dataclass(slots=True)
class SinkStats:
    """Counts since the sink was created (the Prometheus counters are process-wide), and how writing goes."""

    written: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    failures: int = 0
    #: Points of partial writes whose dropped count InfluxDB did not give: neither written nor dropped.
    unconfirmed: int = 0
    #: time.time() of the last request InfluxDB stored points of (in whole or in part).
    last_written_at: float | None = None
    last_failure: WriteFailure | None = None
    #: Failed attempts since InfluxDB last settled a batch (stored, or refused for good): 0 while writes go.
    consecutive_failures: int = 0

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())


class SinkStatus(TypedDict):
    """``InfluxSink.status()``: JSON-ready, times in ISO 8601 UTC."""

    database: str
    buffered_points: int
    written_points: int
    dropped_points: int
    unconfirmed_points: int
    consecutive_failures: int
    last_written_at: str | None
    #: ``{"at", "status", "error"}`` of the last failed attempt, or None.
    last_failure: dict[str, str | int | None] | None


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat()


class InfluxSink:
    """Buffered, batched, never-blocking writer to one InfluxDB database; see the module docstring.

    ``url`` is the server's base URL (``http://host:8086``); credentials in it are sent as basic auth.
    The database is created (``CREATE DATABASE`` is idempotent) before the first write.
    """

    def __init__(
        self,
        url: str,
        database: str = "market_data",
        *,
        max_points: int = 100_000,
        batch_size: int = 5_000,
        flush_interval_s: float = 1.0,
        timeout_s: float = 5.0,
        initial_backoff_s: float = 0.1,
        max_backoff_s: float = 5.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if not 1 <= batch_size <= max_points:
            raise ValueError("need 1 <= batch_size <= max_points")
        parts = urlsplit(url)
        auth = None
        if parts.username is not None:
            auth = httpx.BasicAuth(parts.username, parts.password or "")
        netloc = parts.hostname or ""
        if parts.port is not None:
            netloc = f"{netloc}:{parts.port}"
        self.url = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
        self._user = parts.username
        self.database = database
        self.max_points = max_points
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.initial_backoff_s = initial_backoff_s
        self.max_backoff_s = max_backoff_s
        self.stats = SinkStats()
        self._client = httpx.AsyncClient(base_url=self.url, auth=auth, timeout=timeout_s, transport=transport)
        # Oldest first: the batch being delivered, then the buffer. Together at most max_points.
        self._batch: deque[Buffered] = deque()
        self._buffer: deque[Buffered] = deque()
        self._overflow_logged = -math.inf
        self._posting = False
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._database_ready = False
        self._refusal_logged: tuple[int | None, float] = (None, -math.inf)  # status, time.monotonic()

    # ------------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start the background writer. Never fails for a server problem: InfluxDB may come up later."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="influxdb-sink")

    async def close(self, *, drain_timeout_s: float = 5.0) -> None:
        """Try to write what is buffered (for at most ``drain_timeout_s``), then stop; the rest is dropped."""
        if self._task is not None:
            self._closing = True
            self._wakeup.set()
            try:
                await asyncio.wait_for(asyncio.shield(self._task), drain_timeout_s)
            except TimeoutError:
                self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self._drop([*self._batch, *self._buffer], "shutdown")
        self._batch.clear()
        self._buffer.clear()
        BUFFERED_POINTS.set(0)
        await self._client.aclose()

    @property
    def pending(self) -> int:
        """Points buffered or in flight, not yet written."""
        return len(self._batch) + len(self._buffer)

    async def wait_written(self) -> None:
        """Flush now and return once nothing is pending (it waits through an outage: bound it yourself)."""
        while self.pending:
            self._wakeup.set()
            await asyncio.sleep(0.01)

    def status(self) -> SinkStatus:
        """What waits, what was lost and how writing goes: the figures ``/health/influxdb`` reports."""
        stats, failure = self.stats, self.stats.last_failure
        return SinkStatus(
            database=self.database,
            buffered_points=self.pending,
            written_points=stats.written,
            dropped_points=stats.dropped_total,
            unconfirmed_points=stats.unconfirmed,
            consecutive_failures=stats.consecutive_failures,
            last_written_at=None if stats.last_written_at is None else _iso(stats.last_written_at),
            last_failure=(
                None if failure is None else {"at": _iso(failure.at), "status": failure.status, "error": failure.error}
            ),
        )

    async def ping(self) -> float:
        """Seconds for InfluxDB's ``/ping`` to answer 204; raises if it does not (for ``/health/influxdb``)."""
        started = time.perf_counter()
        response = await self._client.get("/ping")
        if response.status_code != 204:
            raise RuntimeError(f"InfluxDB /ping answered {response.status_code}")
        return time.perf_counter() - started

    # -------------------------------------------------------------------------------------- writing

    def write(self, point: Buffered) -> None:
        """Buffer one point; drops the oldest buffered point when full. O(1), never blocks, never raises
        for the server's state (an unencodable point raises ``ValueError`` at write time, see ``to_line``)."""
        point.to_line()  # refuse a bad point here, where the caller can see it, not in a batch later
        first = not self._buffer
        self._buffer.append(point)
        self._trim(first)

    def write_ticks(self, ticks: Sequence[Tick], series: Mapping[str, TickSeries]) -> None:
        """``market_data`` points of many ticks (``series`` by symbol: every tick's symbol must be there),
        encoded when sent; see ``TickPoint``. O(len(ticks)), never blocks: beyond the bound the oldest points
        are dropped and counted, and ticks that would be dropped at once are not buffered at all."""
        excess = len(ticks) - self.max_points
        if excess > 0:
            self._count_dropped(Tally({MARKET_DATA: excess}), "overflow")
            ticks = ticks[excess:]
        first = not self._buffer
        self._buffer.extend([TickPoint(series[tick.symbol], tick) for tick in ticks])
        self._trim(first and bool(ticks))

    def _trim(self, first: bool) -> None:
        """Drop the oldest points beyond ``max_points`` (counted), then wake the writer if a batch is full or
        the buffer was empty (``first``: the writer idles until then, and starts the flush interval now)."""
        excess = len(self._batch) + len(self._buffer) - self.max_points
        if excess > 0:
            dropped: Tally[str] = Tally()
            for _ in range(excess):
                # The batch waiting for a retry holds the oldest points; one being posted cannot be recalled.
                oldest = self._batch if self._batch and not self._posting else self._buffer
                dropped[oldest.popleft().measurement] += 1
            self._count_dropped(dropped, "overflow")
        BUFFERED_POINTS.set(self.pending)
        if first or len(self._buffer) >= self.batch_size:
            self._wakeup.set()

    def write_tick(self, tick: Tick, *, tick_size: Decimal, lot_size: Decimal = Decimal(1)) -> None:
        """A ``market_data`` point: prices in ticks of ``tick_size``, sizes and volume in lots. Unlike the
        pipeline's committed ticks (``write_ticks``), a tick from anywhere has its integers checked here."""
        for value in (tick.bid, tick.ask, tick.last, tick.bid_size, tick.ask_size, tick.volume):
            if value is not None:
                _field_value(value)  # raises ValueError for what InfluxDB's int64 cannot hold
        self.write(TickPoint(TickSeries(tick.symbol, tick_size, lot_size), tick))

    def write_trade(
        self,
        *,
        symbol: str,
        trade_id: str,
        price: int,
        quantity: int,
        aggressor_side: str,
        ts_ns: int,
        tick_size: Decimal,
        lot_size: Decimal,
    ) -> None:
        """A ``trades`` point: ``price`` in ticks, ``quantity`` in lots; the trade id is a field, not a tag,
        so it does not create a series per trade."""
        tags = {"symbol": symbol, "side": aggressor_side, "tick_size": _plain(tick_size), "lot_size": _plain(lot_size)}
        fields: dict[str, FieldValue] = {"price": price, "quantity": quantity, "trade_id": trade_id}
        self.write(Point(TRADES, tags, fields, ts_ns))

    def write_performance(self, tags: Mapping[str, str], fields: Mapping[str, FieldValue], ts_ns: int) -> None:
        """A ``performance`` point (strategy or account figures such as equity, P&L, fill ratio)."""
        self.write(Point(PERFORMANCE, tags, fields, ts_ns))

    def write_system_metric(self, tags: Mapping[str, str], fields: Mapping[str, FieldValue], ts_ns: int) -> None:
        """A ``system_metrics`` point (process or service health: latencies, queue depths, rates)."""
        self.write(Point(SYSTEM_METRICS, tags, fields, ts_ns))

    # ---------------------------------------------------------------------------------- background

    def _drop(self, points: list[Buffered], reason: str) -> None:
        self._count_dropped(Tally(point.measurement for point in points), reason)

    def _count_dropped(self, by_measurement: Tally[str], reason: str) -> None:
        total = by_measurement.total()
        if not total:
            return
        for measurement, count in by_measurement.items():
            POINTS_DROPPED.labels(measurement, reason).inc(count)
        self.stats.dropped[reason] = self.stats.dropped.get(reason, 0) + total
        if reason == "overflow":  # at ingest rates this would be every commit: once per interval is enough
            now = time.monotonic()
            if now - self._overflow_logged < OVERFLOW_LOG_INTERVAL_S:
                return
            self._overflow_logged = now
        if reason != "shutdown":
            log.warning("influxdb: dropped %d point(s) (%s), %d so far", total, reason, self.stats.dropped[reason])

    async def _run(self) -> None:
        while True:
            if not self._buffer:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if len(self._buffer) < self.batch_size and not self._closing:
                # Let a batch fill up, but never hold the oldest point longer than the flush interval.
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), self.flush_interval_s)
            await self._send_next_batch()

    async def _send_next_batch(self) -> None:
        self._batch.extend(self._buffer.popleft() for _ in range(min(self.batch_size, len(self._buffer))))
        try:
            await self._deliver()
        finally:
            self._posting = False
            BUFFERED_POINTS.set(self.pending)

    async def _deliver(self) -> None:
        """Send the batch until every point of it is written or refused for good (see the module docstring for
        each answer). While InfluxDB is down or refuses the sink's credentials, back off; meanwhile ``write``
        trims the oldest points (the batch's first) so batch + buffer stay within the bound."""
        backoff = self.initial_backoff_s
        size = len(self._batch)  # points per request: halved while InfluxDB answers 413
        while self._batch:
            batch = list(itertools.islice(self._batch, size))
            self._posting = True
            try:
                status, error = await self._post(encode(batch))
                reason = f"HTTP {status}"
            except httpx.HTTPError as exc:
                status, error, reason = None, "", f"{exc.__class__.__name__}: {exc}"
            finally:
                self._posting = False
            if status in (204, 400, 422):  # settled: these points are done with
                for _ in batch:
                    self._batch.popleft()
                self.stats.consecutive_failures = 0
                if status == 204:
                    self.stats.last_written_at = time.time()
                    self._count_written(Tally(point.measurement for point in batch))
                    if self._refusal_logged[0] in (401, 403, 404):
                        log.info("influxdb at %s takes the sink's writes again", self.url)
                        self._refusal_logged = (None, -math.inf)
                else:
                    self._settle_refused(batch, status, error)
                backoff = self.initial_backoff_s
                continue
            self.stats.failures += 1
            self.stats.consecutive_failures += 1
            self.stats.last_failure = WriteFailure(time.time(), status, error[:SAMPLE_CHARS] or reason)
            WRITE_FAILURES.inc()
            if status == 413:
                if len(batch) > 1:
                    size = len(batch) // 2
                    self._log_refusal(
                        413,
                        "influxdb refused %d point(s) as too large (HTTP 413: %s); sending them in parts of %d:"
                        " raise the server's [http] max-body-size (or the body limit of a proxy before it)",
                        len(batch),
                        error[:SAMPLE_CHARS],
                        size,
                    )
                    continue
                self._batch.popleft()
                self.stats.consecutive_failures = 0  # refused for good: settled like a 400
                log.error(
                    "influxdb refused a point as too large even alone (HTTP 413: %s): %s",
                    error[:SAMPLE_CHARS],
                    _sample(batch[0]),
                )
                self._drop(batch, "rejected")
                continue
            if self._closing:
                self._drop(list(self._batch), "shutdown")
                self._batch.clear()
                return
            if status in (401, 403, 404):
                self._log_refusal(
                    status,
                    "%s; %d point(s) wait for it, retried with backoff",
                    self._fix(status, error),
                    len(self._batch),
                )
            else:
                log.warning("influxdb write of %d point(s) failed (%s); retrying in %.2fs", len(batch), reason, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff_s)

    def _fix(self, status: int, error: str) -> str:
        """What an operator must do about an answer that no retry mends by itself (401, 403, 404)."""
        answer = f"HTTP {status}: {error[:SAMPLE_CHARS]}"
        if status == 401:
            return (
                f"influxdb at {self.url} refused the sink's credentials ({answer}): put a valid user and password"
                " in the sink's URL (TRADEPLANE_INFLUXDB_URL=http://user:password@host:8086)"
            )
        if status == 403:
            user = "<user>" if self._user is None else f'"{self._user}"'
            return (
                f"influxdb at {self.url} does not let user {user} write to database {self.database!r} ({answer}):"
                f' grant it (GRANT WRITE ON "{self._quoted_database}" TO {user}) or put a user that may in the'
                " sink's URL (TRADEPLANE_INFLUXDB_URL)"
            )
        return (
            f"influxdb at {self.url} has no database {self.database!r} and the sink could not create it ({answer}):"
            f' create it (1.x: CREATE DATABASE "{self._quoted_database}"; 2.x: a bucket mapped to that database),'
            " or correct TRADEPLANE_INFLUXDB_DATABASE and the path of TRADEPLANE_INFLUXDB_URL"
        )

    def _log_refusal(self, status: int, message: str, *args: object) -> None:
        """Log an answer that needs an operator when it first comes, and then at most once per interval."""
        logged_status, logged_at = self._refusal_logged
        now = time.monotonic()
        if status == logged_status and now - logged_at < REFUSAL_LOG_INTERVAL_S:
            return
        self._refusal_logged = (status, now)
        log.log(logging.WARNING if status == 413 else logging.ERROR, message, *args)

    def _count_written(self, by_measurement: Tally[str]) -> None:
        for measurement, count in by_measurement.items():
            POINTS_WRITTEN.labels(measurement).inc(count)
        self.stats.written += by_measurement.total()

    def _settle_refused(self, batch: list[Buffered], status: int, error: str) -> None:
        """Count a batch answered 400 or 422: refused whole, or written but for the points the answer says it
        dropped."""
        match = _PARTIAL_WRITE.fullmatch(error)
        if match is None:
            log.error(
                "influxdb refused a batch of %d point(s) (HTTP %d): %s; its first point: %s",
                len(batch),
                status,
                error[:500],
                _sample(batch[0]),
            )
            self._drop(batch, "rejected")
            return
        self.stats.last_written_at = time.time()  # written in part: InfluxDB takes the sink's writes
        dropped = int(match["dropped"])
        by_measurement = Tally(point.measurement for point in batch)
        if not 0 < dropped <= len(batch):
            # Lines InfluxDB could not parse are not in its count (1.x says dropped=0), so how many of the batch
            # it stored is unknown: say so rather than count them either way.
            for measurement, count in by_measurement.items():
                POINTS_UNCONFIRMED.labels(measurement).inc(count)
            self.stats.unconfirmed += len(batch)
            log.error(
                "influxdb wrote a batch of %d point(s) only in part without counting what it dropped"
                " (it says dropped=%d); they are counted as unconfirmed: %s",
                len(batch),
                dropped,
                error[:500],
            )
            return
        if len(by_measurement) == 1:
            (measurement,) = by_measurement
        else:
            measurement = UNATTRIBUTED  # the answer does not say which measurements' points it dropped
        log.error("influxdb dropped %d of a batch of %d point(s): %s", dropped, len(batch), error[:500])
        self._count_written(Tally({measurement: len(batch) - dropped}))
        self._count_dropped(Tally({measurement: dropped}), "rejected")

    async def _post(self, body: bytes) -> tuple[int, str]:
        """The answer's status and, for an error, InfluxDB's message."""
        if not self._database_ready:
            response = await self._client.post("/query", params={"q": f'CREATE DATABASE "{self._quoted_database}"'})
            # 403: a user that is not an admin may still write, into a database an admin made (if there is none,
            # the write answers 404 and says so).
            if response.status_code not in (200, 403):
                return response.status_code, _error_message(response)
            self._database_ready = response.status_code == 200
        response = await self._client.post("/write", params={"db": self.database, "precision": "ns"}, content=body)
        if response.status_code == 204:
            self._database_ready = True
            return 204, ""
        if response.status_code == 404:  # database dropped under us: create it again next time
            self._database_ready = False
        return response.status_code, _error_message(response)

    @property
    def _quoted_database(self) -> str:
        return self.database.replace("\\", "\\\\").replace('"', '\\"')


def _sample(point: Buffered) -> str:
    """A point as line protocol, cut for a log line."""
    line = point.to_line()
    return line if len(line) <= SAMPLE_CHARS else f"{line[:SAMPLE_CHARS]}... ({len(line)} characters)"


def _error_message(response: httpx.Response) -> str:
    """InfluxDB's error text: 1.x answers ``{"error": ...}`` and repeats it in ``X-Influxdb-Error`` (where line
    breaks become spaces); 2.x answers ``{"code": ..., "message": ...}``."""
    with contextlib.suppress(ValueError, AttributeError):
        body = response.json()
        for key in ("error", "message"):
            message = body.get(key)
            if isinstance(message, str):
                return message
    header: str = response.headers.get("X-Influxdb-Error", response.text)
    return header
