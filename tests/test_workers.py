"""`gateway serve --workers N` without Redis: each worker takes capacity / N of every backend, /metrics on any worker
reports all workers, billing stays one event per request, and a killed worker's in-flight gauges go."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.admin import tenant_with_key
from tests.support.gateway import GatewayProc, start_gateway
from tests.support.prometheus import promtool
from tests.support.sim import SimHandle, start_sim

MSG = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimHandle]:
    handle = start_sim("--ttft-ms", "1", "--itl-ms", "5", log_dir=tmp_path_factory.mktemp("sim-workers"))
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def gw(sim: SimHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProc]:
    workdir = tmp_path_factory.mktemp("gw-workers")
    config = {
        "backends": [{"name": "sim", "kind": "vllm", "url": sim.url, "capacity": 4}],
        "models": [{"name": "m", "backends": ["sim"], "price": {"input_per_1k": 1.0, "output_per_1k": 1.0}}],
        "billing": {"sinks": [{"kind": "jsonl", "path": str(workdir / "billing.jsonl")}]},
    }
    proc = start_gateway(config, workdir, extra_args=("--workers", "2"))
    yield proc
    proc.stop()


def worker_pids(gw: GatewayProc) -> set[int]:
    assert gw.proc.popen is not None
    out = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(gw.proc.popen.pid)], capture_output=True, text=True, check=False
    ).stdout
    # uvicorn's spawned workers (and the resource tracker multiprocessing starts): the ones serving HTTP
    # are those that have the gateway's listening socket.
    return {int(p) for p in out.split()}


def scrape(gw: GatewayProc, name: str, **labels: str) -> float:
    total = 0.0
    pattern = re.compile(rf"^{re.escape(name)}\{{(.*)\}} (\S+)$")
    for line in httpx.get(gw.url + "/metrics", headers={"connection": "close"}).text.splitlines():
        m = pattern.match(line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            total += float(m.group(2))
    return total


def test_each_worker_gets_its_share_of_backend_capacity(gw: GatewayProc, sim: SimHandle) -> None:
    key = tenant_with_key(gw.url, gw.admin_key, "share")
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, sim.stats()["active"])
            time.sleep(0.01)

    def stream() -> None:
        # A new connection each: the kernel spreads them over both workers.
        with openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0) as client:
            for _ in client.chat.completions.create(model="m", messages=MSG, max_tokens=60, stream=True):
                pass

    sampler = threading.Thread(target=sample)
    sampler.start()
    threads = [threading.Thread(target=stream) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    sampler.join()
    # Capacity 4 over 2 workers: 2 each. Without the split each worker would send 4, up to 8 at once.
    assert 2 <= peak <= 4


def test_metrics_and_billing_add_up_over_workers(gw: GatewayProc) -> None:
    key = tenant_with_key(gw.url, gw.admin_key, "counted")
    ids = []
    for _ in range(40):
        # A new connection per request spreads them over the workers.
        with openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0) as client:
            raw = client.chat.completions.with_raw_response.create(model="m", messages=MSG, max_tokens=2)
            ids.append(raw.headers["x-request-id"])
    # Every scrape, whichever worker answers it, reports all 40.
    for _ in range(6):
        assert scrape(gw, "gateway_requests_total", tenant="counted", status="200") == 40
        assert scrape(gw, "gateway_request_duration_seconds_count", tenant="counted") == 40
    exposition = httpx.get(gw.url + "/metrics").text
    lint = subprocess.run([promtool(), "check", "metrics"], input=exposition, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    billing = gw.config_path.parent / "billing.jsonl"
    deadline = time.monotonic() + 10
    while True:
        events = [json.loads(line) for line in billing.read_text().splitlines()] if billing.exists() else []
        mine = [e["data"]["request_id"] for e in events if e["subject"] == "counted"]
        if len(mine) >= 40 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert sorted(mine) == sorted(ids)  # one event per request, none twice


def test_a_killed_workers_in_flight_requests_leave_the_gauge(gw: GatewayProc, sim: SimHandle) -> None:
    key = tenant_with_key(gw.url, gw.admin_key, "crash")
    before = worker_pids(gw)
    results: list[BaseException | None] = []

    def stream() -> None:
        try:
            with openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0) as client:
                for _ in client.chat.completions.create(model="m", messages=MSG, max_tokens=2000, stream=True):
                    pass
            results.append(None)
        except Exception as exc:
            results.append(exc)

    threads = [threading.Thread(target=stream) for _ in range(4)]
    for t in threads:
        t.start()

    def held() -> float:
        # At a backend or waiting for one: with 2 slots per worker, a third stream that the kernel hands
        # to the same worker queues.
        return scrape(gw, "gateway_inflight_requests", tenant="crash") + scrape(
            gw, "gateway_queued_requests", tenant="crash"
        )

    deadline = time.monotonic() + 10
    while held() < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert held() == 4
    for pid in before:
        os.kill(pid, signal.SIGKILL)  # every worker: all four streams die with them
    for t in threads:
        t.join(30)
    assert len(results) == 4 and all(r is not None for r in results)
    # The supervisor starts new workers; the dead ones' in-flight requests are not counted any more.
    deadline = time.monotonic() + 20
    value = None
    while time.monotonic() < deadline:
        try:
            value = held()
            if value == 0:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    assert value == 0
    assert worker_pids(gw).isdisjoint(before)


def test_workers_flag_is_validated(tmp_path: Path) -> None:
    from tests.support.procs import python_cmd

    out = subprocess.run(
        python_cmd("serve", "--workers", "0"), capture_output=True, text=True, cwd=tmp_path, check=False
    )
    assert out.returncode == 2 and "--workers" in out.stderr
