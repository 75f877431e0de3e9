"""One fair queue across gateway replicas, sized by the engine's own load.

Two (and three) gateway processes with the same config share one real redis-server and front one simulated
engine that runs 4 requests at a time. The config says `capacity: 16` (as an operator would copy it to
every pod); the engine's own metrics must bring what all replicas together send it down to what it runs,
so that requests wait in the gateway's fair queue and not inside the engine, whatever replica a client
talks to. These are behaviour checks with loose bounds; loadtests/bench_scaleout.py measures the figures.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.support.admin import tenant_with_key
from tests.support.gateway import GatewayProc, start_gateway
from tests.support.redis_server import RedisServer
from tests.support.sim import SimHandle, start_sim

MSG = [{"role": "user", "content": "hello"}]
SLOTS = 4


@pytest.fixture(scope="module")
def redis_srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis-scaleout"))
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimHandle]:
    handle = start_sim(
        "--ttft-ms", "1", "--itl-ms", "5", "--max-concurrency", str(SLOTS),
        log_dir=tmp_path_factory.mktemp("sim-scaleout"),
    )  # fmt: skip
    yield handle
    handle.stop()


def config(redis_srv: RedisServer, engine: SimHandle, **extra: Any) -> dict[str, Any]:
    return {
        "redis_url": redis_srv.url,
        "lease_ttl_s": 3,
        "capacity": {"interval_s": 0.1},
        "backends": [{"name": "engine", "kind": "vllm", "url": engine.url, "capacity": 16}],
        "models": [{"name": "m", "backends": ["engine"]}],
        **extra,
    }


@pytest.fixture(scope="module")
def replicas(
    redis_srv: RedisServer, engine: SimHandle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[GatewayProc]]:
    procs = [start_gateway(config(redis_srv, engine), tmp_path_factory.mktemp(f"replica{i}")) for i in range(2)]
    yield procs
    for proc in procs:
        proc.stop()


class Load:
    """Closed-loop clients, each pinned to one replica, counting the tokens each tenant was served."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.served: Counter[str] = Counter()
        self.errors: Counter[int] = Counter()
        self.cut = 0  # clients whose replica went away (they stop)
        self.threads: list[threading.Thread] = []

    def client(self, gw: GatewayProc, key: str, tenant: str, tokens: int = 20) -> None:
        def run() -> None:
            with httpx.Client(timeout=60) as http:
                while not self.stop.is_set():
                    try:
                        resp = http.post(
                            gw.url + "/v1/chat/completions",
                            headers={"Authorization": f"Bearer {key}"},
                            json={"model": "m", "messages": MSG, "max_tokens": tokens},
                        )
                    except httpx.TransportError:
                        self.cut += 1
                        return
                    if resp.status_code == 200:
                        self.served[tenant] += resp.json()["usage"]["completion_tokens"]
                    else:
                        self.errors[resp.status_code] += 1

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self.threads.append(thread)

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)


def engine_sums(engine: SimHandle, first: str, second: str) -> tuple[float, float]:
    """Two of the engine's own series, each summed over its label sets."""
    sums = {first: 0.0, second: 0.0}
    for line in httpx.get(engine.url + "/metrics").text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in sums:
            sums[name] += float(line.rsplit(" ", 1)[1])
    return sums[first], sums[second]


def engine_gauges(engine: SimHandle) -> tuple[float, float]:
    """The engine's running and waiting requests."""
    return engine_sums(engine, "vllm:num_requests_running", "vllm:num_requests_waiting")


def sample_engine(engine: SimHandle, seconds: float) -> tuple[list[float], list[float]]:
    running, waiting = [], []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        r, w = engine_gauges(engine)
        running.append(r)
        waiting.append(w)
        time.sleep(0.05)
    return running, waiting


def test_the_engine_not_the_config_sets_what_all_replicas_send(replicas: list[GatewayProc], engine: SimHandle) -> None:
    keys = [tenant_with_key(replicas[0].url, replicas[0].admin_key, f"spread{i}") for i in range(2)]
    load = Load()
    for i in range(12):  # 12 clients over 2 replicas, 16 allowed by each replica's config, 4 engine slots
        load.client(replicas[i % 2], keys[i % 2], f"spread{i % 2}")
    try:
        time.sleep(1.0)  # the control needs a few readings to find the engine's size
        running, waiting = sample_engine(engine, 3.0)
    finally:
        load.finish()
    assert not load.errors, load.errors
    # The engine runs its 4 and hardly anything waits inside it: the queue is in the gateway.
    assert statistics.mean(waiting) <= 1.0, statistics.mean(waiting)
    assert statistics.mean(running) >= SLOTS * 0.85, statistics.mean(running)
    limit = [
        line for line in httpx.get(replicas[0].url + "/metrics").text.splitlines()
        if line.startswith("gateway_capacity_limit{")
    ]  # fmt: skip
    # The engine's size, or one above it while the control probes whether the engine grew.
    assert limit and float(limit[0].rsplit(" ", 1)[1]) in (SLOTS, SLOTS + 1), limit


def test_weights_hold_across_replicas_with_clients_pinned(replicas: list[GatewayProc], engine: SimHandle) -> None:
    a, b = replicas
    light = tenant_with_key(a.url, a.admin_key, "light", weight=1)
    heavy = tenant_with_key(a.url, a.admin_key, "heavy", weight=3)
    load = Load()
    for _ in range(8):
        load.client(a, light, "light")  # every light client on replica a
        load.client(b, heavy, "heavy")  # every heavy client on replica b
    try:
        time.sleep(1.0)
        before = Counter(load.served)
        time.sleep(5.0)
        during = Counter(load.served)
    finally:
        load.finish()
    light_tokens = during["light"] - before["light"]
    heavy_tokens = during["heavy"] - before["heavy"]
    share = heavy_tokens / (heavy_tokens + light_tokens)
    assert 0.65 <= share <= 0.85, (heavy_tokens, light_tokens)  # entitled to 0.75


def test_a_lone_tenant_gets_the_whole_engine_from_one_replica(replicas: list[GatewayProc], engine: SimHandle) -> None:
    key = tenant_with_key(replicas[1].url, replicas[1].admin_key, "alone")
    load = Load()
    for _ in range(8):
        load.client(replicas[1], key, "alone")
    try:
        time.sleep(1.0)
        running, waiting = sample_engine(engine, 2.0)
    finally:
        load.finish()
    assert statistics.mean(running) >= SLOTS * 0.85 and statistics.mean(waiting) <= 1.0


def test_a_killed_replica_gives_its_permits_back_within_a_lease(
    replicas: list[GatewayProc], redis_srv: RedisServer, engine: SimHandle, tmp_path: Path
) -> None:
    doomed = start_gateway(config(redis_srv, engine), tmp_path)
    key = tenant_with_key(doomed.url, doomed.admin_key, "doomed")
    permits = redis.Redis.from_url(redis_srv.url)
    streams = []

    def hold() -> None:
        with contextlib.suppress(httpx.HTTPError):  # cut when the replica is killed
            httpx.post(
                doomed.url + "/v1/chat/completions",
                headers={"Authorization": f"Bearer {key}"},
                json={"model": "m", "messages": MSG, "max_tokens": 5000, "stream": True},
                timeout=60,
            )

    try:
        for _ in range(3):  # long streams that hold permits
            thread = threading.Thread(target=hold, daemon=True)
            thread.start()
            streams.append(thread)
        deadline = time.monotonic() + 10
        while permits.zcard("gw:pool:{engine}:permits") < 3:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert doomed.proc.popen is not None
        os.kill(doomed.proc.popen.pid, signal.SIGKILL)
        killed = time.monotonic()
        # The survivors' next requests purge the expired permits once their lease (3 s) is over.
        other = tenant_with_key(replicas[0].url, replicas[0].admin_key, "survivor")
        while permits.zcard("gw:pool:{engine}:permits") > 0:
            httpx.post(
                replicas[0].url + "/v1/chat/completions",
                headers={"Authorization": f"Bearer {other}"},
                json={"model": "m", "messages": MSG, "max_tokens": 1},
                timeout=30,
            )
            assert time.monotonic() - killed < 3 + 2, "the dead replica's permits did not come back"
            time.sleep(0.1)
    finally:
        doomed.stop()
        permits.close()


def test_permits_granted_to_a_dead_replicas_waiting_requests_come_back_at_once(
    replicas: list[GatewayProc], redis_srv: RedisServer, engine: SimHandle, tmp_path: Path
) -> None:
    # A killed replica's waiting requests stay in the shared queue until its beat expires, with the lowest
    # counters (their tenant is served no more), so free permits keep going to them, onto a grant list nobody
    # pops. Each must be leased for moments, not for the lease its request asked for (30 s here): otherwise
    # the engine idles that long while the other replicas' tenants wait.
    doomed = start_gateway(config(redis_srv, engine, lease_ttl_s=30), tmp_path)
    doomed_key = tenant_with_key(doomed.url, doomed.admin_key, "doomed-waiting")
    live_key = tenant_with_key(replicas[0].url, replicas[0].admin_key, "live-waiting")
    store = redis.Redis.from_url(redis_srv.url)
    load = Load()
    for _ in range(8):  # 8 clients each, 4 engine slots: both tenants have requests waiting
        load.client(doomed, doomed_key, "doomed-waiting")
        load.client(replicas[0], live_key, "live-waiting")
    try:
        time.sleep(1.5)
        assert doomed.proc.popen is not None
        pid = doomed.proc.popen.pid
        replica = next(r.decode() for r in store.zrange("gw:replicas", 0, -1) if f"-{pid}-" in r.decode())
        os.killpg(pid, signal.SIGKILL)
        killed = time.monotonic()
        granted: dict[bytes, float] = {}
        while time.monotonic() - killed < 4.0:
            for member in store.lrange(f"gw:grants:{replica}", 0, -1):
                expiry = store.zscore("gw:pool:{engine}:permits", member)
                if expiry is not None:
                    granted[member] = max(granted.get(member, 0.0), expiry - time.time())
            time.sleep(0.05)
    finally:
        load.finish()
        doomed.stop()
        store.close()
    assert granted, "no permit was granted to the dead replica's waiting requests: nothing was tested"
    assert max(granted.values()) <= 2.5, granted
    assert not load.errors, load.errors


def engine_queue_time(engine: SimHandle) -> tuple[float, float]:
    """The engine's own queue-time histogram: (sum of seconds, requests)."""
    return engine_sums(engine, "vllm:request_queue_time_seconds_sum", "vllm:request_queue_time_seconds_count")


def test_a_wait_inside_the_engine_is_part_of_the_tenants_queue_wait(
    redis_srv: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # A fixed capacity of 16 over an engine that runs 4: the gateway holds nothing back, and requests wait
    # inside the engine instead, first come first served. The wait the tenant sees must say so.
    workdir = tmp_path_factory.mktemp("engine-wait")
    sim = start_sim("--ttft-ms", "1", "--itl-ms", "5", "--max-concurrency", str(SLOTS), log_dir=workdir)
    billing = workdir / "billing.jsonl"
    cfg = config(redis_srv, sim, billing={"sinks": [{"kind": "jsonl", "path": str(billing)}]})
    # A pool of its own: the module's replicas share this Redis, and a pool's limits are written by its leader.
    cfg["backends"][0].update(name="fixed", capacity_mode="fixed")
    cfg["models"][0]["backends"] = ["fixed"]
    gw = start_gateway(cfg, workdir / "gw")
    try:
        key = tenant_with_key(gw.url, gw.admin_key, "engineq")
        before = engine_queue_time(sim)
        load = Load()
        for _ in range(3 * SLOTS):
            load.client(gw, key, "engineq", tokens=40)
        time.sleep(4)
        load.finish()
        after = engine_queue_time(sim)
        metrics = httpx.get(gw.url + "/metrics").text
    finally:
        gw.stop()
        sim.stop()
    assert not load.errors, load.errors
    engine_mean = (after[0] - before[0]) / (after[1] - before[1])
    assert engine_mean > 0.1, f"nothing waited inside the engine ({engine_mean:.3f} s): nothing was tested"

    def sample(name: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith(name))

    waits = sample('gateway_queue_wait_seconds_sum{model="m",tenant="engineq"}')
    waited = sample('gateway_queue_wait_seconds_count{model="m",tenant="engineq"}')
    seen = waits / waited
    # The capacity never bound, so all of that is the engine's: about what the engine itself counted.
    assert 0.5 * engine_mean <= seen <= 2 * engine_mean, (seen, engine_mean)
    events = [json.loads(line)["data"]["timings"] for line in billing.read_text().splitlines()]
    assert len(events) >= waited - 1  # the last events may still be on their way to the file
    late = events[len(events) // 4 :]  # after the first readings of the engine
    assert all(t["queue_ms"] >= t["engine_queue_ms"] >= 0 for t in events), events
    billed = statistics.mean(t["engine_queue_ms"] for t in late) / 1000
    assert 0.5 * engine_mean <= billed <= 2 * engine_mean, (billed, engine_mean)
