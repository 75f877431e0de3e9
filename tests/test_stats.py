"""GET /admin/stats, the console's live data: exact counters after known traffic, each backend pool's fair
queue and engines (a pool of two simulators, requests held at them), and how several processes combine
(two replicas sharing a real Redis; two workers of one embedded gateway sharing its SQLite file): counters
add up, the figures of shared state do not."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.admin.pools import BackendStats, EndpointStats, PoolReading, merge_pools
from gateway.admin.stats import merge, read_snapshot
from gateway.telemetry.metrics import Metrics
from tests.support import rawhttp
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


@pytest.fixture(scope="module")
def sim2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimHandle]:
    handle = start_sim("--ttft-ms", "1", "--itl-ms", "1", log_dir=tmp_path_factory.mktemp("sim2-stats"))
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


def chat(gw: GatewayProc, key: str, max_tokens: int = 3, fresh: bool = False, messages: Any = MESSAGES) -> int:
    headers = {"Authorization": f"Bearer {key}"}
    if fresh:
        headers["Connection"] = "close"  # a new connection, which any worker may accept
    body = {"model": "chat-model", "messages": messages, "max_tokens": max_tokens}
    return httpx.post(gw.url + "/v1/chat/completions", headers=headers, json=body).status_code


def tenant_of(report: dict[str, Any], tenant_id: str) -> dict[str, Any]:
    found: dict[str, Any] = next(t for t in report["tenants"] if t["id"] == tenant_id)
    return found


def eventually(check: Callable[[], bool], timeout: float = 8.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def fixed(sim: SimHandle) -> list[dict[str, Any]]:
    """One engine with a fixed limit of 8: the limit is exact, and nothing reads the engine's metrics."""
    return [{"name": "sim", "kind": "vllm", "url": sim.url, "capacity": 8, "capacity_mode": "fixed"}]


def pool_of(report: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(b for b in report["backends"] if b["name"] == name)
    return found


def held(gws: list[GatewayProc], keys: list[str], sims: list[SimHandle]) -> list[socket.socket]:
    """One request per key, in that order through `gws` (round robin), each held at an engine that never
    answers it until its socket closes (streamed: the gateway cancels a stream whose client went away)."""
    for sim in sims:
        sim.set_faults("hang", count=len(keys))
    body = json.dumps({"model": "chat-model", "messages": MESSAGES, "max_tokens": 3, "stream": True}).encode()
    socks = []
    for i, key in enumerate(keys):
        sock = rawhttp.connect(gws[i % len(gws)].port)
        sock.sendall(rawhttp.post(key, body))
        socks.append(sock)
    return socks


def release(socks: list[socket.socket], sims: list[SimHandle]) -> None:
    for sock in socks:
        sock.close()
    for sim in sims:
        sim.set_faults("none")


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


def test_a_pool_of_two_engines(sim: SimHandle, sim2: SimHandle, tmp_path: Path) -> None:
    pool = {"name": "sim", "kind": "vllm", "endpoints": [sim.url, sim2.url], "capacity": 8}
    gw = start_gateway(config(sim, backends=[pool]), tmp_path)
    try:
        key = tenant_with_key(gw.url, gw.admin_key, "acme")
        # The same prompt of several KV blocks each time: the engine's prefix cache holds most of it.
        long = [{"role": "user", "content": " ".join(f"word{i}" for i in range(64))}]
        for _ in range(6):
            assert chat(gw, key, messages=long) == 200
        report = stats(gw).json()
        backend = pool_of(report, "sim")
        endpoints = backend["endpoints"]
        assert [e["id"] for e in endpoints] == sorted(f"127.0.0.1:{s.port}" for s in (sim, sim2))
        # Every request and prompt token the tenant was served, counted at the engine that served it.
        tokens = tenant_of(report, "acme")["tokens"]
        assert sum(e["requests"] for e in endpoints) == 6
        assert sum(e["prompt_tokens"] for e in endpoints) == tokens["prompt"]
        assert sum(e["cached_tokens"] for e in endpoints) == tokens["cached"] > 0
        assert all(e["cached_tokens"] <= e["prompt_tokens"] for e in endpoints)
        # The limits the capacity control set from the engines' own load (each at most `capacity`); the
        # engines' own figures as the control read them from the simulators' /metrics.
        assert all(1 <= e["limit"] <= 8 for e in endpoints)
        assert backend["limit"] == sum(e["limit"] for e in endpoints)
        assert backend["waiting_tenants"] == 0
        for e in endpoints:
            assert e["running"] >= 0 and e["waiting"] >= 0 and 0 <= e["kv_cache_usage"] <= 1
            assert e["queue_wait_s"] >= 0
        # Permits as the control last published them (every interval): back to none once it has seen the end.
        eventually(lambda: all(e["permits"] == 0 for e in pool_of(stats(gw).json(), "sim")["endpoints"]))

        # Three requests held at the engines: three permits, wherever they were placed.
        socks = held([gw], [key] * 3, [sim, sim2])
        try:

            def permits() -> bool:
                report = stats(gw).json()
                return (
                    sum(e["permits"] for e in pool_of(report, "sim")["endpoints"]) == 3
                    and tenant_of(report, "acme")["inflight"] == 3
                )

            eventually(permits)
        finally:
            release(socks, [sim, sim2])
        eventually(lambda: all(e["permits"] == 0 for e in pool_of(stats(gw).json(), "sim")["endpoints"]))
    finally:
        gw.stop()


def test_replicas_sum_through_redis(sim: SimHandle, redis_server: RedisServer, tmp_path: Path) -> None:
    shared = config(sim, backends=fixed(sim), redis_url=redis_server.url, stats_interval_s=0.2)
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
        # One engine, one fair queue: its limit is the same whichever replica reports it, not summed; the
        # requests it served are.
        backend = pool_of(report, "sim")
        (endpoint,) = backend["endpoints"]
        assert (backend["limit"], endpoint["limit"], endpoint["requests"]) == (8, 8, 7)
        # capacity_mode fixed: the limit is the operator's, but the engine's own figures are still read.
        assert (endpoint["running"], endpoint["waiting"], endpoint["queue_wait_s"]) == (0, 0, 0.0)

        # Requests held through both replicas hold permits in the one queue: each replica reports them all.
        socks = held([a, b], [key] * 3, [sim])
        try:

            def permits(gw: GatewayProc) -> bool:
                report = stats(gw).json()
                return pool_of(report, "sim")["endpoints"][0]["permits"] == 3 and pool_of(report, "sim")["limit"] == 8

            eventually(lambda: permits(a))
            eventually(lambda: permits(b))
        finally:
            release(socks, [sim])
    finally:
        a.stop()
        b.stop()


def test_workers_sum_through_sqlite(sim: SimHandle, tmp_path: Path) -> None:
    gw = start_gateway(config(sim, backends=fixed(sim), stats_interval_s=0.2), tmp_path, extra_args=("--workers", "2"))
    try:
        key = tenant_with_key(gw.url, gw.admin_key, "busy")
        for _ in range(20):
            assert chat(gw, key, fresh=True) == 200

        def summed() -> bool:
            report = stats(gw).json()
            return len(report["replicas"]) == 2 and tenant_of(report, "busy")["requests"] == {"200": 20}

        eventually(summed)

        # Without Redis each worker keeps its own fair queue with half of the engine's limit: the queues'
        # limits add up to the engine's, which each worker applies (not summed).
        def pooled() -> bool:
            backend = pool_of(stats(gw).json(), "sim")
            return (backend["limit"], backend["endpoints"][0]["limit"], backend["endpoints"][0]["requests"]) == (
                8,
                8,
                20,
            )

        # Each worker's pool figures come with its readings, published every interval like its counters.
        eventually(pooled)
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


def test_pool_reading_matches_the_collectors() -> None:
    metrics = Metrics()
    metrics.capacity_limit.labels("pool").set(12)
    metrics.capacity_waiting.labels("pool").set(2)
    for i, endpoint in enumerate(("10.0.0.1:8000", "10.0.0.2:8000")):
        metrics.endpoint_limit.labels("pool", endpoint).set(6)
        metrics.endpoint_held.labels("pool", endpoint).set(5 - i)
        metrics.engine_requests.labels("pool", endpoint, "running").set(6)
        metrics.engine_requests.labels("pool", endpoint, "waiting").set(i)
        metrics.engine_kv_usage.labels("pool", endpoint).set(0.25 * (i + 1))
        metrics.endpoint_requests.labels("pool", endpoint).inc(10 + i)
        metrics.endpoint_tokens.labels("pool", endpoint, "prompt").inc(1000)
        metrics.endpoint_tokens.labels("pool", endpoint, "cached").inc(400 * i)
    # A hosted provider: a fixed limit and the requests it served, no engine readings.
    metrics.capacity_limit.labels("provider").set(4)
    metrics.endpoint_limit.labels("provider", "api.example.com").set(4)
    metrics.endpoint_requests.labels("provider", "api.example.com").inc(3)
    (pool, provider) = read_snapshot(metrics, "r", 0.0).backends

    fields = {
        "gateway_capacity_limit": "limit",
        "gateway_capacity_waiting_tenants": "waiting_tenants",
        "gateway_endpoint_limit": "limit",
        "gateway_endpoint_permits": "permits",
        "gateway_engine_kv_cache_usage_ratio": "kv_cache_usage",
        "gateway_endpoint_requests_total": "requests",
    }
    expected: dict[tuple[str, str | None], dict[str, float]] = {}
    for metric in (
        metrics.capacity_limit,
        metrics.capacity_waiting,
        metrics.endpoint_limit,
        metrics.endpoint_held,
        metrics.engine_requests,
        metrics.engine_kv_usage,
        metrics.endpoint_requests,
        metrics.endpoint_tokens,
    ):
        for family in metric.collect():
            for sample in family.samples:
                labels = sample.labels
                if sample.name.endswith("_created"):
                    continue
                field = fields.get(sample.name) or labels.get("state") or f"{labels['kind']}_tokens"
                expected.setdefault((labels["backend"], labels.get("endpoint")), {})[field] = sample.value
    got: dict[tuple[str, str | None], dict[str, float]] = {}
    for backend in (pool, provider):
        got[backend.name, None] = backend.model_dump(exclude={"name", "endpoints"}, exclude_none=True)
        for e in backend.endpoints:
            got[backend.name, e.id] = e.model_dump(exclude={"id"}, exclude_none=True)
    # A counter never incremented has no series: it reads as 0.
    assert {k: {f: v for f, v in g.items() if v or f in expected[k]} for k, g in got.items()} == expected
    assert (pool.name, [e.id for e in pool.endpoints]) == ("pool", ["10.0.0.1:8000", "10.0.0.2:8000"])
    assert provider.endpoints[0].running is None and provider.waiting_tenants is None


def reading(
    at: float, own: bool, limit: int, permits: list[int], *, running: int | None = None, requests: int = 0
) -> PoolReading:
    endpoints = [
        EndpointStats(
            id=f"e{i}",
            limit=limit // len(permits) if not own else limit,
            permits=p,
            running=running,
            waiting=None if running is None else running // 2,
            kv_cache_usage=None if running is None else running / 10,
            requests=requests,
            prompt_tokens=10 * requests,
            cached_tokens=requests,
        )
        for i, p in enumerate(permits)
    ]
    return PoolReading(
        at, own, [BackendStats(name="pool", limit=limit, waiting_tenants=sum(permits), endpoints=endpoints)]
    )


def test_pools_combine_by_what_each_figure_describes() -> None:
    # Replicas sharing one queue through Redis: the one that runs the pool's control reports the queue
    # (8 permits of 8), the other its idle local queue and a more cautious limit. The engine's own
    # readings come from the freshest process; counters add up.
    (pool,) = merge_pools(
        [
            reading(100.0, False, 8, [4, 4], running=4, requests=5),
            reading(101.0, False, 4, [0, 0], running=3, requests=7),
        ]
    )
    assert (pool.limit, pool.waiting_tenants) == (8, 8)
    assert [(e.limit, e.permits) for e in pool.endpoints] == [(4, 4), (4, 4)]
    assert [(e.running, e.waiting, e.kv_cache_usage) for e in pool.endpoints] == [(3, 1, 0.3)] * 2
    assert [(e.requests, e.prompt_tokens, e.cached_tokens) for e in pool.endpoints] == [(12, 120, 12)] * 2

    # Workers without Redis each keep their own queue (a share of each engine's limit, which each
    # applies): the queues' figures add up, the engine's limit does not.
    (pool,) = merge_pools([reading(100.0, True, 4, [1, 2]), reading(100.0, True, 4, [3, 0])])
    assert (pool.limit, pool.waiting_tenants) == (8, 6)
    assert [(e.limit, e.permits, e.running) for e in pool.endpoints] == [(4, 4, None), (4, 2, None)]

    # One replica lost Redis and runs its own queue meanwhile: its requests are at the engines too.
    (pool,) = merge_pools([reading(100.0, False, 8, [2, 2]), reading(100.0, True, 8, [1, 0])])
    assert [e.permits for e in pool.endpoints] == [3, 2] and pool.limit == 16

    # A process of an older version publishes no pools; nothing reported stays null.
    assert merge_pools([PoolReading(1.0, False, [])]) == []
    (bare,) = merge_pools([PoolReading(1.0, False, [BackendStats(name="b", endpoints=[EndpointStats(id="x")])])])
    assert (bare.limit, bare.endpoints[0].permits, bare.endpoints[0].running) == (None, None, None)
