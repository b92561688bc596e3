"""Market data ticks in integer price ticks, and the gate every tick passes before it may be stored.

A price travels through the pipeline as an ``int`` count of the instrument's tick size: exact, cheap to
compare and to COPY. ``PriceScale`` is the only place a ``Decimal`` price becomes an int and back, and it
refuses any price that is not a whole number of ticks rather than rounding it.

``TickValidator`` classifies each incoming tick as accepted or dropped with one ``DropReason``. A drop is a
result, never an exception: a bad tick must not stop the pipeline. Drops are counted per reason (for the
metric) and one sample per reason is kept (for the log line).

Invariants of an accepted ``Tick``: the symbol is a known instrument; at least one price is present and
every price present is > 0; ``bid <= ask`` when both are present (a locked quote is allowed, a crossed one is
not); sizes and volume are >= 0; ``0 <= ts_ns < 2**63``; ``ts_ns`` is not older than the symbol's watermark
(the newest accepted ``ts_ns``) minus the out-of-order tolerance; with a future bound, ``ts_ns`` is not later
than the wall clock plus that bound.

Why the future bound: a tick becomes its symbol's watermark, so one tick stamped far in the future (a bad
clock, a unit slip such as microseconds read as nanoseconds) would make every real tick after it out of order
and silence the symbol until the wall clock caught up. Nothing is recorded before it happens, so ticks from
the future are refused whatever the feed: live feeds and replayed history alike (a history file cannot hold
ticks from after its own replay). There is no lower bound: replayed history may be any age.
"""

from __future__ import annotations

import decimal
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from typing import Protocol

NS_PER_SECOND = 1_000_000_000
# Timestamps are stored as int64 nanoseconds (PostgreSQL timestamptz, Arrow timestamp[ns]); refuse the rest.
TS_NS_MIN = 0
TS_NS_MAX = 2**63 - 1

# Enough digits that no realistic price / tick-size quotient is ever rounded; Inexact is trapped anyway so a
# conversion either is exact or raises.
_EXACT = decimal.Context(prec=60, traps=[decimal.InvalidOperation, decimal.Inexact, decimal.Overflow])

_SAMPLE_MAX_CHARS = 300


class OffTickGrid(ValueError):
    """A price is not a whole number of the instrument's tick size."""


class DropReason(StrEnum):
    """Why a tick was refused. The values are the metric label and log field; the set is fixed."""

    UNKNOWN_SYMBOL = "unknown_symbol"
    NON_POSITIVE_PRICE = "non_positive_price"
    NON_FINITE_PRICE = "non_finite_price"
    CROSSED_QUOTE = "crossed_quote"
    MALFORMED_ROW = "malformed_row"
    OUT_OF_ORDER = "out_of_order"
    OFF_TICK_GRID = "off_tick_grid"
    TIMESTAMP_IN_FUTURE = "timestamp_in_future"


@dataclass(frozen=True, slots=True)
class PriceScale:
    """Exact conversion between ``Decimal`` prices and integer tick counts for one tick size.

    ``to_ticks(to_price(n)) == n`` for every int ``n``, and ``to_price(to_ticks(p)) == p`` (numerically) for
    every on-grid price ``p``. Off-grid, non-finite or non-Decimal inputs raise instead of rounding.
    """

    tick_size: Decimal

    def __post_init__(self) -> None:
        if not isinstance(self.tick_size, Decimal) or not self.tick_size.is_finite() or self.tick_size <= 0:
            raise ValueError(f"tick size must be a positive finite Decimal, got {self.tick_size!r}")

    def to_ticks(self, price: Decimal) -> int:
        """The number of ticks in ``price``; raises ``OffTickGrid`` if it is not a whole number of ticks."""
        if not isinstance(price, Decimal):
            raise TypeError(f"price must be a Decimal, got {type(price).__name__}")
        if not price.is_finite():
            raise ValueError(f"price is not finite: {price}")
        try:
            quotient, remainder = _EXACT.divmod(price, self.tick_size)
        except decimal.DecimalException as exc:  # quotient too large to represent exactly
            raise OffTickGrid(f"{price} cannot be expressed in ticks of {self.tick_size}") from exc
        if remainder:
            raise OffTickGrid(f"{price} is not a multiple of the tick size {self.tick_size}")
        return int(quotient)

    def to_price(self, ticks: int) -> Decimal:
        """The exact price of ``ticks`` ticks, with the tick size's exponent (e.g. 12345 x 0.01 -> 123.45)."""
        return _EXACT.multiply(Decimal(ticks), self.tick_size)


class PricedInstrument(Protocol):
    """What the market data path needs to know about an instrument: its symbol and tick size.

    ``tradeplane.domain.book.InstrumentSpec`` satisfies it, so the engine's instrument specs can be passed
    as they are; ``InstrumentGrid`` is the minimal concrete one.
    """

    @property
    def symbol(self) -> str: ...

    @property
    def tick_size(self) -> Decimal: ...


@dataclass(frozen=True, slots=True)
class InstrumentGrid:
    """A symbol and its price grid: the smallest ``PricedInstrument`` (feeds, replay files, tests)."""

    symbol: str
    tick_size: Decimal

    def __post_init__(self) -> None:
        PriceScale(self.tick_size)  # validates the tick size

    @classmethod
    def of(cls, symbol: str, tick_size: Decimal | str) -> InstrumentGrid:
        return cls(symbol, Decimal(tick_size))


@dataclass(slots=True)
class Tick:
    """One top-of-book update (and optionally a trade) for one instrument, prices in integer ticks.

    ``ts_ns`` is UTC epoch nanoseconds. ``bid``/``ask`` are the quote (``None`` when that side is absent);
    ``last`` is the last trade price (``None`` for a quote-only update) and ``volume`` the quantity traded at
    this update. Not frozen, to keep construction cheap at hundreds of thousands per second: treat it as
    immutable once built.
    """

    ts_ns: int
    symbol: str
    bid: int | None
    ask: int | None
    bid_size: int = 0
    ask_size: int = 0
    last: int | None = None
    volume: int = 0


def _truncate(sample: object) -> str:
    text = repr(sample)
    return text if len(text) <= _SAMPLE_MAX_CHARS else text[: _SAMPLE_MAX_CHARS - 3] + "..."


class TickValidator:
    """The single gate between feeds and storage: accepts a tick or drops it with a ``DropReason``.

    ``accept`` checks ticks that are already in integer ticks (simulated feed, bus, engine trades);
    ``normalize`` converts and checks a row whose prices are ``Decimal`` (file replay), which is where
    ``non_finite_price`` and ``off_tick_grid`` can arise; ``reject`` records a drop found by a parser
    (``malformed_row``). All three count into ``drops`` and keep the first sample per reason until
    ``drain_samples`` hands the samples to the logger.

    The out-of-order rule is against a per-symbol watermark, the newest ``ts_ns`` accepted so far (not the
    most recent arrival), so one late tick never moves the watermark backwards.

    ``max_future_ns``: refuse (``timestamp_in_future``) a tick stamped later than ``clock()`` (UTC epoch ns)
    plus this much, the allowed clock skew of the sources; ``None`` means no bound. The bound is cached and
    the clock read again only when a tick passes the cached one, so the per-tick cost is one comparison.
    """

    __slots__ = (
        "_clock",
        "_future_bound",
        "_max_future_ns",
        "_samples",
        "_scales",
        "_tolerance_ns",
        "_watermarks",
        "accepted",
        "drops",
    )

    def __init__(
        self,
        instruments: Iterable[PricedInstrument],
        *,
        max_out_of_order_ns: int,
        max_future_ns: int | None = None,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        if max_out_of_order_ns < 0:
            raise ValueError("max_out_of_order_ns must be >= 0")
        if max_future_ns is not None and max_future_ns < 0:
            raise ValueError("max_future_ns must be >= 0")
        self._scales: dict[str, PriceScale] = {i.symbol: PriceScale(i.tick_size) for i in instruments}
        self._tolerance_ns = max_out_of_order_ns
        self._max_future_ns = max_future_ns
        self._clock = clock
        # Ticks at or below this are not in the future (clock() + max_future_ns when last read).
        self._future_bound = TS_NS_MAX if max_future_ns is None else -1
        self._watermarks: dict[str, int] = {}
        self._samples: dict[DropReason, str] = {}
        self.drops: Counter[DropReason] = Counter()
        self.accepted = 0

    @property
    def price_scales(self) -> Mapping[str, PriceScale]:
        """The known instruments, symbol -> price scale."""
        return self._scales

    @property
    def max_out_of_order_ns(self) -> int:
        return self._tolerance_ns

    def add_instrument(self, instrument: PricedInstrument) -> None:
        """Accept ticks of an instrument listed after this validator was made (a known symbol is left as is)."""
        self._scales.setdefault(instrument.symbol, PriceScale(instrument.tick_size))

    @property
    def max_future_ns(self) -> int | None:
        return self._max_future_ns

    def watermark(self, symbol: str) -> int | None:
        """The newest accepted ``ts_ns`` for ``symbol``, or ``None`` before its first accepted tick."""
        return self._watermarks.get(symbol)

    def reject(self, reason: DropReason, sample: object) -> DropReason:
        """Count a drop (found here or by a parser) and keep ``sample`` if it is the first for ``reason``."""
        self.drops[reason] += 1
        if reason not in self._samples:
            self._samples[reason] = _truncate(sample)
        return reason

    def drain_samples(self) -> dict[DropReason, str]:
        """The kept samples, one per reason, and forget them so the next interval gets fresh ones."""
        samples, self._samples = self._samples, {}
        return samples

    def accept(self, tick: Tick) -> DropReason | None:
        """``None`` if ``tick`` is accepted (and advances the watermark), else the recorded drop reason."""
        symbol = tick.symbol
        if symbol not in self._scales:
            return self.reject(DropReason.UNKNOWN_SYMBOL, tick)
        bid = tick.bid
        ask = tick.ask
        last = tick.last
        if bid is None and ask is None and last is None:
            return self.reject(DropReason.MALFORMED_ROW, tick)
        if (bid is not None and bid <= 0) or (ask is not None and ask <= 0) or (last is not None and last <= 0):
            return self.reject(DropReason.NON_POSITIVE_PRICE, tick)
        if tick.bid_size < 0 or tick.ask_size < 0 or tick.volume < 0:
            return self.reject(DropReason.MALFORMED_ROW, tick)
        ts = tick.ts_ns
        if ts < TS_NS_MIN or ts > TS_NS_MAX:
            return self.reject(DropReason.MALFORMED_ROW, tick)
        if bid is not None and ask is not None and bid > ask:
            return self.reject(DropReason.CROSSED_QUOTE, tick)
        if ts > self._future_bound and self._in_future(ts):
            return self.reject(DropReason.TIMESTAMP_IN_FUTURE, tick)
        watermark = self._watermarks.get(symbol)
        if watermark is None or ts > watermark:
            self._watermarks[symbol] = ts
        elif ts < watermark - self._tolerance_ns:
            return self.reject(DropReason.OUT_OF_ORDER, tick)
        self.accepted += 1
        return None

    def _in_future(self, ts: int) -> bool:
        """Whether ``ts`` is beyond the wall clock plus the allowed skew (re-reads the clock, moves the bound)."""
        assert self._max_future_ns is not None  # the bound is TS_NS_MAX otherwise
        self._future_bound = self._clock() + self._max_future_ns
        return ts > self._future_bound

    def accept_batch(self, ticks: Iterable[Tick]) -> list[Tick]:
        """The accepted ticks of ``ticks``, in order; the others are counted as drops."""
        accept = self.accept
        return [tick for tick in ticks if accept(tick) is None]

    def normalize(
        self,
        ts_ns: int,
        symbol: str,
        bid: Decimal | None,
        ask: Decimal | None,
        bid_size: int,
        ask_size: int,
        last: Decimal | None,
        volume: int,
    ) -> Tick | DropReason:
        """Convert a row with ``Decimal`` prices to a ``Tick`` through the symbol's price scale; accept it.

        Checks in order: unknown symbol, non-finite price, non-positive price, off the tick grid, then the
        integer checks of ``accept`` (crossed quote, out of order, ...). Returns the accepted tick or the
        recorded drop reason.
        """
        scale = self._scales.get(symbol)
        if scale is None:
            return self.reject(DropReason.UNKNOWN_SYMBOL, (ts_ns, symbol, bid, ask, last))
        prices = (bid, ask, last)
        for price in prices:
            if price is not None and not price.is_finite():
                return self.reject(DropReason.NON_FINITE_PRICE, (ts_ns, symbol, bid, ask, last))
        for price in prices:
            if price is not None and price <= 0:
                return self.reject(DropReason.NON_POSITIVE_PRICE, (ts_ns, symbol, bid, ask, last))
        try:
            tick = Tick(
                ts_ns,
                symbol,
                None if bid is None else scale.to_ticks(bid),
                None if ask is None else scale.to_ticks(ask),
                bid_size,
                ask_size,
                None if last is None else scale.to_ticks(last),
                volume,
            )
        except OffTickGrid:
            return self.reject(DropReason.OFF_TICK_GRID, (ts_ns, symbol, bid, ask, last))
        reason = self.accept(tick)
        return tick if reason is None else reason
