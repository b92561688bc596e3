"""The `tradeplane` command line. Every error is one line on stderr and a non-zero exit, never a traceback.

With no server URLs configured, commands use the embedded servers under TRADEPLANE_DATA_DIR, starting the
ones that are not already running (and stopping again only those they started).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from tradeplane.config import Settings, load_settings
from tradeplane.entrypoints.cli_md import md_app, run_marketdata_command
from tradeplane.entrypoints.heap import freeze_long_lived
from tradeplane.errors import ConfigError, TradeplaneError
from tradeplane.logs import configure_logging
from tradeplane.services.audit import AuditSealer
from tradeplane.services.relay import OutboxRelay, relay_wakeups

T = TypeVar("T")
log = logging.getLogger("tradeplane.cli")

app = typer.Typer(
    help="tradeplane: self-hosted trading platform core.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Database migrations.", no_args_is_help=True)
users_app = typer.Typer(help="Users and roles.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys.", no_args_is_help=True)
accounts_app = typer.Typer(help="Trading accounts and deposits.", no_args_is_help=True)
instruments_app = typer.Typer(
    help="List instruments and change their status and trading parameters.", no_args_is_help=True
)
run_app = typer.Typer(help="Run one platform process in the foreground.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(users_app, name="users")
app.add_typer(keys_app, name="keys")
app.add_typer(accounts_app, name="accounts")
app.add_typer(instruments_app, name="instruments")
app.add_typer(run_app, name="run")
app.add_typer(md_app, name="md")
run_app.command("marketdata")(run_marketdata_command)

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


class Terminated(Exception):
    """SIGTERM, turned into an exception so every `finally` (servers, pools, relay) runs on the way out."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


SERVER_KINDS = {"database_url": "postgres", "redis_url": "redis", "bus_url": "nats"}
DEMO_STOP_TIMEOUT_S = 10.0  # at shutdown, how long the demo traders get to cancel their orders


@contextlib.contextmanager
def servers(*needed: str) -> Iterator[Settings]:
    """Settings with a URL for each needed server ("database_url", "redis_url", "bus_url").

    Missing URLs are filled by the embedded servers of the data folder; the ones started here stop on exit.
    """
    settings = load_settings()
    missing = [name for name in needed if getattr(settings, name) is None]
    if not missing:
        yield settings
        return
    from tradeplane.adapters.embedded import EmbeddedStack

    stack = EmbeddedStack(settings.data_dir)
    try:
        with err.status(f"starting embedded {', '.join(SERVER_KINDS[n] for n in missing)} in {settings.data_dir}"):
            urls = {name: stack.start(SERVER_KINDS[name]) for name in missing}
        yield settings.with_urls(**urls)
    finally:
        stack.stop()


def run_async(coro_fn: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(coro_fn())  # type: ignore[arg-type]


async def _with_db(settings: Settings, work: Callable[[Any], Awaitable[T]], operation: str) -> T:
    from tradeplane.adapters.postgres import Database

    assert settings.database_url is not None
    db = Database(settings.database_url, min_size=1, max_size=2, timeout=settings.connect_timeout_s)
    await db.connect()
    try:
        async with db.transaction(operation) as conn:
            return await work(conn)
    finally:
        await db.close()


# ---------------------------------------------------------------- up / run


@app.command()
def up(
    demo: Annotated[bool, typer.Option(help="Load demo instruments, users and a funded account.")] = True,
    demo_traders: Annotated[
        bool, typer.Option(help="Run a demo market maker and a few random traders (needs --demo).")
    ] = True,
) -> None:
    """Start the whole platform: embedded servers (unless URLs are set), migrations, bus setup, demo data, the API,
    relay, matching engine shards and market data worker, in one process."""
    settings = load_settings()
    configure_logging("tradeplane", settings.log_level)
    with servers("database_url", "redis_url", "bus_url") as settings:
        demo = demo and settings.demo
        asyncio.run(_up(settings, demo=demo, demo_traders=demo and demo_traders))


async def _up(settings: Settings, *, demo: bool, demo_traders: bool) -> None:
    from tradeplane.adapters.db.migrate import upgrade
    from tradeplane.bootstrap import build_platform
    from tradeplane.entrypoints.workers.demo import create_demo_participants, run_demo_traders
    from tradeplane.entrypoints.workers.marketdata import run_marketdata
    from tradeplane.entrypoints.workers.order_queues import run_order_queues

    with err.status("applying database migrations"):
        await asyncio.to_thread(upgrade, str(settings.database_url))
    platform = build_platform(settings)
    await platform.start()
    try:
        with err.status(f"creating {platform.bus.kind} streams and queues"):
            await platform.bus.setup(settings.engine_shards)
        demo_key = await _seed_demo(settings, platform) if demo else None
        _print_banner(settings, demo_key)
        stop, demo_stop = asyncio.Event(), asyncio.Event()
        traders: asyncio.Task[Any] | None = None
        workers: list[asyncio.Task[Any]] = [asyncio.create_task(_relay(platform, stop))]
        workers += [asyncio.create_task(worker.run(stop)) for worker in _engine_workers(settings, platform, None)]
        workers.append(asyncio.create_task(run_marketdata(platform, stop, simulate_rate=None)))
        if platform.bus.kind == "amqp":
            workers.append(asyncio.create_task(run_order_queues(platform, stop)))
        if demo_traders:
            async with platform.db.transaction("demo.participants") as conn:
                bots = await create_demo_participants(conn, settings.secret_key.get_secret_value())
            base_url = f"http://{settings.api_host}:{settings.api_port}"
            traders = asyncio.create_task(run_demo_traders(base_url, bots.api_keys, bots.account_ids, demo_stop))
            workers.append(traders)

        async def stop_demo_traders() -> None:
            """The traders cancel their resting orders through the API, so they stop while it still serves."""
            demo_stop.set()
            if traders is not None:
                await asyncio.wait({traders}, timeout=DEMO_STOP_TIMEOUT_S)

        try:
            # Returns on Ctrl-C / SIGTERM (uvicorn handles both), after stop_demo_traders.
            await _serve_api(settings, platform, before_exit=stop_demo_traders)
        finally:
            demo_stop.set()
            stop.set()
            for outcome in await asyncio.gather(*workers, return_exceptions=True):
                if isinstance(outcome, Exception):
                    log.warning("a worker stopped with %s: %s", outcome.__class__.__name__, outcome)
    finally:
        await platform.stop()


async def _seed_demo(settings: Settings, platform: Any) -> str | None:
    from tradeplane.services.demo import seed_demo

    async with platform.db.transaction("demo.seed") as conn:
        seed = await seed_demo(conn, settings.secret_key.get_secret_value())
    keyfile = settings.data_dir / "demo-credentials.json"
    if seed.issued_key is not None:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        keyfile.write_text(json.dumps({"api_key": seed.issued_key, "account_id": seed.trader_account_id}))
        keyfile.chmod(0o600)
        return seed.issued_key
    if keyfile.exists():
        return str(json.loads(keyfile.read_text())["api_key"])
    return None


def _print_banner(settings: Settings, demo_key: str | None) -> None:
    base = f"http://{settings.api_host}:{settings.api_port}"
    out.print(f"[bold green]tradeplane is up[/]  (data: {settings.data_dir.resolve()})")
    out.print(f"  API       {base}/api/v1")
    out.print(f"  Docs      {base}/docs")
    out.print(f"  Health    {base}/health")
    out.print(f"  Metrics   {base}/metrics")
    if demo_key:
        out.print(f"  Demo trader API key: [bold]{demo_key}[/]")
        out.print(f"  Try: curl -H 'Authorization: Bearer {demo_key}' {base}/api/v1/me")
    out.print("Press Ctrl-C to stop.")


def _listening_socket(host: str, port: int, *, shared: bool = True) -> socket.socket:
    """A listening socket; `shared`: other `run api` workers may bind it too (SO_REUSEPORT), and the kernel
    spreads connections over them. An unshared bind fails while anyone else listens on the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if shared:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise TradeplaneError(
            f"the API could not listen on {host}:{port} ({exc.strerror}); set TRADEPLANE_API_PORT to a free port"
        ) from None
    sock.listen(2048)
    sock.set_inheritable(False)
    return sock


async def _serve_api(
    settings: Settings,
    platform: Any,
    *,
    reuse_port: bool = False,
    before_exit: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Serve until Ctrl-C / SIGTERM. `before_exit` runs after the signal while the API still answers."""
    import uvicorn

    class Server(uvicorn.Server):
        async def main_loop(self) -> None:
            await super().main_loop()
            if before_exit is not None:
                await before_exit()

    from tradeplane.entrypoints.api.app import create_app
    from tradeplane.entrypoints.api.ws_protocol import FanoutWebSocketProtocol

    config = uvicorn.Config(
        create_app(platform),
        host=settings.api_host,
        port=settings.api_port,
        log_config=None,
        access_log=False,
        lifespan="on",
        ws_per_message_deflate=False,  # compression doubles fan-out latency for small JSON frames
        ws=FanoutWebSocketProtocol,  # writes a market data frame encoded once to many clients
    )
    server = Server(config)
    freeze_long_lived()
    sockets = [_listening_socket(settings.api_host, settings.api_port)] if reuse_port else None
    await server.serve(sockets=sockets)
    if not server.started:
        raise TradeplaneError(
            f"the API could not listen on {settings.api_host}:{settings.api_port}; "
            "set TRADEPLANE_API_PORT to a free port"
        )


@run_app.command("api")
def run_api(
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            help="API processes sharing the port (SO_REUSEPORT; the kernel spreads connections). Each keeps its"
            " own /metrics, so scrape them separately or run one per port behind a load balancer.",
        ),
    ] = 1,
    reuse_port: Annotated[bool, typer.Option(hidden=True, help="Bind with SO_REUSEPORT (set for workers).")] = False,
) -> None:
    """Serve the REST/WebSocket API (any number of replicas may run behind a load balancer)."""
    settings = load_settings()
    configure_logging("api", settings.log_level)

    async def main(settings: Settings) -> None:
        from tradeplane.bootstrap import build_platform

        platform = build_platform(settings)
        await platform.start()
        try:
            await _serve_api(settings, platform, reuse_port=reuse_port)
        finally:
            await platform.stop()

    with servers("database_url", "redis_url", "bus_url") as settings:
        if workers == 1:
            asyncio.run(main(settings))
        else:
            _run_api_workers(settings, workers)


def _run_api_workers(settings: Settings, workers: int) -> None:
    """Start `workers` single-process `run api` children on the same port and wait; stop them all on
    SIGTERM/Ctrl-C or when one of them dies."""
    # The children use the servers this process resolved (embedded ones included) and refuse nothing new.
    _listening_socket(settings.api_host, settings.api_port, shared=False).close()  # a taken port fails here
    database_url, redis_url, bus_url = settings.require_urls()
    env = {
        **os.environ,
        "TRADEPLANE_DATABASE_URL": str(database_url),
        "TRADEPLANE_REDIS_URL": str(redis_url),
        "TRADEPLANE_BUS_URL": str(bus_url),
    }
    command = [sys.executable, "-m", "tradeplane.entrypoints.cli", "run", "api", "--reuse-port"]
    children = [subprocess.Popen(command, env=env) for _ in range(workers)]
    out.print(f"API on http://{settings.api_host}:{settings.api_port} with {workers} worker processes")
    exit_code = 0
    try:
        while all(child.poll() is None for child in children):
            time.sleep(0.2)
        exit_code = next(child.returncode for child in children if child.returncode is not None)
        err.print(f"an API worker exited with status {exit_code}; stopping the others")
    except (KeyboardInterrupt, Terminated):
        pass
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
    if exit_code:
        raise typer.Exit(1)


@run_app.command("relay")
def run_relay() -> None:
    """Publish committed outbox rows to the bus (one relay is active per database; extras stand by) and seal the
    audit chain."""
    settings = load_settings()
    configure_logging("relay", settings.log_level)

    async def main(settings: Settings) -> None:
        from tradeplane.bootstrap import build_platform

        platform = build_platform(settings)
        await platform.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        freeze_long_lived()
        try:
            await _relay(platform, stop)
        finally:
            await platform.stop()

    with servers("database_url", "redis_url", "bus_url") as settings:
        asyncio.run(main(settings))


async def _relay(platform: Any, stop: asyncio.Event) -> None:
    """The relay process's work: publish the outbox (woken by Redis, polling as the fallback), seal the audit
    chain."""
    wake = asyncio.Event()
    await asyncio.gather(
        OutboxRelay(platform.db, platform.bus, wake=wake).run(stop),
        relay_wakeups(platform.cache, wake, stop),
        AuditSealer(platform.db).run(stop),
    )


def _engine_workers(settings: Settings, platform: Any, shard: int | None) -> list[Any]:
    """One engine worker per shard: `shard` alone, or every shard of TRADEPLANE_ENGINE_SHARDS."""
    from tradeplane.entrypoints.workers.engine import EngineWorker

    shards = settings.engine_shards
    if shard is not None and not 0 <= shard < shards:
        raise ConfigError(f"--shard must be in 0..{shards - 1} (TRADEPLANE_ENGINE_SHARDS={shards})")
    wanted = range(shards) if shard is None else [shard]
    return [EngineWorker(platform.db, platform.cache, platform.bus, shard=k, shards=shards) for k in wanted]


@run_app.command("engine")
def run_engine(
    shard: Annotated[
        int | None, typer.Option(help="Run only this shard (default: every shard of TRADEPLANE_ENGINE_SHARDS).")
    ] = None,
) -> None:
    """Match orders: rebuild the books from PostgreSQL, then consume the shard streams (one engine per shard)."""
    settings = load_settings()
    configure_logging("engine", settings.log_level)

    async def main(settings: Settings) -> None:
        from tradeplane.bootstrap import build_platform

        platform = build_platform(settings)
        workers = _engine_workers(settings, platform, shard)
        await platform.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await asyncio.gather(*(worker.run(stop) for worker in workers))
        finally:
            stop.set()
            await platform.stop()

    with servers("database_url", "redis_url", "bus_url") as settings:
        asyncio.run(main(settings))


# ---------------------------------------------------------------- setup / check


@app.command()
def setup() -> None:
    """Apply migrations and create the bus streams (JetStream) or exchanges, queues and bindings (RabbitMQ)."""
    from tradeplane.adapters.bus import create_bus
    from tradeplane.adapters.db.migrate import current, upgrade

    with servers("database_url", "bus_url") as settings:
        assert settings.database_url is not None and settings.bus_url is not None
        upgrade(settings.database_url)
        out.print(f"database at revision {current(settings.database_url)}")
        bus = create_bus(settings.bus_url, namespace=settings.bus_namespace)

        async def main() -> None:
            await bus.connect()
            try:
                await bus.setup(settings.engine_shards)
            finally:
                await bus.close()

        asyncio.run(main())
        out.print(f"{bus.kind} topology ready for {settings.engine_shards} engine shard(s)")


@app.command()
def check(
    test: Annotated[bool, typer.Option("--test", help="Also write and read back a probe on each server.")] = False,
) -> None:
    """Health of PostgreSQL, Redis and the bus: ok/fail and latency each; exits 1 if any fails."""
    with servers("database_url", "redis_url", "bus_url") as settings:
        results = asyncio.run(_check(settings, test))
    table = Table("server", "status", "latency", "detail")
    for name, ok, latency, detail in results:
        table.add_row(name, "[green]ok[/]" if ok else "[red]fail[/]", f"{latency * 1000:.2f} ms" if ok else "-", detail)
    out.print(table)
    if not all(ok for _, ok, _, _ in results):
        raise typer.Exit(1)


async def _check(settings: Settings, test: bool) -> list[tuple[str, bool, float, str]]:
    from tradeplane.adapters.bus import create_bus
    from tradeplane.adapters.cache import Cache
    from tradeplane.adapters.postgres import Database

    assert settings.database_url and settings.redis_url and settings.bus_url
    timeout = settings.connect_timeout_s
    probes: list[tuple[str, Any]] = [
        ("postgres", Database(settings.database_url, min_size=1, max_size=1, timeout=timeout)),
        ("redis", Cache(settings.redis_url, timeout=timeout)),
        ("bus", create_bus(settings.bus_url, namespace=settings.bus_namespace)),
    ]
    results = []
    for name, adapter in probes:
        started = time.perf_counter()
        try:
            await adapter.connect()
            latency = await adapter.ping()
            detail = getattr(adapter, "kind", "")
            if test:
                await adapter.roundtrip_test()
                detail = f"{detail} write/read ok".strip()
            results.append((name, True, latency, detail))
        except Exception as exc:  # report every server, not just the first failure
            detail = exc.detail if isinstance(exc, TradeplaneError) else f"{exc.__class__.__name__}: {exc}"
            results.append((name, False, time.perf_counter() - started, detail))
        finally:
            with contextlib.suppress(Exception):
                await adapter.close()
    return results


# ---------------------------------------------------------------- db


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument(help="Target revision.")] = "head") -> None:
    """Apply migrations up to REVISION (default head)."""
    from tradeplane.adapters.db.migrate import current, upgrade

    with servers("database_url") as settings:
        assert settings.database_url is not None
        upgrade(settings.database_url, revision)
        out.print(f"database at revision {current(settings.database_url)}")


@db_app.command("downgrade")
def db_downgrade(revision: Annotated[str, typer.Argument(help="Target revision, e.g. -1 or base.")]) -> None:
    """Revert migrations down to REVISION (base removes every table)."""
    from tradeplane.adapters.db.migrate import current, downgrade

    with servers("database_url") as settings:
        assert settings.database_url is not None
        downgrade(settings.database_url, revision)
        out.print(f"database at revision {current(settings.database_url) or 'base'}")


@db_app.command("current")
def db_current() -> None:
    """Print the database's current revision."""
    from tradeplane.adapters.db.migrate import current, heads

    with servers("database_url") as settings:
        assert settings.database_url is not None
        revision = current(settings.database_url)
        state = "up to date" if revision in heads() else "behind: run `tradeplane db upgrade`"
        out.print(f"{revision or 'base'} ({state})")


@db_app.command("verify-audit")
def db_verify_audit() -> None:
    """Seal the committed audit rows, then check the whole hash chain (exit 1 if any row fails)."""

    async def main(settings: Settings) -> None:
        from tradeplane.adapters.postgres import Database

        assert settings.database_url is not None
        db = Database(settings.database_url, min_size=1, max_size=2, timeout=settings.connect_timeout_s)
        await db.connect()
        try:
            with err.status("sealing and verifying the audit chain"):
                check = await AuditSealer(db).verify()
        finally:
            await db.close()
        if check.bad_row_ids:
            shown = ", ".join(map(str, check.bad_row_ids[:20]))
            err.print(f"audit chain broken: {len(check.bad_row_ids)} rows fail verification (ids {shown})")
            raise typer.Exit(1)
        pending = f"{check.unsealed} written since, not yet committed, or behind a transaction still open"
        out.print(f"audit chain intact (sealed {check.sealed_now} rows now; {pending})")

    with servers("database_url") as settings:
        asyncio.run(main(settings))


@app.command()
def backup(
    file: Annotated[Path, typer.Argument(help="Where to write the dump (pg_dump custom format).")],
) -> None:
    """Dump the database to FILE."""
    from tradeplane.adapters.db.backup import backup as run_backup

    with servers("database_url") as settings, err.status(f"dumping to {file}"):
        assert settings.database_url is not None
        run_backup(settings.database_url, file)
    out.print(f"backup written to {file} ({file.stat().st_size:,} bytes)")


@app.command()
def restore(file: Annotated[Path, typer.Argument(help="A dump made by `tradeplane backup`.")]) -> None:
    """Restore FILE into the configured database, which must be empty (no tables of ours)."""
    from tradeplane.adapters.db.backup import restore as run_restore

    if not file.is_file():
        raise ConfigError(f"{file} does not exist or is not a file")
    with servers("database_url") as settings:
        assert settings.database_url is not None
        url = settings.database_url

        async def has_tables(conn: Any) -> bool:
            return bool(await conn.fetchval("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"))

        if run_async(lambda: _with_db(settings, has_tables, "restore.check")):
            raise TradeplaneError(
                "the target database is not empty; restore into a new database "
                "(createdb, then point TRADEPLANE_DATABASE_URL at it)",
                code="not_empty",
            )
        with err.status(f"restoring {file}"):
            run_restore(url, file)
    out.print(f"restored {file}")


# ---------------------------------------------------------------- users, keys, accounts


@users_app.command("create")
def users_create(
    username: str,
    role: Annotated[str, typer.Option(help="admin, trader, readonly or system.")] = "trader",
    email: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Create a user."""
    from tradeplane.services.identity import Role, create_user

    try:
        parsed = Role(role)
    except ValueError:
        raise ConfigError(f"--role must be one of {', '.join(r.value for r in Role)}") from None
    with servers("database_url") as settings:
        user_id = run_async(
            lambda: _with_db(settings, lambda c: create_user(c, username, parsed, email=email), "users.create")
        )
    out.print(f"user {username} created with id {user_id} and role {parsed.value}")


@keys_app.command("create")
def keys_create(
    user: Annotated[str, typer.Option(help="Username the key acts as.")],
    name: Annotated[str, typer.Option(help="A label for the key.")] = "cli",
) -> None:
    """Create an API key and print it once: it is stored only as a hash."""
    from tradeplane.services.identity import issue_api_key, user_id_by_name

    with servers("database_url") as settings:
        secret = settings.secret_key.get_secret_value()

        async def work(conn: Any) -> Any:
            return await issue_api_key(conn, secret, await user_id_by_name(conn, user), name)

        issued = run_async(lambda: _with_db(settings, work, "keys.create"))
    err.print(f"API key for {user} (shown once; store it now):")
    out.print(issued.key)


@accounts_app.command("create")
def accounts_create(
    user: Annotated[str, typer.Option(help="Owner's username.")],
    name: Annotated[str, typer.Option(help="Account name, unique per user.")] = "main",
    kind: Annotated[str, typer.Option(help="cash or margin.")] = "cash",
    currency: Annotated[str, typer.Option(help="Asset code of the account's cash.")] = "USD",
    stp: Annotated[
        str,
        typer.Option(
            help="Self-trade prevention for orders that name none: cancel_newest, cancel_oldest or cancel_both."
        ),
    ] = "cancel_newest",
) -> None:
    """Create a trading account."""
    from tradeplane.services.accounts import create_account, parse_stp
    from tradeplane.services.identity import user_id_by_name

    mode = parse_stp(stp)
    with servers("database_url") as settings:

        async def work(conn: Any) -> int:
            return await create_account(conn, await user_id_by_name(conn, user), name, kind, currency, mode)

        account_id = run_async(lambda: _with_db(settings, work, "accounts.create"))
    out.print(f"account {account_id} created for {user} ({kind}, {currency}, self-trade prevention {mode.value})")


@accounts_app.command("stp")
def accounts_stp(account_id: int, mode: str) -> None:
    """Set ACCOUNT_ID's self-trade prevention MODE (cancel_newest, cancel_oldest, cancel_both) for orders that
    name none; open orders keep the mode they were placed with."""
    from tradeplane.services.accounts import parse_stp, set_self_trade_prevention

    stp = parse_stp(mode)
    with servers("database_url") as settings:
        run_async(
            lambda: _with_db(settings, lambda c: set_self_trade_prevention(c, account_id, stp, None), "accounts.stp")
        )
    out.print(f"account {account_id}: self-trade prevention {stp.value}")


@accounts_app.command("deposit")
def accounts_deposit(
    account_id: int,
    amount: str,
    asset: Annotated[str | None, typer.Option(help="Defaults to the account's currency.")] = None,
) -> None:
    """Credit AMOUNT to ACCOUNT_ID as a balanced ledger transaction."""
    from tradeplane.services.accounts import deposit, parse_amount

    parsed: Decimal = parse_amount(amount)
    with servers("database_url") as settings:
        result = run_async(lambda: _with_db(settings, lambda c: deposit(c, account_id, parsed, asset), "deposit"))
    out.print(f"deposited {parsed} to account {account_id}; balance now {result.balance}")


# ---------------------------------------------------------------- instruments

_DecimalOption = Annotated[str | None, typer.Option(help="Exact decimal.")]
_RateOption = Annotated[
    str | None,
    typer.Option(help="A fraction (0.0005 is 0.05%). Lower: any time. Higher: only halted with no open orders."),
]


def _decimal(text: str | None, name: str) -> Decimal | None:
    from tradeplane.services.instruments import parse_decimal

    return None if text is None else parse_decimal(text, name)


def _instrument_line(view: Any) -> list[str]:
    from tradeplane.services.queries import decimal_text

    t = view.terms

    def text(value: Decimal | None) -> str:
        return "-" if value is None else decimal_text(value)

    return [
        t.symbol,
        f"{t.base_asset}/{t.quote_asset}",
        t.status,
        text(t.tick_size),
        text(t.lot_size),
        f"{text(t.min_qty)}..{text(t.max_qty)}",
        f"{text(t.price_band_pct)}%",
        text(t.reference_price),
        text(view.last_price),
        f"{text(t.maker_fee_rate)}/{text(t.taker_fee_rate)}",
        text(t.margin_rate),
        "-" if t.session_close_utc is None else t.session_close_utc.isoformat(),
        str(view.open_orders),
    ]


@instruments_app.command("add")
def instruments_add(
    symbol: Annotated[str, typer.Argument(help="e.g. SOL-USD: A-Z, 0-9, '.', '_', '-', up to 32 characters.")],
    base: Annotated[str, typer.Option(help="Base asset code (what is bought and sold).")],
    quote: Annotated[str, typer.Option(help="Quote asset code (what prices, cash and fees are in).")],
    tick_size: Annotated[str, typer.Option(help="Price step.")],
    lot_size: Annotated[str, typer.Option(help="Quantity step.")],
    min_qty: Annotated[str, typer.Option(help="Smallest order quantity (a multiple of the lot size).")],
    max_qty: Annotated[str, typer.Option(help="Largest order quantity (a multiple of the lot size).")],
    band: Annotated[str, typer.Option(help="Price band in percent around the last (or reference) price.")],
    reference_price: Annotated[str | None, typer.Option(help="Band centre before the first trade.")] = None,
    maker_fee: Annotated[
        str, typer.Option(help="Maker fee rate, a fraction (0.0002 = 0.02%; negative = rebate).")
    ] = "0",
    taker_fee: Annotated[str, typer.Option(help="Taker fee rate, a fraction.")] = "0",
    margin_rate: Annotated[str, typer.Option(help="Initial margin fraction, above 0 and at most 1.")] = "1",
    status: Annotated[str, typer.Option(help="open, halted or closed.")] = "open",
    session_close: Annotated[str | None, typer.Option(help="HH:MM UTC when DAY orders expire.")] = None,
    base_scale: Annotated[
        int | None, typer.Option(help="Decimal places of a new base asset (default: the lot size's).")
    ] = None,
    quote_scale: Annotated[
        int | None, typer.Option(help="Decimal places of a new quote asset (default: the tick size's).")
    ] = None,
) -> None:
    """List a new instrument (creating its assets if they do not exist). Running processes pick it up."""
    from tradeplane.services.instruments import (
        InstrumentTerms,
        list_instrument,
        parse_decimal,
        parse_session_close,
        parse_status,
    )

    terms = InstrumentTerms(
        symbol=symbol,
        base_asset=base,
        quote_asset=quote,
        tick_size=parse_decimal(tick_size, "tick size"),
        lot_size=parse_decimal(lot_size, "lot size"),
        min_qty=parse_decimal(min_qty, "min quantity"),
        max_qty=parse_decimal(max_qty, "max quantity"),
        price_band_pct=parse_decimal(band, "price band"),
        reference_price=_decimal(reference_price, "reference price"),
        maker_fee_rate=parse_decimal(maker_fee, "maker fee rate"),
        taker_fee_rate=parse_decimal(taker_fee, "taker fee rate"),
        margin_rate=parse_decimal(margin_rate, "margin rate"),
        status=parse_status(status),
        session_close_utc=None if session_close is None else parse_session_close(session_close),
    )
    with servers("database_url") as settings:
        instrument_id = run_async(
            lambda: _with_db(
                settings,
                lambda c: list_instrument(c, terms, base_scale=base_scale, quote_scale=quote_scale),
                "instruments.add",
            )
        )
    out.print(f"instrument {symbol} listed with id {instrument_id} ({status})")


@instruments_app.command("list")
def instruments_list() -> None:
    """Every instrument with its parameters and open order count."""
    from tradeplane.services.instruments import list_instruments

    with servers("database_url") as settings:
        views = run_async(lambda: _with_db(settings, list_instruments, "instruments.list"))
    table = Table(
        "symbol",
        "assets",
        "status",
        "tick",
        "lot",
        "qty",
        "band",
        "ref",
        "last",
        "maker/taker",
        "margin",
        "close",
        "open orders",
    )
    for view in views:
        table.add_row(*_instrument_line(view))
    out.print(table)


@instruments_app.command("set")
def instruments_set(
    symbol: str,
    status: Annotated[str | None, typer.Option(help="open, halted or closed.")] = None,
    band: _DecimalOption = None,
    reference_price: _DecimalOption = None,
    min_qty: _DecimalOption = None,
    max_qty: _DecimalOption = None,
    maker_fee: _RateOption = None,
    taker_fee: _RateOption = None,
    margin_rate: _RateOption = None,
    session_close: Annotated[str | None, typer.Option(help="HH:MM UTC when DAY orders expire.")] = None,
    no_session_close: Annotated[bool, typer.Option(help="DAY orders expire at the end of the UTC day.")] = False,
    tick_size: Annotated[str | None, typer.Option(help="Only while the instrument has no open orders.")] = None,
    lot_size: Annotated[str | None, typer.Option(help="Only while the instrument has no open orders.")] = None,
) -> None:
    """Change SYMBOL's status or trading parameters. The engine applies new fees and margin rate from its next
    fill, no restart. Lowering them works any time (open orders' holds shrink to match); raising them only while it
    is halted or closed with no open orders, and it reopens once the api has the new rates. Tick and lot size only
    with no open orders (restart the engine shard and the market data worker after)."""
    from tradeplane.services.instruments import (
        InstrumentChanges,
        adjust_instrument,
        parse_session_close,
        parse_status,
        set_status,
    )

    wanted = None if status is None else parse_status(status)
    changes = InstrumentChanges(
        tick_size=_decimal(tick_size, "tick size"),
        lot_size=_decimal(lot_size, "lot size"),
        min_qty=_decimal(min_qty, "min quantity"),
        max_qty=_decimal(max_qty, "max quantity"),
        price_band_pct=_decimal(band, "price band"),
        reference_price=_decimal(reference_price, "reference price"),
        maker_fee_rate=_decimal(maker_fee, "maker fee rate"),
        taker_fee_rate=_decimal(taker_fee, "taker fee rate"),
        margin_rate=_decimal(margin_rate, "margin rate"),
        session_close_utc=None if session_close is None else parse_session_close(session_close),
        clear_session_close=no_session_close,
    )
    if wanted is None and changes.is_empty():
        raise ConfigError("nothing to change: give --status or a parameter (see --help)")

    async def work(conn: Any) -> list[str]:
        done: list[str] = []
        # Halting comes first and reopening last, so one command can halt, raise a fee, or change and reopen.
        if wanted is not None and wanted != "open":
            previous = await set_status(conn, symbol, wanted)
            done.append(f"status {previous} -> {wanted}")
        if not changes.is_empty():
            await adjust_instrument(conn, symbol, changes)
            done.append("parameters updated")
        if wanted == "open":
            previous = await set_status(conn, symbol, wanted)
            done.append(f"status {previous} -> {wanted}")
        return done

    with servers("database_url") as settings:
        done = run_async(lambda: _with_db(settings, work, "instruments.set"))
        views = run_async(lambda: _with_db(settings, _list_for_print, "instruments.list"))
    out.print(f"{symbol}: {', '.join(done)}")
    for view in views:
        if view.terms.symbol == symbol:
            out.print("  " + "  ".join(_instrument_line(view)[2:]))


async def _list_for_print(conn: Any) -> Any:
    from tradeplane.services.instruments import list_instruments

    return await list_instruments(conn)


def _use_uvloop() -> None:
    """uvloop (installed with uvicorn[standard]) cuts the event loop's per-request overhead; every process
    the CLI starts runs on it. asyncio.run() would otherwise pick the pure-Python loop."""
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def main() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    # uvicorn re-raises a captured SIGTERM after its graceful shutdown; with the default handler that would kill
    # the process before the embedded servers are stopped.
    signal.signal(signal.SIGTERM, _raise_terminated)
    _use_uvloop()
    try:
        app(standalone_mode=True)
    except Terminated:
        sys.exit(0)
    except ConfigError as exc:
        err.print(f"[red]error:[/] {exc.detail}")
        sys.exit(2)
    except TradeplaneError as exc:
        err.print(f"[red]error:[/] {exc.detail}")
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
