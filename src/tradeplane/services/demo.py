"""Demo reference data and users, loaded by `tradeplane up` so a newcomer has something to trade.

Idempotent: running it again changes nothing. The demo trader's API key is shown once at creation, so `up`
keeps it in the data folder (mode 0600) to print it on every start; it is a development convenience only.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

import asyncpg

from tradeplane.services import accounts, identity
from tradeplane.services.identity import Role

ASSETS = (
    ("USD", 2, "US dollar"),
    ("EUR", 2, "Euro"),
    ("BTC", 8, "Bitcoin"),
    ("ETH", 8, "Ether"),
    ("AAPL", 0, "Apple"),
)

# symbol, base, quote, tick, lot, min qty, max qty, band %, reference price, maker fee, taker fee, margin rate
INSTRUMENTS = (
    (
        "BTC-USD",
        "BTC",
        "USD",
        "0.01",
        "0.0001",
        "0.0001",
        "100",
        "10",
        "65000.00",
        "0.0002",
        "0.0005",
        "0.10",
    ),
    ("ETH-USD", "ETH", "USD", "0.01", "0.001", "0.001", "1000", "10", "3200.00", "0.0002", "0.0005", "0.10"),
    (
        "EUR-USD",
        "EUR",
        "USD",
        "0.00001",
        "1000",
        "1000",
        "10000000",
        "5",
        "1.08000",
        "0.00002",
        "0.00005",
        "0.03",
    ),
    ("AAPL", "AAPL", "USD", "0.01", "1", "1", "100000", "10", "190.00", "0.0001", "0.0003", "0.25"),
)

DEMO_TRADER = "demo-trader"
DEMO_ADMIN = "admin"
DEMO_DEPOSIT = Decimal("1000000.00")


@dataclass(frozen=True, slots=True)
class DemoSeed:
    trader_user_id: int
    trader_account_id: int
    issued_key: str | None  # only on the run that created the key


async def load_reference_data(conn: asyncpg.Connection) -> None:
    await conn.executemany(
        "INSERT INTO assets (code, scale, name) VALUES ($1, $2, $3) ON CONFLICT (code) DO NOTHING", ASSETS
    )
    await conn.executemany(
        "INSERT INTO instruments (symbol, base_asset, quote_asset, tick_size, lot_size, min_qty, max_qty,"
        " price_band_pct, reference_price, maker_fee_rate, taker_fee_rate, margin_rate, status)"
        " VALUES ($1, $2, $3, $4::numeric, $5::numeric, $6::numeric, $7::numeric, $8::numeric, $9::numeric,"
        " $10::numeric, $11::numeric, $12::numeric, 'open') ON CONFLICT (symbol) DO NOTHING",
        [tuple(Decimal(v) if i >= 3 else v for i, v in enumerate(row)) for row in INSTRUMENTS],
    )


async def seed_demo(conn: asyncpg.Connection, secret_key: str) -> DemoSeed:
    """Reference data, an admin, and a demo trader with a funded cash account and an API key."""
    await load_reference_data(conn)
    if not await conn.fetchval("SELECT 1 FROM users WHERE username = $1", DEMO_ADMIN):
        await identity.create_user(conn, DEMO_ADMIN, Role.ADMIN)
    trader_id: int | None = await conn.fetchval("SELECT id FROM users WHERE username = $1", DEMO_TRADER)
    issued: str | None = None
    if trader_id is None:
        trader_id = await identity.create_user(conn, DEMO_TRADER, Role.TRADER)
        issued = (await identity.issue_api_key(conn, secret_key, trader_id, "demo")).key
    account_id: int | None = await conn.fetchval(
        "SELECT id FROM accounts WHERE user_id = $1 AND name = 'main'", trader_id
    )
    if account_id is None:
        account_id = await accounts.create_account(conn, trader_id, "main", "cash", "USD")
        await accounts.deposit(conn, account_id, DEMO_DEPOSIT)
    return DemoSeed(trader_user_id=trader_id, trader_account_id=account_id, issued_key=issued)
