"""The real book against the naive reference matcher, and replay determinism.

A hypothesis state machine sends the same random commands (limit, market, IOC, FOK, post-only, DAY/GTD, stop
and stop-limit orders, any of them reduce-only, cancels, modifies, cancel-all, expiry) to ``MatchingEngine`` and
to ``reference_matcher.ReferenceEngine`` and requires, after every step, identical events (fills with their ids,
prices and quantities, cancels with their reasons, ...) and identical books (open orders with their priority,
L2 depth, last trade price, positions); it also checks that the L2 increments rebuild the depth and, on its own
terms, that no reduce-only fill ever grows or flips a position and that an account's open reduce-only orders never
exceed what they may reduce. Prices sit in a narrow band and accounts are few, so orders cross, partially fill,
self-trade, trigger stops and cut reduce-only orders often.
"""

from __future__ import annotations

import random

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from tests.unit.reference_matcher import ReferenceEngine
from tradeplane.domain.matching import (
    Cancel,
    CancelAll,
    Command,
    Event,
    Expire,
    Fill,
    MatchingEngine,
    Modify,
    NewOrder,
    OrderRejected,
)
from tradeplane.domain.orders import OrderType, SelfTradePrevention, Side, TimeInForce

SYMBOLS = ["AAA", "BBB"]
symbols = st.sampled_from(["AAA", "AAA", "AAA", "BBB"])
sides = st.sampled_from(list(Side))
prices = st.integers(96, 104)
qtys = st.integers(0, 9)  # 0 now and then exercises the invalid-quantity rejection
accounts = st.integers(1, 4)
stp_modes = st.sampled_from(list(SelfTradePrevention))
limit_tifs = st.sampled_from(
    [TimeInForce.GTC, TimeInForce.GTC, TimeInForce.IOC, TimeInForce.FOK, TimeInForce.DAY, TimeInForce.GTD]
)
market_tifs = st.sampled_from([TimeInForce.GTC, TimeInForce.IOC, TimeInForce.FOK])
lifetimes = st.integers(1, 40)
reduce_onlys = st.sampled_from([False, False, True])


class EngineMatchesReference(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.engine = MatchingEngine(SYMBOLS)
        self.reference = ReferenceEngine(SYMBOLS)
        self.seq = 0
        self.now = 1_000
        self.next_id = 1
        self.symbol_of: dict[int, str] = {}
        self.commands: list[Command] = []
        self.log: list[Event] = []
        # Per symbol, the L2 book a subscriber rebuilds from nothing but ``take_level_changes()`` increments.
        self.l2: dict[str, tuple[dict[int, int], dict[int, int]]] = {s: ({}, {}) for s in SYMBOLS}
        # Read from the commands and fills alone, independently of both matchers: which orders are reduce-only,
        # and every account's position per symbol.
        self.reduce_only: set[int] = set()
        self.positions: dict[tuple[str, int], int] = {}

    def _send(self, command: Command) -> None:
        self.commands.append(command)
        got = self.engine.process(command)
        want = self.reference.process(command)
        assert got == want, f"{command}\n engine:    {got}\n reference: {want}"
        self.log.extend(got)
        if isinstance(command, NewOrder) and command.reduce_only:
            self.reduce_only.add(command.order_id)
            assert any(isinstance(ev, OrderRejected) for ev in got) or self._position(command) != 0
        for ev in got:
            if isinstance(ev, Fill):
                taker_side = ev.aggressor_side
                maker_side = Side.SELL if taker_side is Side.BUY else Side.BUY
                for order_id, account, side in (
                    (ev.maker_order_id, ev.maker_account_id, maker_side),
                    (ev.taker_order_id, ev.taker_account_id, taker_side),
                ):
                    key = (ev.symbol, account)
                    before = self.positions.get(key, 0)
                    after = before + (ev.qty if side is Side.BUY else -ev.qty)
                    self.positions[key] = after
                    if order_id in self.reduce_only:
                        # Towards zero and never through it.
                        assert abs(after) < abs(before) and after * before >= 0, (ev, before, after)

    def _position(self, order: NewOrder) -> int:
        return self.positions.get((order.symbol, order.account_id), 0)

    def _next(self) -> tuple[int, int]:
        self.seq += 1
        self.now += 1
        return self.seq, self.now

    def _new(self, symbol: str, **fields: object) -> None:
        seq, now = self._next()
        order_id = self.next_id
        self.next_id += 1
        self.symbol_of[order_id] = symbol
        self._send(NewOrder(seq=seq, ts_ns=now, symbol=symbol, order_id=order_id, **fields))  # type: ignore[arg-type]

    def _expiry(self, tif: TimeInForce, lifetime: int) -> int | None:
        return self.now + 1 + lifetime if tif in (TimeInForce.DAY, TimeInForce.GTD) else None

    @initialize(symbol=symbols, account=accounts)
    def seed_both_sides(self, symbol: str, account: int) -> None:
        """Start from a two-sided book so the first commands already have something to trade with."""
        for side, price in ((Side.BUY, 99), (Side.BUY, 98), (Side.SELL, 101), (Side.SELL, 102)):
            self._new(symbol, account_id=account + 10, side=side, order_type=OrderType.LIMIT, qty=5, price=price)

    @rule(
        symbol=symbols,
        side=sides,
        price=prices,
        qty=qtys,
        account=accounts,
        tif=limit_tifs,
        post_only=st.booleans(),
        stp=stp_modes,
        lifetime=lifetimes,
        reduce_only=reduce_onlys,
    )
    def limit_order(
        self,
        symbol: str,
        side: Side,
        price: int,
        qty: int,
        account: int,
        tif: TimeInForce,
        post_only: bool,
        stp: SelfTradePrevention,
        lifetime: int,
        reduce_only: bool,
    ) -> None:
        self._new(
            symbol,
            account_id=account,
            side=side,
            order_type=OrderType.LIMIT,
            qty=qty,
            price=price,
            time_in_force=tif,
            expire_at_ns=self._expiry(tif, lifetime),
            post_only=post_only and tif is not TimeInForce.FOK,
            stp=stp,
            reduce_only=reduce_only,
        )

    @rule(
        symbol=symbols,
        side=sides,
        qty=st.integers(1, 25),
        account=accounts,
        tif=market_tifs,
        stp=stp_modes,
        reduce_only=reduce_onlys,
    )
    def market_order(
        self,
        symbol: str,
        side: Side,
        qty: int,
        account: int,
        tif: TimeInForce,
        stp: SelfTradePrevention,
        reduce_only: bool,
    ) -> None:
        self._new(
            symbol,
            account_id=account,
            side=side,
            order_type=OrderType.MARKET,
            qty=qty,
            time_in_force=tif,
            stp=stp,
            reduce_only=reduce_only,
        )

    @rule(
        symbol=symbols,
        side=sides,
        stop_price=prices,
        limit=st.none() | prices,
        qty=st.integers(1, 9),
        account=accounts,
        tif=st.sampled_from([TimeInForce.GTC, TimeInForce.IOC, TimeInForce.FOK, TimeInForce.GTD]),
        stp=stp_modes,
        lifetime=lifetimes,
        reduce_only=reduce_onlys,
    )
    def stop_order(
        self,
        symbol: str,
        side: Side,
        stop_price: int,
        limit: int | None,
        qty: int,
        account: int,
        tif: TimeInForce,
        stp: SelfTradePrevention,
        lifetime: int,
        reduce_only: bool,
    ) -> None:
        self._new(
            symbol,
            account_id=account,
            side=side,
            order_type=OrderType.STOP if limit is None else OrderType.STOP_LIMIT,
            qty=qty,
            price=limit,
            stop_price=stop_price,
            time_in_force=tif,
            expire_at_ns=self._expiry(tif, lifetime),
            stp=stp,
            reduce_only=reduce_only,
        )

    def _pick_order_id(self, data: st.DataObject) -> int:
        """Mostly an open order; sometimes any id ever used (filled, canceled) or one never used."""
        open_ids = sorted(s.order_id for symbol in SYMBOLS for s in self.engine.book(symbol).resting_orders())
        anything = st.integers(1, self.next_id)  # next_id itself is unknown to both
        return data.draw(st.sampled_from(open_ids) | anything if open_ids else anything)

    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        order_id = self._pick_order_id(data)
        seq, now = self._next()
        symbol = self.symbol_of.get(order_id, "AAA")
        self._send(Cancel(seq=seq, ts_ns=now, symbol=symbol, order_id=order_id))

    @rule(data=st.data(), new_qty=st.none() | st.integers(0, 12), new_price=st.none() | prices)
    def modify(self, data: st.DataObject, new_qty: int | None, new_price: int | None) -> None:
        order_id = self._pick_order_id(data)
        seq, now = self._next()
        symbol = self.symbol_of.get(order_id, "AAA")
        self._send(Modify(seq=seq, ts_ns=now, symbol=symbol, order_id=order_id, new_qty=new_qty, new_price=new_price))

    @rule(account=accounts, symbol=st.none() | symbols)
    def cancel_all(self, account: int, symbol: str | None) -> None:
        seq, now = self._next()
        self._send(CancelAll(seq=seq, ts_ns=now, account_id=account, symbol=symbol))

    @rule(elapsed=st.integers(0, 25))
    def expire(self, elapsed: int) -> None:
        seq, _ = self._next()
        self.now += elapsed
        self._send(Expire(seq=seq, now_ns=self.now))

    @invariant()
    def books_are_identical_and_uncrossed(self) -> None:
        for symbol in SYMBOLS:
            book, ref = self.engine.book(symbol), self.reference.books[symbol]
            assert book.resting_orders() == ref.resting_orders()
            assert book.depth() == ref.depth()
            assert book.last_price == ref.last_price
            if book.best_bid is not None and book.best_ask is not None:
                assert book.best_bid < book.best_ask
            assert book.positions() == {a: p for (s, a), p in sorted(self.positions.items()) if s == symbol and p}
            assert book.positions() == {a: p for a, p in sorted(ref.positions.items()) if p}

    @invariant()
    def reduce_only_orders_stay_within_positions(self) -> None:
        for symbol in SYMBOLS:
            book = self.engine.book(symbol)
            pending: dict[tuple[int, Side], int] = {}
            for state in book.resting_orders():
                if state.reduce_only:
                    key = (state.account_id, state.side)
                    pending[key] = pending.get(key, 0) + state.leaves_qty
            for (account, side), total in pending.items():
                position = book.position(account)
                assert total <= (position if side is Side.SELL else -position), (symbol, account, side, total)

    @invariant()
    def level_increments_rebuild_the_depth(self) -> None:
        for symbol in SYMBOLS:
            book = self.engine.book(symbol)
            bid_changes, ask_changes = book.take_level_changes()
            bids, asks = self.l2[symbol]
            for levels, changes in ((bids, bid_changes), (asks, ask_changes)):
                for price, total in changes:
                    if total:
                        levels[price] = total
                    else:
                        levels.pop(price, None)
            assert (sorted(bids.items(), reverse=True), sorted(asks.items())) == book.depth()

    def teardown(self) -> None:
        """Replaying the whole command log on a fresh engine gives the same events, trade ids included."""
        replay = MatchingEngine(SYMBOLS)
        replayed: list[Event] = []
        for command in self.commands:
            replayed.extend(replay.process(command))
        assert replayed == self.log
        fills = [ev for ev in self.log if isinstance(ev, Fill)]
        assert len({f.trade_id for f in fills}) == len(fills)


EngineMatchesReference.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestEngineMatchesReference = EngineMatchesReference.TestCase


# ------------------------------------------------------------------------------ replay and restart


def random_commands(seed: int, count: int) -> list[Command]:
    """A seeded stream of mixed commands over two symbols (plain ``random``: the stream is the fixture)."""
    rng = random.Random(seed)
    commands: list[Command] = []
    next_id = 1
    symbol_of: dict[int, str] = {}
    for seq in range(1, count + 1):
        r = rng.random()
        symbol = rng.choice(SYMBOLS)
        if r < 0.55 or next_id == 1:
            otype = rng.choice([OrderType.LIMIT] * 6 + [OrderType.MARKET, OrderType.STOP, OrderType.STOP_LIMIT])
            tif = rng.choice([TimeInForce.GTC] * 4 + [TimeInForce.IOC, TimeInForce.FOK, TimeInForce.GTD])
            if otype is OrderType.MARKET and tif is TimeInForce.GTD:
                tif = TimeInForce.GTC
            symbol_of[next_id] = symbol
            commands.append(
                NewOrder(
                    seq=seq,
                    ts_ns=seq,
                    symbol=symbol,
                    order_id=next_id,
                    account_id=rng.randint(1, 6),
                    side=rng.choice(list(Side)),
                    order_type=otype,
                    qty=rng.randint(1, 20),
                    price=rng.randint(90, 110) if otype in (OrderType.LIMIT, OrderType.STOP_LIMIT) else None,
                    stop_price=rng.randint(90, 110) if otype in (OrderType.STOP, OrderType.STOP_LIMIT) else None,
                    time_in_force=tif,
                    expire_at_ns=seq + rng.randint(1, 200) if tif is TimeInForce.GTD else None,
                    post_only=otype is OrderType.LIMIT and tif is TimeInForce.GTC and rng.random() < 0.1,
                    stp=rng.choice(list(SelfTradePrevention)),
                    reduce_only=rng.random() < 0.25,
                )
            )
            next_id += 1
        elif r < 0.80:
            order_id = rng.randrange(1, next_id)
            commands.append(Cancel(seq=seq, ts_ns=seq, symbol=symbol_of[order_id], order_id=order_id))
        elif r < 0.97:
            order_id = rng.randrange(1, next_id)
            commands.append(
                Modify(
                    seq=seq,
                    ts_ns=seq,
                    symbol=symbol_of[order_id],
                    order_id=order_id,
                    new_qty=rng.choice([None, rng.randint(1, 25)]),
                    new_price=rng.choice([None, rng.randint(90, 110)]),
                )
            )
        elif r < 0.99:
            commands.append(Expire(seq=seq, now_ns=seq))
        else:
            commands.append(CancelAll(seq=seq, ts_ns=seq, account_id=rng.randint(1, 6)))
    return commands


def run(engine: MatchingEngine, commands: list[Command]) -> list[Event]:
    events: list[Event] = []
    for command in commands:
        events.extend(engine.process(command))
    return events


def test_replaying_the_same_commands_gives_identical_events_and_ids() -> None:
    commands = random_commands(seed=7, count=6_000)
    first = run(MatchingEngine(SYMBOLS), commands)
    second = run(MatchingEngine(SYMBOLS), commands)
    assert sum(isinstance(ev, Fill) for ev in first) > 500  # the stream really trades
    assert first == second
    assert [f.trade_id for f in first if isinstance(f, Fill)] == [f.trade_id for f in second if isinstance(f, Fill)]


def test_a_book_restored_from_its_open_orders_continues_exactly_like_the_original() -> None:
    """The engine-restart path: rebuild from the open orders (as PostgreSQL would hold them) mid-stream."""
    commands = random_commands(seed=11, count=6_000)
    head, tail = commands[:3_000], commands[3_000:]
    original = MatchingEngine(SYMBOLS)
    run(original, head)
    restarted = MatchingEngine()
    for symbol in SYMBOLS:
        book = original.book(symbol)
        assert len(book) > 0
        assert any(s.reduce_only for s in book.resting_orders()) and book.positions()
        restarted.restore(
            symbol, reversed(book.resting_orders()), last_price=book.last_price, positions=book.positions()
        )
        assert restarted.book(symbol).resting_orders() == book.resting_orders()
        assert restarted.book(symbol).depth() == book.depth()
    assert run(restarted, tail) == run(original, tail)
