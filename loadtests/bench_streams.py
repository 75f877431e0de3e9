"""Concurrent streams through one gateway worker: added inter-chunk latency and memory.

Usage: .venv/bin/python -m loadtests.bench_streams [--streams 500 2000] [--tokens 20] [--itl-ms 50]

N clients open streams at once (aiohttp, one process, its own core), first straight to the simulator and
then through the gateway (every admission feature on, Redis-free embedded mode); each records the gaps
between the chunks it receives. Added latency = p99 gap through the gateway - p99 gap direct. The
gateway's RSS is sampled from /proc while the streams run. Also measured: start-up time to a 200 from
/readyz, and idle RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from loadtests.common import PY, ROOT, free_port, spawn, stop, wait_http

KEY = "sk-gw-" + "S" * 43


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def one_stream(
    session: aiohttp.ClientSession, url: str, tokens: int, gaps: list[float], key: str, failures: list[str]
) -> int:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": tokens, "stream": True}
    chunks = 0
    try:
        return await _read_stream(session, url, body, gaps, key)
    except (aiohttp.ClientError, OSError) as exc:
        failures.append(type(exc).__name__)
        return chunks


async def _read_stream(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], gaps: list[float], key: str
) -> int:
    chunks = 0
    async with session.post(url, json=body, headers={"Authorization": f"Bearer {key}"}) as resp:
        if resp.status != 200:
            raise aiohttp.ClientResponseError(resp.request_info, (), status=resp.status, message=await resp.text())
        last: float | None = None
        async for line in resp.content:
            if not line.startswith(b"data: {"):
                continue
            now = time.perf_counter()
            if last is not None:
                gaps.append(now - last)
            last = now
            chunks += 1
    return chunks


async def run_streams(url: str, n: int, tokens: int, pid: int | None) -> dict[str, Any]:
    gaps: list[float] = []
    failures: list[str] = []
    peak = 0.0
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set() and pid is not None:
            peak = max(peak, rss_mb(pid))
            await asyncio.sleep(0.1)

    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        sampler = asyncio.create_task(sample())
        start = time.perf_counter()
        counts = await asyncio.gather(*(one_stream(session, url, tokens, gaps, KEY, failures) for _ in range(n)))
        elapsed = time.perf_counter() - start
        done.set()
        await sampler
    gaps.sort()
    return {
        "streams": n,
        "complete": sum(1 for c in counts if c >= tokens),
        "failures": {name: failures.count(name) for name in set(failures)},
        "elapsed_s": round(elapsed, 2),
        "gap_p50_ms": round(1000 * gaps[len(gaps) // 2], 2),
        "gap_p99_ms": round(1000 * gaps[int(len(gaps) * 0.99)], 2),
        "peak_rss_mb": round(peak, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, nargs="*", default=[500, 2000])
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--itl-ms", type=float, default=50)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-streams-"))
    sim_port, gw_port = free_port(), free_port()
    sim = spawn(
        [
            PY,
            "-m",
            "gateway",
            "sim",
            "--port",
            str(sim_port),
            "--ttft-ms",
            "0",
            "--itl-ms",
            str(args.itl_ms),
            "--max-concurrency",
            "10000",
        ],
        cpu=1,
        log=tmp / "sim.log",
    )
    config = {
        "listen": {"host": "127.0.0.1", "port": gw_port},
        "state_path": str(tmp / "state.db"),
        "backends": [{"name": "sim", "kind": "vllm", "url": f"http://127.0.0.1:{sim_port}", "capacity": 10000}],
        "models": [{"name": "m", "backends": ["sim"], "price": {"input_per_1k": 0.001, "output_per_1k": 0.002}}],
        "tenants": [
            {
                "id": "bench",
                "keys": [{"name": "k", "key_env": "BENCH_KEY"}],
                "limits": {"rpm": 10_000_000, "tpm": 10_000_000_000, "max_concurrency": 100_000},
            }
        ],
        "billing": {"sinks": [{"kind": "jsonl", "path": str(tmp / "billing.jsonl")}]},
        "log_level": "warning",
    }
    (tmp / "gw.yaml").write_text(yaml.safe_dump(config))
    results: dict[str, Any] = {}
    try:
        wait_http(f"http://127.0.0.1:{sim_port}/health")
        started = time.perf_counter()
        gw = spawn(
            [PY, "-m", "gateway", "serve", "--config", str(tmp / "gw.yaml")],
            cpu=0,
            env={"BENCH_KEY": KEY, "GATEWAY_ADMIN_KEY": "a" * 24, "GATEWAY_SALT_SECRET": "s" * 32},
            log=tmp / "gw.log",
        )
        wait_http(f"http://127.0.0.1:{gw_port}/readyz", timeout=30)
        results["startup_to_ready_s"] = round(time.perf_counter() - started, 3)
        time.sleep(1.0)
        results["idle_rss_mb"] = round(rss_mb(gw.pid), 1)
        try:
            for n in args.streams:
                direct = asyncio.run(
                    run_streams(f"http://127.0.0.1:{sim_port}/v1/chat/completions", n, args.tokens, None)
                )
                through = asyncio.run(
                    run_streams(f"http://127.0.0.1:{gw_port}/v1/chat/completions", n, args.tokens, gw.pid)
                )
                results[f"streams_{n}"] = {
                    "direct": direct,
                    "gateway": through,
                    "added_gap_p99_ms": round(through["gap_p99_ms"] - direct["gap_p99_ms"], 2),
                }
        finally:
            stop(gw)
    finally:
        stop(sim)
    dest = ROOT / "loadtests" / "results"
    dest.mkdir(exist_ok=True)
    (dest / "streams.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    _ = statistics


if __name__ == "__main__":
    main()
