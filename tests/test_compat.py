"""Compatibility with the clients people use: the official Node SDK (from npm) and curl, against the
gateway on loopback. (The Python SDK, sync, async, streaming and with_raw_response, is all over the suite.)"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.admin import tenant_with_key
from tests.support.gateway import GatewayProc, start_gateway
from tests.support.sim import SimHandle, start_sim

NODE_DIR = Path(__file__).parent / "node"


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimHandle]:
    handle = start_sim("--ttft-ms", "1", "--itl-ms", "1", log_dir=tmp_path_factory.mktemp("sim-compat"))
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def gw(sim: SimHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProc]:
    config = {
        "backends": [{"name": "sim", "kind": "vllm", "url": sim.url}],
        "models": [{"name": "chat-model", "backends": ["sim"]}],
    }
    proc = start_gateway(config, tmp_path_factory.mktemp("gw-compat"))
    yield proc
    proc.stop()


def test_node_sdk(gw: GatewayProc) -> None:
    node, npm = shutil.which("node"), shutil.which("npm")
    assert node and npm, "Node.js and npm are needed for the Node SDK compatibility test"
    if not (NODE_DIR / "node_modules" / "openai").exists():
        subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--silent"], cwd=NODE_DIR, check=True, timeout=300)
    key = tenant_with_key(gw.url, gw.admin_key, "node")
    # One request every 10 s: the SDK's first try is refused even if Node takes seconds to start on a busy
    # machine, and its retry after the advertised delay (at most 10 s) passes.
    limited = tenant_with_key(gw.url, gw.admin_key, "node-limited", limits={"rpm": 6})
    # Spend the limited key's burst so the SDK's first try is refused and it must retry.
    while True:
        resp = httpx.post(
            gw.url + "/v1/chat/completions",
            headers={"Authorization": f"Bearer {limited}"},
            json={"model": "chat-model", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1},
        )
        if resp.status_code == 429:
            if int(resp.headers["retry-after-ms"]) >= 7000:
                break
            time.sleep(int(resp.headers["retry-after-ms"]) / 1000)
    result = subprocess.run(
        [node, "compat.mjs", gw.url + "/v1", key, limited], cwd=NODE_DIR, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["chat"] and found["usage"] == 3
    assert found["stream_chunks"] >= 5 and found["stream_text"].strip()
    assert found["not_found"] is True and found["not_found_code"] == "model_not_found"
    assert found["auth_error"] is True
    assert found["retried_ok"] is True
    assert found["first_429_retry_after_ms"] and found["first_429_retry_after_ms"] > 0
    assert found["retry_elapsed_ms"] >= found["first_429_retry_after_ms"] - 50


def test_curl(gw: GatewayProc) -> None:
    curl = shutil.which("curl")
    assert curl, "curl is needed"
    key = tenant_with_key(gw.url, gw.admin_key, "curl")
    body = json.dumps({"model": "chat-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    plain = subprocess.run(
        [
            curl,
            "-si",
            gw.url + "/v1/chat/completions",
            "-H",
            f"Authorization: Bearer {key}",
            "-H",
            "Content-Type: application/json",
            "-d",
            body,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    head, _, payload = plain.partition("\n\n")  # text mode turned CRLF into LF
    assert head.startswith("HTTP/1.1 200") and "x-request-id: req_" in head
    assert json.loads(payload)["usage"]["completion_tokens"] == 2
    streamed = subprocess.run(
        [
            curl,
            "-sN",
            gw.url + "/v1/chat/completions",
            "-H",
            f"Authorization: Bearer {key}",
            "-H",
            "Content-Type: application/json",
            "-d",
            body.replace('"max_tokens": 2', '"max_tokens": 3, "stream": true'),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    events = [line for line in streamed.splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) >= 4


@pytest.mark.providers
def test_litellm_as_a_client(gw: GatewayProc) -> None:
    """litellm.completion with the gateway as api_base: unary, stream, a wrong key, a rate limit."""
    import sys

    key = tenant_with_key(gw.url, gw.admin_key, "litellm-client")
    limited = tenant_with_key(gw.url, gw.admin_key, "litellm-limited", limits={"rpm": 1})
    spend = httpx.post(
        gw.url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {limited}"},
        json={"model": "chat-model", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1},
    )
    assert spend.status_code == 200  # the one request of its minute
    result = subprocess.run(
        [sys.executable, "-m", "tests.support.litellm_client", gw.url + "/v1", key, limited],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parent.parent,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["content"] and seen["usage"] == 5
    assert seen["stream"]
    assert seen["bad_key"] == "AuthenticationError 401"
    assert seen["limited"] == "RateLimitError 429"
