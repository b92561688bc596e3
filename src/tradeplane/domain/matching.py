"""The matching engine: many ``OrderBook``s, commands in, events out.

The engine worker feeds it the commands of its shard's stream in order and persists the events it returns.
Determinism is the contract: given the same books and the same commands, ``process`` returns equal events
(trade ids included), so replaying a stream after a crash reproduces exactly what was persisted.

Commands, events, reasons and ``InstrumentSpec`` are defined in ``tradeplane.domain.book`` and re-exported
here, so callers import everything from this module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from tradeplane.domain.book import (
    BookStateError,
    Cancel,
    CancelAll,
    CancelReason,
    CancelRejected,
    Command,
    Event,
    Expire,
    Fill,
    InstrumentSpec,
    Modify,
    ModifyRejected,
    NewOrder,
    OffGridValue,
    OrderAccepted,
    OrderBook,
    OrderCanceled,
    OrderExpired,
    OrderFilled,
    OrderModified,
    OrderRejected,
    RejectReason,
    StopTriggered,
)
from tradeplane.domain.orders import OrderState

__all__ = [
    "BookStateError",
    "Cancel",
    "CancelAll",
    "CancelReason",
    "CancelRejected",
    "Command",
    "Event",
    "Expire",
    "Fill",
    "InstrumentSpec",
    "MatchingEngine",
    "Modify",
    "ModifyRejected",
    "NewOrder",
    "OffGridValue",
    "OrderAccepted",
    "OrderBook",
    "OrderCanceled",
    "OrderExpired",
    "OrderFilled",
    "OrderModified",
    "OrderRejected",
    "OrderState",
    "RejectReason",
    "StopTriggered",
    "UnknownCommand",
]


class UnknownCommand(TypeError):
    """``process`` was handed something that is not one of the engine's commands: a programming error."""


class MatchingEngine:
    """Routes each command to its symbol's book; cancel-all and expiry fan out over books in symbol order.

    A command for a symbol the engine does not hold is answered with a rejection event
    (``unknown_instrument``), never an exception: the stream must keep flowing.
    """

    __slots__ = ("_books", "_dispatch")

    def __init__(self, symbols: Iterable[str] = ()) -> None:
        self._books: dict[str, OrderBook] = {}
        for symbol in symbols:
            self.add_book(symbol)
        self._dispatch: dict[type, Callable[[object, list[Event]], None]] = {
            NewOrder: self._new_order,  # type: ignore[dict-item]
            Cancel: self._cancel,  # type: ignore[dict-item]
            Modify: self._modify,  # type: ignore[dict-item]
            CancelAll: self._cancel_all,  # type: ignore[dict-item]
            Expire: self._expire,  # type: ignore[dict-item]
        }

    def add_book(self, symbol: str) -> OrderBook:
        if symbol in self._books:
            raise ValueError(f"the engine already has a book for {symbol}")
        book = self._books[symbol] = OrderBook(symbol)
        return book

    def book(self, symbol: str) -> OrderBook:
        """The book of ``symbol``; KeyError if the engine does not hold it."""
        return self._books[symbol]

    @property
    def symbols(self) -> list[str]:
        return sorted(self._books)

    def restore(
        self,
        symbol: str,
        resting_orders: Iterable[OrderState],
        *,
        last_price: int | None = None,
        positions: Mapping[int, int] | None = None,
    ) -> OrderBook:
        """Create (if needed) and rebuild ``symbol``'s book from its open orders and its accounts' net positions
        in signed lots (``OrderBook.restore``)."""
        book = self._books.get(symbol)
        if book is None:
            book = self.add_book(symbol)
        book.restore(resting_orders, last_price=last_price, positions=positions)
        return book

    def process(self, command: Command) -> list[Event]:
        """Apply one command and return the events it caused, in order."""
        out: list[Event] = []
        # New orders and cancels are nearly all the traffic: route them without the dispatch table.
        if type(command) is NewOrder:
            book = self._books.get(command.symbol)
            if book is not None:
                book.new_order(command, out)
                return out
        elif type(command) is Cancel:
            book = self._books.get(command.symbol)
            if book is not None:
                book.cancel(command, out)
                return out
        handler = self._dispatch.get(type(command))
        if handler is None:
            raise UnknownCommand(f"not an engine command: {command!r}")
        handler(command, out)
        return out

    def process_into(self, command: Command, out: list[Event]) -> None:
        """Like ``process`` but appends to ``out``: one list for a whole batch of commands."""
        handler = self._dispatch.get(type(command))
        if handler is None:
            raise UnknownCommand(f"not an engine command: {command!r}")
        handler(command, out)

    def _new_order(self, cmd: NewOrder, out: list[Event]) -> None:
        book = self._books.get(cmd.symbol)
        if book is None:
            out.append(OrderRejected(cmd.seq, cmd.symbol, cmd.order_id, RejectReason.UNKNOWN_INSTRUMENT))
        else:
            book.new_order(cmd, out)

    def _cancel(self, cmd: Cancel, out: list[Event]) -> None:
        book = self._books.get(cmd.symbol)
        if book is None:
            out.append(CancelRejected(cmd.seq, cmd.symbol, cmd.order_id, RejectReason.UNKNOWN_INSTRUMENT))
        else:
            book.cancel(cmd, out)

    def _modify(self, cmd: Modify, out: list[Event]) -> None:
        book = self._books.get(cmd.symbol)
        if book is None:
            out.append(ModifyRejected(cmd.seq, cmd.symbol, cmd.order_id, RejectReason.UNKNOWN_INSTRUMENT))
        else:
            book.modify(cmd, out)

    def _books_for(self, symbol: str | None) -> list[OrderBook]:
        if symbol is None:
            return [self._books[s] for s in sorted(self._books)]
        book = self._books.get(symbol)
        return [] if book is None else [book]

    def _cancel_all(self, cmd: CancelAll, out: list[Event]) -> None:
        for book in self._books_for(cmd.symbol):
            book.cancel_account(cmd.account_id, cmd.seq, out)

    def _expire(self, cmd: Expire, out: list[Event]) -> None:
        for book in self._books_for(cmd.symbol):
            book.expire(cmd.now_ns, cmd.seq, out)
