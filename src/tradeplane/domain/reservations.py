"""What an open order reserves, and which engine shard owns a symbol.

Both the api (which places the hold when it acknowledges an order) and the engine (which shrinks and releases
it as the order fills, is canceled or expires) compute holds with `reservation`, so at rest the invariant holds:
the active holds of an account equal the sum of `reservation` over its open orders' leaves quantities. An order
with client modifies in flight keeps more: what the api funded them with, less what fills have used since.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal

from tradeplane.domain.orders import PRICED_TYPES, OrderType, Side


@dataclass(frozen=True, slots=True)
class Reservation:
    asset: str
    amount: Decimal  # >= 0; zero means nothing is reserved


def shard_for(symbol: str, shards: int) -> int:
    """Stable across processes and restarts (unlike hash()): a symbol always maps to the same engine shard."""
    return zlib.crc32(symbol.encode()) % shards


def ceil_to_scale(amount: Decimal, scale: int) -> Decimal:
    return amount.quantize(Decimal(1).scaleb(-scale), rounding=ROUND_CEILING)


def reservation(
    *,
    side: Side,
    account_kind: str,
    leaves_qty: Decimal,
    hold_price: Decimal,
    maker_fee_rate: Decimal,
    taker_fee_rate: Decimal,
    margin_rate: Decimal,
    base_asset: str,
    quote_asset: str,
    quote_scale: int,
    reduce_only: bool = False,
) -> Reservation:
    """Funds an order with `leaves_qty` still open must keep aside.

    - cash account, buy: notional at the hold price plus the worst fee, in the quote currency (a buy never
      fills above its hold price, so the cash debited on a fill never exceeds what the hold released);
    - cash account, sell: the quantity itself, in the base asset (a cash account cannot sell what it lacks);
    - margin account, either side: initial margin plus the worst fee, in the quote currency; a reduce-only
      order only the worst fee (it shrinks a position whose margin is already counted, so closing a
      leveraged position never needs fresh margin).
    """
    fee = max(maker_fee_rate, taker_fee_rate, Decimal(0))
    if account_kind == "margin":
        rate = fee if reduce_only else margin_rate + fee
        return Reservation(quote_asset, ceil_to_scale(leaves_qty * hold_price * rate, quote_scale))
    if side is Side.BUY:
        return Reservation(quote_asset, ceil_to_scale(leaves_qty * hold_price * (1 + fee), quote_scale))
    return Reservation(base_asset, leaves_qty)


def modify_hold_price(order_type: OrderType, hold_price: Decimal, new_price: Decimal | None) -> Decimal:
    """The hold price of an order a client modify takes to limit price ``new_price`` (None: no limit price).

    A higher limit raises it; a lower one does not lower it, since fills already in flight may still come at the
    old price (the engine sets it to the new limit once it has applied the modify). A market or stop order's hold
    price is its protection price, which a modify does not change. The api prices a modify's hold with it, and
    settlement keeps that hold, less what fills use, until the engine has processed the modify.
    """
    if new_price is not None and order_type in PRICED_TYPES:
        return max(hold_price, new_price)
    return hold_price
