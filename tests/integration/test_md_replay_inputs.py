"""`tradeplane md replay` at the edges of its input: a file with nothing in it is refused with a one-line error
and a non-zero exit; a CSV with only its header is a replay of nothing that says so; numbers a feed never
writes (``1_000``) are malformed rows in the summary."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from tests.integration.test_ingest import md_env  # noqa: F401 - fixture
from tests.integration.test_md_replay_files import HEADER, ROW, tradeplane


def summary(stdout: str) -> dict[str, str]:
    cells = [[c.strip() for c in line.strip().strip("│").split("│")] for line in stdout.splitlines()]
    return {row[0]: row[1] for row in cells if len(row) == 2}


async def stored_ticks(md_env: dict[str, str]) -> int:  # noqa: F811
    conn = await asyncpg.connect(md_env["TRADEPLANE_DATABASE_URL"])
    try:
        return int(await conn.fetchval("SELECT count(*) FROM ticks"))
    finally:
        await conn.close()


@pytest.mark.parametrize("content", [b"", b"\xef\xbb\xbf"], ids=["zero-bytes", "only-a-byte-order-mark"])
async def test_an_empty_csv_is_refused_in_one_line_with_a_non_zero_exit(
    md_env: dict[str, str],  # noqa: F811
    tmp_path: Path,
    content: bytes,
) -> None:
    path = tmp_path / "ticks.csv"
    path.write_bytes(content)
    result = await asyncio.to_thread(tradeplane, "md", "replay", str(path), env=md_env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    message = result.stderr.replace("\n", "")
    assert f"error: {path}: not a tick file: it is empty" in message, result.stderr
    assert "rows read" not in result.stdout


async def test_a_header_only_csv_replays_nothing_and_says_so(md_env: dict[str, str], tmp_path: Path) -> None:  # noqa: F811
    path = tmp_path / "ticks.csv"
    path.write_text(HEADER + "\n")
    result = await asyncio.to_thread(tradeplane, "md", "replay", str(path), env=md_env)
    assert result.returncode == 0, result.stderr
    counts = summary(result.stdout)
    assert (counts["rows read"], counts["stored"], counts["dropped"]) == ("0", "0", "0")
    assert "ticks.csv has no data rows (its header only): nothing was replayed" in result.stdout.replace("\n", "")
    assert await stored_ticks(md_env) == 0


async def test_numbers_with_digit_grouping_are_malformed_rows(md_env: dict[str, str], tmp_path: Path) -> None:  # noqa: F811
    path = tmp_path / "ticks.csv"
    grouped = "2024-03-05T12:00:01Z,AAPL,190.00,190.02,1_000,4,190.01,5"
    path.write_text(f"{HEADER}\n{ROW}\n{grouped}\n")
    result = await asyncio.to_thread(tradeplane, "md", "replay", str(path), env=md_env)
    assert result.returncode == 0, result.stderr
    counts = summary(result.stdout)
    assert (counts["rows read"], counts["stored"], counts["malformed_row"]) == ("2", "1", "1")
    assert "no data rows" not in result.stdout
    assert await stored_ticks(md_env) == 1
