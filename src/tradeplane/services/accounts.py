"""Trading accounts and deposits."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

import asyncpg

from tradeplane.domain.ledger import LedgerEntry, LedgerTransaction
from tradeplane.domain.orders import SelfTradePrevention
from tradeplane.errors import Conflict, InvalidRequest, NotFound
from tradeplane.services import ledger
from tradeplane.services.identity import Principal, Role
from tradeplane.services.queries import sees_all_accounts

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


def parse_stp(text: str) -> SelfTradePrevention:
    try:
        return SelfTradePrevention(text)
    except ValueError:
        modes = ", ".join(mode.value for mode in SelfTradePrevention)
        raise InvalidRequest(
            f"self-trade prevention must be one of {modes} (got {text!r})", code="invalid_stp"
        ) from None


async def create_account(
    conn: asyncpg.Connection,
    user_id: int,
    name: str,
    kind: str = "cash",
    currency: str = "USD",
    stp: SelfTradePrevention = SelfTradePrevention.CANCEL_NEWEST,
) -> int:
    if kind not in ACCOUNT_KINDS:
        raise InvalidRequest(f"account kind must be one of {', '.join(ACCOUNT_KINDS)}", code="invalid_kind")
    if not await conn.fetchval("SELECT 1 FROM assets WHERE code = $1", currency):
        raise NotFound(
            f"unknown currency {currency!r}: list an instrument quoted in it first"
            " (`tradeplane instruments add` creates its assets)",
            code="unknown_asset",
        )
    try:
        account_id: int = await conn.fetchval(
            "INSERT INTO accounts (user_id, name, kind, currency, stp_mode) VALUES ($1, $2, $3, $4, $5) RETURNING id",
            user_id,
            name,
            kind,
            currency,
            stp.value,
        )
    except asyncpg.UniqueViolationError:
        raise Conflict(f"this user already has an account named {name!r}", code="account_exists") from None
    await conn.execute(
        "INSERT INTO audit_log (actor_user_id, action, entity, entity_id, details)"
        " VALUES ($1, 'account.create', 'account', $2,"
        " jsonb_build_object('kind', $3::text, 'currency', $4::text, 'stp', $5::text))",
        user_id,
        str(account_id),
        kind,
        currency,
        stp.value,
    )
    return account_id


async def set_self_trade_prevention(
    conn: asyncpg.Connection, account_id: int, stp: SelfTradePrevention, principal: Principal | None
) -> None:
    """Set the mode that the account's orders get when they name none; orders already placed keep theirs.
    ``principal`` None is the operator at the CLI, who holds the database credentials anyway.

    Raises PermissionDenied for a readonly principal, NotFound for an account the principal may not see.
    """
    if principal is not None:
        principal.require(Role.ADMIN, Role.TRADER, Role.SYSTEM)
    owner = await conn.fetchrow(
        "SELECT user_id FROM accounts WHERE id = $1 AND kind <> 'house' FOR NO KEY UPDATE", account_id
    )
    if owner is None or not (
        principal is None or sees_all_accounts(principal) or owner["user_id"] == principal.user_id
    ):
        raise NotFound(f"no account {account_id}", code="account_not_found")
    await conn.execute(
        "WITH u AS (UPDATE accounts SET stp_mode = $2 WHERE id = $1)"
        " INSERT INTO audit_log (actor_user_id, action, entity, entity_id, details)"
        " VALUES ($3, 'account.stp', 'account', $4, jsonb_build_object('stp', $2::text))",
        account_id,
        stp.value,
        None if principal is None else principal.user_id,
        str(account_id),
    )


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
