"""Posting ledger transactions and keeping balances in step, inside the caller's transaction."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from decimal import Decimal

import asyncpg

from tradeplane.domain.ledger import LedgerTransaction

# One statement: draw an id per transaction (ascending in the order given), insert the transactions, then their
# entries in the order given ($3: each entry's transaction, 1-based, an index into the drawn ids: no join, so
# the plan is the same for any number of rows), and move each balance by the sum of its entries ($7-$9, one
# element per (account, asset), sorted: the rows are upserted, hence locked, in that order). The sequence is
# looked up once (a scalar subquery), not per id.
_INSERT_TRANSACTIONS = """
WITH drawn AS MATERIALIZED (
    SELECT array_agg(id ORDER BY id) AS ids
    FROM (SELECT nextval((SELECT pg_get_serial_sequence('ledger_transactions', 'id'))::regclass) AS id
          FROM generate_series(1, cardinality($1::text[]))) AS d
), tx AS (
    INSERT INTO ledger_transactions (id, kind, reference)
    SELECT drawn.ids[t.n], t.kind, t.reference
    FROM drawn, unnest($1::text[], $2::text[]) WITH ORDINALITY AS t(kind, reference, n)
    ORDER BY t.n
), entries AS (
    INSERT INTO ledger_entries (transaction_id, account_id, asset, amount)
    SELECT drawn.ids[e.n], e.account_id, e.asset, e.amount
    FROM drawn, unnest($3::bigint[], $4::bigint[], $5::text[], $6::numeric[]) WITH ORDINALITY
         AS e(n, account_id, asset, amount, k)
    ORDER BY e.k
), moved AS (
    INSERT INTO balances AS b (account_id, asset, amount)
    SELECT m.account_id, m.asset, m.amount
    FROM unnest($7::bigint[], $8::text[], $9::numeric[]) WITH ORDINALITY AS m(account_id, asset, amount, k)
    ORDER BY m.k
    ON CONFLICT (account_id, asset) DO UPDATE SET amount = b.amount + EXCLUDED.amount, updated_at = now()
)
SELECT unnest(ids) FROM drawn
"""


async def post(conn: asyncpg.Connection, tx: LedgerTransaction) -> int:
    """Post one transaction; returns its id."""
    return (await post_many(conn, [tx]))[0]


async def post_many(conn: asyncpg.Connection, txs: Sequence[LedgerTransaction]) -> list[int]:
    """Insert the transactions and their entries and move each balance by the sum of its entries.

    One round trip whatever the batch size (the engine posts one transaction per fill). Balance rows are
    moved in (account, asset) order, the same order the engine locks them in. The database re-checks the
    zero-sum rule (migration 0016), so a bug here cannot commit an unbalanced transaction; every entry of a
    transaction goes in this one statement, so the check costs one pass over the statement's rows. Returns the
    transaction ids in the order given.
    """
    if not txs:
        return []
    entries = [(n, e) for n, tx in enumerate(txs, 1) for e in tx.entries]
    moves: dict[tuple[int, str], Decimal] = defaultdict(Decimal)
    for _, e in entries:
        moves[(e.account_id, e.asset)] += e.amount
    legs = sorted(moves)
    rows = await conn.fetch(
        _INSERT_TRANSACTIONS,
        [tx.kind for tx in txs],
        [tx.reference for tx in txs],
        [n for n, _ in entries],
        [e.account_id for _, e in entries],
        [e.asset for _, e in entries],
        [e.amount for _, e in entries],
        [account for account, _ in legs],
        [asset for _, asset in legs],
        [moves[leg] for leg in legs],
    )
    return [row[0] for row in rows]
