"""Health endpoints: 200 with per-dependency latency when up, 503 when a dependency is down.

Each check runs on every request (bounded by a timeout), so status returns to 200 by itself as soon as
the server is back; nothing is cached.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import orjson
from fastapi import APIRouter
from fastapi.responses import JSONResponse

from tradeplane.adapters.cache import REDIS_ERRORS
from tradeplane.adapters.influxdb import InfluxSink, status_key
from tradeplane.bootstrap import Platform
from tradeplane.entrypoints.api.deps import PlatformDep
from tradeplane.metrics import DEPENDENCY_UP

router = APIRouter(tags=["health"])

CHECK_TIMEOUT_S = 2.0
#: What ``/health/influxdb`` shows under ``writer`` of the writer's ``InfluxSink.status()``.
WRITER_FIGURES = ("written_points", "consecutive_failures", "last_written_at", "last_failure")


async def run_check(name: str, probe: Callable[[], Awaitable[float]]) -> dict[str, Any]:
    try:
        latency = await asyncio.wait_for(probe(), CHECK_TIMEOUT_S)
    except Exception as exc:  # any failure of a dependency is reported, not raised
        DEPENDENCY_UP.labels(name).set(0)
        reason = "timeout" if isinstance(exc, TimeoutError) else str(exc) or exc.__class__.__name__
        return {"status": "fail", "error": reason}
    DEPENDENCY_UP.labels(name).set(1)
    return {"status": "ok", "latency_ms": round(latency * 1000, 3)}


def respond(body: dict[str, Any], ok: bool) -> JSONResponse:
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/health")
async def health(platform: PlatformDep) -> JSONResponse:
    names = ("postgres", "redis", "bus")
    results = await asyncio.gather(
        run_check("postgres", platform.db.ping),
        run_check("redis", platform.cache.ping),
        run_check("bus", platform.bus.ping),
    )
    checks = dict(zip(names, results, strict=True))
    ok = all(c["status"] == "ok" for c in checks.values())
    return respond({"status": "ok" if ok else "fail", "checks": checks}, ok)


async def _single(name: str, probe: Callable[[], Awaitable[float]]) -> JSONResponse:
    result = await run_check(name, probe)
    return respond(result, result["status"] == "ok")


@router.get("/health/postgres")
async def health_postgres(platform: PlatformDep) -> JSONResponse:
    return await _single("postgres", platform.db.ping)


@router.get("/health/redis")
async def health_redis(platform: PlatformDep) -> JSONResponse:
    return await _single("redis", platform.cache.ping)


@router.get("/health/bus")
async def health_bus(platform: PlatformDep) -> JSONResponse:
    result = await run_check("bus", platform.bus.ping)
    result["kind"] = platform.bus.kind
    return respond(result, result["status"] == "ok")


@router.get("/health/influxdb")
async def health_influxdb(platform: PlatformDep) -> JSONResponse:
    """The optional InfluxDB sink: 404 when it is not configured. Not part of ``/health``: the platform trades
    on while InfluxDB is down (the sink buffers, then drops its oldest points), so it must not be pulled
    from a load balancer for it.

    ``/ping`` needs no credentials and this process's sink writes nothing (the market data worker does), so
    the answer is the ping plus the status the writer publishes in Redis (``workers.marketdata``): its
    figures, who reported and how long ago. 503 with a ``reason``: ``unreachable`` (ping failed),
    ``writes_failing`` (the writer's last attempts failed: ``writer.last_failure`` has the status and
    InfluxDB's message, e.g. 401, 403, 404 for credentials, grants, the database), ``writer_not_reporting``
    (no report within its TTL: the worker is not running, or cannot reach Redis)."""
    influx = platform.influx
    if influx is None:
        return JSONResponse({"error": "not_found", "detail": "the InfluxDB sink is not configured"}, status_code=404)
    result, (report, unread) = await asyncio.gather(
        run_check("influxdb", influx.ping), _writer_report(platform, influx)
    )
    sink: dict[str, Any] = report["sink"] if report is not None else {}
    # The writer's figures; null without a report (this process's own sink is idle: its zeros would mislead).
    for name in ("buffered_points", "dropped_points", "unconfirmed_points"):
        result[name] = sink.get(name)
    writer = None
    if report is not None:
        writer = {name: report[name] for name in ("service", "host", "pid", "reported_at", "age_s")}
        writer |= {name: sink[name] for name in WRITER_FIGURES}
    result["writer"] = writer
    if result["status"] != "ok":
        result["reason"] = "unreachable"
    elif writer is None:
        result["reason"] = "writer_not_reporting"
        result["detail"] = unread or (
            f"no process reports writing to InfluxDB database {influx.database!r}: the market data worker"
            " (tradeplane run marketdata) is not running, or cannot reach Redis"
        )
    elif writer["consecutive_failures"]:
        failure = writer["last_failure"] or {}
        answer = "no answer" if failure.get("status") is None else f"HTTP {failure['status']}"
        result["reason"] = "writes_failing"
        result["detail"] = (
            f"{writer['service']} on {writer['host']} reports {writer['consecutive_failures']} failed write(s) in a"
            f" row, the last: {answer}: {failure.get('error', '')}"
        )
    ok = "reason" not in result
    result["status"] = "ok" if ok else "fail"
    return respond(result, ok)


async def _writer_report(platform: Platform, influx: InfluxSink) -> tuple[dict[str, Any] | None, str | None]:
    """The status the process writing to the sink's database published, with ``age_s``; else None and why
    it could not be read (None when there is no report)."""
    try:
        raw = await asyncio.wait_for(platform.cache.client.get(status_key(influx.database)), CHECK_TIMEOUT_S)
    except (*REDIS_ERRORS, TimeoutError) as exc:
        return None, f"the writer's status could not be read from Redis: {str(exc) or exc.__class__.__name__}"
    if raw is None:
        return None, None
    report: dict[str, Any] = orjson.loads(raw)
    age = datetime.now(UTC) - datetime.fromisoformat(report["reported_at"])
    report["age_s"] = round(max(0.0, age.total_seconds()), 3)  # clocks of two hosts may disagree a little
    return report, None
