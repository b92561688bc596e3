"""Live candles over the WebSocket hub, from the real ingest pipeline through Redis pub/sub to a real client:
each ``candles:<timeframe>`` channel carries that timeframe's candles, and a late tick that changes a candle
already sent (a new low, an earlier open) reaches subscribers as a corrected candle, even when the same commit
also opened a newer bucket.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection

from tests.integration.conftest import Actor
from tests.integration.test_ingest import T0, list_instrument
from tests.integration.test_websocket import (  # noqa: F401 - the server and alice fixtures
    Server,
    alice,
    authenticated,
    receive,
    request,
    server,
)
from tradeplane.domain.candles import Timeframe
from tradeplane.domain.ticks import NS_PER_SECOND, Tick
from tradeplane.services.ingest import MarketDataPipeline, candles_channel

SECOND = NS_PER_SECOND
MARKER = "end-of-test-batch"


async def until_markers(live: Server, ws: ClientConnection, symbol: str) -> dict[str, list[dict[str, Any]]]:
    """Every message the client gets, by channel, up to a marker published after them on each candle channel:
    pub/sub keeps one channel's order, so everything published on it before its marker has been delivered."""
    received: dict[str, list[dict[str, Any]]] = {f"candles:{tf.value}": [] for tf in Timeframe}
    markers = {}
    for tf in Timeframe:
        marker = {"channel": f"candles:{tf.value}", "symbol": symbol, "data": {"marker": MARKER}}
        markers[marker["channel"]] = marker
        await live.platform.cache.client.publish(candles_channel(tf, symbol), orjson.dumps(marker))
    while markers:
        message = await receive(ws)
        if markers.get(message["channel"]) == message:
            del markers[message["channel"]]
        else:
            assert message["channel"] in markers, f"{message} after its channel's marker"
            received[message["channel"]].append(message)
    return received


async def test_a_late_tick_correcting_a_sent_candle_reaches_subscribers_of_every_timeframe(
    server: Server,  # noqa: F811
    alice: Actor,  # noqa: F811
) -> None:
    listed = await list_instrument(server.platform)
    symbol = listed.symbol
    channels = [f"candles:{tf.value}" for tf in Timeframe]
    async with await authenticated(server, alice) as ws:
        for channel in channels:
            assert (await request(ws, op="subscribe", channel=channel, symbol=symbol))["event"] == "subscribed"
        pipeline = MarketDataPipeline(server.platform.db, [listed], cache=server.platform.cache)
        async with pipeline:
            await pipeline.submit([Tick(T0 + 30 * SECOND, symbol, None, None, 0, 0, 10_000, 1_000)])
            await pipeline.flush()
            first = await until_markers(server, ws, symbol)
            (sent,) = first["candles:M1"]
            assert (sent["data"]["bucket"], sent["data"]["low"]) == ("2024-03-05T22:30:00Z", "100")

            # One commit: a tick opening the next minute, then a late one (3 s behind it, within the 5 s
            # tolerance) that is the new low of the minute already sent.
            await pipeline.submit(
                [
                    Tick(T0 + 61 * SECOND, symbol, None, None, 0, 0, 10_500, 1_000),
                    Tick(T0 + 58 * SECOND, symbol, None, None, 0, 0, 9_000, 2_000),
                ]
            )
            await pipeline.flush()
            second = await until_markers(server, ws, symbol)

    for channel in channels:
        assert all(m["channel"] == channel and m["symbol"] == symbol for m in first[channel] + second[channel])
        assert all(m["data"]["timeframe"] == channel.split(":")[1] for m in first[channel] + second[channel])
    by_bucket = {m["data"]["bucket"]: m["data"] for m in second["candles:M1"]}
    corrected = by_bucket.get("2024-03-05T22:30:00Z")
    assert corrected is not None, f"the corrected 22:30 candle was never sent: {second['candles:M1']}"
    assert (corrected["open"], corrected["low"], corrected["close"]) == ("100", "90", "90")
    assert (Decimal(corrected["volume"]), corrected["tick_count"]) == (Decimal(3), 2)
    newest = second["candles:M1"][-1]["data"]
    assert (newest["bucket"], newest["open"], newest["tick_count"]) == ("2024-03-05T22:31:00Z", "105", 1)
    (h1,) = second["candles:H1"]
    assert (h1["data"]["low"], h1["data"]["close"], h1["data"]["tick_count"]) == ("90", "105", 3)


async def test_the_last_ticks_of_a_sent_candle_reach_subscribers_when_their_commit_also_opens_the_next(
    server: Server,  # noqa: F811
    alice: Actor,  # noqa: F811
) -> None:
    """In order, no late tick: the commit that crosses a minute boundary carries the last trades of the minute
    already sent and the first of the next. Both candles go out, the finished one with its final close."""
    listed = await list_instrument(server.platform)
    symbol = listed.symbol
    async with await authenticated(server, alice) as ws:
        for tf in Timeframe:
            reply = await request(ws, op="subscribe", channel=f"candles:{tf.value}", symbol=symbol)
            assert reply["event"] == "subscribed"
        pipeline = MarketDataPipeline(server.platform.db, [listed], cache=server.platform.cache)
        async with pipeline:
            await pipeline.submit([Tick(T0 + 30 * SECOND, symbol, None, None, 0, 0, 10_000, 1_000)])
            await pipeline.flush()
            await until_markers(server, ws, symbol)
            await pipeline.submit(
                [
                    Tick(T0 + 59 * SECOND, symbol, None, None, 0, 0, 10_200, 1_000),
                    Tick(T0 + 60 * SECOND, symbol, None, None, 0, 0, 10_300, 1_000),
                ]
            )
            await pipeline.flush()
            received = await until_markers(server, ws, symbol)
    assert [(m["data"]["bucket"][11:16], m["data"]["close"]) for m in received["candles:M1"]] == [
        ("22:30", "102"),
        ("22:31", "103"),
    ]
    assert [(m["data"]["bucket"][11:16], m["data"]["close"]) for m in received["candles:M5"]] == [("22:30", "103")]
