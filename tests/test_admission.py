"""Admission end to end: quotas in Redis (a real redis-server), the fair queue, 429s the SDK understands."""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gateway.admission import Admission
from gateway.admission.limits import LocalQuotaStore
from gateway.config import Settings
from gateway.requests import parse_request
from gateway.telemetry.metrics import Metrics
from gateway.tenancy import KeyRecord, Principal, Quotas, Tenant
from gateway.upstream.backends import BackendPool
from tests.support.admin import tenant_with_key
from tests.support.gateway import GatewayProc, start_gateway
from tests.support.redis_server import RedisServer
from tests.support.sim import SimHandle, start_sim

MSG = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimHandle]:
    handle = start_sim("--ttft-ms", "1", "--itl-ms", "2", log_dir=tmp_path_factory.mktemp("sim-adm"))
    yield handle
    handle.stop()


def base_config(sim: SimHandle, redis: RedisServer | None, workdir: Path, capacity: int = 64) -> dict[str, Any]:
    return {
        "redis_url": redis.url if redis else None,
        "backends": [{"name": "sim", "kind": "vllm", "url": sim.url, "capacity": capacity}],
        "models": [
            {"name": "big", "backends": ["sim"], "price": {"input_per_1k": 1.0, "output_per_1k": 2.0}},
            {"name": "small", "backends": ["sim"], "price": {"input_per_1k": 0.0, "output_per_1k": 0.0}},
        ],
        "billing": {"sinks": [{"kind": "jsonl", "path": str(workdir / "billing.jsonl")}]},
    }


@pytest.fixture(scope="module")
def gw(sim: SimHandle, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProc]:
    workdir = tmp_path_factory.mktemp("gw-adm")
    proc = start_gateway(base_config(sim, redis_server, workdir), workdir)
    yield proc
    proc.stop()


def post(gw: GatewayProc, key: str, **body: Any) -> httpx.Response:
    return httpx.post(
        gw.url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "big", "messages": MSG, "max_tokens": 2, **body},
        timeout=30,
    )


def billing_event(gw: GatewayProc, request_id: str) -> dict[str, Any]:
    """The request's billing event, once the sink's batch is written (delivery is asynchronous)."""
    path = gw.config_path.parent / "billing.jsonl"
    deadline = time.monotonic() + 10
    while True:
        if path.exists():
            for line in path.read_text().splitlines():
                event: dict[str, Any] = json.loads(line)
                if event["data"]["request_id"] == request_id:
                    return event
        assert time.monotonic() < deadline, f"no billing event for {request_id}"
        time.sleep(0.05)


def metric(gw: GatewayProc, line_start: str) -> float:
    for line in httpx.get(gw.url + "/metrics").text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_rpm_limit_headers_and_429(gw: GatewayProc) -> None:
    key = tenant_with_key(gw.url, gw.admin_key, "rpm5", limits={"rpm": 5})
    remaining = []
    for _ in range(5):
        resp = post(gw, key)
        assert resp.status_code == 200
        assert resp.headers["x-ratelimit-limit-requests"] == "5"
        remaining.append(int(resp.headers["x-ratelimit-remaining-requests"]))
        assert resp.headers["x-ratelimit-reset-requests"].endswith("s")
    assert remaining == [4, 3, 2, 1, 0]
    refused = post(gw, key)
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["type"] == "requests" and error["code"] == "rate_limit_exceeded"
    assert "requests per minute" in error["message"] and "rpm5" not in error["message"]
    assert 1 <= int(refused.headers["retry-after"]) <= 13
    assert 1000 <= int(refused.headers["retry-after-ms"]) <= 12_100
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-request-id"]
    assert metric(gw, 'gateway_rejections_total{reason="rpm",tenant="rpm5"}') == 1


def test_sdk_retries_a_rate_limit_after_the_advertised_delay(gw: GatewayProc) -> None:
    key = tenant_with_key(gw.url, gw.admin_key, "retry", limits={"rpm": 60})
    seen: list[tuple[float, int, str | None]] = []  # (when, status, retry-after-ms) of each SDK attempt

    # The SDK's own HTTP client class (httpx for openai 2.x, httpx2 for 3.x), with a hook on every answer.
    def on_response(response: Any) -> None:
        seen.append((time.monotonic(), response.status_code, response.headers.get("retry-after-ms")))

    client = openai.OpenAI(
        base_url=gw.url + "/v1",
        api_key=key,
        max_retries=3,
        http_client=openai.DefaultHttpxClient(event_hooks={"response": [on_response]}),
    )
    client.models.list()  # warm the SDK's connection: its first try must follow the last refusal closely
    # Spend the burst until a refusal advertises at least half a second (the bucket refills at 1/s), so the
    # SDK's first try, a few ms later, is refused too.
    while True:
        refused = post(gw, key)
        if refused.status_code == 429:
            if int(refused.headers["retry-after-ms"]) >= 500:
                break
            time.sleep(int(refused.headers["retry-after-ms"]) / 1000)
    seen.clear()
    done = client.chat.completions.create(model="big", messages=MSG, max_tokens=1)  # type: ignore[arg-type]
    client.close()
    assert done.choices
    statuses = [status for _, status, _ in seen]
    assert statuses[0] == 429 and statuses[-1] == 200
    # Each retry came no earlier than the delay the previous 429 advertised (the SDK's own backoff would
    # start at 0.5 s with jitter; the gateway's figure is what it honoured).
    for (when, status, advertised), (next_when, _, _) in itertools.pairwise(seen):
        assert status == 429 and advertised is not None
        assert next_when - when >= int(advertised) / 1000 - 0.01


def test_budget_429_is_not_retried(gw: GatewayProc) -> None:
    key = tenant_with_key(gw.url, gw.admin_key, "broke", budget={"amount": 0.000001, "period": "day"})
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=3)
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="big", messages=MSG, max_tokens=5)  # type: ignore[arg-type]
    assert info.value.code == "insufficient_quota"
    assert info.value.response.headers["x-should-retry"] == "false"
    assert metric(gw, 'gateway_rejections_total{reason="budget",tenant="broke"}') == 1  # one attempt only


def test_budget_downgrades_to_a_smaller_model(gw: GatewayProc) -> None:
    key = tenant_with_key(
        gw.url,
        gw.admin_key,
        "thrifty",
        budget={"amount": 0.000001, "period": "month"},
        on_limit={"budget": "downgrade:small"},
    )
    resp = post(gw, key)
    assert resp.status_code == 200
    assert resp.headers["x-gateway-downgraded-from"] == "big"
    assert resp.json()["model"] == "small"
    event = billing_event(gw, resp.headers["x-request-id"])
    assert event["data"]["model"] == "small" and event["data"]["downgraded_from"] == "big"


def test_tokens_are_refunded_after_a_cancelled_stream(gw: GatewayProc) -> None:
    key = tenant_with_key(gw.url, gw.admin_key, "tpm", limits={"tpm": 6000})
    body = {"model": "big", "messages": MSG, "max_tokens": 1000, "stream": True}
    with httpx.stream(
        "POST", gw.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
    ) as resp:
        assert int(resp.headers["x-ratelimit-remaining-tokens"]) < 5000  # 1000+ reserved
        lines = resp.iter_lines()
        for _ in range(4):
            next(lines)
    time.sleep(0.3)  # the gateway settles the cancelled stream
    after = post(gw, key, max_tokens=10)
    # Without the refund the bucket would hold about 6000 - 1040 - 50 (+ refill); with it, nearly full.
    assert int(after.headers["x-ratelimit-remaining-tokens"]) > 5600


def test_concurrency_cap_and_release(gw: GatewayProc) -> None:
    key = tenant_with_key(gw.url, gw.admin_key, "one-at-a-time", limits={"max_concurrency": 1})
    body = {"model": "big", "messages": MSG, "max_tokens": 150, "stream": True}
    with httpx.stream(
        "POST", gw.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
    ) as resp:
        lines = resp.iter_lines()  # keep the iterator: dropping it closes the stream
        next(lines)
        refused = post(gw, key)
        assert refused.status_code == 429
        assert "concurrent requests" in refused.json()["error"]["message"]
        for _ in lines:
            pass
    assert post(gw, key).status_code == 200  # the lease came back


def test_a_stream_longer_than_the_lease_ttl_keeps_its_concurrency_slot(
    sim: SimHandle, redis_server: RedisServer, tmp_path: Path
) -> None:
    # Leases expire after 1.5 s unless renewed; the stream runs about 4 s (2 ms per token).
    proc = start_gateway({**base_config(sim, redis_server, tmp_path), "lease_ttl_s": 1.5}, tmp_path)
    try:
        key = tenant_with_key(proc.url, proc.admin_key, "long-stream", limits={"max_concurrency": 1})
        body = {"model": "big", "messages": MSG, "max_tokens": 2000, "stream": True}
        statuses = []
        with httpx.stream(
            "POST", proc.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
        ) as resp:
            lines = resp.iter_lines()
            next(lines)
            started = time.monotonic()
            while time.monotonic() - started < 3.0:  # twice the TTL: renewed, never expired
                statuses.append(post(proc, key).status_code)
                time.sleep(0.25)
            for _ in lines:
                pass
        assert statuses and set(statuses) == {429}
        assert post(proc, key).status_code == 200  # released when the stream ended
    finally:
        proc.stop()


async def test_a_burst_with_a_new_key_makes_one_store_read(gw: GatewayProc, redis_server: RedisServer) -> None:
    """500 clients start at once with a key this replica has not seen: one lookup for all of them, not 500
    connections to Redis (which once answered most of such a burst with 503 state_store_unavailable)."""
    import redis.asyncio as aioredis

    key = tenant_with_key(gw.url, gw.admin_key, "burst")
    inspector = aioredis.Redis.from_url(redis_server.url)
    before = (await inspector.info("commandstats")).get("cmdstat_hget", {}).get("calls", 0)
    body = json.dumps({"model": "big", "messages": MSG, "max_tokens": 1}).encode()
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body

    async def one() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(request)
        answer = await reader.read()
        writer.close()
        return answer[:12]

    statuses = await asyncio.gather(*(one() for _ in range(500)))  # raw sockets: truly all at once
    after = (await inspector.info("commandstats"))["cmdstat_hget"]["calls"]
    await inspector.aclose()
    assert statuses.count(b"HTTP/1.1 200") == 500, set(statuses)
    assert after - before <= 10  # the key and its tenant, read once (plus what other tenants did meanwhile)


def test_noisy_neighbour_gets_429s_quiet_tenant_none(gw: GatewayProc) -> None:
    noisy = tenant_with_key(gw.url, gw.admin_key, "noisy", limits={"rpm": 10})
    quiet = tenant_with_key(gw.url, gw.admin_key, "quiet", limits={"rpm": 20})
    noisy_codes, quiet_codes = [], []
    started = time.monotonic()
    for i in range(30):
        noisy_codes.append(post(gw, noisy).status_code)
        if i % 3 == 0:
            quiet_codes.append(post(gw, quiet).status_code)
    # rpm 10 refills one request every 6 s: a slow run may earn the noisy tenant one or two more.
    refilled = int((time.monotonic() - started) // 6)
    assert 10 <= noisy_codes.count(200) <= 10 + refilled and noisy_codes.count(200) + noisy_codes.count(429) == 30
    assert set(quiet_codes) == {200}


# --- the fair queue ---------------------------------------------------------------------------------


@pytest.fixture
def slow_gw(redis_server: RedisServer, tmp_path: Path) -> Iterator[tuple[GatewayProc, SimHandle]]:
    sim = start_sim("--ttft-ms", "1", "--itl-ms", "10", log_dir=tmp_path)
    proc = start_gateway(base_config(sim, None, tmp_path, capacity=1), tmp_path)
    yield proc, sim
    proc.stop()
    sim.stop()


def hold_slot(gw: GatewayProc, key: str, tokens: int, ready: threading.Event) -> None:
    body = {"model": "big", "messages": MSG, "max_tokens": tokens, "stream": True}
    with httpx.stream(
        "POST", gw.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30
    ) as resp:
        for _ in resp.iter_lines():
            ready.set()


def test_queue_full_and_queue_timeout(slow_gw: tuple[GatewayProc, SimHandle]) -> None:
    gw, _ = slow_gw
    key = tenant_with_key(gw.url, gw.admin_key, "queued", limits={"max_queue_depth": 1, "max_queue_wait_ms": 300})
    ready = threading.Event()
    holder = threading.Thread(target=hold_slot, args=(gw, key, 100, ready))
    holder.start()
    assert ready.wait(10)
    results: list[httpx.Response] = []
    waiter = threading.Thread(target=lambda: results.append(post(gw, key)))
    waiter.start()
    deadline = time.monotonic() + 5
    while metric(gw, 'gateway_queued_requests{tenant="queued"}') != 1:  # the waiter is in the queue
        assert time.monotonic() < deadline
        time.sleep(0.01)
    full = post(gw, key)
    assert full.status_code == 429 and "queue" in full.json()["error"]["message"]
    assert int(full.headers["retry-after-ms"]) >= 50
    waiter.join(10)
    timed_out = results[0]
    assert timed_out.status_code == 429 and "waited" in timed_out.json()["error"]["message"]
    holder.join(10)
    assert metric(gw, 'gateway_rejections_total{reason="queue_full",tenant="queued"}') == 1
    assert metric(gw, 'gateway_rejections_total{reason="queue_timeout",tenant="queued"}') == 1


def test_client_leaving_the_queue_leaves_at_once(slow_gw: tuple[GatewayProc, SimHandle]) -> None:
    gw, sim = slow_gw
    key = tenant_with_key(gw.url, gw.admin_key, "leaver")
    ready = threading.Event()
    holder = threading.Thread(target=hold_slot, args=(gw, key, 100, ready))
    holder.start()
    assert ready.wait(10)
    with pytest.raises(httpx.ReadTimeout):
        post_timeout = httpx.post(
            gw.url + "/v1/chat/completions",
            headers={"Authorization": f"Bearer {key}"},
            json={"model": "big", "messages": MSG},
            timeout=0.3,
        )
        del post_timeout
    deadline = time.monotonic() + 2
    while metric(gw, 'gateway_queued_requests{tenant="leaver"}') != 0:
        assert time.monotonic() < deadline, "the abandoned request is still queued"
        time.sleep(0.02)
    before = sim.stats()["requests"]
    holder.join(10)
    time.sleep(0.2)
    assert sim.stats()["requests"] == before  # the abandoned request never reached the backend


# --- Redis failure modes and two replicas -----------------------------------------------------------


def test_two_replicas_share_the_rpm_limit(sim: SimHandle, redis_server: RedisServer, tmp_path: Path) -> None:
    a = start_gateway(base_config(sim, redis_server, tmp_path / "a"), tmp_path / "a")
    b = start_gateway(base_config(sim, redis_server, tmp_path / "b"), tmp_path / "b")
    try:
        key = tenant_with_key(a.url, a.admin_key, "shared-rpm", limits={"rpm": 20})
        started = time.monotonic()
        codes = [post(a if i % 2 else b, key).status_code for i in range(30)]
        # One bucket for both: 20 at once, plus one more for every 3 s the 30 requests took (the bucket
        # refills at rpm / 60 per second; a busy machine can take that long).
        refilled = int((time.monotonic() - started) // 3)
        assert 20 <= codes.count(200) <= 20 + refilled and codes.count(200) + codes.count(429) == 30
    finally:
        a.stop()
        b.stop()


@pytest.mark.parametrize(("mode", "while_down"), [("local", 200), ("open", 200), ("closed", 503)])
def test_redis_killed_and_restarted(sim: SimHandle, tmp_path: Path, mode: str, while_down: int) -> None:
    redis = RedisServer(tmp_path / "redis")
    redis.start(appendonly=True)
    config = {**base_config(sim, redis, tmp_path), "redis_failure_mode": mode, "replicas": 2}
    gw = start_gateway(config, tmp_path)
    try:
        key = tenant_with_key(gw.url, gw.admin_key, "resilient", limits={"rpm": 1000})
        assert post(gw, key).status_code == 200
        redis.kill()
        for _ in range(5):
            start = time.monotonic()
            resp = post(gw, key)
            assert time.monotonic() - start < 5, "a request hung on Redis"
            assert resp.status_code == while_down, resp.text
        assert metric(gw, f'gateway_redis_degraded{{mode="{mode}"}}') == 1
        redis.start(appendonly=True)
        deadline = time.monotonic() + 10
        # Recovery needs no restart: the next requests find Redis again.
        while post(gw, key).status_code != 200 or metric(gw, f'gateway_redis_degraded{{mode="{mode}"}}') != 0:
            assert time.monotonic() < deadline, gw.output()[-3000:]
            time.sleep(0.2)
        assert f"failure mode '{mode}'" in gw.output()
    finally:
        gw.stop()
        redis.kill()


def test_usage_per_tenant_and_key(gw: GatewayProc) -> None:
    key1 = tenant_with_key(gw.url, gw.admin_key, "metered")
    key2 = httpx.post(
        gw.url + "/admin/tenants/metered/keys",
        json={"name": "two"},
        headers={"Authorization": f"Bearer {gw.admin_key}"},
    ).json()
    for _ in range(3):
        assert post(gw, key1, max_tokens=4).status_code == 200
    for _ in range(2):
        assert post(gw, key2["key"], max_tokens=6).status_code == 200
    admin = {"Authorization": f"Bearer {gw.admin_key}"}
    deadline = time.monotonic() + 10
    while True:
        report = httpx.get(gw.url + "/admin/tenants/metered/usage", headers=admin).json()
        if report["requests"] == 5:
            break
        assert time.monotonic() < deadline, report
        time.sleep(0.1)
    assert report["tokens"]["completion"] == 3 * 4 + 2 * 6
    assert report["tokens"]["prompt"] > 0 and report["spend"]["USD"] > 0
    by_key = {k["key_id"]: k for k in report["by_key"]}
    assert by_key[key2["id"]]["requests"] == 2 and by_key[key2["id"]]["tokens"]["completion"] == 12
    one = httpx.get(gw.url + f"/admin/keys/{key2['id']}/usage", headers=admin).json()
    assert one["requests"] == 2
    past = httpx.get(
        gw.url + "/admin/tenants/metered/usage",
        params={"until": "2020-01-01T00:00:00Z", "since": "2019-01-01T00:00:00Z"},
        headers=admin,
    ).json()
    assert past["requests"] == 0
    bad = httpx.get(gw.url + "/admin/tenants/metered/usage", params={"since": "yesterday"}, headers=admin)
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "since"


async def test_refreshed_principals_of_one_key_are_not_kept_alive() -> None:
    """The authenticator makes a new principal for a key every time its cache entry refreshes; the quota
    scopes memo kept each one (about 6 KB) until 4,096 had piled up: the soak run's RSS crept up by
    0.17 MB/min with two busy keys. Only the latest principal of a key may stay."""
    settings = Settings.model_validate(
        {
            "backends": [{"name": "sim", "kind": "openai", "url": "http://127.0.0.1:9"}],
            "models": [{"name": "m", "backends": ["sim"]}],
        }
    )
    metrics = Metrics()
    quotas = LocalQuotaStore()
    admission = Admission(settings=settings, quotas=quotas, metrics=metrics, worst_cost=lambda *_: 0.0)
    backends = BackendPool(settings, metrics)
    for endpoint in backends.backends["sim"].endpoints.values():
        endpoint.healthy = True
    admission.reconfigure(settings, backends)
    await quotas.set_capacity("sim", {"http://127.0.0.1:9": 4})
    model = settings.models[0]
    request = parse_request("chat", b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}', 1000)
    tenant = Tenant(id="t", limits=Quotas(rpm=10**9, tpm=10**12)).model_dump_json()
    key = KeyRecord(
        id="key_1", tenant_id="t", secret_hash="0" * 64, prefix="sk-gw-xxxx", created_at=0
    ).model_dump_json()

    async def never() -> dict[str, str]:
        raise AssertionError("a free slot is taken without waiting")

    async def one_refresh() -> None:
        # What Authenticator._load builds from the store on every refresh.
        principal = Principal(tenant=Tenant.model_validate_json(tenant), key=KeyRecord.model_validate_json(key))
        placement = await admission.place(principal, request, model, receive=never)
        await admission.settle(placement, prompt_tokens=10, completion_tokens=10, cost=0.0)

    for _ in range(50):
        await one_refresh()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(2000):
            await one_refresh()
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 1_000_000, grown  # was about 13 MB
