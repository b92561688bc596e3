"""The platform as an operator runs it: real processes, real embedded servers, real signals.

These tests always use embedded servers in their own data folders (never the shared CI servers), because
they stop and start servers underneath a running API.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tradeplane.adapters.embedded import EmbeddedStack

CLI = [sys.executable, "-m", "tradeplane.entrypoints.cli"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRADEPLANE_") or k.startswith("TRADEPLANE_TEST")}
    return {**env, **extra}


def eventually(check: Callable[[], bool], *, within: float = 60.0, what: str = "condition") -> None:
    """Poll until `check` holds; a readiness wait, not a timing assertion."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{what} did not happen within {within:.0f} s")


def status(url: str) -> int:
    return httpx.get(url, timeout=5).status_code


@pytest.fixture
def data_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="tpe2e"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def stack(data_dir: Path) -> Iterator[EmbeddedStack]:
    stack = EmbeddedStack(data_dir)
    stack.start_all()
    yield stack
    stack.stop()


def set_up_stack(stack: EmbeddedStack, port: int, **extra: str) -> dict[str, str]:
    """`tradeplane setup` against the stack's servers; returns the environment for commands that use them."""
    urls = stack.start_all()
    env = clean_env(
        TRADEPLANE_DATABASE_URL=urls["database_url"],
        TRADEPLANE_REDIS_URL=urls["redis_url"],
        TRADEPLANE_BUS_URL=urls["bus_url"],
        TRADEPLANE_API_PORT=str(port),
        **extra,
    )
    setup = subprocess.run([*CLI, "setup"], env=env, capture_output=True, text=True, timeout=120)
    assert setup.returncode == 0, setup.stderr
    return env


@pytest.fixture
def api(stack: EmbeddedStack, data_dir: Path) -> Iterator[str]:
    """`tradeplane setup` then `tradeplane run api` against the stack's servers."""
    port = free_port()
    env = set_up_stack(stack, port, TRADEPLANE_CONNECT_TIMEOUT_S="1")
    log = (data_dir / "api.log").open("w")
    process = subprocess.Popen([*CLI, "run", "api"], env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        eventually(lambda: status(f"{base}/health") == 200, what="API start")
        yield base
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        log.close()


def test_health_follows_redis_and_bus_outages_without_restart(api: str, stack: EmbeddedStack) -> None:
    assert status(f"{api}/health") == 200

    redis_url = stack.redis.url
    stack.redis.stop()
    eventually(lambda: status(f"{api}/health/redis") == 503, what="redis health 503")
    assert status(f"{api}/health") == 503
    assert status(f"{api}/health/postgres") == 200
    assert stack.start("redis") == redis_url  # same port, so the API's client finds it again
    eventually(lambda: status(f"{api}/health/redis") == 200, what="redis health back to 200")

    bus_url = stack.nats.url
    stack.nats.stop()
    eventually(lambda: status(f"{api}/health/bus") == 503, what="bus health 503")
    assert httpx.get(f"{api}/health").json()["checks"]["bus"]["status"] == "fail"
    assert stack.start("nats") == bus_url
    eventually(lambda: status(f"{api}/health/bus") == 200, what="bus health back to 200")
    assert status(f"{api}/health") == 200


def test_metrics_of_a_running_api(api: str) -> None:
    httpx.get(f"{api}/health")
    eventually(lambda: 'message_queue_length{stream="orders.0"}' in httpx.get(f"{api}/metrics").text)
    text = httpx.get(f"{api}/metrics").text
    assert 'http_requests_total{method="GET",route="/health",status="200"}' in text
    assert 'database_query_duration_seconds_count{operation="health"}' in text


def data_dir_processes(data_dir: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if str(data_dir) in cmdline:
            found.append(proc)
    return found


def start_up(data_dir: Path, port: int) -> tuple[subprocess.Popen[str], Path]:
    """`tradeplane up` with its banner in `<data_dir>-up.out` and its logs in `<data_dir>-up.log`."""
    out = data_dir.parent / f"{data_dir.name}-up.out"
    logs = data_dir.parent / f"{data_dir.name}-up.log"
    env = clean_env(TRADEPLANE_DATA_DIR=str(data_dir), TRADEPLANE_API_PORT=str(port))
    process = subprocess.Popen([*CLI, "up"], env=env, stdout=out.open("w"), stderr=logs.open("w"), text=True)
    return process, out


def test_up_serves_stops_cleanly_and_keeps_data(data_dir: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    process, out = start_up(data_dir / "data", port)
    try:
        eventually(lambda: status(f"{base}/health") == 200, within=120, what="`up` serving")
        banner = out.read_text()
        assert f"{base}/docs" in banner and f"{base}/metrics" in banner
        key = next(word for word in banner.split() if word.startswith("tp_"))
        me = httpx.get(f"{base}/api/v1/me", headers={"Authorization": f"Bearer {key}"})
        assert me.status_code == 200 and me.json()["username"] == "demo-trader"
        assert status(f"{base}/docs") == 200
        book = f"{base}/api/v1/book/BTC-USD"
        headers = {"Authorization": f"Bearer {key}"}
        eventually(lambda: bool(httpx.get(book, headers=headers).json()["bids"]), within=60, what="demo quotes")
    finally:
        process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    assert data_dir_processes(data_dir) == [], "embedded servers left running after SIGTERM"
    logs = (data_dir / "data-up.log").read_text()
    # The demo traders stop before the API does, so they cancel their quotes rather than fail to reach it.
    assert "demo traders stopped and cancelled their resting orders" in logs, logs[-3000:]
    assert "Server disconnected" not in logs

    process, out = start_up(data_dir / "data", port)
    try:
        eventually(lambda: status(f"{base}/health") == 200, within=120, what="`up` serving again")
        again = httpx.get(f"{base}/api/v1/me", headers={"Authorization": f"Bearer {key}"})
        assert again.status_code == 200, "the demo key (and its user) did not survive the restart"
        assert key in out.read_text()
    finally:
        process.send_signal(signal.SIGINT)  # Ctrl-C
    process.wait(timeout=60)
    assert data_dir_processes(data_dir) == [], "embedded servers left running after Ctrl-C"


def test_api_workers_share_one_port_and_stop_together(stack: EmbeddedStack, data_dir: Path) -> None:
    port = free_port()
    env = set_up_stack(stack, port)
    log = (data_dir / "api.log").open("w")
    parent = subprocess.Popen([*CLI, "run", "api", "--workers", "2"], env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    clients = [httpx.Client(base_url=base) for _ in range(24)]
    try:
        eventually(lambda: status(f"{base}/health") == 200, what="API start")
        workers = psutil.Process(parent.pid).children()
        assert len(workers) == 2

        def listening(worker: psutil.Process) -> bool:
            return any(c.laddr.port == port and c.status == psutil.CONN_LISTEN for c in worker.net_connections("tcp"))

        def serving(worker: psutil.Process) -> int:
            return sum(1 for c in worker.net_connections("tcp") if c.laddr.port == port and c.raddr)

        # /health answers as soon as one worker listens; connections only spread once both do
        eventually(lambda: all(listening(worker) for worker in workers), what="both workers listening")
        for client in clients:  # 24 keep-alive connections: the kernel hands them to both workers
            assert client.get("/health").status_code == 200

        assert all(serving(worker) > 0 for worker in workers), [serving(w) for w in workers]

        second = subprocess.run([*CLI, "run", "api", "--workers", "2"], env=env, capture_output=True, text=True)
        assert second.returncode == 1
        assert f"could not listen on 127.0.0.1:{port}" in second.stderr
    finally:
        for client in clients:
            client.close()
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=30) == 0
        log.close()
    assert not any(worker.is_running() for worker in workers)
