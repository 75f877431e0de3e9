"""GET /admin/stats, the console's live data: exact counters after known traffic, and sums over several
processes (two replicas sharing a real Redis; two workers of one embedded gateway sharing its SQLite file)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.admin.stats import merge, read_snapshot
from gateway.telemetry.metrics import Metrics
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


def test_direct_reading_matches_the_collectors() -> None:
    """`read_snapshot` reads prometheus_client's children directly (fast); `collect()` is the public
    reading: they must agree, so a library upgrade that changes the internals fails here."""
    metrics = Metrics()
    for i, tenant in enumerate(("a", "b", "other")):
        for model in ("m1", "m2"):
            metrics.requests.labels(tenant, model, "200").inc(3 + i)
            metrics.requests.labels(tenant, model, "429").inc(i)
            metrics.tokens.labels(tenant, model, "prompt").inc(100 * (i + 1))
            metrics.tokens.labels(tenant, model, "cached").inc(40)
            for wait in (0.0, 0.004, 0.3, 400.0):
                metrics.queue_wait.labels(tenant, model).observe(wait * (i + 1))
        metrics.rejections.labels(tenant, "rpm").inc(i + 1)
        metrics.spend.labels(tenant, "USD").inc(0.25 * (i + 1))
        metrics.spend.labels(tenant, "EUR").inc(0.5)
        metrics.inflight.labels(tenant).set(i)
        metrics.queued.labels(tenant).set(2 * i)
    snapshot = read_snapshot(metrics, "r", 0.0)

    expected: dict[str, dict[str, Any]] = {}
    bounds = snapshot.queue_wait_bounds
    for metric in (metrics.requests, metrics.tokens, metrics.rejections, metrics.spend, metrics.queue_wait):
        for family in metric.collect():
            for sample in family.samples:
                t = expected.setdefault(sample.labels["tenant"], {"buckets": [0] * len(bounds)})
                name, labels, value = sample.name, sample.labels, sample.value
                if name == "gateway_requests_total":
                    t.setdefault("requests", {}).setdefault(labels["status"], 0)
                    t["requests"][labels["status"]] += value
                elif name == "gateway_tokens_total":
                    t.setdefault("tokens", {}).setdefault(labels["kind"], 0)
                    t["tokens"][labels["kind"]] += value
                elif name == "gateway_rejections_total":
                    t.setdefault("rejections", {})[labels["reason"]] = value
                elif name == "gateway_spend_total":
                    t.setdefault("spend", {})[labels["currency"]] = value
                elif name == "gateway_queue_wait_seconds_count":
                    t["count"] = t.get("count", 0) + value
                elif name == "gateway_queue_wait_seconds_sum":
                    t["sum"] = t.get("sum", 0) + value
                elif name == "gateway_queue_wait_seconds_bucket" and labels["le"] != "+Inf":
                    t["buckets"][bounds.index(float(labels["le"]))] += value
    assert set(snapshot.tenants) == set(expected) == {"a", "b", "other"}
    for tenant, counters in snapshot.tenants.items():
        want = expected[tenant]
        assert counters.requests == want["requests"] and counters.tokens == want["tokens"]
        assert counters.rejections == want["rejections"] and counters.spend == want["spend"]
        assert counters.queue_wait.count == want["count"] == 8
        assert counters.queue_wait.sum == pytest.approx(want["sum"])
        assert counters.queue_wait.buckets == want["buckets"]
    assert (snapshot.tenants["b"].inflight, snapshot.tenants["b"].queued) == (1, 2)
    # Summing two processes adds everything up, histograms bucket by bucket.
    total = merge([snapshot, snapshot])["a"]
    assert total.requests == {"200": 12, "429": 0} and total.queue_wait.count == 16
    assert total.queue_wait.buckets == [2 * n for n in snapshot.tenants["a"].queue_wait.buckets]
