"""Health endpoints: 200 with per-dependency latency when up, 503 when a dependency is down.

Each check runs on every request (bounded by a timeout), so status returns to 200 by itself as soon as
the server is back; nothing is cached.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from tradeplane.entrypoints.api.deps import PlatformDep
from tradeplane.metrics import DEPENDENCY_UP

router = APIRouter(tags=["health"])

CHECK_TIMEOUT_S = 2.0


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
    from a load balancer for it."""
    if platform.influx is None:
        return JSONResponse({"error": "not_found", "detail": "the InfluxDB sink is not configured"}, status_code=404)
    result = await run_check("influxdb", platform.influx.ping)
    result["buffered_points"] = platform.influx.pending
    result["dropped_points"] = platform.influx.stats.dropped_total
    result["unconfirmed_points"] = platform.influx.stats.unconfirmed  # written in part, drops not counted
    return respond(result, result["status"] == "ok")
