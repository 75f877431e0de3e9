"""Closed-loop throughput and latency of one gateway worker against the simulator, with the simulator
measured directly in the same run. Usage: .venv/bin/python loadtests/bench_gateway.py [--seconds N]

Layout on a 2-core machine: the gateway on core 0; the simulator and wrk on core 1. The simulator is the
upstream here (its own ceiling is measured first); issue-6 benchmarks use nginx as a faster upstream.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import yaml

from loadtests.common import PY, ROOT, free_port, spawn, stop, wait_http, wrk_post

KEY = "sk-gw-" + "B" * 43
BODY = '{"model": "bench-model", "messages": [{"role": "user", "content": "hello benchmark"}], "max_tokens": 4}'


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-gw-"))
    sim_port, gw_port, redis_port = free_port(), free_port(), free_port()
    redis = spawn(["redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no"], cpu=1)
    sim = spawn(
        [PY, "-m", "gateway", "sim", "--port", str(sim_port), "--ttft-ms", "0", "--itl-ms", "0"],
        cpu=1,
        log=tmp / "sim.log",
    )
    config = {
        "listen": {"host": "127.0.0.1", "port": gw_port},
        "state_path": str(tmp / "state.db"),
        "backends": [{"name": "sim", "kind": "vllm", "url": f"http://127.0.0.1:{sim_port}", "capacity": 1024}],
        "models": [
            {
                "name": "bench-model",
                "backends": ["sim"],
                "upstream_model": "sim-model",
                "price": {"input_per_1k": 0.001, "output_per_1k": 0.002},
            }
        ],
        "redis_url": f"redis://127.0.0.1:{redis_port}/0",
        # Every admission feature on, with limits high enough never to refuse: Redis buckets and leases,
        # budget, and the fair queue (capacity above the load, so it never waits).
        "tenants": [
            {
                "id": "bench",
                "keys": [{"name": "k", "key_env": "BENCH_KEY"}],
                "limits": {"rpm": 100_000_000, "tpm": 10_000_000_000, "max_concurrency": 100_000},
                "budget": {"amount": 1_000_000_000, "period": "month"},
            }
        ],
        "billing": {"sinks": [{"kind": "jsonl", "path": str(tmp / "billing.jsonl")}]},
        "log_level": "warning",
    }
    (tmp / "gateway.yaml").write_text(yaml.safe_dump(config))
    try:
        wait_http(f"http://127.0.0.1:{sim_port}/health")
        gw = spawn(
            [PY, "-m", "gateway", "serve", "--config", str(tmp / "gateway.yaml")],
            cpu=0,
            env={"BENCH_KEY": KEY, "GATEWAY_ADMIN_KEY": "x" * 20, "GATEWAY_SALT_SECRET": "s" * 32},
            log=tmp / "gateway.log",
        )
        try:
            wait_http(f"http://127.0.0.1:{gw_port}/readyz")
            headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
            url_sim = f"http://127.0.0.1:{sim_port}/v1/chat/completions"
            url_gw = f"http://127.0.0.1:{gw_port}/v1/chat/completions"
            # Warm both, then measure.
            wrk_post(url_gw, BODY, headers, connections=8, seconds=2, cpu=1)
            results = {}
            for name, url in (("simulator direct", url_sim), ("gateway -> simulator", url_gw)):
                for conns in (4, args.connections):
                    r = wrk_post(url, BODY, headers, connections=conns, seconds=args.seconds, cpu=1)
                    results[f"{name} c={conns}"] = r.__dict__
        finally:
            stop(gw)
    finally:
        stop(sim)
        stop(redis)
    out = {
        "machine": {"python": platform.python_version(), "cpus": __import__("os").cpu_count()},
        "body": BODY,
        "results": results,
    }
    dest = ROOT / "loadtests" / "results"
    dest.mkdir(exist_ok=True)
    (dest / "gateway.json").write_text(json.dumps(out, indent=2))
    print("| run | req/s | p50 ms | p90 ms | p99 ms | errors |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(
            f"| {name} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | {r['p99_ms']:.2f} | {r['errors']} |"
        )


if __name__ == "__main__":
    main()
