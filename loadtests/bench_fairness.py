"""Fairness under contention, with the VTC paper's workloads (Sheng et al., OSDI 2024), against the simulator.

Usage: .venv/bin/python -m loadtests.bench_fairness [--seconds 20] [--quick]

One gateway worker in front of one simulated vLLM whose capacity is the bottleneck (the gateway's backend
capacity equals the simulator's --max-concurrency, so requests queue in the gateway's fair queue). Each
tenant is a closed loop of concurrent streaming clients (more clients = more offered load). Served
service per tenant is counted as the VTC paper does, input + 2 x output tokens, from the usage chunk.

Workloads:
  overload   two equal-weight tenants, one offering 10x the other's load; both backlogged
  fcfs       the same offered load with the gateway's queue out of the way (capacity 1,000: the
             simulator's own FIFO queue decides), for comparison
  weights    four tenants, weights 1:2:3:4, all backlogged
  on_off     a tenant idle for the first half returns: it must get its share, not a burst of credit
  noisy      a tenant at 10x its rpm quota next to one at half its quota: the quiet one sees no 429
             and its p99 time to first token stays near what it gets alone
Results: loadtests/results/fairness.json and a Markdown table on stdout (copied into docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from loadtests.common import PY, ROOT, free_port, spawn, stop, wait_http

ADMIN = "sk-admin-bench-0123456789"


@dataclass
class Tenant:
    id: str
    weight: float = 1.0
    clients: int = 4
    limits: dict[str, int] = field(default_factory=dict)
    start_s: float = 0.0
    key: str = ""
    served: list[tuple[float, int]] = field(default_factory=list)  # (finish time, service)
    ttfts: list[tuple[float, float]] = field(default_factory=list)  # (start time, ttft)
    codes: dict[int, int] = field(default_factory=dict)


def jain(values: list[float]) -> float:
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values)) if any(values) else 0.0


async def client_loop(session: aiohttp.ClientSession, url: str, t: Tenant, t0: float, end: float) -> None:
    await asyncio.sleep(t.start_s)
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "x " * 40}],
        "max_tokens": 20,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    headers = {"Authorization": f"Bearer {t.key}"}
    while time.monotonic() < end:
        start = time.monotonic()
        first: float | None = None
        usage: dict[str, int] | None = None
        async with session.post(url, json=body, headers=headers) as resp:
            t.codes[resp.status] = t.codes.get(resp.status, 0) + 1
            if resp.status == 429:
                await asyncio.sleep(min(float(resp.headers.get("retry-after-ms", "100")) / 1000, 0.5))
                continue
            async for line in resp.content:
                if first is None and b'"content"' in line:
                    first = time.monotonic() - start
                if line.startswith(b"data: {") and b'"usage":{' in line:
                    usage = json.loads(line[6:]).get("usage")
        if usage:
            t.served.append((time.monotonic() - t0, usage["prompt_tokens"] + 2 * usage["completion_tokens"]))
        if first is not None:
            t.ttfts.append((start - t0, first))


async def run_load(gw_url: str, tenants: list[Tenant], seconds: float) -> None:
    url = gw_url + "/v1/chat/completions"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        for t in tenants:
            async with session.post(
                gw_url + "/admin/tenants",
                headers={"Authorization": f"Bearer {ADMIN}"},
                json={"id": t.id, "weight": t.weight, "limits": t.limits},
            ) as resp:
                assert resp.status == 201, await resp.text()
            async with session.post(
                gw_url + f"/admin/tenants/{t.id}/keys", json={}, headers={"Authorization": f"Bearer {ADMIN}"}
            ) as resp:
                t.key = (await resp.json())["key"]
        t0 = time.monotonic()
        end = t0 + seconds
        await asyncio.gather(*(client_loop(session, url, t, t0, end) for t in tenants for _ in range(t.clients)))


class Stack:
    """The simulator and one gateway worker, started fresh for each workload."""

    def __init__(self, capacity: int, gateway_capacity: int) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-fair-"))
        self.sim_port, self.gw_port = free_port(), free_port()
        self.sim = spawn(
            [
                PY,
                "-m",
                "gateway",
                "sim",
                "--port",
                str(self.sim_port),
                "--ttft-ms",
                "5",
                "--itl-ms",
                "5",
                "--max-concurrency",
                str(capacity),
                "--prefill-us-per-token",
                "0",
            ],
            cpu=1,
            log=self.tmp / "sim.log",
        )
        config = {
            "listen": {"host": "127.0.0.1", "port": self.gw_port},
            "state_path": str(self.tmp / "state.db"),
            "backends": [
                {
                    "name": "sim",
                    "kind": "vllm",
                    "url": f"http://127.0.0.1:{self.sim_port}",
                    "capacity": gateway_capacity,
                }
            ],
            "models": [{"name": "m", "backends": ["sim"]}],
            "log_level": "warning",
        }
        (self.tmp / "gw.yaml").write_text(yaml.safe_dump(config))
        wait_http(f"http://127.0.0.1:{self.sim_port}/health")
        self.gw = spawn(
            [PY, "-m", "gateway", "serve", "--config", str(self.tmp / "gw.yaml")],
            cpu=0,
            env={"GATEWAY_ADMIN_KEY": ADMIN, "GATEWAY_SALT_SECRET": "s" * 32},
            log=self.tmp / "gw.log",
        )
        wait_http(f"http://127.0.0.1:{self.gw_port}/readyz")
        self.url = f"http://127.0.0.1:{self.gw_port}"

    def close(self) -> None:
        stop(self.gw)
        stop(self.sim)


def summarize(tenants: list[Tenant], window: tuple[float, float], windows: int = 5) -> dict[str, Any]:
    lo, hi = window
    served = {t.id: sum(s for at, s in t.served if lo <= at < hi) for t in tenants}
    normalized = [served[t.id] / t.weight for t in tenants]
    step = (hi - lo) / windows
    per_window = [
        {t.id: sum(s for at, s in t.served if lo + i * step <= at < lo + (i + 1) * step) for t in tenants}
        for i in range(windows)
    ]
    max_diff = max(abs(w[a.id] / a.weight - w[b.id] / b.weight) for w in per_window for a in tenants for b in tenants)
    total = sum(served.values()) or 1
    return {
        "served": served,
        "share": {k: round(v / total, 4) for k, v in served.items()},
        "jain": round(jain(normalized), 4),
        "max_window_service_difference": max_diff,
        "per_window": per_window,
        "codes": {t.id: t.codes for t in tenants},
        "ttft_p99_ms": {t.id: round(1000 * _p99([x for _, x in t.ttfts]), 1) for t in tenants if t.ttfts},
        "ttft_p99_ms_after_5s": {
            t.id: round(1000 * _p99([x for at, x in t.ttfts if at >= 5.0]), 1) for t in tenants if t.ttfts
        },
    }


def _p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) >= 2 else (values[0] if values else 0.0)


def workload(name: str, seconds: float) -> dict[str, Any]:
    cap = 4
    if name in ("overload", "fcfs"):
        tenants = [Tenant("heavy", clients=40), Tenant("light", clients=4)]
        stack = Stack(cap, 1000 if name == "fcfs" else cap)
        window = (2.0, seconds)
    elif name == "weights":
        tenants = [Tenant(f"w{w}", weight=w, clients=12) for w in (1, 2, 3, 4)]
        stack = Stack(cap, cap)
        window = (2.0, seconds)
    elif name == "on_off":
        tenants = [Tenant("always", clients=12), Tenant("returning", clients=12, start_s=seconds / 2)]
        stack = Stack(cap, cap)
        window = (seconds / 2 + 0.5, seconds)
    elif name in ("noisy", "alone"):
        # The quiet tenant's closed loop runs at about 9 req/s, half of its 1,200 rpm; the noisy one offers
        # far more than its 120 rpm. A token bucket lets a full bucket through at once (120 requests, about
        # 3 s of this backend), so the quiet tenant's TTFT is reported for the whole run and after 5 s.
        quiet = Tenant("quiet", clients=1, limits={"rpm": 1200})
        tenants = [quiet] if name == "alone" else [Tenant("noisy", clients=40, limits={"rpm": 120}), quiet]
        stack = Stack(cap, cap)
        window = (1.0, seconds)
    else:
        raise ValueError(name)
    try:
        asyncio.run(run_load(stack.url, tenants, seconds))
    finally:
        stack.close()
    return summarize(tenants, window)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--only", nargs="*", help="run only these workloads")
    args = parser.parse_args()
    names = args.only or ["overload", "fcfs", "weights", "on_off", "noisy", "alone"]
    results = {name: workload(name, args.seconds) for name in names}
    dest = ROOT / "loadtests" / "results"
    dest.mkdir(exist_ok=True)
    (dest / f"fairness-{'-'.join(names)}.json").write_text(json.dumps(results, indent=2))
    print("| workload | service share | Jain's index (weighted) | max service difference per window | notes |")
    print("|---|---|---:|---:|---|")
    for name, r in results.items():
        share = ", ".join(f"{k} {v:.1%}" for k, v in r["share"].items())
        notes = ""
        if name in ("noisy", "alone"):
            notes = (
                f"429s: { {k: v.get(429, 0) for k, v in r['codes'].items()} }, TTFT p99 ms: {r['ttft_p99_ms']}, "
                f"after 5 s: {r['ttft_p99_ms_after_5s']}"
            )
        print(f"| {name} | {share} | {r['jain']:.4f} | {r['max_window_service_difference']:.0f} | {notes} |")


if __name__ == "__main__":
    main()
