"""The audit sealer: rows written by the order path are chained within moments, whatever their commit order."""

from __future__ import annotations

import asyncio

import asyncpg

from tradeplane.adapters.postgres import Database
from tradeplane.services.audit import AuditSealer


async def unsealed(db: Database) -> int:
    async with db.connection("test") as conn:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM audit_log a WHERE NOT EXISTS (SELECT FROM audit_chain c WHERE c.audit_id = a.id)"
        )
    return count


async def test_running_sealer_chains_rows_as_they_commit(database_url: str) -> None:
    db = Database(database_url, min_size=1, max_size=4)
    await db.connect()
    stop = asyncio.Event()
    sealer = asyncio.create_task(AuditSealer(db, batch_size=50, idle_sleep_s=0.01).run(stop))
    try:
        async with db.transaction("test") as conn:
            await conn.execute(
                "INSERT INTO audit_log (action, entity) SELECT 'a' || n, 'test' FROM generate_series(1, 120) n"
            )
        async with asyncio.timeout(10):
            while await unsealed(db):  # noqa: ASYNC110 - polling the database, not an in-process event
                await asyncio.sleep(0.01)
        check = await AuditSealer(db).verify()
        assert check.bad_row_ids == [] and check.unsealed == 0 and check.sealed_now == 0
        async with db.connection("test") as conn:
            assert await conn.fetchval("SELECT max(seq) FROM audit_chain") == 120
    finally:
        stop.set()
        await sealer
        await db.close()


async def test_verify_seals_more_than_one_batch(database_url: str) -> None:
    db = Database(database_url, min_size=1, max_size=2)
    await db.connect()
    try:
        async with db.transaction("test") as conn:
            await conn.execute("INSERT INTO audit_log (action, entity) SELECT 'a', 't' FROM generate_series(1, 25) n")
        check = await AuditSealer(db, batch_size=10).verify()
        assert (check.sealed_now, check.bad_row_ids, check.unsealed) == (25, [], 0)
    finally:
        await db.close()


async def test_verify_seals_what_committed_and_waits_only_for_writers_ahead_of_it(database_url: str) -> None:
    db = Database(database_url, min_size=1, max_size=2)
    await db.connect()
    writer = await asyncpg.connect(database_url)
    try:
        async with db.transaction("test") as conn:
            await conn.execute("INSERT INTO audit_log (action, entity) SELECT 'a', 't' FROM generate_series(1, 3) n")
        # A writer that took its transaction id after those rows does not hold them back.
        open_tx = writer.transaction()
        await open_tx.start()
        await writer.execute("INSERT INTO audit_log (action, entity) VALUES ('still open', 't')")
        check = await AuditSealer(db).verify()
        assert (check.sealed_now, check.bad_row_ids, check.unsealed) == (3, [], 0)

        # A row committed after it waits for it (the open writer may still add a row that belongs before);
        # verify waits at most wait_s and reports the row as unsealed.
        async with db.transaction("test") as conn:
            await conn.execute("INSERT INTO audit_log (action, entity) VALUES ('behind', 't')")
        check = await AuditSealer(db).verify(wait_s=0.2)
        assert (check.sealed_now, check.bad_row_ids, check.unsealed) == (0, [], 1)

        await open_tx.commit()
        check = await AuditSealer(db).verify()
        assert (check.sealed_now, check.bad_row_ids, check.unsealed) == (2, [], 0)
        async with db.connection("test") as conn:
            chained = [
                r[0]
                for r in await conn.fetch(
                    "SELECT a.action FROM audit_chain c JOIN audit_log a ON a.id = c.audit_id ORDER BY c.seq"
                )
            ]
        assert chained == ["a", "a", "a", "still open", "behind"]
    finally:
        await writer.close()
        await db.close()
