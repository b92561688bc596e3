"""Posting ledger transactions and keeping balances in step, inside the caller's transaction."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from decimal import Decimal

import asyncpg

from tradeplane.domain.ledger import LedgerTransaction


async def post(conn: asyncpg.Connection, tx: LedgerTransaction) -> int:
    """Post one transaction; returns its id."""
    return (await post_many(conn, [tx]))[0]


async def post_many(conn: asyncpg.Connection, txs: Sequence[LedgerTransaction]) -> list[int]:
    """Insert the transactions and their entries and move each balance by the sum of its entries.

    A fixed number of round trips whatever the batch size (the engine posts one transaction per fill). Balance
    rows are moved in (account, asset) order, the same order the engine locks them in. The database re-checks
    the zero-sum rule at commit (deferred constraint trigger), so a bug here cannot commit an unbalanced
    transaction. Returns the transaction ids in the order given.
    """
    if not txs:
        return []
    ids: list[int] = [
        row[0]
        for row in await conn.fetch(
            # the sequence looked up once (a scalar subquery), not per id
            "SELECT nextval((SELECT pg_get_serial_sequence('ledger_transactions', 'id'))::regclass)"
            " FROM generate_series(1, $1)",
            len(txs),
        )
    ]
    await conn.execute(
        "INSERT INTO ledger_transactions (id, kind, reference)"
        " SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[])",
        ids,
        [tx.kind for tx in txs],
        [tx.reference for tx in txs],
    )
    entries = [(tx_id, e) for tx_id, tx in zip(ids, txs, strict=True) for e in tx.entries]
    await conn.execute(
        "INSERT INTO ledger_entries (transaction_id, account_id, asset, amount)"
        " SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::numeric[])",
        [tx_id for tx_id, _ in entries],
        [e.account_id for _, e in entries],
        [e.asset for _, e in entries],
        [e.amount for _, e in entries],
    )
    moves: dict[tuple[int, str], Decimal] = defaultdict(Decimal)
    for tx in txs:
        for e in tx.entries:
            moves[(e.account_id, e.asset)] += e.amount
    await conn.executemany(
        "INSERT INTO balances (account_id, asset, amount) VALUES ($1, $2, $3)"
        " ON CONFLICT (account_id, asset) DO UPDATE"
        " SET amount = balances.amount + EXCLUDED.amount, updated_at = now()",
        [(account, asset, amount) for (account, asset), amount in sorted(moves.items())],
    )
    return ids
