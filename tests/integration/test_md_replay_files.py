"""`tradeplane md replay FILE` through the real command-line entry point with files as tools write them:
a CSV with a UTF-8 byte order mark replays; a file that is not the format its name says is refused with a
one-line error and a non-zero exit, never a traceback."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from tests.integration.test_ingest import md_env  # noqa: F401 - fixture

HEADER = "ts,symbol,bid,ask,bid_size,ask_size,last,volume"
ROW = "2024-03-05T12:00:00Z,AAPL,190.00,190.02,3,4,190.01,5"


def tradeplane(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The installed `tradeplane` command's entry point (``cli.main``), so its error handling is included."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("TRADEPLANE_") or k.startswith("TRADEPLANE_TEST")}
    code = "import sys; from tradeplane.entrypoints.cli import main; sys.argv[0] = 'tradeplane'; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        env={**base, "COLUMNS": "200", **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


async def test_a_csv_with_a_byte_order_mark_replays(md_env: dict[str, str], tmp_path: Path) -> None:  # noqa: F811
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbf" + f"{HEADER}\r\n{ROW}\r\n".encode())
    result = await asyncio.to_thread(tradeplane, "md", "replay", str(path), env=md_env)
    assert result.returncode == 0, result.stderr
    conn = await asyncpg.connect(md_env["TRADEPLANE_DATABASE_URL"])
    try:
        assert await conn.fetchval("SELECT count(*) FROM ticks") == 1
    finally:
        await conn.close()


@pytest.mark.parametrize(
    "content",
    [b"hello\n", f"{HEADER}\n{ROW}\n".encode(), b""],
    ids=["text", "a-csv-misnamed", "empty"],
)
async def test_a_file_named_parquet_that_is_not_parquet_is_refused_cleanly(
    md_env: dict[str, str],  # noqa: F811
    tmp_path: Path,
    content: bytes,
) -> None:
    path = tmp_path / "ticks.parquet"
    path.write_bytes(content)
    result = await asyncio.to_thread(tradeplane, "md", "replay", str(path), env=md_env)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert f"error: {path}: not a Parquet file" in result.stderr.replace("\n", "")
