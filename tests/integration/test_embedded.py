"""The embedded default servers: real PostgreSQL, Redis and NATS run from pip packages under a data folder.

Each test uses its own short data folder (sockets have a path-length limit) and stops what it started.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import nats
import psutil
import pytest
import redis.asyncio as redis

from tradeplane.adapters.embedded import EmbeddedStack
from tradeplane.errors import ConfigError, InfrastructureUnavailable

SERVER_NAMES = ("postgres", "redis-server", "nats-server")


@pytest.fixture
def data_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="tp"))
    yield path
    leftovers = server_processes(path)
    for proc in leftovers:  # never leave servers behind, even when a test failed half-way
        proc.kill()
    shutil.rmtree(path, ignore_errors=True)


def server_processes(data_dir: Path) -> list[psutil.Process]:
    """Live server processes working in `data_dir` (postgres backends included), from the process table."""
    root = str(data_dir.resolve())
    found = []
    for proc in psutil.process_iter(["name", "cmdline", "cwd", "status"]):
        info = proc.info
        if info["name"] not in SERVER_NAMES or info["status"] == psutil.STATUS_ZOMBIE:
            continue
        cmdline = " ".join(info["cmdline"] or [])
        if root in cmdline or (info["cwd"] or "").startswith(root):
            found.append(proc)
    return found


def port_of(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None
    return port


async def write_everything(urls: dict[str, str]) -> None:
    """One durable write to each server: a row, a key, a JetStream message."""
    conn = await asyncpg.connect(urls["database_url"])
    try:
        assert await conn.fetchval("SELECT 1") == 1
        await conn.execute("CREATE TABLE fills (id bigint PRIMARY KEY, price numeric(20, 8) NOT NULL)")
        await conn.execute("INSERT INTO fills VALUES (1, 65000.12345678)")
    finally:
        await conn.close()

    cache = redis.from_url(urls["redis_url"])
    try:
        await cache.set("price:BTC-USD", "65000.12")
    finally:
        await cache.aclose()

    bus = await nats.connect(urls["bus_url"])
    try:
        js = bus.jetstream()
        await js.add_stream(name="ORDERS", subjects=["orders.>"])
        ack = await js.publish("orders.0", b'{"client_order_id": "c-1"}')
        assert ack.seq == 1
    finally:
        await bus.close()


async def read_everything(urls: dict[str, str]) -> tuple[Decimal, bytes | str | None, bytes]:
    conn = await asyncpg.connect(urls["database_url"])
    try:
        price = await conn.fetchval("SELECT price FROM fills WHERE id = 1")
    finally:
        await conn.close()

    cache = redis.from_url(urls["redis_url"])
    try:
        cached = await cache.get("price:BTC-USD")
    finally:
        await cache.aclose()

    bus = await nats.connect(urls["bus_url"])
    try:
        message = await bus.jetstream().get_msg("ORDERS", 1)
    finally:
        await bus.close()
    assert message.data is not None
    return price, cached, message.data


async def test_stack_serves_real_servers_and_keeps_data_across_a_restart(data_dir: Path) -> None:
    with EmbeddedStack(data_dir) as stack:
        urls = stack.start_all()
        assert urls["database_url"].startswith("postgresql://postgres@127.0.0.1:")
        assert urls["database_url"].endswith("/tradeplane")
        assert urls["redis_url"].startswith("redis://127.0.0.1:")
        assert urls["bus_url"].startswith("nats://127.0.0.1:")
        await write_everything(urls)
    assert server_processes(data_dir) == []

    with EmbeddedStack(data_dir) as again:
        urls_again = again.start_all()
        assert await read_everything(urls_again) == (
            Decimal("65000.12345678"),
            b"65000.12",
            b'{"client_order_id": "c-1"}',
        )
    assert urls_again == urls  # the remembered ports were free, so clients' URLs stay valid
    assert server_processes(data_dir) == []


async def test_start_is_idempotent_and_stop_leaves_no_server_process(data_dir: Path) -> None:
    stack = EmbeddedStack(data_dir)
    urls = stack.start_all()
    pids = {kind: stack.server(kind).pid for kind in ("postgres", "redis", "nats")}
    assert stack.start("postgres") == urls["database_url"]
    assert stack.start_all() == urls
    assert {kind: stack.server(kind).pid for kind in pids} == pids  # nothing was started twice

    running = server_processes(data_dir)
    # the postmaster with its backends, one redis-server, one nats-server
    assert {proc.info["name"] for proc in running} == set(SERVER_NAMES)
    assert len(running) > 3

    stack.stop()
    assert server_processes(data_dir) == []
    assert not any(psutil.pid_exists(proc.pid) and proc.status() != psutil.STATUS_ZOMBIE for proc in running)
    assert not stack.postgres.running
    stack.stop()  # stopping twice is harmless


async def test_two_data_folders_run_side_by_side(data_dir: Path) -> None:
    other_dir = Path(tempfile.mkdtemp(prefix="tp"))
    try:
        with EmbeddedStack(data_dir) as first, EmbeddedStack(other_dir) as second:
            urls_a, urls_b = first.start_all(), second.start_all()
            ports = [port_of(url) for url in (*urls_a.values(), *urls_b.values())]
            assert len(set(ports)) == 6

            for urls, value in ((urls_a, "a"), (urls_b, "b")):
                cache = redis.from_url(urls["redis_url"])
                await cache.set("system:owner", value)
                await cache.aclose()
                conn = await asyncpg.connect(urls["database_url"])
                await conn.execute("CREATE TABLE owner (name text)")
                await conn.execute("INSERT INTO owner VALUES ($1)", value)
                await conn.close()
                bus = await nats.connect(urls["bus_url"])
                await bus.jetstream().add_stream(name="MD", subjects=["md.>"])
                await bus.close()

            for urls, value in ((urls_a, "a"), (urls_b, "b")):
                cache = redis.from_url(urls["redis_url"])
                assert await cache.get("system:owner") == value.encode()
                await cache.aclose()
                conn = await asyncpg.connect(urls["database_url"])
                assert await conn.fetch("SELECT name FROM owner") == [(value,)]
                await conn.close()
        assert server_processes(data_dir) == []
        assert server_processes(other_dir) == []
    finally:
        for proc in server_processes(other_dir):
            proc.kill()
        shutil.rmtree(other_dir, ignore_errors=True)


CRASHING_OWNER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from tradeplane.adapters.embedded import EmbeddedStack

    stack = EmbeddedStack(Path(sys.argv[1]))
    urls = stack.start_all()
    pids = {kind: stack.server(kind).pid for kind in ("postgres", "redis", "nats")}
    print(json.dumps({"urls": urls, "pids": pids}), flush=True)
    time.sleep(600)
    """
)


async def test_servers_left_by_a_crashed_owner_are_adopted_then_stopped(data_dir: Path) -> None:
    owner = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CRASHING_OWNER, str(data_dir), stdout=asyncio.subprocess.PIPE
    )
    try:
        assert owner.stdout is not None
        started = json.loads(await owner.stdout.readline())
    finally:
        owner.kill()  # `tradeplane up` killed hard (SIGKILL): no chance to stop its servers
        await owner.wait()
    assert len(server_processes(data_dir)) > 3

    stack = EmbeddedStack(data_dir)
    assert stack.start_all() == started["urls"]
    # the very same processes were reused, not restarted next to the orphans
    assert {kind: stack.server(kind).pid for kind in started["pids"]} == started["pids"]
    assert all(stack.server(kind).owned for kind in started["pids"])
    conn = await asyncpg.connect(started["urls"]["database_url"])
    assert await conn.fetchval("SELECT 1") == 1
    await conn.close()

    stack.stop()
    assert server_processes(data_dir) == []


async def test_servers_of_a_live_owner_are_shared_and_left_running(data_dir: Path) -> None:
    owner = EmbeddedStack(data_dir)
    try:
        urls = owner.start_all()
        guest = EmbeddedStack(data_dir)
        assert guest.start_all() == urls
        assert not guest.postgres.owned
        guest.stop()

        conn = await asyncpg.connect(urls["database_url"])  # the owner's servers still serve
        assert await conn.fetchval("SELECT 1") == 1
        await conn.close()
        cache = redis.from_url(urls["redis_url"])
        assert await cache.ping()
        await cache.aclose()
    finally:
        owner.stop()
    assert server_processes(data_dir) == []


async def test_a_server_that_cannot_start_says_where_its_log_is(data_dir: Path) -> None:
    with EmbeddedStack(data_dir) as stack:
        stack.start("postgres")
    # a data folder written by a PostgreSQL major this binary cannot run
    pg_version = data_dir / "postgres" / "PG_VERSION"
    pg_version.write_text("9\n")

    stack = EmbeddedStack(data_dir)
    with pytest.raises(InfrastructureUnavailable) as caught:
        stack.start("postgres")
    message = str(caught.value)
    assert "\n" not in message
    log = data_dir / "logs" / "postgres.log"
    assert str(log) in message
    assert "incompatible" in message or "PG_VERSION" in message or "database files" in message
    assert server_processes(data_dir) == []

    with pytest.raises(ConfigError):
        stack.start("mysql")


def test_postgres_never_runs_as_root(data_dir: Path) -> None:
    """PostgreSQL refuses uid 0; as root (this project's machines and CI) it runs as `embedded_postgres`."""
    with EmbeddedStack(data_dir) as stack:
        stack.start("postgres")
        assert stack.postgres.pid is not None
        postmaster = psutil.Process(stack.postgres.pid)
        assert postmaster.uids().effective != 0
        assert (data_dir / "postgres").stat().st_uid == postmaster.uids().effective
        if os.geteuid() == 0:
            assert postmaster.username() == "embedded_postgres"


async def test_stale_pid_files_from_a_crash_do_not_block_a_start(data_dir: Path) -> None:
    """After a machine crash the pid files remain, and their pids may now belong to unrelated processes."""
    with EmbeddedStack(data_dir) as stack:
        urls = stack.start_all()
    unrelated = os.getpid()  # alive, but not a server: PostgreSQL alone would refuse to start
    (data_dir / "postgres" / "postmaster.pid").write_text(
        f"{unrelated}\n{data_dir / 'postgres'}\n1700000000\n{port_of(urls['database_url'])}\n\n127.0.0.1\n"
        "  0  0\nready   \n"
    )
    (data_dir / "redis" / "redis.pid").write_text(f"{unrelated}\n")
    (data_dir / "nats" / "nats.pid").write_text(f"{unrelated}")

    with EmbeddedStack(data_dir) as again:
        assert again.start_all() == urls
        assert again.postgres.pid != unrelated
        conn = await asyncpg.connect(urls["database_url"])
        assert await conn.fetchval("SELECT 1") == 1
        await conn.close()
    assert psutil.pid_exists(unrelated)


async def test_a_data_folder_too_deep_for_a_unix_socket_still_works(data_dir: Path) -> None:
    deep = data_dir / ("d" * 60) / ("e" * 60)  # PGDATA/.s.PGSQL.<port> would pass the 107-byte limit
    with EmbeddedStack(deep) as stack:
        url = stack.start("postgres")
        conn = await asyncpg.connect(url)
        socket_dir = Path(await conn.fetchval("SHOW unix_socket_directories"))
        assert socket_dir != deep / "postgres"
        assert (socket_dir / f".s.PGSQL.{port_of(url)}").is_socket()
        assert await conn.fetchval("SELECT 1") == 1
        await conn.close()
    assert server_processes(data_dir) == []
    assert not await asyncio.to_thread(socket_dir.exists)  # the /tmp socket folder goes with the server
