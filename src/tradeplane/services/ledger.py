"""Posting ledger transactions and keeping balances in step, inside the caller's transaction."""

from __future__ import annotations

import asyncpg

from tradeplane.domain.ledger import LedgerTransaction


async def post(conn: asyncpg.Connection, tx: LedgerTransaction) -> int:
    """Insert the transaction and its entries and move each balance by its entry.

    The database re-checks the zero-sum rule at commit (deferred constraint trigger), so a bug here cannot
    commit an unbalanced transaction.
    """
    tx_id: int = await conn.fetchval(
        "INSERT INTO ledger_transactions (kind, reference) VALUES ($1, $2) RETURNING id",
        tx.kind,
        tx.reference,
    )
    rows = [(tx_id, e.account_id, e.asset, e.amount) for e in tx.entries]
    await conn.executemany(
        "INSERT INTO ledger_entries (transaction_id, account_id, asset, amount) VALUES ($1, $2, $3, $4)", rows
    )
    await conn.executemany(
        "INSERT INTO balances (account_id, asset, amount) VALUES ($1, $2, $3)"
        " ON CONFLICT (account_id, asset) DO UPDATE"
        " SET amount = balances.amount + EXCLUDED.amount, updated_at = now()",
        [(e.account_id, e.asset, e.amount) for e in tx.entries],
    )
    return tx_id
