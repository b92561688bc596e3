"""Request and response bodies of the trading API, named so they never shadow domain types (OrderCreate,
OrderPublic, ...). Every decimal is a JSON string in responses; requests accept strings (preferred, exact) or
JSON numbers."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Context, Decimal
from typing import Annotated

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, PlainSerializer

from tradeplane.domain.orders import OrderType, SelfTradePrevention, Side, TimeInForce
from tradeplane.domain.risk import COLUMN_LIMIT, COLUMN_QUANTUM, OrderTerms
from tradeplane.services.instruments import SYMBOL_PATTERN
from tradeplane.services.orders import MAX_BATCH
from tradeplane.services.queries import MAX_ROW_ID, decimal_text

DecimalText = Annotated[Decimal, PlainSerializer(decimal_text, return_type=str)]
RowId = Annotated[int, Field(ge=1, le=MAX_ROW_ID)]
"""An id in a request body: a positive bigint, as every id column is (a larger one is a 422, not a 500)."""


def _in_utc(moment: datetime) -> datetime:
    try:
        return moment.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00+14:00 is in year 0 in UTC, 9999-12-31T23:00-14:00 in year 10000
        raise ValueError("must fall between 0001-01-01 and 9999-12-31 in UTC") from None


UtcInstant = Annotated[AwareDatetime, AfterValidator(_in_utc)]
"""A time with a UTC offset, normalised to UTC: one that UTC cannot express is a 422, not a failed query."""

_LAST_INSTANT = datetime.max.replace(tzinfo=UTC)


def _finite(moment: datetime) -> datetime:
    if moment == _LAST_INSTANT:  # asyncpg stores it as 'infinity', which reads back as a naive datetime.max
        raise ValueError("must be before 9999-12-31T23:59:59.999999Z")
    return moment


Expiry = Annotated[UtcInstant, AfterValidator(_finite)]
"""An instant to store and hand to the engine (expire_at)."""

_NUMERIC = Context(prec=40)  # NUMERIC(38, 18) values need 38 digits


def _fewer_zeros(value: Decimal) -> Decimal:
    """The same number with 18 decimals when only zeros lie beyond them: 65000.000...0 with thousands of zeros
    is a valid price, but asyncpg cannot send a NUMERIC with that exponent. Anything else is left to the
    service's checks (which refuse more than 18 significant decimals, or a value past 10^20)."""
    if len(str(value)) <= 40 or not value.is_finite() or value.copy_abs() >= COLUMN_LIMIT:
        return value  # 40 characters hold any NUMERIC(38, 18); str() is far cheaper than as_tuple()
    rescaled = value.quantize(COLUMN_QUANTUM, context=_NUMERIC)
    return rescaled if rescaled == value else value


Amount = Annotated[Decimal, AfterValidator(_fewer_zeros)]
"""A quantity or price in a request: a JSON string (exact) or number."""
Symbol = Annotated[str, Field(pattern=SYMBOL_PATTERN.pattern, description="an instrument symbol, e.g. BTC-USD")]
"""A symbol as instruments are named (1 to 32 of A-Z 0-9 . _ -): any other text names none, and some (NUL)
cannot even be sent to PostgreSQL."""
ClientOrderId = Annotated[str, Field(pattern=r"^[ -~]{1,64}$", description="1 to 64 printable ASCII characters")]
"""The client's own order id: printable ASCII (no control characters, no NUL, which PostgreSQL refuses)."""


class OrderCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    account_id: RowId
    symbol: Symbol
    side: Side
    type: OrderType
    quantity: Amount
    price: Amount | None = None
    stop_price: Amount | None = None
    time_in_force: TimeInForce = TimeInForce.GTC
    expire_at: Expiry | None = Field(default=None, description="GTD only; DAY orders expire at session close")
    post_only: bool = False
    reduce_only: bool = False
    stp: SelfTradePrevention | None = Field(
        default=None, description="self-trade prevention; default: the account's (cancel_newest unless set)"
    )
    client_order_id: ClientOrderId | None = None

    def terms(self) -> OrderTerms:
        return OrderTerms(
            side=self.side,
            order_type=self.type,
            quantity=self.quantity,
            price=self.price,
            stop_price=self.stop_price,
            time_in_force=self.time_in_force,
            expire_at=self.expire_at,
            post_only=self.post_only,
            reduce_only=self.reduce_only,
            stp=self.stp,
        )


class OrderBatchCreate(BaseModel):
    """POST /orders/batch: orders placed in one transaction, answered one by one in the same order."""

    model_config = ConfigDict(extra="forbid")

    orders: list[OrderCreate] = Field(min_length=1, max_length=MAX_BATCH)


class OrderAmend(BaseModel):
    """PATCH /orders/{id}: the new total quantity (filled part included) and/or the new limit price."""

    model_config = ConfigDict(extra="forbid")

    quantity: Amount | None = None
    price: Amount | None = None


class OrderPublic(BaseModel):
    id: int
    account_id: int
    symbol: str
    client_order_id: str | None
    side: Side
    type: OrderType
    time_in_force: TimeInForce
    quantity: DecimalText
    price: DecimalText | None
    stop_price: DecimalText | None
    expire_at: datetime | None
    post_only: bool
    reduce_only: bool
    stp: SelfTradePrevention
    status: str
    filled_quantity: DecimalText
    leaves_quantity: DecimalText
    average_fill_price: DecimalText | None
    reject_reason: str | None = Field(
        description="why the order was rejected, or canceled by the engine on its own (stp, ioc_remainder,"
        " fok_unfillable, market_no_liquidity, reduce_only_*, modify_qty_filled); null for a client's cancel"
    )
    created_at: datetime
    updated_at: datetime


class RiskRejectedBody(BaseModel):
    """422 body of a risk denial; ``order`` is the stored rejected order (null for an unknown instrument)."""

    error: str = "risk_rejected"
    detail: str
    reason: str
    order: OrderPublic | None


class BatchItemPublic(BaseModel):
    """One order's answer in a batch: ``status`` is the HTTP status its own POST /orders would have had.

    201 accepted and 200 an idempotent replay carry ``order``; 422 ``risk_rejected`` carries ``reason`` and
    the stored rejected ``order``; any other error (422 validation_error, 404 account_not_found, 409
    duplicate_client_order_id) carries ``error`` and ``detail`` and stored nothing.
    """

    status: int
    order: OrderPublic | None = None
    error: str | None = None
    reason: str | None = None
    detail: str | None = None


class BatchPublic(BaseModel):
    results: list[BatchItemPublic]


class OrderPage(BaseModel):
    items: list[OrderPublic]
    next_cursor: str | None


class FillPublic(BaseModel):
    id: int
    fill_id: str
    order_id: int
    account_id: int
    symbol: str
    side: Side
    quantity: DecimalText
    price: DecimalText
    fee: DecimalText
    fee_asset: str
    liquidity: str
    trade_id: str
    created_at: datetime


class FillPage(BaseModel):
    items: list[FillPublic]
    next_cursor: str | None


class PositionPublic(BaseModel):
    account_id: int
    symbol: str
    net_quantity: DecimalText
    average_price: DecimalText
    realized_pnl: DecimalText
    mark_price: DecimalText | None
    unrealized_pnl: DecimalText


class AccountUpdate(BaseModel):
    """PATCH /accounts/{id}: the self-trade prevention that the account's orders get when they name none."""

    model_config = ConfigDict(extra="forbid")

    stp: SelfTradePrevention


class AccountPublic(BaseModel):
    account_id: int
    user_id: int | None
    name: str
    kind: str
    currency: str
    status: str
    stp: SelfTradePrevention
    cash: DecimalText
    holds: DecimalText
    free: DecimalText
    positions_value: DecimalText
    equity: DecimalText
    margin_used: DecimalText
    realized_pnl: DecimalText
    unrealized_pnl: DecimalText


class InstrumentPublic(BaseModel):
    id: int
    symbol: str
    base_asset: str
    quote_asset: str
    tick_size: DecimalText
    lot_size: DecimalText
    min_qty: DecimalText
    max_qty: DecimalText
    price_band_pct: DecimalText
    reference_price: DecimalText | None
    last_price: DecimalText | None
    maker_fee_rate: DecimalText
    taker_fee_rate: DecimalText
    margin_rate: DecimalText
    status: str


class BookPublic(BaseModel):
    symbol: str
    seq: int
    bids: list[list[str]]
    asks: list[list[str]]
