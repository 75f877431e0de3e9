"""GET /admin/stats, the console's live data: exact counters after known traffic, and sums over several
processes (two replicas sharing a real Redis; two workers of one embedded gateway sharing its SQLite file)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.admin import create_key, create_tenant, tenant_with_key
from tests.support.gateway import GatewayProc, start_gateway
from tests.support.redis_server import RedisServer
from tests.support.sim import SimHandle, start_sim

PRICE = {"input_per_1k": 0.01, "output_per_1k": 0.03, "currency": "USD"}
MESSAGES = [{"role": "user", "content": "one two three four"}]


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimHandle]:
    handle = start_sim("--ttft-ms", "1", "--itl-ms", "1", log_dir=tmp_path_factory.mktemp("sim-stats"))
    yield handle
    handle.stop()


def config(sim: SimHandle, **extra: Any) -> dict[str, Any]:
    return {
        "backends": [{"name": "sim", "kind": "vllm", "url": sim.url, "capacity": 8}],
        "models": [{"name": "chat-model", "backends": ["sim"], "price": PRICE}],
        **extra,
    }


def stats(gw: GatewayProc, key: str | None = None) -> httpx.Response:
    return httpx.get(gw.url + "/admin/stats", headers={"Authorization": f"Bearer {key or gw.admin_key}"})


def chat(gw: GatewayProc, key: str, max_tokens: int = 3, fresh: bool = False) -> int:
    headers = {"Authorization": f"Bearer {key}"}
    if fresh:
        headers["Connection"] = "close"  # a new connection, which any worker may accept
    body = {"model": "chat-model", "messages": MESSAGES, "max_tokens": max_tokens}
    return httpx.post(gw.url + "/v1/chat/completions", headers=headers, json=body).status_code


def tenant_of(report: dict[str, Any], tenant_id: str) -> dict[str, Any]:
    found: dict[str, Any] = next(t for t in report["tenants"] if t["id"] == tenant_id)
    return found


def eventually(check: Callable[[], bool], timeout: float = 8.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def test_counters_after_known_traffic(sim: SimHandle, tmp_path: Path) -> None:
    gw = start_gateway(config(sim), tmp_path)
    try:
        key = tenant_with_key(gw.url, gw.admin_key, "acme", weight=3, priority=2, limits={"rpm": 5})
        create_tenant(gw.url, gw.admin_key, "quiet", budget={"amount": 7, "period": "week"})
        statuses = [chat(gw, key) for _ in range(8)]
        assert statuses.count(200) == 5 and statuses.count(429) == 3

        resp = stats(gw)
        assert resp.status_code == 200, resp.text
        report = resp.json()
        assert report["object"] == "stats" and report["complete"] is True
        assert abs(report["time"] - time.time()) < 5
        assert [r["id"] for r in report["replicas"]] == [report["replicas"][0]["id"]]
        acme = tenant_of(report, "acme")
        assert acme["requests"] == {"200": 5, "429": 3}
        assert acme["rejections"] == {"rpm": 3}
        # The simulator's prompt for these four words and three tokens out, five times.
        usage = httpx.post(
            sim.base_url + "/chat/completions",
            json={"model": "chat-model", "messages": MESSAGES, "max_tokens": 3},
        ).json()["usage"]
        assert acme["tokens"]["prompt"] == 5 * usage["prompt_tokens"]
        assert acme["tokens"]["completion"] == 15
        expected_spend = 5 * (usage["prompt_tokens"] * 0.01 + 3 * 0.03) / 1000
        assert abs(acme["spend"]["USD"] - expected_spend) < 1e-9
        assert acme["queue_wait"]["count"] == 5
        assert len(acme["queue_wait"]["buckets"]) == len(report["queue_wait_bounds"])
        assert acme["queue_wait"]["buckets"][-1] == 5  # every wait under the largest bound
        assert (acme["weight"], acme["priority"], acme["exists"]) == (3, 2, True)
        assert acme["inflight"] == 0 and acme["queued"] == 0
        # A tenant without traffic is listed, with its policy and zeros.
        quiet = tenant_of(report, "quiet")
        assert quiet["requests"] == {} and quiet["budget"] == {"amount": 7, "period": "week"}
        assert quiet["queue_wait"]["buckets"] == [0] * len(report["queue_wait_bounds"])

        # Counters only grow: a second read differences to the traffic in between.
        chat(gw, key)
        later = tenant_of(stats(gw).json(), "acme")
        assert sum(later["requests"].values()) == 9

        # Admin only.
        assert stats(gw, key).status_code == 403
        assert httpx.get(gw.url + "/admin/stats").status_code == 401
    finally:
        gw.stop()


def test_replicas_sum_through_redis(sim: SimHandle, redis_server: RedisServer, tmp_path: Path) -> None:
    shared = config(sim, redis_url=redis_server.url, stats_interval_s=0.2)
    a = start_gateway(shared, tmp_path / "a")
    b = start_gateway(shared, tmp_path / "b")
    try:
        create_tenant(a.url, a.admin_key, "shared")
        key = create_key(a.url, a.admin_key, "shared", name="k")
        for _ in range(3):
            assert chat(a, key) == 200
        for _ in range(4):
            assert chat(b, key) == 200

        def summed(gw: GatewayProc) -> bool:
            report = stats(gw).json()
            return len(report["replicas"]) == 2 and tenant_of(report, "shared")["requests"] == {"200": 7}

        # Each replica answers with its own counters plus the other's last published ones.
        eventually(lambda: summed(a))
        eventually(lambda: summed(b))
        report = stats(a).json()
        assert tenant_of(report, "shared")["tokens"]["completion"] == 21
        assert len({r["id"] for r in report["replicas"]}) == 2
    finally:
        a.stop()
        b.stop()


def test_workers_sum_through_sqlite(sim: SimHandle, tmp_path: Path) -> None:
    gw = start_gateway(config(sim, stats_interval_s=0.2), tmp_path, extra_args=("--workers", "2"))
    try:
        key = tenant_with_key(gw.url, gw.admin_key, "busy")
        for _ in range(20):
            assert chat(gw, key, fresh=True) == 200

        def summed() -> bool:
            report = stats(gw).json()
            return len(report["replicas"]) == 2 and tenant_of(report, "busy")["requests"] == {"200": 20}

        eventually(summed)
    finally:
        gw.stop()
