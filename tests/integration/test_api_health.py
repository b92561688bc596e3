"""Health endpoints report each dependency; /metrics exposes the seed 000 names, actually updated."""

from __future__ import annotations

import re

import httpx

from tests.integration.conftest import Actor


async def test_health_reports_every_dependency(client: httpx.AsyncClient) -> None:
    response = await client.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    for name in ("postgres", "redis", "bus"):
        assert body["checks"][name]["status"] == "ok"
        assert body["checks"][name]["latency_ms"] >= 0


async def test_single_dependency_endpoints(client: httpx.AsyncClient) -> None:
    for path in ("/health/postgres", "/health/redis", "/health/bus"):
        response = await client.get(path)
        assert response.status_code == 200, path
        assert response.json()["status"] == "ok"
    assert (await client.get("/health/bus")).json()["kind"] == "nats"


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one Prometheus sample, 0 when absent."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_metrics_are_updated_by_requests(client: httpx.AsyncClient, trader: Actor) -> None:
    before = (await client.get("/metrics")).text
    for _ in range(3):
        assert (await client.get("/api/v1/me", headers=trader.headers)).status_code == 200
    await client.get("/health/postgres")
    after = (await client.get("/metrics")).text
    route = {"method": "GET", "route": "/api/v1/me", "status": "200"}
    assert sample(after, "http_requests_total", **route) - sample(before, "http_requests_total", **route) == 3
    count = "http_request_duration_seconds_count"
    assert sample(after, count, **route) - sample(before, count, **route) == 3
    db_count = "database_query_duration_seconds_count"
    assert sample(after, db_count, operation="health") > sample(before, db_count, operation="health")
    for name in ("database_errors_total", "message_queue_length", "cache_hit_ratio"):
        assert re.search(rf"^# TYPE {name} ", after, re.M) or f"# TYPE {name.removesuffix('_total')} " in after
