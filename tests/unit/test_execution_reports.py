"""The execution reports the engine publishes, byte for byte.

The WebSocket hub forwards each envelope to clients as it is, the order-queue worker re-publishes positions to
``position_updates`` and the market data feed reads trades: all of them rely on these exact bytes (the format is
in ``workers.engine``'s docstring). The expected payloads below were written by the engine before reports were
built for ``orjson`` directly, with every kind of value a report carries: decimals with trailing zeros, zero,
negative, integral and long ones, times with and without microseconds, a client order id that JSON escapes.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import MAX_PREC, Context
from decimal import Decimal as D

from hypothesis import example, given
from hypothesis import strategies as st

from tradeplane.domain.orders import OrderStatus, OrderType, Side
from tradeplane.entrypoints.workers.engine import execution_reports
from tradeplane.services.queries import decimal_text
from tradeplane.services.settlement import FillRecord, OrderRow, Position, SettledBatch, TradeRecord, dec

NOW = datetime(2026, 11, 21, 10, 11, 12, 345678, tzinfo=UTC)
CREATED = datetime(2026, 11, 21, 10, 11, 12, tzinfo=UTC)  # no microseconds: isoformat() leaves them out


def order(order_id: int, user_id: int | None, status: OrderStatus, filled: str, **terms: object) -> OrderRow:
    values: dict[str, object] = {
        "order_id": order_id,
        "account_id": 10 + order_id,
        "user_id": user_id,
        "account_kind": "margin",
        "instrument_id": 1,
        "symbol": "BTC-USD",
        "client_order_id": None,
        "side": Side.BUY,
        "order_type": OrderType.LIMIT,
        "time_in_force": "gtc",
        "quantity": D("1.000000000000000000"),
        "price": D("65000.000000000000000000"),
        "stop_price": None,
        "expire_at": None,
        "post_only": False,
        "reduce_only": False,
        "stp_mode": "cancel_newest",
        "status": status,
        "filled_quantity": D(filled),
        "average_fill_price": None,
        "reject_reason": None,
        "sequence": 7,
        "hold_price": None,
        "created_at": CREATED,
        "updated_at": NOW,
    }
    values.update(terms)
    return OrderRow(**values)  # type: ignore[arg-type]


def fill(fill_id: str, order_id: int, user_id: int | None, side: Side, liquidity: str) -> FillRecord:
    return FillRecord(
        fill_id=fill_id,
        order_id=order_id,
        account_id=10 + order_id,
        user_id=user_id,
        symbol="BTC-USD",
        side=side,
        quantity=D("0.2500"),
        price=D("65000.50"),
        fee=D("-1.62") if liquidity == "maker" else D("8.13"),
        fee_asset="USD",
        liquidity=liquidity,
        trade_id="BTC-USD-7-0",
        ts=NOW,
        id=900 + order_id,
    )


def a_batch() -> SettledBatch:
    """One taker buy sweeping a resting sell (users 5 and 6), a rejected stop-limit order of user 5 on another
    symbol, user 7's position there (a channel's only report goes as a bare envelope) and an order of an account
    without a user (no channel to report to)."""
    taker = order(
        2,
        5,
        OrderStatus.PARTIALLY_FILLED,
        "0.250000000000000000",
        client_order_id='my "quoted" \\ id',
        average_fill_price=D("65000.500000000000000000"),
        time_in_force="gtd",
        expire_at=datetime(2026, 11, 22, 0, 0, tzinfo=UTC),
    )
    maker = order(
        1,
        6,
        OrderStatus.FILLED,
        "0.250000000000000000",
        side=Side.SELL,
        quantity=D("0.250000000000000000"),
        price=D("65000.500000000000000000"),
        average_fill_price=D("65000.500000000000000000"),
        created_at=datetime(2026, 11, 21, 9, 0, 0, 1, tzinfo=UTC),
    )
    stop = order(
        3,
        5,
        OrderStatus.REJECTED,
        "0",
        symbol="ETH-USD",
        order_type=OrderType.STOP_LIMIT,
        price=D("3100.000000000000000000"),
        stop_price=D("3000.000000000000000000"),
        post_only=True,
        reduce_only=True,
        reject_reason="insufficient funds: 0.000000001 short",
        updated_at=None,
    )
    house = order(4, None, OrderStatus.NEW, "0")
    return SettledBatch(
        orders=[taker, maker, stop, house],
        fills=[fill("BTC-USD-7-0-M", 1, 6, Side.SELL, "maker"), fill("BTC-USD-7-0-T", 2, 5, Side.BUY, "taker")],
        trades=[TradeRecord("BTC-USD-7-0", "BTC-USD", D("65000.50"), D("0.2500"), Side.BUY, NOW)],
        positions=[
            Position(12, 5, 1, "BTC-USD", D("1.250000000000000000"), D("64000.4"), D("0"), D("65000.50")),
            Position(11, 6, 1, "BTC-USD", D("-0.25"), D("65000.500000000000000000"), D("-12.345E+2"), D("65000.50")),
            Position(13, 7, 2, "ETH-USD", D("0E-18"), D("0E-18"), D("0.0000001000"), None),
        ],
        symbols={"BTC-USD", "ETH-USD"},
    )


EXPECTED = [
    (
        "tp:trades:BTC-USD",
        b'{"channel":"trades","symbol":"BTC-USD","data":{"trade_id":"BTC-USD-7-0","price":"65000.50",'
        b'"qty":"0.2500","aggressor_side":"buy","ts":"2026-11-21T10:11:12.345678+00:00"}}',
    ),
    (
        "tp:user:6",
        b'[{"channel":"fills","symbol":"BTC-USD","data":{"id":901,"fill_id":"BTC-USD-7-0-M","order_id":1,'
        b'"account_id":11,"symbol":"BTC-USD","side":"sell","quantity":"0.25","price":"65000.5",'
        b'"fee":"-1.62","fee_asset":"USD","liquidity":"maker","trade_id":"BTC-USD-7-0",'
        b'"created_at":"2026-11-21T10:11:12.345678+00:00"}},{"channel":"orders","symbol":"BTC-USD",'
        b'"data":{"id":1,"account_id":11,"symbol":"BTC-USD","client_order_id":null,"side":"sell",'
        b'"type":"limit","time_in_force":"gtc","quantity":"0.25","price":"65000.5","stop_price":null,'
        b'"expire_at":null,"post_only":false,"reduce_only":false,"stp":"cancel_newest","status":"filled",'
        b'"filled_quantity":"0.25","leaves_quantity":"0","average_fill_price":"65000.5",'
        b'"reject_reason":null,"created_at":"2026-11-21T09:00:00.000001+00:00",'
        b'"updated_at":"2026-11-21T10:11:12.345678+00:00"}},{"channel":"positions","symbol":"BTC-USD",'
        b'"data":{"account_id":11,"symbol":"BTC-USD","net_quantity":"-0.25","average_price":"65000.5",'
        b'"realized_pnl":"-1234.5","mark_price":"65000.5","unrealized_pnl":"0"}}]',
    ),
    (
        "tp:user:5",
        b'[{"channel":"fills","symbol":"BTC-USD","data":{"id":902,"fill_id":"BTC-USD-7-0-T","order_id":2,'
        b'"account_id":12,"symbol":"BTC-USD","side":"buy","quantity":"0.25","price":"65000.5","fee":"8.13",'
        b'"fee_asset":"USD","liquidity":"taker","trade_id":"BTC-USD-7-0",'
        b'"created_at":"2026-11-21T10:11:12.345678+00:00"}},{"channel":"orders","symbol":"BTC-USD",'
        b'"data":{"id":2,"account_id":12,"symbol":"BTC-USD","client_order_id":"my \\"quoted\\" \\\\ id",'
        b'"side":"buy","type":"limit","time_in_force":"gtd","quantity":"1","price":"65000",'
        b'"stop_price":null,"expire_at":"2026-11-22T00:00:00+00:00","post_only":false,"reduce_only":false,'
        b'"stp":"cancel_newest","status":"partially_filled","filled_quantity":"0.25",'
        b'"leaves_quantity":"0.75","average_fill_price":"65000.5","reject_reason":null,'
        b'"created_at":"2026-11-21T10:11:12+00:00","updated_at":"2026-11-21T10:11:12.345678+00:00"}},'
        b'{"channel":"orders","symbol":"ETH-USD","data":{"id":3,"account_id":13,"symbol":"ETH-USD",'
        b'"client_order_id":null,"side":"buy","type":"stop_limit","time_in_force":"gtc","quantity":"1",'
        b'"price":"3100","stop_price":"3000","expire_at":null,"post_only":true,"reduce_only":true,'
        b'"stp":"cancel_newest","status":"rejected","filled_quantity":"0","leaves_quantity":"0",'
        b'"average_fill_price":null,"reject_reason":"insufficient funds: 0.000000001 short",'
        b'"created_at":"2026-11-21T10:11:12+00:00","updated_at":null}},{"channel":"positions",'
        b'"symbol":"BTC-USD","data":{"account_id":12,"symbol":"BTC-USD","net_quantity":"1.25",'
        b'"average_price":"64000.4","realized_pnl":"0","mark_price":"65000.5",'
        b'"unrealized_pnl":"1250.125"}}]',
    ),
    (
        "tp:user:7",
        b'{"channel":"positions","symbol":"ETH-USD","data":{"account_id":13,"symbol":"ETH-USD",'
        b'"net_quantity":"0","average_price":"0","realized_pnl":"0.0000001","mark_price":null,'
        b'"unrealized_pnl":"0"}}',
    ),
]


def test_each_channel_gets_the_reports_of_a_batch_in_the_pinned_bytes() -> None:
    assert execution_reports(a_batch()) == EXPECTED


def test_a_batch_without_reports_publishes_nothing() -> None:
    assert execution_reports(SettledBatch(orders=[order(4, None, OrderStatus.NEW, "0")])) == []


def plain(value: D) -> str:
    """Plain notation without trailing zeros, every digit kept (``normalize()`` in the default context would round
    past 28 significant digits, which NUMERIC(38, 18) values can have)."""
    return "0" if value == 0 else format(value.normalize(Context(prec=MAX_PREC)), "f")


@given(
    st.decimals(allow_nan=False, allow_infinity=False)
    | st.builds(lambda n, e: D(n).scaleb(e), st.integers(-(10**40), 10**40), st.integers(-40, 40))
)
@example(D("0E-18"))
@example(D("-0.000"))
@example(D("1E+2"))
@example(D("0.0000001000"))
@example(D("12345678901.123456789012345678"))  # 29 digits: the default context's normalize() rounds them to 28
@example(D("99999999999999999999.999999999999999999"))
@example(D("-1234567890123456789012345678"))
def test_decimals_are_written_plainly_and_exactly(value: D) -> None:
    assert dec(value) == plain(value)
    assert dec(value) == plain(value)  # again, from the texts it remembers
    assert decimal_text(value) == plain(value)  # the API's writer: the same text
    assert D(dec(value)) == value


def test_a_balance_with_more_digits_than_the_default_context_keeps_them_all() -> None:
    balance = D("12345678901.123456789012345678")  # NUMERIC(38, 18) holds it; 29 significant digits
    assert dec(balance) == decimal_text(balance) == "12345678901.123456789012345678"
