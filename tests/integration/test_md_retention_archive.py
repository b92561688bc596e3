"""Retention with an archive (native partitions): every row a dropped partition held is in its Parquet
archive, even a row committed while retention was running; a failed archive drops nothing and a later run
finishes the job; a tick arriving for a day being (or already) archived is stored and archived later, in a
file of its own."""

from __future__ import annotations

import asyncio
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from tests.integration.test_ingest import (  # noqa: F401 - fixture
    SECOND,
    WAIT_S,
    list_instrument,
    pipeline_factory,
    stored_ticks,
    until,
)
from tradeplane.bootstrap import Platform
from tradeplane.domain.ticks import Tick
from tradeplane.services.ingest import RetentionResult, apply_retention

OLD = 1_104_537_600_000_000_000  # 2005-01-01T00:00:00Z
PARTITION = "ticks_p20050101"
DETACHED = "ticks_p20050101_archiving"


async def old_day(platform: Platform, make_pipeline: Any, minutes: int) -> tuple[Any, Any]:
    """A listed instrument with ``minutes`` one-minute ticks stored on 2005-01-01, and its running pipeline."""
    a = await list_instrument(platform)
    pipeline = await make_pipeline([a])
    await pipeline.submit([Tick(OLD + i * 60 * SECOND, a.symbol, 100, 101, 1, 1, 100, 1) for i in range(minutes)])
    await pipeline.flush()
    return a, pipeline


async def test_a_row_committed_while_retention_runs_is_archived_before_its_partition_is_dropped(
    platform: Platform,
    pipeline_factory: Any,  # noqa: F811
    tmp_path: Path,
) -> None:
    a, _ = await old_day(platform, pipeline_factory, 30)
    async with platform.db.connection("test.late-writer") as writer, platform.db.connection("test.locks") as watcher:
        late = writer.transaction()
        await late.start()  # a writer is inserting into the old day as retention starts
        await writer.execute(
            "INSERT INTO ticks (ts, instrument_id, bid, ask, bid_size, ask_size, last, volume)"
            " VALUES ('2005-01-01T12:00:00Z', $1, 1.23, 1.24, 0.001, 0.001, NULL, NULL)",
            a.instrument_id,
        )
        retention = asyncio.create_task(
            apply_retention(
                platform.db, retention_days=30, instruments=[a], archive_dir=tmp_path, today=date(2005, 3, 1)
            )
        )
        waiting = (
            "SELECT count(*) > 0 FROM pg_locks WHERE NOT granted AND relation IN ('ticks'::regclass, $1::regclass)"
        )
        await until(lambda: watcher.fetchval(waiting, PARTITION))  # retention waits for the writer's lock
        await late.commit()
        result = await asyncio.wait_for(retention, WAIT_S)
    assert PARTITION in result.dropped
    assert await stored_ticks(platform, a) == []
    archived = pq.read_table(tmp_path / f"{PARTITION}.parquet").to_pylist()
    assert len(archived) == 31  # the 30 ticks stored before and the one committed meanwhile
    assert [str(row["bid"]) for row in archived if row["last"] is None] == ["1.23"]


async def test_a_failed_archive_drops_nothing_and_a_later_run_finishes_the_job(
    platform: Platform,
    pipeline_factory: Any,  # noqa: F811
    tmp_path: Path,
) -> None:
    a, _ = await old_day(platform, pipeline_factory, 5)
    not_a_folder = tmp_path / "archive"
    not_a_folder.write_text("a file where the archive folder should be")
    failed = await apply_retention(
        platform.db, retention_days=30, instruments=[a], archive_dir=not_a_folder, today=date(2005, 3, 1)
    )
    assert PARTITION not in failed.dropped
    assert DETACHED in failed.pending  # reported, and the rows kept in the detached table
    assert await rows_in(platform, DETACHED) == 5
    # Without an archive folder the waiting table is kept too (it was detached to be archived).
    unarchived = await apply_retention(platform.db, retention_days=30, instruments=[a], today=date(2005, 3, 1))
    assert DETACHED in unarchived.pending
    assert await rows_in(platform, DETACHED) == 5

    folder = tmp_path / "fixed"
    result = await apply_retention(
        platform.db, retention_days=30, instruments=[a], archive_dir=folder, today=date(2005, 3, 1)
    )
    assert PARTITION in result.dropped
    assert result.pending == []
    assert len(pq.read_table(folder / f"{PARTITION}.parquet")) == 5
    async with platform.db.connection("test.partitions") as conn:
        assert not await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", DETACHED)


async def test_a_late_tick_for_an_archived_day_is_stored_and_archived_without_overwriting_the_first_archive(
    platform: Platform,
    pipeline_factory: Any,  # noqa: F811
    tmp_path: Path,
) -> None:
    a, pipeline = await old_day(platform, pipeline_factory, 30)
    await retention(platform, [a], tmp_path)
    # A replayed (or very late) tick for the archived day gets a new partition for it...
    await pipeline.submit([Tick(OLD + 12 * 3600 * SECOND, a.symbol, 123, 124, 1, 1, None, 0)])
    await pipeline.flush()
    assert len(await stored_ticks(platform, a)) == 1
    # ... which the next run archives beside the first archive, not over it.
    result = await retention(platform, [a], tmp_path)
    assert tmp_path / f"{PARTITION}.1.parquet" in result.archived
    assert len(pq.read_table(tmp_path / f"{PARTITION}.parquet")) == 30
    assert len(pq.read_table(tmp_path / f"{PARTITION}.1.parquet")) == 1
    assert await stored_ticks(platform, a) == []


async def test_ticks_ingested_while_retention_detaches_their_day_are_stored_not_lost(
    platform: Platform,
    pipeline_factory: Any,  # noqa: F811
    tmp_path: Path,
) -> None:
    a, pipeline = await old_day(platform, pipeline_factory, 30)
    async with platform.db.connection("test.reader") as reader, platform.db.connection("test.locks") as watcher:
        read = reader.transaction()
        await read.start()
        await reader.fetchval("SELECT count(*) FROM ticks")  # a reader holds ticks: the detach queues behind it
        running = asyncio.create_task(retention(platform, [a], tmp_path))
        await until(lambda: waiting_for_ticks(watcher, 1))
        # the ingester's COPY for the day being detached queues behind the detach
        await pipeline.submit([Tick(OLD + 12 * 3600 * SECOND, a.symbol, 123, 124, 1, 1, None, 0)])
        await until(lambda: waiting_for_ticks(watcher, 2))
        await read.commit()
        result = await asyncio.wait_for(running, WAIT_S)
        await pipeline.flush()  # raises if the pipeline failed
    assert PARTITION in result.dropped
    assert len(pq.read_table(tmp_path / f"{PARTITION}.parquet")) == 30
    # ... after a retry of its commit, in a new partition for the day (archived by the next run)
    assert [row["bid"] for row in await stored_ticks(platform, a)] == [Decimal("1.23")]


async def waiting_for_ticks(watcher: Any, sessions: int) -> bool:
    waiting = "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'ticks'::regclass"
    return bool(await watcher.fetchval(waiting) >= sessions)


async def retention(platform: Platform, instruments: list[Any], archive_dir: Path) -> RetentionResult:
    return await apply_retention(
        platform.db, retention_days=30, instruments=instruments, archive_dir=archive_dir, today=date(2005, 3, 1)
    )


async def rows_in(platform: Platform, table: str) -> int:
    async with platform.db.connection("test.rows") as conn:
        return int(await conn.fetchval(f'SELECT count(*) FROM "{table}"'))
