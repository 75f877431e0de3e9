"""Hot reload with SIGHUP: a new backend takes effect without a dropped request; a bad config is refused."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.support.admin import tenant_with_key
from tests.support.gateway import GatewayProc, start_gateway
from tests.support.sim import SimHandle, start_sim


@pytest.fixture(scope="module")
def sims(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SimHandle, SimHandle]]:
    log_dir = tmp_path_factory.mktemp("sims-reload")
    one = start_sim("--ttft-ms", "1", "--itl-ms", "1", log_dir=log_dir)
    two = start_sim("--ttft-ms", "1", "--itl-ms", "1", log_dir=log_dir)
    yield one, two
    one.stop()
    two.stop()


def rewrite(gw: GatewayProc, change: dict[str, Any]) -> None:
    config = yaml.safe_load(gw.config_path.read_text())
    config.update(change)
    gw.config_path.write_text(yaml.safe_dump(config))
    gw.proc.signal(signal.SIGHUP)


def test_sighup_adds_a_backend_without_dropping_requests(sims: tuple[SimHandle, SimHandle], tmp_path: Path) -> None:
    one, two = sims
    gw = start_gateway(
        {"backends": [{"name": "one", "kind": "vllm", "url": one.url}], "models": [{"name": "m", "backends": ["one"]}]},
        tmp_path,
    )
    key = tenant_with_key(gw.url, gw.admin_key, "t")
    statuses: list[int] = []
    stop = threading.Event()

    def load() -> None:
        body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 20, "stream": True}
        with httpx.Client(headers={"Authorization": f"Bearer {key}"}, timeout=10) as client:
            while not stop.is_set():
                with client.stream("POST", gw.url + "/v1/chat/completions", json=body) as resp:
                    text = "".join(resp.iter_text())
                    statuses.append(resp.status_code if text.rstrip().endswith("[DONE]") else -1)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.3)
        before = two.stats()["requests"]
        rewrite(
            gw,
            {
                "backends": [
                    {"name": "one", "kind": "vllm", "url": one.url},
                    {"name": "two", "kind": "vllm", "url": two.url},
                ],
                "models": [{"name": "m", "backends": ["two"]}, {"name": "m-old", "backends": ["one"]}],
            },
        )
        deadline = time.monotonic() + 5
        while two.stats()["requests"] == before:
            assert time.monotonic() < deadline, gw.output()
            time.sleep(0.02)
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert statuses and set(statuses) == {200}, f"dropped or failed requests during reload: {statuses}"
    models = httpx.get(gw.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).json()
    assert {m["id"] for m in models["data"]} == {"m", "m-old"}
    assert "config reloaded" in gw.output()
    gw.stop()


def test_invalid_config_is_refused_and_the_old_one_stays(sims: tuple[SimHandle, SimHandle], tmp_path: Path) -> None:
    one, _ = sims
    gw = start_gateway(
        {"backends": [{"name": "one", "kind": "vllm", "url": one.url}], "models": [{"name": "m", "backends": ["one"]}]},
        tmp_path,
    )
    key = tenant_with_key(gw.url, gw.admin_key, "t")
    rewrite(gw, {"backends": [{"name": "one", "kind": "vlm", "url": one.url}]})
    deadline = time.monotonic() + 5
    while "reload refused" not in gw.output():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert "backends[0].kind" in gw.output()
    resp = httpx.post(
        gw.url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "m", "messages": [{"role": "user", "content": "x"}]},
    )
    assert resp.status_code == 200
    gw.stop()
