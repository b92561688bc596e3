"""The asyncpg connection pool: the one way the platform talks to PostgreSQL at run time.

asyncpg over psycopg 3 because it speaks the binary protocol natively (binary COPY for market data,
cheap Decimal/NUMERIC decoding) and is the fastest Python driver. SQLAlchemy is used only for the
schema metadata and Alembic migrations.

Connection loss maps to InfrastructureUnavailable (HTTP 503). The pool replaces broken connections on
the next acquire, so service resumes by itself when the server returns. Only errors that mean the server
cannot be reached are mapped: an error of the caller's own inside a connection scope (a full disk while it
writes an archive there, a query asyncpg refuses to send on a healthy connection) stays what it is, and reaches
an API client as a 500 with its traceback logged, not as a 503 that would send it retrying.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import asyncpg
from prometheus_client import Histogram

from tradeplane.errors import InfrastructureUnavailable
from tradeplane.metrics import DATABASE_ERRORS, DATABASE_QUERY_DURATION

log = logging.getLogger("tradeplane.db")

# Opening a connection: any OSError means the server cannot be reached (refused, no route to the host, a name
# that does not resolve, a Unix socket that is not there), as do a timeout and the server refusing connections.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
)
# Inside a connection scope, a lost connection is one of asyncpg's connection errors, a timeout, or an OSError
# of the network: a ConnectionError (reset, aborted, broken pipe) or one of _NETWORK_ERRNOS. Any other OSError
# there is the caller's: a file it writes or reads in the scope (disk full, permission, no such folder), not
# PostgreSQL being away.
_CONNECTION_LOST: tuple[type[BaseException], ...] = (
    ConnectionError,
    *(error for error in CONNECTION_ERRORS if error is not OSError),
)
_NETWORK_ERRNOS = frozenset(
    (errno.ENETDOWN, errno.ENETUNREACH, errno.ENETRESET, errno.EHOSTDOWN, errno.EHOSTUNREACH, errno.ENOTCONN)
)


def _connection_lost(exc: BaseException, *, connection_open: bool) -> bool:
    """Whether ``exc``, raised while a connection was in use, means PostgreSQL cannot be reached.

    asyncpg raises ``InterfaceError`` both for a connection that is gone ("connection is closed") and for a call it
    refuses on a healthy one, before anything reaches the server: a wrong number of arguments, a second query
    while one runs, a parameter it cannot encode (documented as its ``InterfaceError`` subclass ``DataError``;
    asyncpg 0.32 raises the SQLSTATE-22 ``asyncpg.DataError``, a ``PostgresError``, instead). Only the first is
    an outage, told apart by whether the connection is still open (``connection_open``).
    """
    if isinstance(exc, asyncpg.InterfaceError):
        return not connection_open and not isinstance(exc, ValueError)  # DataError, ClientConfigurationError
    return isinstance(exc, _CONNECTION_LOST) or (isinstance(exc, OSError) and exc.errno in _NETWORK_ERRNOS)


# For a transaction whose statements take arrays (``unnest($1::bigint[])``, ``= ANY($1)``): PostgreSQL plans
# such a prepared statement afresh on every call (each call's array length changes its estimates, so it keeps
# preferring custom plans), and for a batch of a few rows planning costs more than running. A generic plan is
# planned once per connection and statement and kept until the tables' statistics change, so use it only for
# statements that stay index lookups whatever the table sizes: order placement's (measured: 0.1 ms less CPU
# per order at 500 single orders/s). Not the engine's: its cached generic plan for loading order rows was a
# sequential scan of orders, planned while the table was small and kept until the first ANALYZE.
# ``await conn.execute(GENERIC_PLANS)`` first thing in the transaction.
GENERIC_PLANS = "SET LOCAL plan_cache_mode = force_generic_plan"


# database_query_duration_seconds' child per operation: ``labels()`` costs a lock and a tuple of strings on every
# call, once per transaction. As bounded as the operation names, which are code constants (prometheus_client
# keeps every child anyway).
_DURATIONS: dict[str, Histogram] = {}


def _duration_of(operation: str) -> Histogram:
    child = _DURATIONS.get(operation)
    if child is None:
        child = _DURATIONS[operation] = DATABASE_QUERY_DURATION.labels(operation)
    return child


def describe_server(url: str) -> str:
    """host:port/db without credentials, for error messages."""
    parts = urlsplit(url)
    return f"{parts.hostname or 'socket'}:{parts.port or 5432}{parts.path}"


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Release without asyncpg's default reset query (RESET ALL, UNLISTEN *, CLOSE ALL, advisory unlocks).

    That query is one more round trip on every release, i.e. on every request. The platform never leaves
    session state on a pooled connection: no SET, LISTEN, session advisory lock or cursor outside a
    transaction. asyncpg still rolls back a transaction left open before calling this.
    """


class Database:
    def __init__(self, url: str, *, min_size: int = 2, max_size: int = 20, timeout: float = 5.0) -> None:
        self.url = url
        self._min_size = min_size
        self._max_size = max_size
        self._timeout = timeout
        self._pool: asyncpg.Pool | None = None

    async def connect(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self.url,
                min_size=self._min_size,
                max_size=self._max_size,
                timeout=self._timeout,
                command_timeout=30,
                reset=_keep_session,
            )
        except CONNECTION_ERRORS as exc:
            raise InfrastructureUnavailable(
                f"PostgreSQL at {describe_server(self.url)} is unreachable ({exc.__class__.__name__}: {exc}); "
                "check TRADEPLANE_DATABASE_URL and that the server is running"
            ) from None

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise InfrastructureUnavailable("PostgreSQL pool is not connected")
        return self._pool

    @asynccontextmanager
    async def connection(self, operation: str) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection; its time and failures are recorded under `operation`."""
        started = time.perf_counter()
        acquired = connection_open = False
        try:
            async with self.pool.acquire(timeout=self._timeout) as conn:  # may open a connection
                acquired = True
                try:
                    yield conn
                except asyncpg.InterfaceError:
                    connection_open = not conn.is_closed()  # asked before the pool takes the connection back
                    raise
        except CONNECTION_ERRORS as exc:
            if acquired and not _connection_lost(exc, connection_open=connection_open):
                if isinstance(exc, asyncpg.InterfaceError):
                    DATABASE_ERRORS.labels(operation).inc()  # a query that failed, though PostgreSQL is fine
                raise  # the caller's own error inside the scope (a file's OSError, a refused query), not an outage
            DATABASE_ERRORS.labels(operation).inc()
            raise InfrastructureUnavailable(f"PostgreSQL unavailable: {exc.__class__.__name__}") from exc
        except asyncpg.PostgresError:
            DATABASE_ERRORS.labels(operation).inc()
            raise
        finally:
            _duration_of(operation).observe(time.perf_counter() - started)

    @asynccontextmanager
    async def transaction(self, operation: str) -> AsyncIterator[asyncpg.Connection]:
        """One transaction: committed when the block exits normally, rolled back otherwise.

        Services never commit; the caller's scope (request, message batch, CLI command) does, here.
        """
        async with self.connection(operation) as conn, conn.transaction():
            yield conn

    async def ping(self) -> float:
        started = time.perf_counter()
        async with self.connection("health") as conn:
            await conn.fetchval("SELECT 1", timeout=self._timeout)
        return time.perf_counter() - started

    async def roundtrip_test(self) -> None:
        """Write a row and read it back inside a transaction that leaves nothing behind."""
        async with self.connection("check") as conn:
            tx = conn.transaction()
            await tx.start()
            try:
                await conn.execute("CREATE TEMP TABLE tradeplane_check (v text) ON COMMIT DROP")
                await conn.execute("INSERT INTO tradeplane_check VALUES ('probe')")
                value = await conn.fetchval("SELECT v FROM tradeplane_check")
            finally:
                await tx.rollback()
        if value != "probe":
            raise InfrastructureUnavailable(f"PostgreSQL returned {value!r} for the written probe")
