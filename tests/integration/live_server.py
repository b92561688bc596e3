"""The real API app served by uvicorn on a free local port, inside the test's event loop."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI

from tradeplane.bootstrap import Platform
from tradeplane.entrypoints.api.app import create_app


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@asynccontextmanager
async def serving(platform: Platform, app: FastAPI | None = None, **config: Any) -> AsyncIterator[str]:
    """Serve `app` (default: create_app(platform)) with its lifespan; yields the base URL http://127.0.0.1:port.

    `config` goes to uvicorn.Config as is (say, the `ws` protocol class).
    """
    app = app or create_app(platform)
    port = free_port()
    server_config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_config=None, access_log=False, lifespan="on", **config
    )
    server = uvicorn.Server(server_config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
                raise AssertionError("uvicorn stopped before it started")
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
