"""Order commands on the RabbitMQ queues follow REST's input rules: a value that cannot be stored or computed
with (a time UTC cannot express, a number past Decimal's context, NUL in text) is a 422 validation_error reply,
not a 500 `internal`; and a message_id PostgreSQL cannot hold (NUL) still identifies the message's copies."""

from __future__ import annotations

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

REFUSED: list[tuple[str, dict[str, Any]]] = [
    ("order.place", {"time_in_force": "gtd", "expire_at": "9999-12-31T23:00:00-14:00"}),
    ("order.place", {"quantity": "1e1000000"}),
    ("order.place", {"price": "1e1000000"}),
    ("order.place", {"symbol": "BTC-USD\x00"}),
    ("order.place", {"client_order_id": "c\x001"}),
    ("order.place", {"api_key": None, "user": "carol\x00"}),
    ("order.modify", {"order_id": 1, "quantity": "1e1000000"}),
    ("order.cancel", {"account_id": "ACCOUNT", "symbol": "BTC-USD\x00"}),
]


@pytest.mark.parametrize(("routing_key", "fields"), REFUSED, ids=[f"{k} {f!r}"[:60] for k, f in REFUSED])
async def test_a_command_that_cannot_be_stored_is_a_validation_error(
    amqp_platform: Platform, requester: Requester, trader: Actor, routing_key: str, fields: dict[str, Any]
) -> None:
    placed = await requester.call("order.place", placement(trader))
    assert (placed["status"], placed["order"]["id"]) == (201, 1)
    fields = {k: trader.account_id if v == "ACCOUNT" else v for k, v in fields.items()}
    command = placement(trader, **fields) if routing_key == "order.place" else {"api_key": trader.key, **fields}
    reply = await requester.call(routing_key, command)
    assert (reply["status"], reply["error"]) == (422, "validation_error"), reply
    [row] = await order_rows(amqp_platform)
    assert (row["id"], row["status"]) == (1, "pending_new")  # nothing placed, modified or canceled


async def test_a_message_id_with_nul_still_places_one_order_per_message(
    amqp_platform: Platform, requester: Requester, trader: Actor
) -> None:
    first = await requester.call("order.place", placement(trader), message_id="m\x001")
    again = await requester.call("order.place", placement(trader), message_id="m\x001")  # a redelivered copy
    other = await requester.call("order.place", placement(trader), message_id="m\x002")
    assert (first["status"], again["status"], other["status"]) == (201, 200, 201), (first, again, other)
    assert again["order"]["id"] == first["order"]["id"] != other["order"]["id"]
    client_order_id = first["order"]["client_order_id"]
    assert client_order_id.startswith("amqp-") and client_order_id.isascii() and client_order_id.isprintable()

    modify = {"api_key": trader.key, "order_id": first["order"]["id"], "price": "64000.00"}
    modified = await requester.call("order.modify", modify, message_id="m\x003")
    replayed = await requester.call("order.modify", modify, message_id="m\x003")
    assert modified["status"] == 200, modified
    assert replayed == modified  # the recorded reply of the first copy
    cancel = {"api_key": trader.key, "order_id": other["order"]["id"]}
    canceled = await requester.call("order.cancel", cancel, message_id="m\x004")
    assert (canceled["status"], canceled["order"]["status"]) == (200, "pending_cancel"), canceled
