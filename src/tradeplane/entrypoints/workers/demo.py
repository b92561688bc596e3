"""Demo market: a market maker and a few random traders, so a newcomer sees a live book, trades and positions.

They are ordinary API clients: each has its own user, account and API key, and trades over the public REST API
with httpx, so everything they do takes the real path (authentication, risk, the outbox, the engine, the
WebSocket hub). `tradeplane up` runs them unless told not to:

    participants = await create_demo_participants(conn, secret_key)        # in a transaction, then commit
    await run_demo_traders(base_url, participants.api_keys, participants.account_ids, stop)

- The market maker (a margin account, so it may be short) quotes MM_LEVELS bids and asks around each symbol's
  last trade price (the reference price before the first trade), and re-quotes every MM_REQUOTE_S seconds:
  cancel-all for the symbol, then fresh quotes around the new mark.
- Each trader (a cash account) sends an order every TRADER_PAUSE_S seconds or so: mostly marketable limit IOC
  orders that take the maker's quotes, sometimes market orders, sometimes passive GTC limits that rest on the
  book. A trader sells only what it holds, so a cash account is never refused for selling short.

Failures (the API restarting, a risk rejection) are counted and logged, never raised: the demo must not take
`tradeplane up` down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import Any

import asyncpg
import httpx

from tradeplane.services import accounts, identity
from tradeplane.services.demo import INSTRUMENTS, load_reference_data
from tradeplane.services.identity import Role
from tradeplane.services.stopping import pause

log = logging.getLogger("tradeplane.demo")

DEMO_MARKET_MAKER = "demo-market-maker"
DEMO_TRADERS = ("demo-trader-1", "demo-trader-2", "demo-trader-3")
DEMO_ACCOUNT = "demo"
DEMO_KEY_NAME = "demo-bot"
MM_DEPOSIT = Decimal("50000000.00")
TRADER_DEPOSIT = Decimal("250000.00")
DEMO_SYMBOLS = tuple(row[0] for row in INSTRUMENTS)

MM_LEVELS = 3
MM_HALF_SPREAD = Decimal("0.0005")  # 5 bp from the mark to the best quote
MM_LEVEL_STEP = Decimal("0.0005")  # 5 bp between levels
MM_QUOTE_NOTIONAL = Decimal("20000")  # quote currency per level
MM_REQUOTE_S = 2.0
TRADER_NOTIONAL = (Decimal("200"), Decimal("2000"))
TRADER_PAUSE_S = (0.4, 1.6)
TRADER_MAX_RESTING = 4
RETRY_S = 1.0
CLOSE_CANCEL_S = 2.0


# --- participants ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DemoParticipant:
    username: str
    user_id: int
    account_id: int
    api_key: str


@dataclass(frozen=True, slots=True)
class DemoParticipants:
    market_maker: DemoParticipant
    traders: tuple[DemoParticipant, ...]

    @property
    def api_keys(self) -> tuple[str, ...]:
        """The market maker's key first, then the traders' (the order run_demo_traders expects)."""
        return (self.market_maker.api_key, *(t.api_key for t in self.traders))

    @property
    def account_ids(self) -> tuple[int, ...]:
        return (self.market_maker.account_id, *(t.account_id for t in self.traders))


async def create_demo_participants(conn: asyncpg.Connection, secret_key: str) -> DemoParticipants:
    """Users, funded accounts and fresh API keys for the demo bots, in the caller's transaction.

    Idempotent: users and accounts are made once; an account that has spent more than half its deposit is
    topped up. Keys are shown only at creation, so every call issues new ones and revokes the previous run's.
    """
    await load_reference_data(conn)
    market_maker = await _participant(conn, secret_key, DEMO_MARKET_MAKER, "margin", MM_DEPOSIT)
    traders = [await _participant(conn, secret_key, name, "cash", TRADER_DEPOSIT) for name in DEMO_TRADERS]
    return DemoParticipants(market_maker, tuple(traders))


async def _participant(
    conn: asyncpg.Connection, secret_key: str, username: str, kind: str, deposit: Decimal
) -> DemoParticipant:
    user_id: int | None = await conn.fetchval("SELECT id FROM users WHERE username = $1", username)
    if user_id is None:
        user_id = await identity.create_user(conn, username, Role.TRADER)
    account_id: int | None = await conn.fetchval(
        "SELECT id FROM accounts WHERE user_id = $1 AND name = $2", user_id, DEMO_ACCOUNT
    )
    if account_id is None:
        account_id = await accounts.create_account(conn, user_id, DEMO_ACCOUNT, kind, "USD")
    balance: Decimal = await conn.fetchval(
        "SELECT coalesce((SELECT amount FROM balances WHERE account_id = $1 AND asset = 'USD'), 0)", account_id
    )
    if balance < deposit / 2:
        await accounts.deposit(conn, account_id, deposit - balance)
    await conn.execute(
        "UPDATE api_keys SET revoked_at = now() WHERE user_id = $1 AND name = $2 AND revoked_at IS NULL",
        user_id,
        DEMO_KEY_NAME,
    )
    key = (await identity.issue_api_key(conn, secret_key, user_id, DEMO_KEY_NAME)).key
    return DemoParticipant(username, user_id, account_id, key)


# --- trading ---------------------------------------------------------------------------------------------


@dataclass
class DemoStats:
    """What the bots did; `accepted` counts orders the API acknowledged (201)."""

    placed: int = 0
    accepted: int = 0
    rejected: int = 0
    failed: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Instrument:
    symbol: str
    tick: Decimal
    lot: Decimal
    min_qty: Decimal
    max_qty: Decimal
    mark: Decimal

    @staticmethod
    def parse(body: dict[str, Any]) -> _Instrument | None:
        mark = body.get("last_price") or body.get("reference_price")
        if mark is None or body.get("status") != "open":
            return None
        return _Instrument(
            symbol=body["symbol"],
            tick=Decimal(body["tick_size"]),
            lot=Decimal(body["lot_size"]),
            min_qty=Decimal(body["min_qty"]),
            max_qty=Decimal(body["max_qty"]),
            mark=Decimal(mark),
        )

    def price(self, value: Decimal, *, up: bool) -> Decimal:
        """`value` on the tick grid, rounded away from the mark on the side it lies (bids down, asks up)."""
        ticks = (value / self.tick).to_integral_value(ROUND_CEILING if up else ROUND_FLOOR)
        return max(ticks, Decimal(1)) * self.tick

    def quantity(self, notional: Decimal, price: Decimal) -> Decimal:
        lots = (notional / price / self.lot).to_integral_value(ROUND_FLOOR)
        return min(max(lots * self.lot, self.min_qty), self.max_qty)


class _Bot:
    """One participant's HTTP session."""

    def __init__(self, base_url: str, api_key: str, account_id: int, stats: DemoStats, rng: random.Random) -> None:
        self.http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"), headers={"Authorization": f"Bearer {api_key}"}, timeout=10.0
        )
        self.account_id = account_id
        self.stats = stats
        self.rng = rng

    async def instruments(self, symbols: Sequence[str]) -> dict[str, _Instrument]:
        response = await self.http.get("/api/v1/instruments")
        response.raise_for_status()
        found = (_Instrument.parse(body) for body in response.json())
        return {i.symbol: i for i in found if i is not None and i.symbol in symbols}

    async def place(self, symbol: str, side: str, order_type: str, quantity: Decimal, **extra: Any) -> bool:
        body = {
            "account_id": self.account_id,
            "symbol": symbol,
            "side": side,
            "type": order_type,
            "quantity": str(quantity),
            **{k: str(v) if isinstance(v, Decimal) else v for k, v in extra.items()},
        }
        self.stats.placed += 1
        response = await self.http.post("/api/v1/orders", json=body)
        if response.status_code in (200, 201):
            self.stats.accepted += 1
            return True
        if response.status_code == 422:
            self.stats.rejected += 1
            reason = str(response.json().get("reason") or response.json().get("error"))
            self.stats.reasons[reason] = self.stats.reasons.get(reason, 0) + 1
            log.debug("demo order %s refused: %s", body, response.text)
            return False
        response.raise_for_status()
        return False

    async def cancel_all(self, symbol: str | None = None) -> None:
        params: dict[str, str | int] = {"account_id": self.account_id}
        if symbol is not None:
            params["symbol"] = symbol
        response = await self.http.delete("/api/v1/orders", params=params)
        response.raise_for_status()

    async def holdings(self) -> dict[str, Decimal]:
        response = await self.http.get("/api/v1/positions", params={"account_id": self.account_id})
        response.raise_for_status()
        return {p["symbol"]: Decimal(p["net_quantity"]) for p in response.json()}

    async def close(self) -> None:
        await self.http.aclose()


async def _until_stopped(name: str, stop: asyncio.Event, stats: DemoStats, step: Callable[[], Awaitable[None]]) -> None:
    """Run `step()` until `stop`; an HTTP failure is counted and retried after RETRY_S."""
    failing = False
    while not stop.is_set():
        try:
            await step()
            failing = False
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            stats.failed += 1
            if not failing:
                log.warning("demo %s: %s; retrying", name, exc)
            failing = True
            await pause(stop, RETRY_S)


async def _market_maker(bot: _Bot, symbols: Sequence[str], stop: asyncio.Event) -> None:
    async def requote() -> None:
        instruments = await bot.instruments(symbols)
        for instrument in instruments.values():
            if stop.is_set():
                return
            await bot.cancel_all(instrument.symbol)
            mid = instrument.mark * (1 + Decimal(bot.rng.randint(-5, 5)) / 10_000)
            for level in range(MM_LEVELS):
                offset = MM_HALF_SPREAD + MM_LEVEL_STEP * level
                bid = instrument.price(mid * (1 - offset), up=False)
                ask = instrument.price(mid * (1 + offset), up=True)
                if bid >= ask:
                    ask = bid + instrument.tick
                size = MM_QUOTE_NOTIONAL * Decimal(bot.rng.randint(5, 15)) / 10
                await bot.place(instrument.symbol, "buy", "limit", instrument.quantity(size, bid), price=bid)
                await bot.place(instrument.symbol, "sell", "limit", instrument.quantity(size, ask), price=ask)
        await pause(stop, MM_REQUOTE_S)

    await _until_stopped("market maker", stop, bot.stats, requote)


async def _trader(bot: _Bot, symbols: Sequence[str], stop: asyncio.Event) -> None:
    rng = bot.rng
    sent = 0

    async def trade() -> None:
        nonlocal sent
        await pause(stop, rng.uniform(*TRADER_PAUSE_S))
        if stop.is_set():
            return
        instruments = await bot.instruments(symbols)
        if not instruments:
            return
        instrument = instruments[rng.choice(sorted(instruments))]
        held = (await bot.holdings()).get(instrument.symbol, Decimal(0))
        notional = Decimal(rng.randint(int(TRADER_NOTIONAL[0]), int(TRADER_NOTIONAL[1])))
        side = "sell" if held >= instrument.min_qty and rng.random() < 0.5 else "buy"
        quantity = instrument.quantity(notional, instrument.mark)
        if side == "sell":
            quantity = min(quantity, (held / instrument.lot).to_integral_value(ROUND_FLOOR) * instrument.lot)
        sign = 1 if side == "buy" else -1
        style = rng.random()
        if style < 0.6:  # take liquidity: a limit through the touch, whatever does not fill is canceled
            price = instrument.price(instrument.mark * (1 + sign * Decimal("0.004")), up=side == "buy")
            await bot.place(instrument.symbol, side, "limit", quantity, price=price, time_in_force="ioc")
        elif style < 0.7:
            await bot.place(instrument.symbol, side, "market", quantity, time_in_force="ioc")
        else:  # rest on the book, a little behind the market maker's quotes
            away = Decimal(rng.randint(8, 30)) / 10_000
            price = instrument.price(instrument.mark * (1 - sign * away), up=side == "sell")
            await bot.place(instrument.symbol, side, "limit", quantity, price=price, time_in_force="gtc")
        sent += 1
        if sent % TRADER_MAX_RESTING == 0:
            await bot.cancel_all()

    await _until_stopped("trader", stop, bot.stats, trade)


async def _wait_for_api(http: httpx.AsyncClient, stop: asyncio.Event) -> bool:
    while not stop.is_set():
        with contextlib.suppress(httpx.HTTPError):
            if (await http.get("/health")).status_code == 200:
                return True
        await pause(stop, 0.2)
    return False


async def run_demo_traders(
    base_url: str,
    api_keys: Sequence[str],
    account_ids: Sequence[int],
    stop: asyncio.Event,
    seed: int | None = None,
    *,
    symbols: Sequence[str] = DEMO_SYMBOLS,
) -> DemoStats:
    """Trade until `stop` is set. api_keys[0]/account_ids[0] is the market maker, the rest are traders.

    Waits for the API at `base_url` to answer /health first. `seed` makes the bots' choices repeatable.
    Returns what they did.
    """
    if len(api_keys) != len(account_ids) or not api_keys:
        raise ValueError("give one account id per API key, the market maker's first")
    rng = random.Random(seed)
    stats = DemoStats()
    bots = [
        _Bot(base_url, key, account_id, stats, random.Random(rng.getrandbits(64)))
        for key, account_id in zip(api_keys, account_ids, strict=True)
    ]
    api_answered = False
    try:
        if not await _wait_for_api(bots[0].http, stop):
            return stats
        api_answered = True
        log.info("demo market maker and %d traders started on %s", len(bots) - 1, ", ".join(symbols))
        await asyncio.gather(
            _market_maker(bots[0], symbols, stop),
            *(_trader(bot, symbols, stop) for bot in bots[1:]),
        )
    finally:
        left = 0
        for bot in bots if api_answered else ():  # leave no demo orders resting behind
            try:
                await asyncio.wait_for(bot.cancel_all(), CLOSE_CANCEL_S)
            except (httpx.HTTPError, TimeoutError):
                left += 1
        for bot in bots:
            await bot.close()
        if left:
            log.warning("demo traders stopped; %d of them could not cancel their resting orders", left)
        elif api_answered:
            log.info("demo traders stopped and cancelled their resting orders")
        log.info(
            "demo stopped: %d orders placed, %d accepted, %d rejected %s, %d failed calls",
            stats.placed,
            stats.accepted,
            stats.rejected,
            stats.reasons,
            stats.failed,
        )
    return stats
