"""Faults caused for real: a backend that hangs, and a replica SIGKILLed while it holds
concurrency leases. Each test checks that what the failed request held (its fair-queue slot, its
concurrency lease in Redis) comes back, so the next request is served."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.admin import tenant_with_key
from tests.support.gateway import GatewayProc, start_gateway
from tests.support.redis_server import RedisServer
from tests.support.sim import SimHandle, start_sim

MSG = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimHandle]:
    handle = start_sim("--ttft-ms", "1", "--itl-ms", "20", log_dir=tmp_path_factory.mktemp("sim-faults"))
    yield handle
    handle.stop()


def chat(gw: GatewayProc, key: str, timeout: float = 30, **body: object) -> httpx.Response:
    return httpx.post(
        gw.url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "m", "messages": MSG, "max_tokens": 2, **body},
        timeout=timeout,
    )


def test_a_hanging_backend_times_out_and_gives_back_its_slot_and_lease(
    sim: SimHandle, redis_server: RedisServer, tmp_path: Path
) -> None:
    # One slot of backend capacity, one concurrent request for the tenant, a 1 s read timeout.
    config = {
        "redis_url": redis_server.url,
        "backends": [{"name": "sim", "kind": "vllm", "url": sim.url, "capacity": 1}],
        "models": [{"name": "m", "backends": ["sim"]}],
        "limits": {"read_timeout_s": 1.0},
    }
    gw = start_gateway(config, tmp_path)
    try:
        key = tenant_with_key(gw.url, gw.admin_key, "hung", limits={"max_concurrency": 1})
        sim.set_faults("hang", count=1)
        started = time.monotonic()
        hung = chat(gw, key)
        assert hung.status_code == 502, hung.text
        assert hung.json()["error"]["type"] == "server_error"
        assert time.monotonic() - started < 10
        assert "127.0.0.1" not in hung.text  # no backend address in the answer
        # Both the capacity slot and the concurrency lease came back: the next request is served at once.
        assert chat(gw, key, timeout=5).status_code == 200
        stream = chat(gw, key, timeout=5, stream=True)
        assert stream.status_code == 200
    finally:
        sim.set_faults("none")
        gw.stop()


def test_a_killed_replicas_leases_expire_and_the_other_replica_gets_the_capacity_back(
    sim: SimHandle, redis_server: RedisServer, tmp_path: Path
) -> None:
    config = {
        "redis_url": redis_server.url,
        "lease_ttl_s": 2.0,
        "backends": [{"name": "sim", "kind": "vllm", "url": sim.url}],
        "models": [{"name": "m", "backends": ["sim"]}],
    }
    a = start_gateway(config, tmp_path / "a")
    b = start_gateway(config, tmp_path / "b")
    try:
        key = tenant_with_key(a.url, a.admin_key, "leased", limits={"max_concurrency": 2})
        opened = threading.Barrier(3)

        def hold() -> None:
            with httpx.stream(
                "POST",
                a.url + "/v1/chat/completions",
                json={"model": "m", "messages": MSG, "max_tokens": 5000, "stream": True},
                headers={"Authorization": f"Bearer {key}"},
                timeout=60,
            ) as resp:
                lines = resp.iter_lines()
                next(lines)
                opened.wait()
                try:
                    for _ in lines:
                        pass
                except httpx.HTTPError:
                    pass  # replica A dies under it

        holders = [threading.Thread(target=hold) for _ in range(2)]
        for t in holders:
            t.start()
        opened.wait(timeout=20)
        assert chat(b, key).status_code == 429  # both of the tenant's slots are held on A
        assert a.proc.popen is not None
        os.kill(a.proc.popen.pid, signal.SIGKILL)  # no settle, no goodbye: only the leases' TTL helps
        killed = time.monotonic()
        status = 429
        while status == 429 and time.monotonic() - killed < 10:
            time.sleep(0.1)
            status = chat(b, key).status_code
        recovered = time.monotonic() - killed
        assert status == 200
        assert recovered < 2.0 + 1.5  # within the lease TTL (plus polling slack)
        for t in holders:
            t.join(10)
    finally:
        a.proc.kill()
        b.stop()
