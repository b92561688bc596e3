"""Order commands on the RabbitMQ queues name orders and accounts with ids as REST does: an id that is not a
positive bigint (JSON true, a number beyond bigint) is a 422 validation_error reply, and no order changes."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from tests.integration import test_order_queues
from tests.integration.conftest import Actor
from tests.integration.test_order_queues import Requester, order_rows, placement
from tradeplane.bootstrap import Platform

amqp_platform = test_order_queues.amqp_platform
worker = test_order_queues.worker
requester = test_order_queues.requester
trader = test_order_queues.trader

HUGE = 2**63  # one past the largest bigint


async def test_json_true_is_not_order_id_1(amqp_platform: Platform, requester: Requester, trader: Actor) -> None:
    placed = await requester.call("order.place", placement(trader))
    assert (placed["status"], placed["order"]["id"]) == (201, 1)  # a fresh database: the first order is 1

    modify = await requester.call("order.modify", {"api_key": trader.key, "order_id": True, "price": "64000.00"})
    assert (modify["status"], modify["error"]) == (422, "validation_error")
    cancel = await requester.call("order.cancel", {"api_key": trader.key, "order_id": True})
    assert (cancel["status"], cancel["error"]) == (422, "validation_error")
    [row] = await order_rows(amqp_platform)
    assert (row["status"], row["price"]) == ("pending_new", Decimal("65000"))  # neither modified nor canceled


COMMANDS: list[tuple[str, dict[str, Any]]] = [
    ("order.modify", {"order_id": HUGE, "price": "64000.00"}),
    ("order.cancel", {"order_id": HUGE}),
    ("order.cancel", {"account_id": HUGE}),
    ("order.place", {"account_id": HUGE}),
]


@pytest.mark.parametrize(("routing_key", "fields"), COMMANDS, ids=[f"{k} {sorted(f)}" for k, f in COMMANDS])
async def test_an_id_beyond_bigint_is_a_validation_error(
    amqp_platform: Platform, requester: Requester, trader: Actor, routing_key: str, fields: dict[str, Any]
) -> None:
    command = placement(trader, **fields) if routing_key == "order.place" else {"api_key": trader.key, **fields}
    reply = await requester.call(routing_key, command)
    assert (reply["status"], reply["error"]) == (422, "validation_error"), reply
    assert await order_rows(amqp_platform) == []
