"""Graceful shutdown with a real process and a real SIGTERM while a stream is in flight."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.admin import tenant_with_key
from tests.support.gateway import GatewayProc, start_gateway
from tests.support.sim import SimHandle, start_sim


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimHandle]:
    handle = start_sim("--ttft-ms", "5", "--itl-ms", "20", log_dir=tmp_path_factory.mktemp("sim-shutdown"))
    yield handle
    handle.stop()


def start(sim: SimHandle, workdir: Path, grace_s: float) -> tuple[GatewayProc, str]:
    config: dict[str, Any] = {
        "backends": [{"name": "sim", "kind": "vllm", "url": sim.url}],
        "models": [{"name": "m", "backends": ["sim"]}],
        "billing": {"sinks": [{"kind": "jsonl", "path": str(workdir / "billing.jsonl")}]},
        "shutdown_drain_s": 0.5,
        "shutdown_grace_s": grace_s,
    }
    gw = start_gateway(config, workdir)
    return gw, tenant_with_key(gw.url, gw.admin_key, "t")


def stream_in_thread(gw: GatewayProc, key: str, max_tokens: int, lines: list[str], started: threading.Event) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens, "stream": True}
    with httpx.stream(
        "POST", gw.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30
    ) as resp:
        for line in resp.iter_lines():
            if line:
                lines.append(line)
                started.set()


def events(workdir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (workdir / "billing.jsonl").read_text().splitlines()]


def test_sigterm_lets_the_stream_finish_and_bills_it(sim: SimHandle, tmp_path: Path) -> None:
    gw, key = start(sim, tmp_path, grace_s=20)
    lines: list[str] = []
    started = threading.Event()
    reader = threading.Thread(target=stream_in_thread, args=(gw, key, 60, lines, started))
    reader.start()
    assert started.wait(10)
    gw.proc.signal(signal.SIGTERM)
    time.sleep(0.1)
    # Draining: not ready any more, but still answering while the load balancer notices.
    assert httpx.get(gw.url + "/readyz").status_code == 503
    reader.join(20)
    assert gw.proc.popen is not None
    assert gw.proc.popen.wait(20) == 0, gw.output()
    assert lines[-1] == "data: [DONE]"
    assert sum(1 for line in lines if '"content"' in line) >= 60
    (event,) = events(tmp_path)
    assert event["data"]["stream"] is True and event["data"]["partial"] is False
    assert event["data"]["completion_tokens"] == 60


def test_stream_past_the_grace_period_ends_with_an_error_event(sim: SimHandle, tmp_path: Path) -> None:
    gw, key = start(sim, tmp_path, grace_s=0.5)
    lines: list[str] = []
    started = threading.Event()
    reader = threading.Thread(target=stream_in_thread, args=(gw, key, 500, lines, started))
    reader.start()
    assert started.wait(10)
    gw.proc.signal(signal.SIGTERM)
    reader.join(20)
    assert gw.proc.popen is not None
    assert gw.proc.popen.wait(20) == 0, gw.output()
    assert "shutting down" in lines[-1] and lines[-1].startswith('data: {"error"')
    (event,) = events(tmp_path)
    assert event["data"]["partial"] is True and event["data"]["status"] == 503
    assert 0 < event["data"]["completion_tokens"] < 500
