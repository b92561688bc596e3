"""The audit sealer: chains committed ``audit_log`` rows off the order path.

Writers insert audit rows and take no lock (``tables.audit_log``); the rows are never updated. The sealer calls
``tp_audit_log_seal`` in a loop, which appends the rows of finished transactions to ``audit_chain`` (chain
position and hash) under the ``audit_log_head`` row lock. Any number of sealers may run: the head lock makes
them take turns, and each seals what the previous one left. The relay worker runs one.

A row is sealed once every transaction that was assigned an id before its own has ended (migration 0009), so
a writing transaction held open anywhere on the PostgreSQL server delays sealing until it ends; nothing is
skipped.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from tradeplane.adapters.postgres import Database
from tradeplane.errors import InfrastructureUnavailable
from tradeplane.services.stopping import pause

log = logging.getLogger("tradeplane.audit")

# The first transaction id not yet assigned: every transaction that committed before has a smaller one.
_NEXT_XACT_ID = "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint"

# Is a committed row of a transaction below $1 still unchained? (Rows below the head's cursor never are.)
_COMMITTED_UNSEALED = """
SELECT EXISTS (
    SELECT FROM audit_log a
     WHERE a.xact_id >= (SELECT xact_cursor FROM audit_log_head WHERE singleton) AND a.xact_id < $1
       AND NOT EXISTS (SELECT FROM audit_chain c WHERE c.audit_id = a.id)
)
"""

_UNSEALED = "SELECT count(*) FROM audit_log a WHERE NOT EXISTS (SELECT FROM audit_chain c WHERE c.audit_id = a.id)"


@dataclass(frozen=True, slots=True)
class AuditCheck:
    sealed_now: int
    bad_row_ids: list[int]
    # rows unsealed after sealing: uncommitted when sealing ran, written since, or committed behind a
    # transaction still open on the server when the wait ended
    unsealed: int


class AuditSealer:
    def __init__(self, db: Database, *, batch_size: int = 10_000, idle_sleep_s: float = 0.1) -> None:
        self.db = db
        self.batch_size = batch_size
        self.idle_sleep_s = idle_sleep_s

    async def seal_pending(self) -> int:
        """Seal up to one batch of the rows of finished transactions; returns how many were sealed."""
        async with self.db.connection("audit.seal") as conn:
            # One statement is its own transaction: the function's locks and rows commit with it, in one round
            # trip rather than three (BEGIN, the call, COMMIT), on every wake-up, busy or idle.
            sealed: int = await conn.fetchval("SELECT tp_audit_log_seal($1)", self.batch_size)
        return sealed

    async def seal_committed(self, *, wait_s: float = 10.0) -> int:
        """Seal every row committed before this call; returns how many rows were sealed.

        A committed row waits for the transactions assigned an id before its own; if one of them is still
        open after ``wait_s``, the rows behind it are left for a later call.
        """
        async with self.db.connection("audit.seal") as conn:
            target = int(await conn.fetchval(_NEXT_XACT_ID))
        deadline = asyncio.get_running_loop().time() + wait_s
        sealed = 0
        while True:
            batch = await self.seal_pending()
            sealed += batch
            if batch == self.batch_size:
                continue
            async with self.db.connection("audit.seal") as conn:
                behind = bool(await conn.fetchval(_COMMITTED_UNSEALED, target))
            if not behind or asyncio.get_running_loop().time() >= deadline:
                return sealed
            await asyncio.sleep(min(self.idle_sleep_s, 0.02))

    async def run(self, stop: asyncio.Event) -> None:
        """Seal until `stop` is set; a PostgreSQL outage is waited out, never fatal."""
        backoff = 0.1
        while not stop.is_set():
            try:
                sealed = await self.seal_pending()
                backoff = 0.1
            except InfrastructureUnavailable as exc:
                log.warning("audit sealer waiting for PostgreSQL: %s", exc.detail)
                await pause(stop, backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            if sealed < self.batch_size:
                await pause(stop, self.idle_sleep_s)

    async def verify(self, *, wait_s: float = 10.0) -> AuditCheck:
        """Seal everything committed so far (see `seal_committed`), then check the whole chain."""
        sealed = await self.seal_committed(wait_s=wait_s)
        async with self.db.connection("audit.verify") as conn:
            bad = [row[0] for row in await conn.fetch("SELECT * FROM tp_audit_log_verify()")]
            unsealed = await conn.fetchval(_UNSEALED)
        return AuditCheck(sealed, bad, unsealed)
