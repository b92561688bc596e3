"""A WebSocket connection lives only as long as its API key authenticates: revoking the key (or disabling its
user) closes the connection with 4401 "credentials revoked", as REST refuses the key, while everyone else's
connections go on. Real uvicorn, Redis pub/sub and PostgreSQL; the hub checks every few milliseconds here (the
period is the hub's to configure) so the test need not wait out the production period."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.integration.conftest import Actor, make_actor
from tests.integration.live_server import serving
from tests.integration.test_websocket import SERVED_AS, WAIT_S, Server, authenticated, publish, receive, request
from tradeplane.bootstrap import Platform
from tradeplane.entrypoints.api.app import create_app
from tradeplane.entrypoints.api.websocket import WebSocketHub
from tradeplane.services.identity import Role

CHECK_S = 0.02


@pytest.fixture(params=sorted(SERVED_AS))
async def server(platform: Platform, request: pytest.FixtureRequest) -> AsyncIterator[Server]:
    app = create_app(platform)
    hub = WebSocketHub(platform, credential_check_s=CHECK_S)
    app.state.websocket_hub = hub
    async with platform.db.transaction("test.ids") as conn:
        # user ids no other test database hands out, so tp:user:<id> on the shared Redis is ours alone
        await conn.execute(f"ALTER TABLE users ALTER COLUMN id RESTART WITH {random.randrange(10**9, 2 * 10**9)}")
    async with serving(platform, app, **SERVED_AS[request.param]) as base_url:
        yield Server(base_url.replace("http://", "ws://") + "/ws", base_url, hub, platform)


def order_event(actor: Actor, n: int) -> dict[str, Any]:
    return {"channel": "orders", "symbol": "BTC-USD", "data": {"account_id": actor.account_id, "n": n}}


async def subscribed_to_orders(server: Server, actor: Actor) -> ClientConnection:
    ws = await authenticated(server, actor)
    assert (await request(ws, op="subscribe", channel="orders"))["event"] == "subscribed"
    await publish(server.platform, f"tp:user:{actor.user_id}", order_event(actor, 0))
    assert await receive(ws) == order_event(actor, 0)
    return ws


async def messages_until_closed(server: Server, ws: ClientConnection, actor: Actor) -> tuple[list[Any], Any]:
    """Keep publishing the actor's private events and reading until the server closes the connection; the
    messages read and the close frame received. Without a close this runs into the hang guard."""
    seen: list[dict[str, Any]] = []
    async with asyncio.timeout(WAIT_S):
        n = 0
        while True:
            n += 1
            await publish(server.platform, f"tp:user:{actor.user_id}", order_event(actor, n))
            try:
                seen.append(await receive(ws))
            except ConnectionClosed as closed:
                return seen, closed.rcvd


@pytest.mark.parametrize(
    "withdraw",
    [
        "UPDATE api_keys SET revoked_at = now() WHERE user_id = $1",
        "UPDATE users SET is_active = false WHERE id = $1",
    ],
    ids=["key revoked", "user disabled"],
)
async def test_withdrawn_credentials_close_the_connection(server: Server, withdraw: str) -> None:
    alice = await make_actor(server.platform, "alice", Role.TRADER, with_account=True)
    bob = await make_actor(server.platform, "bob", Role.TRADER, with_account=True)
    a = await subscribed_to_orders(server, alice)
    b = await subscribed_to_orders(server, bob)

    async with server.platform.db.connection("test.revoke") as conn:
        await conn.execute(withdraw, alice.user_id)
    seen, close = await messages_until_closed(server, a, alice)

    assert close is not None and (close.code, close.reason) == (4401, "credentials revoked")
    assert seen and seen[-1]["event"] == "error" and seen[-1]["error"] == "credentials_revoked"
    assert all(m.get("channel") == "orders" for m in seen[:-1])  # events published before the check saw it

    # Bob's key is fine: his connection stayed open through the checks that closed Alice's, and still delivers.
    await publish(server.platform, f"tp:user:{bob.user_id}", order_event(bob, 1))
    assert await receive(b) == order_event(bob, 1)
    assert await request(b, op="ping") == {"event": "pong"}
    await b.close()

    # A new connection with the key does not last either: refused, or (while the principal cache of
    # services.identity still holds the key, as it does for REST) closed by the next check.
    async with connect(server.url) as again:
        reply = await request(again, op="auth", key=alice.key)
        if reply["event"] == "error":
            assert reply["error"] == "invalid_api_key"
        else:
            assert reply["event"] == "authenticated"
            _, close = await messages_until_closed(server, again, alice)
            assert close is not None and close.code == 4401
