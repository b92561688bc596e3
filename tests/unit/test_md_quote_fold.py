"""The latest quote per instrument does not depend on how ticks were batched: folding a chunk gives the quote
that folding its ticks one at a time in arrival order gives (late ticks, one-sided updates, trades, several
instruments interleaved). No servers: the pipeline is never started."""

from __future__ import annotations

from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from tradeplane.adapters.db.marketdata import ListedInstrument
from tradeplane.adapters.postgres import Database
from tradeplane.domain.ticks import Tick
from tradeplane.services.ingest import MarketDataPipeline

LISTED = [
    ListedInstrument(1, "BTC-USD", Decimal("0.01"), Decimal("0.001")),
    ListedInstrument(2, "ETH-USD", Decimal("0.05"), Decimal("1")),
]
T0 = 1_709_677_800_000_000_000


def quotes_after(chunks: list[list[Tick]]) -> list[dict[str, object]]:
    pipeline = MarketDataPipeline(Database("postgresql://nowhere/unused"), LISTED)  # never connected
    for chunk in chunks:
        pipeline._note_quotes(pipeline.encoder.columns(chunk))
    return [pipeline.quote_payload(index) for index in range(len(LISTED))]


side = st.one_of(st.none(), st.integers(1, 50))
ticks = st.lists(
    st.builds(
        lambda ts, symbol, bid, ask, size, last: Tick(T0 + ts, symbol, bid, ask, size, size + 1, last, 1),
        st.integers(0, 20),  # few distinct instants: ties and late ticks are common
        st.sampled_from([i.symbol for i in LISTED]),
        side,
        side,
        st.integers(0, 9),
        side,
    ).filter(lambda tick: tick.bid or tick.ask or tick.last),  # the validator refuses a tick with no price
    max_size=40,
)


@given(ticks)
def test_a_chunk_folds_into_the_quote_that_its_ticks_one_by_one_give(ticks: list[Tick]) -> None:
    assert quotes_after([ticks]) == quotes_after([[tick] for tick in ticks])
