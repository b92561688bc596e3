"""Time-series storage for market data: TimescaleDB hypertables when the extension can be had, native
daily range partitions otherwise, behind one set of functions.

Native layout: ``ticks``, ``trades``, ``depth_snapshots`` and ``spreads`` are ``PARTITION BY RANGE (ts)``
with one partition per UTC day named ``<table>_pYYYYMMDD`` covering ``[day 00:00Z, day+1 00:00Z)``.
There is deliberately no DEFAULT partition: a row for a day without a partition fails loudly instead of
piling up where retention cannot drop it, so writers call :func:`ensure_daily_partitions` ahead of time
(the migration creates yesterday .. 7 days ahead) and for the days of any replayed history. Retention
drops whole partitions (:func:`drop_partitions_older_than`), which is instant and leaves no bloat. Retention
that archives first detaches each expired partition and renames it ``<partition>_archiving``
(:func:`detach_partitions_older_than_async`): no row can enter it any more, so its archive is complete; it is
dropped once archived (:func:`drop_detached_async`), and one whose archive failed stays until a later run
(:func:`detached_partitions_async`).

TimescaleDB layout: the same tables are hypertables with 1-day chunks; ensuring partitions is a no-op
and retention calls ``drop_chunks``.

Each function comes twice: for a synchronous SQLAlchemy ``Connection`` (migrations, or
``AsyncConnection.run_sync``) and, suffixed ``_async``, for an asyncpg connection (the run-time pool).
They run inside the caller's transaction; the asyncpg variants open one (or a savepoint) themselves.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Literal

import asyncpg
from sqlalchemy import text
from sqlalchemy.engine import Connection

from tradeplane.adapters.db.tables import TIMESERIES_TABLES

log = logging.getLogger("tradeplane.db")

StorageKind = Literal["hypertable", "partitioned", "plain", "missing"]

TIMESCALE_EXTENSION = "timescaledb"
#: Marker comment put on the extension when our migration created it, so the downgrade drops only an
#: extension it installed itself.
TIMESCALE_MARKER = "installed by tradeplane migration 0001"

_AVAILABLE_SQL = "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb')"
_INSTALLED_SQL = "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')"
_RELKIND_SQL = "SELECT c.relkind::text FROM pg_class c WHERE c.oid = to_regclass($1)"
_HYPERTABLE_SQL = (
    "SELECT EXISTS (SELECT 1 FROM timescaledb_information.hypertables"
    " WHERE hypertable_schema = current_schema() AND hypertable_name = $1)"
)
_PARTITIONS_SQL = (
    "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
    " WHERE i.inhparent = to_regclass($1) ORDER BY 1"
)
_LOCK_SQL = "SELECT pg_advisory_xact_lock(hashtext($1))"
#: Tables of this schema, not partitions, named like a detached partition waiting for its archive.
_DETACHED_SQL = (
    "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
    " WHERE n.nspname = current_schema() AND c.relkind = 'r' AND NOT c.relispartition"
    " AND c.relname LIKE '%\\_archiving' ORDER BY 1"
)
_EXISTS_SQL = "SELECT to_regclass($1) IS NOT NULL"
_DROP_CHUNKS_SQL = (
    "SELECT CAST(drop_chunks(CAST(CAST($1 AS text) AS regclass), older_than => CAST($2 AS timestamptz)) AS text)"
)


def _checked(table: str) -> str:
    """Table names end up in DDL, so only the known time-series tables are accepted."""
    if table not in TIMESERIES_TABLES:
        raise ValueError(f"{table!r} is not a time-series table (one of {', '.join(TIMESERIES_TABLES)})")
    return table


def partition_name(table: str, day: date) -> str:
    return f"{_checked(table)}_p{day:%Y%m%d}"


#: Suffix of a partition detached by retention and waiting for its archive (see module docstring).
ARCHIVING_SUFFIX = "_archiving"


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _utc_midnight(day: date) -> datetime:
    return datetime.combine(day, time(0), tzinfo=UTC)


def partition_ddl(table: str, day: date) -> str:
    """CREATE statement for the partition holding ``[day 00:00Z, day+1 00:00Z)``."""
    lower = _utc_midnight(day).isoformat()
    upper = _utc_midnight(day + timedelta(days=1)).isoformat()
    return (
        f'CREATE TABLE IF NOT EXISTS "{partition_name(table, day)}" PARTITION OF "{_checked(table)}"'
        f" FOR VALUES FROM ('{lower}') TO ('{upper}')"
    )


def _days(start: date, days: int) -> list[date]:
    if days < 0:
        raise ValueError("days must be >= 0")
    return [start + timedelta(days=offset) for offset in range(days)]


def _partition_day(table: str, name: str) -> date | None:
    """The day of a partition we named, or None for a partition someone else attached."""
    match = re.fullmatch(re.escape(table) + r"_p(\d{8})", name)
    return datetime.strptime(match.group(1), "%Y%m%d").date() if match else None


def _detached_day(table: str, name: str) -> date | None:
    """The day of a partition retention detached for its archive (``<table>_pYYYYMMDD_archiving``), or None."""
    stem = name.removesuffix(ARCHIVING_SUFFIX)
    return _partition_day(table, stem) if stem != name else None


def _expired(table: str, names: Sequence[str], cutoff: date) -> list[str]:
    """Partitions lying wholly before ``cutoff`` (00:00Z), oldest first."""
    expired = []
    for name in names:
        day = _partition_day(table, name)
        if day is not None and day < cutoff:
            expired.append(name)
    return expired


def _storage(relkind: str | None, is_hypertable: bool) -> StorageKind:
    if relkind is None:
        return "missing"
    if relkind == "p":
        return "partitioned"
    return "hypertable" if is_hypertable else "plain"


# ------------------------------------------------------------------------- synchronous (SQLAlchemy)


def _sa(sql: str) -> Any:
    """asyncpg-style ``$n`` placeholders to SQLAlchemy ``:pn`` binds, so both variants share SQL."""
    return text(re.sub(r"\$(\d+)", r":p\1", sql))


def _params(*args: object) -> dict[str, object]:
    return {f"p{index}": value for index, value in enumerate(args, start=1)}


def timescale_available(conn: Connection) -> bool:
    """True if the server offers the TimescaleDB extension (installed or installable)."""
    available = bool(conn.execute(_sa(_AVAILABLE_SQL)).scalar())
    log.info("timescaledb %s on this server", "available" if available else "not available")
    return available


def enable_timescale(conn: Connection) -> bool:
    """Install TimescaleDB if the server offers it; False (and nothing changed) if that fails.

    Listed in pg_available_extensions is not enough: the library must also be preloaded. So the
    CREATE EXTENSION is tried inside a savepoint and a failure means the native path.
    """
    if bool(conn.execute(_sa(_INSTALLED_SQL)).scalar()):
        log.info("timescaledb already installed: market data uses hypertables")
        return True
    if not timescale_available(conn):
        log.info("market data uses native daily partitions")
        return False
    savepoint = conn.begin_nested()
    try:
        conn.execute(text("CREATE EXTENSION timescaledb"))
        conn.execute(text(f"COMMENT ON EXTENSION timescaledb IS '{TIMESCALE_MARKER}'"))
    except Exception as exc:  # any server refusal means: use native partitions
        savepoint.rollback()
        log.warning("timescaledb could not be installed (%s): market data uses native daily partitions", exc)
        return False
    savepoint.commit()
    log.info("timescaledb installed: market data uses hypertables")
    return True


def storage_kind(conn: Connection, table: str) -> StorageKind:
    relkind = conn.execute(_sa(_RELKIND_SQL), _params(_checked(table))).scalar()
    hypertable = False
    if relkind == "r" and bool(conn.execute(_sa(_INSTALLED_SQL)).scalar()):
        hypertable = bool(conn.execute(_sa(_HYPERTABLE_SQL), _params(table)).scalar())
    return _storage(relkind, hypertable)


def ensure_daily_partitions(conn: Connection, table: str, start: date, days: int) -> list[str]:
    """Create the missing daily partitions ``start .. start+days-1``; returns the names created.

    Idempotent and safe to race: concurrent callers serialise on an advisory lock per table. A no-op
    (returns []) when the table is a hypertable.
    """
    if storage_kind(conn, table) != "partitioned":
        return []
    conn.execute(_sa(_LOCK_SQL), _params(f"tradeplane.partitions.{table}"))
    existing = set(conn.execute(_sa(_PARTITIONS_SQL), _params(table)).scalars())
    created = []
    for day in _days(start, days):
        name = partition_name(table, day)
        if name not in existing:
            conn.execute(text(partition_ddl(table, day)))
            created.append(name)
    if created:
        log.info("created partitions %s", ", ".join(created))
    return created


def drop_partitions_older_than(conn: Connection, table: str, cutoff: date) -> list[str]:
    """Retention: drop every partition (or chunk) wholly before ``cutoff`` 00:00Z; returns their names."""
    kind = storage_kind(conn, table)
    if kind == "hypertable":
        dropped = list(conn.execute(_sa(_DROP_CHUNKS_SQL), _params(table, _utc_midnight(cutoff))).scalars())
    elif kind == "partitioned":
        conn.execute(_sa(_LOCK_SQL), _params(f"tradeplane.partitions.{table}"))
        names = list(conn.execute(_sa(_PARTITIONS_SQL), _params(table)).scalars())
        dropped = _expired(table, names, cutoff)
        for name in dropped:
            conn.execute(text(f'DROP TABLE "{name}"'))
    else:
        dropped = []
    if dropped:
        log.info("retention dropped %s", ", ".join(dropped))
    return dropped


# ------------------------------------------------------------------------------------ asyncpg (run time)


async def timescale_available_async(conn: asyncpg.Connection) -> bool:
    """As :func:`timescale_available`, for an asyncpg connection."""
    available = bool(await conn.fetchval(_AVAILABLE_SQL))
    log.info("timescaledb %s on this server", "available" if available else "not available")
    return available


async def storage_kind_async(conn: asyncpg.Connection) -> dict[str, StorageKind]:
    """Storage of every time-series table, for an asyncpg connection: how the ingester picks its path."""
    installed = bool(await conn.fetchval(_INSTALLED_SQL))
    kinds: dict[str, StorageKind] = {}
    for table in TIMESERIES_TABLES:
        relkind = await conn.fetchval(_RELKIND_SQL, table)
        hypertable = relkind == "r" and installed and bool(await conn.fetchval(_HYPERTABLE_SQL, table))
        kinds[table] = _storage(relkind, hypertable)
    return kinds


async def ensure_daily_partitions_async(conn: asyncpg.Connection, table: str, start: date, days: int) -> list[str]:
    """As :func:`ensure_daily_partitions`, for an asyncpg connection (runs in its own transaction)."""
    kinds = await storage_kind_async(conn)
    if kinds[_checked(table)] != "partitioned":
        return []
    async with conn.transaction():
        await conn.execute(_LOCK_SQL, f"tradeplane.partitions.{table}")
        existing = {row[0] for row in await conn.fetch(_PARTITIONS_SQL, table)}
        created = []
        for day in _days(start, days):
            name = partition_name(table, day)
            if name not in existing:
                await conn.execute(partition_ddl(table, day))
                created.append(name)
    if created:
        log.info("created partitions %s", ", ".join(created))
    return created


async def drop_partitions_older_than_async(conn: asyncpg.Connection, table: str, cutoff: date) -> list[str]:
    """As :func:`drop_partitions_older_than`, for an asyncpg connection (runs in its own transaction)."""
    kind = (await storage_kind_async(conn))[_checked(table)]
    dropped: list[str] = []
    async with conn.transaction():
        if kind == "hypertable":
            dropped = [row[0] for row in await conn.fetch(_DROP_CHUNKS_SQL, table, _utc_midnight(cutoff))]
        elif kind == "partitioned":
            await conn.execute(_LOCK_SQL, f"tradeplane.partitions.{table}")
            names = [row[0] for row in await conn.fetch(_PARTITIONS_SQL, table)]
            dropped = _expired(table, names, cutoff)
            for name in dropped:
                await conn.execute(f'DROP TABLE "{name}"')
    if dropped:
        log.info("retention dropped %s", ", ".join(dropped))
    return dropped


async def detach_partitions_older_than_async(conn: asyncpg.Connection, table: str, cutoff: date) -> list[str]:
    """Retention with an archive: detach every partition of ``table`` wholly before ``cutoff`` 00:00Z and
    rename it ``<partition>_archiving``, in one transaction; returns the new names, oldest first.

    The plain DETACH (not CONCURRENTLY, which cannot share a transaction with the rename) takes ACCESS
    EXCLUSIVE on the parent, as DROP of a partition does, so it waits for writers in flight and afterwards
    no row can enter the detached table: its archive is complete. Parent then partition is the order writers
    lock in, so no deadlock. The rename frees the day's name in the same transaction: a late row for that
    day gets a new partition (:func:`ensure_daily_partitions_async`; ``CREATE TABLE IF NOT EXISTS`` would
    silently skip a detached table still holding the name), archived by a later run. A day whose previously
    detached table is still there (its archive failed) stays attached until that one is gone.
    Native partitions only: returns [] for a hypertable or a plain table.
    """
    if (await storage_kind_async(conn))[_checked(table)] != "partitioned":
        return []
    detached: list[str] = []
    async with conn.transaction():
        await conn.execute(_LOCK_SQL, f"tradeplane.partitions.{table}")
        names = [row[0] for row in await conn.fetch(_PARTITIONS_SQL, table)]
        for name in _expired(table, names, cutoff):
            target = name + ARCHIVING_SUFFIX
            if await conn.fetchval(_EXISTS_SQL, _quoted(target)):
                log.warning("retention keeps %s attached: %s is still waiting for its archive", name, target)
                continue
            await conn.execute(f"ALTER TABLE {_quoted(table)} DETACH PARTITION {_quoted(name)}")
            await conn.execute(f"ALTER TABLE {_quoted(name)} RENAME TO {_quoted(target)}")
            detached.append(target)
    if detached:
        log.info("retention detached %s", ", ".join(detached))
    return detached


async def detached_partitions_async(conn: asyncpg.Connection, table: str) -> list[str]:
    """The partitions of ``table`` that retention detached and has not yet archived and dropped, oldest first."""
    _checked(table)
    return [row[0] for row in await conn.fetch(_DETACHED_SQL) if _detached_day(table, row[0]) is not None]


async def drop_detached_async(conn: asyncpg.Connection, table: str, name: str) -> None:
    """Drop a partition of ``table`` that retention detached (and the caller archived)."""
    if _detached_day(table, name) is None:
        raise ValueError(f"{name!r} is not a detached partition of {_checked(table)}")
    await conn.execute(f"DROP TABLE {_quoted(name)}")
    log.info("retention dropped %s", name)
