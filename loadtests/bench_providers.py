"""What a hosted-provider request costs the gateway, next to a vLLM one, and what litellm costs at start-up.

    .venv/bin/python -m loadtests.bench_providers              # needs the `providers` extra
    .venv/bin/python -m loadtests.bench_providers --requests 1000

One simulator serves both sides (its OpenAI endpoints as the vLLM backend, its Anthropic Messages endpoint
behind litellm); one gateway worker has both backends. Requests go one at a time (so the figure is the
gateway's own CPU per request, not queueing), non-streaming and streaming (16 tokens), to a model on
each backend; the gateway's CPU time comes from /proc. Also: start-up to ready and idle RSS, with and
without the litellm backend. Figures go to docs/BENCHMARKS.md by hand; nothing asserts on time.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from loadtests.common import PY, free_port, spawn, stop, wait_http

KEY = "sk-gw-" + "B" * 43
MESSAGES = [{"role": "user", "content": "hello there, how are you today?"}]


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return 0.0


def start(workdir: Path, sim_url: str, with_litellm: bool) -> tuple[Any, str, float]:
    port = free_port()
    backends: list[dict[str, Any]] = [{"name": "vllm", "kind": "vllm", "url": sim_url, "capacity": 64}]
    models: list[dict[str, Any]] = [{"name": "llama", "backends": ["vllm"]}]
    if with_litellm:
        backends.append(
            {
                "name": "claude",
                "kind": "litellm",
                "url": sim_url,
                "provider_model": "anthropic/claude-haiku-4-5",
                "api_key_env": "BENCH_PROVIDER_KEY",
            }
        )
        models.append({"name": "haiku", "backends": ["claude"]})
    config = {
        "listen": {"host": "127.0.0.1", "port": port},
        "state_path": str(workdir / f"state-{port}.db"),
        "backends": backends,
        "models": models,
        "tenants": [{"id": "bench", "keys": [{"name": "k", "key_env": "BENCH_KEY"}]}],
        "shutdown_drain_s": 0,
    }
    path = workdir / f"gateway-{port}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {"BENCH_KEY": KEY, "BENCH_PROVIDER_KEY": "sk-ant-bench", "GATEWAY_ADMIN_KEY": "x" * 20}
    env["GATEWAY_SALT_SECRET"] = "s" * 32
    began = time.perf_counter()
    proc = spawn([PY, "-m", "gateway", "serve", "--config", str(path)], cpu=0, env=env, log=workdir / "gw.log")
    wait_http(f"http://127.0.0.1:{port}/readyz", timeout=30)
    return proc, f"http://127.0.0.1:{port}", time.perf_counter() - began


def per_request_us(client: httpx.Client, pid: int, model: str, n: int, stream: bool) -> float:
    body = {"model": model, "messages": MESSAGES, "max_tokens": 16, "stream": stream}
    for _ in range(20):  # warm-up: connections, litellm's client cache
        client.post("/v1/chat/completions", json=body).read()
    before = cpu_s(pid)
    for _ in range(n):
        resp = client.post("/v1/chat/completions", json=body)
        resp.read()
        assert resp.status_code == 200, resp.text
    return (cpu_s(pid) - before) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        sim_port = free_port()
        sim = spawn(
            [PY, "-m", "gateway", "sim", "--port", str(sim_port), "--ttft-ms", "0", "--itl-ms", "0"],
            cpu=1,
            log=workdir / "sim.log",
        )
        try:
            wait_http(f"http://127.0.0.1:{sim_port}/health")
            sim_url = f"http://127.0.0.1:{sim_port}"
            for with_litellm in (False, True):
                proc, url, ready_s = start(workdir, sim_url, with_litellm)
                try:
                    time.sleep(1)
                    label = "vLLM + litellm backends" if with_litellm else "vLLM backend only"
                    print(f"{label}: start-up to ready {ready_s:.2f} s, idle RSS {rss_mb(proc.pid):.0f} MB")
                    headers = {"Authorization": f"Bearer {KEY}"}
                    with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
                        for model in ("llama", "haiku") if with_litellm else ("llama",):
                            for stream in (False, True):
                                us = per_request_us(client, proc.pid, model, args.requests, stream)
                                kind = "stream" if stream else "unary"
                                print(f"  {model} {kind}: {us:.0f} us of gateway CPU per request")
                finally:
                    stop(proc)
        finally:
            stop(sim)


if __name__ == "__main__":
    main()
