"""Listing instruments and changing them: what an operator does at the CLI (`tradeplane instruments`).

Every change is one transaction with its ``audit_log`` row. Running processes pick changes up on their own: the
api's instrument catalog within ``queries.INSTRUMENT_TTL_S`` (a new symbol on its first order), the engine when
it first meets the symbol (``_adopt_instrument``; fees and margin rate in every batch, the grid only when it
restarts) and the market data worker within ``INSTRUMENT_RELOAD_S`` of its own
(``entrypoints.workers.marketdata``). Status is read by every placement in its own transaction, so a halt stops
new orders at once.

What may change while an instrument trades, and why the rest may not:

- price band, reference price, min/max quantity, session close: any time; they are checked when an order is
  placed;
- fees and margin rate (what holds are priced at, by the api and by the engine's settlement, and what fills are
  charged): the engine re-reads them in every batch (``settlement.refresh_rates``), so a change applies to the
  next fill without a restart. A change that asks no hold for more (neither the worst fee, the larger of maker,
  taker and 0, nor the margin rate goes up) may be made at any time: in its transaction the holds of the open
  orders at rest are re-priced down to the new rates (an order with client modifies in flight keeps its larger
  hold until the engine has processed them), and an api process that still prices at the old rates for up to
  ``INSTRUMENT_TTL_S`` only holds more than needed, which the engine trims when it accepts the order. A raise
  would leave resting orders held for less than a fill may now cost, and the api's catalog would fund new orders
  at the old rates for a while, so it is made only while the instrument is halted or closed with no open orders,
  and it may reopen only once every api process has the new rates (``FEE_CHANGE_SETTLE_S``);
- tick or lot size: only without open orders (their prices and quantities are on the old grid), with the last
  and reference prices and the min/max quantities on the new grid. The engine and the market data worker keep
  the grid they loaded (its candles are kept in ticks): restart them after such a change.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace
from datetime import time
from decimal import Decimal, InvalidOperation
from typing import Any

import asyncpg
import orjson

from tradeplane.adapters.db.tables import INSTRUMENT_STATUSES, OPEN_ORDER_STATUSES
from tradeplane.domain.orders import Side
from tradeplane.domain.reservations import reservation
from tradeplane.domain.risk import on_grid
from tradeplane.errors import Conflict, InvalidRequest, NotFound
from tradeplane.services.queries import INSTRUMENT_TTL_S, decimal_text

#: Stored as NUMERIC(38, 18): more fractional digits would be rounded by PostgreSQL, more integer ones refused.
MAX_FRACTION_DIGITS = 18
MAX_INTEGER_DIGITS = 20
#: Fee rates above this are refused as a likely typo (0.001 is 0.1%, 0.1 is already 10%).
MAX_FEE_RATE = Decimal("0.1")
#: How long after a fee change the instrument may not reopen: every api process has reloaded its catalog by then.
FEE_CHANGE_SETTLE_S = INSTRUMENT_TTL_S + 2.0
SYMBOL_PATTERN = re.compile(r"^[A-Z0-9][A-Z0-9._-]{0,31}$")
ASSET_PATTERN = re.compile(r"^[A-Z0-9][A-Z0-9._-]{0,15}$")
_OPEN = list(OPEN_ORDER_STATUSES)
_t = decimal_text


@dataclass(frozen=True, slots=True)
class InstrumentTerms:
    """Everything an operator sets on an instrument (``instruments`` table columns, less the engine's marks)."""

    symbol: str
    base_asset: str
    quote_asset: str
    tick_size: Decimal
    lot_size: Decimal
    min_qty: Decimal
    max_qty: Decimal
    price_band_pct: Decimal
    reference_price: Decimal | None = None
    maker_fee_rate: Decimal = Decimal(0)
    taker_fee_rate: Decimal = Decimal(0)
    margin_rate: Decimal = Decimal(1)
    status: str = "open"
    session_close_utc: time | None = None

    @property
    def worst_fee(self) -> Decimal:
        """The fee rate holds are priced at (``domain.reservations.reservation``)."""
        return max(self.maker_fee_rate, self.taker_fee_rate, Decimal(0))


@dataclass(frozen=True, slots=True)
class InstrumentChanges:
    """The parameters ``adjust_instrument`` changes; None leaves one as it is. ``clear_*`` removes an optional one."""

    tick_size: Decimal | None = None
    lot_size: Decimal | None = None
    min_qty: Decimal | None = None
    max_qty: Decimal | None = None
    price_band_pct: Decimal | None = None
    reference_price: Decimal | None = None
    maker_fee_rate: Decimal | None = None
    taker_fee_rate: Decimal | None = None
    margin_rate: Decimal | None = None
    session_close_utc: time | None = None
    clear_session_close: bool = False

    def is_empty(self) -> bool:
        return not self.clear_session_close and all(
            getattr(self, f.name) is None for f in fields(self) if f.name != "clear_session_close"
        )


@dataclass(frozen=True, slots=True)
class ListedInstrumentView:
    """One row of ``tradeplane instruments list``."""

    terms: InstrumentTerms
    instrument_id: int
    last_price: Decimal | None
    open_orders: int


# ------------------------------------------------------------------------------------------- parsing


#: What an operator types for a number: ASCII digits with an optional sign, point and exponent. Decimal() reads
#: more (``1_000``, full-width or other Unicode digits, Unicode spaces around it) that a typo should not pass as.
_DECIMAL_TEXT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[+-]?(?:nan|inf|infinity)", re.I)
_ASCII_SPACE = " \t\r\n"


def parse_decimal(text: str, name: str) -> Decimal:
    """``text`` as an exact Decimal that NUMERIC(38, 18) stores unchanged; InvalidRequest otherwise.

    Only plain ASCII notation is a number here (``0.0005``, ``-1``, ``5e-4``, spaces around it): ``1_000``, non-ASCII
    digits and non-ASCII spaces are refused rather than read the way ``Decimal()`` would.
    """
    stripped = text.strip(_ASCII_SPACE) if isinstance(text, str) else ""
    if not _DECIMAL_TEXT.fullmatch(stripped):
        hint = ""
        if "_" in stripped:
            hint = " (write it without '_' separators)"
        elif not stripped.isascii():
            hint = " (use ASCII digits, '.', '-' and 'e' only)"
        raise InvalidRequest(f"{name} {text!r} is not a decimal number{hint}", code="invalid_number")
    try:
        value = Decimal(stripped)
    except (InvalidOperation, ValueError):
        raise InvalidRequest(f"{name} {text!r} is not a decimal number", code="invalid_number") from None
    if not value.is_finite():
        raise InvalidRequest(f"{name} must be a finite number (got {stripped})", code="invalid_number")
    value = value.normalize() if value else Decimal(0)
    exponent = int(value.as_tuple().exponent)
    if -exponent > MAX_FRACTION_DIGITS:
        raise InvalidRequest(
            f"{name} {stripped} has more than {MAX_FRACTION_DIGITS} decimal places", code="invalid_number"
        )
    if value.adjusted() >= MAX_INTEGER_DIGITS:
        raise InvalidRequest(f"{name} {stripped} is too large", code="invalid_number")
    return value


def parse_session_close(text: str) -> time:
    """``HH:MM`` or ``HH:MM:SS``, UTC."""
    try:
        parsed = time.fromisoformat(text.strip())
    except ValueError:
        raise InvalidRequest(
            f"session close {text!r} is not a time of day (HH:MM or HH:MM:SS, UTC)", code="invalid_time"
        ) from None
    if parsed.tzinfo is not None or parsed.microsecond:
        raise InvalidRequest("session close is HH:MM or HH:MM:SS, UTC, without an offset", code="invalid_time")
    return parsed


def parse_status(text: str) -> str:
    if text not in INSTRUMENT_STATUSES:
        raise InvalidRequest(
            f"status must be one of {', '.join(INSTRUMENT_STATUSES)} (got {text!r})", code="invalid_status"
        )
    return text


def decimal_places(value: Decimal) -> int:
    """Fractional digits ``value`` needs: 0.0001 -> 4, 1000 -> 0."""
    return max(0, -int(value.normalize().as_tuple().exponent))


# ---------------------------------------------------------------------------------------- validation


def validate_terms(terms: InstrumentTerms) -> None:
    """Every rule an instrument's terms must meet, checked before the database's own constraints."""

    def invalid(detail: str, code: str = "invalid_instrument") -> InvalidRequest:
        return InvalidRequest(f"{terms.symbol}: {detail}", code=code)

    if not SYMBOL_PATTERN.fullmatch(terms.symbol):
        raise InvalidRequest(
            f"symbol {terms.symbol!r} must be 1-32 characters of A-Z, 0-9, '.', '_', '-', starting with a letter"
            " or digit",
            code="invalid_symbol",
        )
    for name, asset in (("base asset", terms.base_asset), ("quote asset", terms.quote_asset)):
        if not ASSET_PATTERN.fullmatch(asset):
            raise invalid(f"{name} {asset!r} must be 1-16 characters of A-Z, 0-9, '.', '_', '-'", "invalid_asset")
    if terms.base_asset == terms.quote_asset:
        raise invalid("base and quote asset must differ", "invalid_asset")
    if terms.tick_size <= 0:
        raise invalid(f"tick size must be positive (got {_t(terms.tick_size)})")
    if terms.lot_size <= 0:
        raise invalid(f"lot size must be positive (got {_t(terms.lot_size)})")
    if terms.min_qty <= 0:
        raise invalid(f"min quantity must be positive (got {_t(terms.min_qty)})")
    if terms.max_qty < terms.min_qty:
        raise invalid(f"max quantity {_t(terms.max_qty)} is below min quantity {_t(terms.min_qty)}")
    for name, qty in (("min quantity", terms.min_qty), ("max quantity", terms.max_qty)):
        if not on_grid(qty, terms.lot_size):
            raise invalid(f"{name} {_t(qty)} is not a multiple of the lot size {_t(terms.lot_size)}")
    if not 0 < terms.price_band_pct <= 100:
        raise invalid(f"price band must be a percentage above 0 and at most 100 (got {_t(terms.price_band_pct)})")
    if terms.reference_price is not None:
        if terms.reference_price <= 0:
            raise invalid(f"reference price must be positive (got {_t(terms.reference_price)})")
        if not on_grid(terms.reference_price, terms.tick_size):
            raise invalid(f"reference price {_t(terms.reference_price)} is not a multiple of the tick size")
    if not 0 <= terms.taker_fee_rate <= MAX_FEE_RATE:
        raise invalid(
            f"taker fee rate must be between 0 and {MAX_FEE_RATE} (a fraction: 0.0005 is 0.05%; got"
            f" {_t(terms.taker_fee_rate)})",
            "invalid_fee",
        )
    if not -terms.taker_fee_rate <= terms.maker_fee_rate <= MAX_FEE_RATE:
        raise invalid(
            f"maker fee rate must be between -{_t(terms.taker_fee_rate)} (a rebate no larger than the taker fee) and"
            f" {MAX_FEE_RATE} (got {_t(terms.maker_fee_rate)})",
            "invalid_fee",
        )
    if not 0 < terms.margin_rate <= 1:
        raise invalid(f"margin rate must be above 0 and at most 1 (got {_t(terms.margin_rate)})", "invalid_margin")
    parse_status(terms.status)


async def _ensure_asset(
    conn: asyncpg.Connection, code: str, scale: int | None, *, min_scale: int, default: int, role: str
) -> dict[str, Any]:
    """The asset ``code``, created with ``scale`` (else ``default``) if it does not exist yet.

    Returns what the audit row records: its code, scale and whether it was created here.
    """
    existing: int | None = await conn.fetchval("SELECT scale FROM assets WHERE code = $1", code)
    if existing is not None:
        if scale is not None and scale != existing:
            raise Conflict(
                f"asset {code} exists with scale {existing}; leave out the {role} scale or give {existing}",
                code="asset_scale_mismatch",
            )
        if existing < min_scale:
            raise InvalidRequest(
                f"asset {code} has {existing} decimal places; the {role} lot needs {min_scale}",
                code="asset_scale_too_small",
            )
        return {"code": code, "scale": existing, "created": False}
    chosen = default if scale is None else scale
    if not 0 <= chosen <= MAX_FRACTION_DIGITS:
        raise InvalidRequest(f"{role} scale must be 0..{MAX_FRACTION_DIGITS} (got {chosen})", code="invalid_scale")
    if chosen < min_scale:
        raise InvalidRequest(
            f"{role} scale {chosen} is too small: the lot size needs {min_scale} decimal places",
            code="asset_scale_too_small",
        )
    # ON CONFLICT: another operator creating it at the same time; their scale then wins and is re-checked.
    await conn.execute(
        "INSERT INTO assets (code, scale, name) VALUES ($1, $2, $3) ON CONFLICT (code) DO NOTHING", code, chosen, code
    )
    stored: int = await conn.fetchval("SELECT scale FROM assets WHERE code = $1", code)
    if stored != chosen:
        return await _ensure_asset(conn, code, scale, min_scale=min_scale, default=default, role=role)
    return {"code": code, "scale": stored, "created": True}


# ----------------------------------------------------------------------------------------- use cases


def _terms_json(terms: InstrumentTerms) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(terms):
        value = getattr(terms, f.name)
        if isinstance(value, Decimal):
            value = decimal_text(value)
        elif isinstance(value, time):
            value = value.isoformat()
        out[f.name] = value
    return out


async def _audit(
    conn: asyncpg.Connection, actor_user_id: int | None, action: str, instrument_id: int, details: dict[str, Any]
) -> None:
    await conn.execute(
        "INSERT INTO audit_log (actor_user_id, action, entity, entity_id, details)"
        " VALUES ($1, $2, 'instrument', $3, $4::jsonb)",
        actor_user_id,
        action,
        str(instrument_id),
        orjson.dumps(details).decode(),
    )


async def list_instrument(
    conn: asyncpg.Connection,
    terms: InstrumentTerms,
    *,
    base_scale: int | None = None,
    quote_scale: int | None = None,
    actor_user_id: int | None = None,
) -> int:
    """List a new instrument; returns its id. Its assets are created if missing: the base asset with
    ``base_scale`` (default: the lot size's decimal places, the least that holds a quantity), the quote asset
    with ``quote_scale`` (default: the tick size's decimal places). An existing base asset must have room for
    the lot size's decimals.

    Raises InvalidRequest for bad terms, Conflict when the symbol is listed already or an asset exists with
    another scale than the one given.
    """
    validate_terms(terms)
    if await conn.fetchval("SELECT 1 FROM instruments WHERE symbol = $1", terms.symbol):
        raise Conflict(f"instrument {terms.symbol} is listed already", code="instrument_exists")
    lot_places = decimal_places(terms.lot_size)
    base = await _ensure_asset(
        conn, terms.base_asset, base_scale, min_scale=lot_places, default=lot_places, role="base"
    )
    # A new quote asset is priced to the tick by default; an existing one may be coarser (USD with a pip tick).
    quote = await _ensure_asset(
        conn, terms.quote_asset, quote_scale, min_scale=0, default=decimal_places(terms.tick_size), role="quote"
    )
    try:
        instrument_id: int = await conn.fetchval(
            "INSERT INTO instruments (symbol, base_asset, quote_asset, tick_size, lot_size, min_qty, max_qty,"
            " price_band_pct, reference_price, maker_fee_rate, taker_fee_rate, margin_rate, status,"
            " session_close_utc) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) RETURNING id",
            terms.symbol,
            terms.base_asset,
            terms.quote_asset,
            terms.tick_size,
            terms.lot_size,
            terms.min_qty,
            terms.max_qty,
            terms.price_band_pct,
            terms.reference_price,
            terms.maker_fee_rate,
            terms.taker_fee_rate,
            terms.margin_rate,
            terms.status,
            terms.session_close_utc,
        )
    except asyncpg.UniqueViolationError:
        raise Conflict(f"instrument {terms.symbol} is listed already", code="instrument_exists") from None
    await _audit(conn, actor_user_id, "instrument.list", instrument_id, {**_terms_json(terms), "assets": [base, quote]})
    return instrument_id


_SELECT = (
    "SELECT i.id, i.symbol, i.base_asset, i.quote_asset, i.tick_size, i.lot_size, i.min_qty, i.max_qty,"
    " i.price_band_pct, i.reference_price, i.maker_fee_rate, i.taker_fee_rate, i.margin_rate, i.status,"
    " i.session_close_utc, i.last_price FROM instruments i"
)


def _terms_from_row(row: asyncpg.Record) -> InstrumentTerms:
    def dec(name: str) -> Decimal:
        value: Decimal = row[name]
        return value.normalize() if value else Decimal(0)

    reference: Decimal | None = row["reference_price"]
    return InstrumentTerms(
        symbol=row["symbol"],
        base_asset=row["base_asset"],
        quote_asset=row["quote_asset"],
        tick_size=dec("tick_size"),
        lot_size=dec("lot_size"),
        min_qty=dec("min_qty"),
        max_qty=dec("max_qty"),
        price_band_pct=dec("price_band_pct"),
        reference_price=None if reference is None else reference.normalize(),
        maker_fee_rate=dec("maker_fee_rate"),
        taker_fee_rate=dec("taker_fee_rate"),
        margin_rate=dec("margin_rate"),
        status=row["status"],
        session_close_utc=row["session_close_utc"],
    )


async def _lock(conn: asyncpg.Connection, symbol: str) -> asyncpg.Record:
    row = await conn.fetchrow(_SELECT + " WHERE i.symbol = $1 FOR UPDATE", symbol)
    if row is None:
        raise NotFound(f"no instrument {symbol!r}", code="instrument_not_found")
    return row


async def _open_orders(conn: asyncpg.Connection, instrument_id: int) -> int:
    count: int = await conn.fetchval(
        "SELECT count(*) FROM orders WHERE instrument_id = $1 AND status = ANY($2::text[])", instrument_id, _OPEN
    )
    return count


async def _reprice_holds(conn: asyncpg.Connection, instrument_id: int, terms: InstrumentTerms) -> int:
    """Re-price the holds of ``instrument_id``'s open orders at rest to ``terms``' rates, lowering only; returns
    how many changed. Called after ``_lock``: an engine batch that read the old rates has committed (it holds the
    instrument row in KEY SHARE), and the next one waits for this transaction, so none settles in between.

    An order with client modifies in flight keeps its hold: the api funded them at rates no lower, and settlement
    brings it down to ``reservation`` once the engine has processed them. The order rows are locked FOR NO KEY
    UPDATE, in id order, as the api does before it changes a hold.
    """
    rows = await conn.fetch(
        "SELECT o.id, o.side, o.quantity, o.filled_quantity, o.hold_price, o.reduce_only, a.kind, h.amount"
        " FROM orders o JOIN accounts a ON a.id = o.account_id"
        " JOIN holds h ON h.order_id = o.id AND h.released_at IS NULL"
        " WHERE o.instrument_id = $1 AND o.status = ANY($2::text[]) AND o.modifies_requested <= o.modifies_done"
        " AND o.hold_price IS NOT NULL ORDER BY o.id FOR NO KEY UPDATE OF o",
        instrument_id,
        _OPEN,
    )
    if not rows:
        return 0
    quote_scale: int = await conn.fetchval("SELECT scale FROM assets WHERE code = $1", terms.quote_asset)
    ids: list[int] = []
    amounts: list[Decimal] = []
    for r in rows:
        wanted = reservation(
            side=Side(r["side"]),
            account_kind=r["kind"],
            leaves_qty=r["quantity"] - r["filled_quantity"],
            hold_price=r["hold_price"],
            maker_fee_rate=terms.maker_fee_rate,
            taker_fee_rate=terms.taker_fee_rate,
            margin_rate=terms.margin_rate,
            base_asset=terms.base_asset,
            quote_asset=terms.quote_asset,
            quote_scale=quote_scale,
            reduce_only=r["reduce_only"],
        ).amount
        if wanted < r["amount"]:
            ids.append(r["id"])
            amounts.append(wanted)
    if ids:
        # as settlement does: a hold that reserves nothing any more is released
        await conn.execute(
            "UPDATE holds h SET amount = CASE WHEN u.amount > 0 THEN u.amount ELSE h.amount END,"
            " released_at = CASE WHEN u.amount > 0 THEN NULL ELSE now() END"
            " FROM unnest($1::bigint[], $2::numeric[]) AS u(order_id, amount)"
            " WHERE h.order_id = u.order_id AND h.released_at IS NULL",
            ids,
            amounts,
        )
    return len(ids)


async def list_instruments(conn: asyncpg.Connection) -> list[ListedInstrumentView]:
    open_orders = (
        ", (SELECT count(*) FROM orders o WHERE o.instrument_id = i.id AND o.status = ANY($1::text[])) AS open_orders"
    )
    rows = await conn.fetch(
        _SELECT.replace(" FROM instruments i", open_orders + " FROM instruments i", 1) + " ORDER BY i.symbol", _OPEN
    )
    return [
        ListedInstrumentView(
            terms=_terms_from_row(r),
            instrument_id=r["id"],
            last_price=None if r["last_price"] is None else r["last_price"].normalize(),
            open_orders=r["open_orders"],
        )
        for r in rows
    ]


async def set_status(conn: asyncpg.Connection, symbol: str, status: str, *, actor_user_id: int | None = None) -> str:
    """Open, halt or close ``symbol``; returns the previous status. A halted or closed instrument takes no new
    orders (its open orders stay and may be canceled). Reopening within ``FEE_CHANGE_SETTLE_S`` of a fee raise is
    refused (Conflict ``fee_change_settling``): see the module docstring."""
    status = parse_status(status)
    row = await _lock(conn, symbol)
    previous: str = row["status"]
    if status == previous:
        return previous
    if status == "open":
        recent: float | None = await conn.fetchval(
            "SELECT extract(epoch FROM now() - max(ts))::float8 FROM audit_log"
            " WHERE entity = 'instrument' AND entity_id = $1 AND action = 'instrument.set'"
            " AND details ? 'fees_raised' AND ts > now() - make_interval(secs => $2)",
            str(row["id"]),
            FEE_CHANGE_SETTLE_S,
        )
        if recent is not None:
            wait = max(1, int(FEE_CHANGE_SETTLE_S - recent + 0.999))
            raise Conflict(
                f"{symbol}: its fees or margin rate went up {recent:.0f} s ago; api processes take up to"
                f" {FEE_CHANGE_SETTLE_S:.0f} s to see them, so reopen in {wait} s",
                code="fee_change_settling",
            )
    await conn.execute("UPDATE instruments SET status = $2 WHERE id = $1", row["id"], status)
    await _audit(conn, actor_user_id, "instrument.status", row["id"], {"from": previous, "to": status})
    return previous


async def adjust_instrument(
    conn: asyncpg.Connection, symbol: str, changes: InstrumentChanges, *, actor_user_id: int | None = None
) -> InstrumentTerms:
    """Change ``symbol``'s trading parameters; returns the new terms. See the module docstring for what may
    change when. Raises NotFound, InvalidRequest (bad values, nothing to change), Conflict (``open_orders`` for a
    grid change or a fee or margin raise under open orders, ``instrument_open`` for such a raise while it is open,
    ``off_grid`` for a grid its prices are not on)."""
    if changes.is_empty():
        raise InvalidRequest("nothing to change: give at least one parameter", code="no_changes")
    row = await _lock(conn, symbol)
    old = _terms_from_row(row)
    updates = {
        f.name: getattr(changes, f.name)
        for f in fields(changes)
        if f.name != "clear_session_close" and getattr(changes, f.name) is not None
    }
    if changes.clear_session_close:
        if changes.session_close_utc is not None:
            raise InvalidRequest("give a session close or clear it, not both", code="invalid_time")
        updates["session_close_utc"] = None
    new = replace(old, **updates)
    validate_terms(new)
    changed = {name: value for name, value in updates.items() if getattr(old, name) != value}
    if not changed:
        return old
    instrument_id: int = row["id"]
    grid_changed = new.tick_size != old.tick_size or new.lot_size != old.lot_size
    # the margin rate prices a margin account's holds as the fees do, in the api and in the engine's settlement
    rates_changed = (new.maker_fee_rate, new.taker_fee_rate, new.margin_rate) != (
        old.maker_fee_rate,
        old.taker_fee_rate,
        old.margin_rate,
    )
    # a hold covers the worst fee and the margin rate: a change raising either could leave one short
    rates_raised = new.worst_fee > old.worst_fee or new.margin_rate > old.margin_rate
    if grid_changed or rates_raised:
        open_orders = await _open_orders(conn, instrument_id)
        if open_orders:
            what = (
                "tick or lot size cannot change"
                if grid_changed
                else "fees or margin rate cannot go up (their holds were priced at the current ones)"
            )
            raise Conflict(
                f"{symbol} has {open_orders} open orders: its {what} under them; halt it and let them be canceled"
                " or filled first",
                code="open_orders",
            )
    if rates_raised and old.status == "open":
        raise Conflict(
            f"{symbol} is open: a higher fee or margin rate applies only while it is halted or closed (api processes"
            f" price new orders at the old rates for up to {FEE_CHANGE_SETTLE_S:.0f} s); halt it, raise them, then"
            " reopen it. Lowering them needs no halt",
            code="instrument_open",
        )
    if grid_changed:
        last: Decimal | None = row["last_price"]
        if last is not None and not on_grid(last, new.tick_size):
            raise Conflict(
                f"{symbol}'s last price {_t(last)} is not a multiple of the new tick size {_t(new.tick_size)}",
                code="off_grid",
            )
        if new.lot_size != old.lot_size:
            scale: int | None = await conn.fetchval("SELECT scale FROM assets WHERE code = $1", new.base_asset)
            if scale is not None and scale < decimal_places(new.lot_size):
                raise InvalidRequest(
                    f"asset {new.base_asset} has {scale} decimal places; lot size {_t(new.lot_size)} needs"
                    f" {decimal_places(new.lot_size)}",
                    code="asset_scale_too_small",
                )
    await conn.execute(
        "UPDATE instruments SET tick_size = $2, lot_size = $3, min_qty = $4, max_qty = $5, price_band_pct = $6,"
        " reference_price = $7, maker_fee_rate = $8, taker_fee_rate = $9, margin_rate = $10,"
        " session_close_utc = $11 WHERE id = $1",
        instrument_id,
        new.tick_size,
        new.lot_size,
        new.min_qty,
        new.max_qty,
        new.price_band_pct,
        new.reference_price,
        new.maker_fee_rate,
        new.taker_fee_rate,
        new.margin_rate,
        new.session_close_utc,
    )
    repriced = await _reprice_holds(conn, instrument_id, new) if rates_changed else 0
    old_json, new_json = _terms_json(old), _terms_json(new)
    details: dict[str, Any] = {name: {"from": old_json[name], "to": new_json[name]} for name in changed}
    if rates_changed:
        details["fees_changed"] = True
        details["holds_repriced"] = repriced
    if rates_raised:
        details["fees_raised"] = True  # reopening waits FEE_CHANGE_SETTLE_S (``set_status``)
    await _audit(conn, actor_user_id, "instrument.set", instrument_id, details)
    return new
