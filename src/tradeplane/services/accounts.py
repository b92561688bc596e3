"""Trading accounts and deposits."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

import asyncpg

from tradeplane.domain.ledger import LedgerEntry, LedgerTransaction
from tradeplane.errors import Conflict, InvalidRequest, NotFound
from tradeplane.services import ledger

ACCOUNT_KINDS = ("cash", "margin")


@dataclass(frozen=True, slots=True)
class Deposit:
    deposit_id: int
    transaction_id: int
    balance: Decimal


def parse_amount(text: str | Decimal) -> Decimal:
    try:
        amount = Decimal(text)
    except (InvalidOperation, ValueError):
        raise InvalidRequest(f"amount {text!r} is not a decimal number", code="invalid_amount") from None
    if not amount.is_finite() or amount <= 0:
        raise InvalidRequest(f"amount must be a positive finite number (got {text})", code="invalid_amount")
    return amount


async def create_account(
    conn: asyncpg.Connection, user_id: int, name: str, kind: str = "cash", currency: str = "USD"
) -> int:
    if kind not in ACCOUNT_KINDS:
        raise InvalidRequest(f"account kind must be one of {', '.join(ACCOUNT_KINDS)}", code="invalid_kind")
    if not await conn.fetchval("SELECT 1 FROM assets WHERE code = $1", currency):
        raise NotFound(f"unknown currency {currency!r}", code="unknown_asset")
    try:
        account_id: int = await conn.fetchval(
            "INSERT INTO accounts (user_id, name, kind, currency) VALUES ($1, $2, $3, $4) RETURNING id",
            user_id,
            name,
            kind,
            currency,
        )
    except asyncpg.UniqueViolationError:
        raise Conflict(f"this user already has an account named {name!r}", code="account_exists") from None
    await conn.execute(
        "INSERT INTO audit_log (actor_user_id, action, entity, entity_id, details)"
        " VALUES ($1, 'account.create', 'account', $2, jsonb_build_object('kind', $3::text, 'currency', $4::text))",
        user_id,
        str(account_id),
        kind,
        currency,
    )
    return account_id


async def house_account(conn: asyncpg.Connection, purpose: str, asset: str) -> int:
    """The house account for `purpose` (deposits, fees...) in `asset`, created on first use.

    Two transactions creating it at once (engine shards rebuilding together) both succeed: the second waits
    for the first's insert and, once it commits, reads its row instead of failing on the unique name.
    """
    name = f"house:{purpose}:{asset}"
    account_id: int | None = await conn.fetchval("SELECT id FROM accounts WHERE user_id IS NULL AND name = $1", name)
    if account_id is None:
        account_id = await conn.fetchval(
            "INSERT INTO accounts (user_id, name, kind, currency) VALUES (NULL, $1, 'house', $2)"
            " ON CONFLICT (user_id, name) DO NOTHING RETURNING id",
            name,
            asset,
        )
    if account_id is None:  # a concurrent transaction created it and has committed
        account_id = await conn.fetchval("SELECT id FROM accounts WHERE user_id IS NULL AND name = $1", name)
    assert account_id is not None
    return account_id


async def deposit(
    conn: asyncpg.Connection,
    account_id: int,
    amount: Decimal,
    asset: str | None = None,
    actor_user_id: int | None = None,
) -> Deposit:
    """Credit `amount` to the account against the house deposits account, as one balanced transaction."""
    amount = parse_amount(amount)
    row = await conn.fetchrow("SELECT currency, status, kind FROM accounts WHERE id = $1 FOR NO KEY UPDATE", account_id)
    if row is None or row["kind"] == "house":
        raise NotFound(f"no account {account_id}", code="account_not_found")
    if row["status"] != "active":
        raise Conflict(f"account {account_id} is {row['status']}", code="account_not_active")
    asset = asset or row["currency"]
    scale = await conn.fetchval("SELECT scale FROM assets WHERE code = $1", asset)
    if scale is None:
        raise NotFound(f"unknown asset {asset!r}", code="unknown_asset")
    if amount != amount.quantize(Decimal(1).scaleb(-scale)):
        raise InvalidRequest(f"{asset} allows {scale} decimal places", code="invalid_amount")
    source = await house_account(conn, "deposits", asset)
    tx_id = await ledger.post(
        conn,
        LedgerTransaction(
            kind="deposit",
            reference=f"deposit:{account_id}",
            entries=(LedgerEntry(account_id, asset, amount), LedgerEntry(source, asset, -amount)),
        ),
    )
    deposit_id: int = await conn.fetchval(
        "INSERT INTO deposits (account_id, asset, amount, transaction_id) VALUES ($1, $2, $3, $4) RETURNING id",
        account_id,
        asset,
        amount,
        tx_id,
    )
    await conn.execute(
        "INSERT INTO audit_log (actor_user_id, action, entity, entity_id, details)"
        " VALUES ($1, 'account.deposit', 'account', $2, jsonb_build_object('asset', $3::text, 'amount', $4::text))",
        actor_user_id,
        str(account_id),
        asset,
        str(amount),
    )
    balance: Decimal = await conn.fetchval(
        "SELECT amount FROM balances WHERE account_id = $1 AND asset = $2", account_id, asset
    )
    return Deposit(deposit_id=deposit_id, transaction_id=tx_id, balance=balance)
