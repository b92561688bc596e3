"""`tradeplane md ...`: run market data into storage from the command line, with a progress bar and a summary.

    tradeplane md simulate --rate 5000 --duration 60   a simulated market over the listed instruments
    tradeplane md replay ticks.csv                      a CSV or Parquet tick file (see adapters/feeds/replay):
                                                        quantities in instrument units, as /ticks returns them
                                                        and the retention archive writes them

Both apply the migrations first (idempotent), use the configured servers or start the embedded ones (the
`servers(...)` helper of the main CLI), and end with rows read, stored and dropped by reason. Bad rows are a
result, not a failure: the exit code is 0 unless the run itself failed. A file that is not a tick file at all
(empty, without the tick columns, named .parquet but not Parquet) is a one-line error and exit code 1; a CSV
with only its header is a replay of nothing, and the summary says so. `run_marketdata_command` is the
`tradeplane run marketdata` worker command, registered by the main CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tradeplane.config import Settings
from tradeplane.errors import TradeplaneError
from tradeplane.services.ingest import IngestStats, MarketDataPipeline

md_app = typer.Typer(help="Market data: simulate a market or replay a tick file into storage.", no_args_is_help=True)

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

PROGRESS_REFRESH_S = 0.2


def summary_table(stats: IngestStats, elapsed_s: float) -> Table:
    """Rows read, stored and dropped (total and by reason), and the storage rate."""
    table = Table(title="market data run", show_header=False)
    table.add_column("what")
    table.add_column("count", justify="right")
    table.add_row("rows read", f"{stats.rows_read:,}")
    table.add_row("stored", f"{stats.stored:,}")
    table.add_row("dropped", f"{stats.dropped_total:,}")
    for reason, count in sorted(stats.dropped.items()):
        table.add_row(f"  {reason}", f"{count:,}")
    table.add_row("candle upserts", f"{stats.candles_written:,}")
    table.add_row("elapsed", f"{elapsed_s:.1f} s")
    table.add_row("stored per second", f"{stats.stored / elapsed_s:,.0f}" if elapsed_s > 0 else "-")
    return table


async def _connected(settings: Settings, work: Callable[[Any], Awaitable[None]]) -> None:
    """Migrate, connect PostgreSQL and Redis (no bus needed), run ``work(platform-like)``, disconnect."""
    from tradeplane.adapters.cache import Cache
    from tradeplane.adapters.db.migrate import upgrade
    from tradeplane.adapters.postgres import Database

    assert settings.database_url is not None and settings.redis_url is not None
    await asyncio.to_thread(upgrade, settings.database_url)
    db = Database(settings.database_url, min_size=1, max_size=4, timeout=settings.connect_timeout_s)
    cache = Cache(settings.redis_url, timeout=settings.connect_timeout_s)
    await db.connect()
    try:
        await cache.connect()
        try:
            await work((db, cache))
        finally:
            await cache.close()
    finally:
        await db.close()


async def _run_with_progress(
    pipeline: MarketDataPipeline, run: Awaitable[None], total: int | None, label: str
) -> float:
    """Run ``run`` (which feeds ``pipeline``) under a progress bar of stored ticks; returns elapsed seconds.
    Ctrl-C stops feeding; what was submitted is still committed."""
    started = time.perf_counter()
    task = asyncio.ensure_future(run)
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGINT, task.cancel)
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=False) as progress:
        bar = progress.add_task(label, total=total)
        while not task.done():
            await asyncio.wait({task}, timeout=PROGRESS_REFRESH_S)
            progress.update(
                bar, completed=pipeline.stats.rows_read, description=f"{label} (stored {pipeline.stats.stored:,})"
            )
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await pipeline.flush()
        progress.update(
            bar, completed=pipeline.stats.rows_read, description=f"{label} (stored {pipeline.stats.stored:,})"
        )
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.remove_signal_handler(sig)
    return time.perf_counter() - started


def _report(stats: IngestStats, elapsed: float) -> None:
    out.print(summary_table(stats, elapsed))


def _servers() -> contextlib.AbstractContextManager[Settings]:
    from tradeplane.entrypoints.cli import servers  # late: cli.py imports this module to register `md`

    return servers("database_url", "redis_url")


@md_app.command()
def simulate(
    rate: Annotated[int, typer.Option(min=1, help="Ticks per second over all listed instruments.")] = 1000,
    duration: Annotated[float, typer.Option(min=0.1, help="Seconds to run.")] = 10.0,
    seed: Annotated[int | None, typer.Option(help="Random seed (default: random).")] = None,
) -> None:
    """Simulate a random-walk market over the listed instruments and store it (quotes go to Redis too)."""
    from tradeplane.adapters.db.marketdata import load_instruments
    from tradeplane.adapters.feeds.simulated import SimulatedFeed
    from tradeplane.entrypoints.workers.marketdata import load_simulation_from

    async def work(adapters: Any) -> None:
        db, cache = adapters
        async with db.connection("md.instruments") as conn:
            instruments = await load_instruments(conn)
            walks = await load_simulation_from(conn)
        if not instruments:
            raise TradeplaneError("no instruments are listed: run `tradeplane up` once to load the demo ones")
        total = int(rate * duration)
        chosen = seed if seed is not None else time.time_ns() % 2**32
        feed = SimulatedFeed(walks, seed=chosen, rate=rate, total_ticks=total)
        async with MarketDataPipeline(db, instruments, cache=cache) as pipeline:
            elapsed = await _run_with_progress(pipeline, pipeline.run_feed(feed), total, f"simulating {rate:,}/s")
        _report(pipeline.stats, elapsed)

    with _servers() as settings:
        asyncio.run(_connected(settings, work))


@md_app.command()
def replay(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True, help="CSV or Parquet tick file.")],
    naive_is_utc: Annotated[bool, typer.Option(help="Read timestamps without an offset as UTC.")] = False,
) -> None:
    """Replay a tick file (columns ts,symbol,bid,ask,bid_size,ask_size,last,volume) into storage.

    Prices and quantities are decimals; bid_size, ask_size and volume are in instrument units (whole
    multiples of the lot size, as /ticks returns them and retention archives them). Replayed trades are
    history: they make candles but are not announced on the live trades channel."""
    from tradeplane.adapters.db.marketdata import load_instruments
    from tradeplane.adapters.feeds.replay import ReplayFeed

    total = _count_rows(file)

    async def work(adapters: Any) -> None:
        db, cache = adapters
        async with db.connection("md.instruments") as conn:
            instruments = await load_instruments(conn)
        if not instruments:
            raise TradeplaneError("no instruments are listed: run `tradeplane up` once to load the demo ones")
        async with MarketDataPipeline(db, instruments, cache=cache) as pipeline:
            feed = ReplayFeed(
                file, pipeline.validator, pipeline.lot_sizes, batch_size=20_000, naive_is_utc=naive_is_utc
            )
            elapsed = await _run_with_progress(
                pipeline, pipeline.run_feed(feed, validated=True), total, f"replaying {file.name}"
            )
        _report(pipeline.stats, elapsed)
        if pipeline.stats.rows_read == 0:  # a file with no header at all was refused before this
            only = "schema" if feed.file_format == "parquet" else "header"
            out.print(f"{file.name} has no data rows (its {only} only): nothing was replayed")

    with _servers() as settings:
        asyncio.run(_connected(settings, work))


def _count_rows(path: Path) -> int | None:
    """Data rows in a tick file, for the progress bar (None if it cannot be told cheaply)."""
    if path.suffix.lower() in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        try:
            return int(pq.ParquetFile(path).metadata.num_rows)
        except Exception:  # not Parquet after all: the replay reports it
            return None
    with path.open("rb") as handle:
        lines = sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))
    return max(0, lines - 1)


def run_marketdata_command(
    simulate_rate: Annotated[
        int | None, typer.Option("--simulate-rate", min=1, help="Also run a simulated market at this many ticks/s.")
    ] = None,
) -> None:
    """Run the market data worker: bus and engine-trade feeds (and a simulated market if asked), depth
    snapshots, partitions and retention."""
    from tradeplane.config import load_settings
    from tradeplane.entrypoints.cli import servers
    from tradeplane.logs import configure_logging

    settings = load_settings()
    configure_logging("marketdata", settings.log_level)

    async def main(settings: Settings) -> None:
        from tradeplane.bootstrap import build_platform
        from tradeplane.entrypoints.heap import freeze_long_lived
        from tradeplane.entrypoints.workers.marketdata import run_marketdata

        platform = build_platform(settings)
        await platform.start()
        freeze_long_lived()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await platform.bus.setup(settings.engine_shards)
            await run_marketdata(platform, stop, simulate_rate=simulate_rate)
        finally:
            await platform.stop()

    with servers("database_url", "redis_url", "bus_url") as settings:
        asyncio.run(main(settings))
