"""The audit sealer: chains committed ``audit_log`` rows off the order path.

Writers insert audit rows unsealed and take no lock (``tables.audit_log``). The sealer calls
``tp_audit_log_seal`` in a loop, which gives committed unsealed rows their chain position and hash under the
``audit_log_head`` row lock. Any number of sealers may run: the head lock makes them take turns, and each
seals what the previous one left. The relay worker runs one.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from tradeplane.adapters.postgres import Database
from tradeplane.errors import InfrastructureUnavailable
from tradeplane.services.stopping import pause

log = logging.getLogger("tradeplane.audit")


@dataclass(frozen=True, slots=True)
class AuditCheck:
    sealed_now: int
    bad_row_ids: list[int]
    unsealed: int  # rows still unsealed after sealing: uncommitted when sealing ran, or written since


class AuditSealer:
    def __init__(self, db: Database, *, batch_size: int = 10_000, idle_sleep_s: float = 0.1) -> None:
        self.db = db
        self.batch_size = batch_size
        self.idle_sleep_s = idle_sleep_s

    async def seal_pending(self) -> int:
        """Seal up to one batch of committed unsealed rows; returns how many were sealed."""
        async with self.db.transaction("audit.seal") as conn:
            sealed: int = await conn.fetchval("SELECT tp_audit_log_seal($1)", self.batch_size)
        return sealed

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

    async def verify(self) -> AuditCheck:
        """Seal everything committed so far, then check the whole chain."""
        sealed = 0
        while (batch := await self.seal_pending()) == self.batch_size:
            sealed += batch
        sealed += batch
        async with self.db.connection("audit.verify") as conn:
            bad = [row[0] for row in await conn.fetch("SELECT * FROM tp_audit_log_verify()")]
            unsealed = await conn.fetchval("SELECT count(*) FROM audit_log WHERE hash IS NULL")
        return AuditCheck(sealed, bad, unsealed)
