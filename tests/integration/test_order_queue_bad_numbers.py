"""Audit of the seed 000 order-entry queues with bad messages among good ones (issue 3: "same validation and risk as
REST"): a message whose numbers the database cannot hold, or that is malformed in some other way, is answered
with its own refusal and does not take the placements it shares a transaction with down with it.
"""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

from tests.integration import test_order_queues
from tests.integration.conftest import make_actor
from tests.integration.test_order_queues import open_requester, order_rows, placement
from tradeplane.bootstrap import Platform
from tradeplane.entrypoints.workers.order_queues import OrderQueueWorker
from tradeplane.services import accounts
from tradeplane.services.identity import Role

amqp_platform = test_order_queues.amqp_platform  # a platform on a namespaced RabbitMQ bus


async def test_bad_placements_in_a_burst_refuse_only_themselves(amqp_platform: Platform, amqp_url: str) -> None:
    trader = await make_actor(amqp_platform, "erin", Role.TRADER, with_account=True)
    async with amqp_platform.db.transaction("test.funds") as conn:
        await accounts.deposit(conn, trader.account_id, Decimal("100000.00"))
    commands: list[dict[str, Any]] = [placement(trader, quantity="0.01", client_order_id=f"ok-{k}") for k in range(6)]
    commands[1] = placement(trader, quantity="1e40", client_order_id="huge")
    commands[3] = placement(trader, type="stop_limit", stop_price="1e25", client_order_id="huge-stop")
    commands[4] = placement(trader, quantity="0.01000000000000000001", client_order_id="too-fine")
    async with open_requester(amqp_platform, amqp_url) as requester:
        calls = [asyncio.ensure_future(requester.call("order.place", command)) for command in commands]
        await asyncio.sleep(0.5)  # all of them wait in the queue, so the worker places them together
        worker = OrderQueueWorker(amqp_platform)
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        try:
            replies = await asyncio.gather(*calls)
        finally:
            stop.set()
            await running
    assert [r["status"] for r in replies] == [201, 422, 201, 422, 422, 201]
    assert {replies[k]["error"] for k in (1, 3, 4)} == {"validation_error"}
    stored = [r["client_order_id"] for r in await order_rows(amqp_platform)]
    assert stored == ["ok-0", "ok-2", "ok-5"]
