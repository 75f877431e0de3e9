"""How fast is the simulator? It is the upstream of every gateway benchmark, so it must never be their
bottleneck. Starts `gateway sim` with zero latencies pinned to one core, loads it with wrk from another
core, and prints requests per second and latency for each scenario.

    .venv/bin/python loadtests/bench_sim.py                 # all scenarios, 10 s each
    .venv/bin/python loadtests/bench_sim.py --duration 5 --scenario chat-stream

Results also go to loadtests/results/bench_sim-<time>.json (not committed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.procs import Proc, free_port, python_cmd, wait_http  # noqa: E402

_LUA = """\
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [[{body}]]
"""

_PROMPT = "Summarise the plot of a short film about a lighthouse keeper in two sentences."


@dataclass(frozen=True)
class Scenario:
    name: str
    what: str
    sim_args: tuple[str, ...]
    path: str
    body: dict[str, Any]


_ZERO = ("--ttft-ms", "0", "--itl-ms", "0")
_CHAT = {"model": "sim-model", "messages": [{"role": "user", "content": _PROMPT}], "max_tokens": 16}

SCENARIOS = (
    Scenario(
        "chat",
        "non-streaming chat, 16 output tokens; --ttft-ms 0 --itl-ms 0 (prefill cost at its default, 20 us/token)",
        _ZERO,
        "/v1/chat/completions",
        _CHAT,
    ),
    Scenario(
        "chat-no-prefill",
        "as chat, with --prefill-us-per-token 0 too: no timer at all, the synchronous fast path",
        (*_ZERO, "--prefill-us-per-token", "0"),
        "/v1/chat/completions",
        _CHAT,
    ),
    Scenario(
        "chat-stream",
        "streaming chat, 16 tokens = 17 SSE events + [DONE], with include_usage; --ttft-ms 0 --itl-ms 0",
        _ZERO,
        "/v1/chat/completions",
        {**_CHAT, "stream": True, "stream_options": {"include_usage": True}},
    ),
)


def _pinned(cpu: str | None, cmd: list[str]) -> list[str]:
    if cpu is None or shutil.which("taskset") is None:
        return cmd
    return ["taskset", "-c", cpu, *cmd]


def _cpu_seconds(pid: int) -> float:
    """CPU time (user + system) the simulator has used: req/s per CPU-second is robust on a shared host."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _parse_wrk(text: str) -> dict[str, Any]:
    def ms(value: str) -> float:
        number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value).groups()  # type: ignore[union-attr]
        return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]

    result: dict[str, Any] = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))}  # type: ignore[union-attr]
    result["requests"] = int(re.search(r"(\d+) requests in", text).group(1))  # type: ignore[union-attr]
    result["latency_avg_ms"] = ms(re.search(r"Latency\s+(\S+)", text).group(1))  # type: ignore[union-attr]
    for pct in ("50", "90", "99"):
        match = re.search(rf"^\s+{pct}(?:\.000)?%\s+(\S+)", text, re.MULTILINE)
        if match:
            result[f"p{pct}_ms"] = ms(match.group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    result["non_2xx"] = int(errors.group(1)) if errors else 0
    socket_errors = re.search(r"Socket errors: (.*)", text)
    result["socket_errors"] = socket_errors.group(1).strip() if socket_errors else ""
    return result


def run_scenario(scenario: Scenario, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    port = free_port()
    sim = Proc(
        _pinned(args.sim_cpu, python_cmd("sim", "--port", str(port), *scenario.sim_args)),
        workdir / f"sim-{scenario.name}.log",
    ).start()
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc=sim.popen)
        script = workdir / f"{scenario.name}.lua"
        script.write_text(_LUA.format(body=json.dumps(scenario.body)))
        url = f"http://127.0.0.1:{port}{scenario.path}"
        wrk = ["wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{args.duration}s", "--latency"]
        # A short warm-up so the first second's imports and allocations do not count.
        warmup = [*wrk[:3], "-d2s", "-s", str(script), url]
        subprocess.run(_pinned(args.wrk_cpu, warmup), capture_output=True, check=True)
        runs = []
        for _ in range(args.repeat):
            cpu_before = _cpu_seconds(sim.pid)
            out = subprocess.run(
                _pinned(args.wrk_cpu, [*wrk, "-s", str(script), url]), capture_output=True, text=True, check=True
            ).stdout
            run = _parse_wrk(out)
            cpu = _cpu_seconds(sim.pid) - cpu_before
            run.update(sim_cpu_s=cpu, cpu_us_per_request=cpu * 1e6 / run["requests"], wrk=out)
            runs.append(run)
        # The machine may be shared: the median run is the figure, the others show the spread.
        best = sorted(runs, key=lambda r: r["rps"])[len(runs) // 2]
        return {
            **{k: v for k, v in best.items() if k != "wrk"},
            "rps_runs": [r["rps"] for r in runs],
            "cpu_us_per_request_runs": [round(r["cpu_us_per_request"], 1) for r in runs],
            "scenario": scenario.name,
            "what": scenario.what,
            "sim_args": list(scenario.sim_args),
            "runs": runs,
        }
    finally:
        sim.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=1, help="wrk runs per scenario; the median is reported")
    parser.add_argument("--sim-cpu", default="0", help="core for the simulator (taskset -c)")
    parser.add_argument("--wrk-cpu", default="1", help="core for wrk")
    parser.add_argument("--scenario", action="append", choices=[s.name for s in SCENARIOS])
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    if (os.cpu_count() or 1) < 2:
        args.wrk_cpu = None
    chosen = [s for s in SCENARIOS if not args.scenario or s.name in args.scenario]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for scenario in chosen:
            result = run_scenario(scenario, args, Path(tmp))
            results.append(result)
            cpu_us = result["cpu_us_per_request"]
            print(
                f"{scenario.name:16} {result['rps']:>10,.0f} req/s   avg {result['latency_avg_ms']:.2f} ms"
                f"   p50 {result.get('p50_ms', float('nan')):.2f} ms   p99 {result.get('p99_ms', float('nan')):.2f} ms"
                f"   non-2xx {result['non_2xx']}  {result['socket_errors']}"
                f"   runs: {', '.join(f'{r:,.0f}' for r in result['rps_runs'])}"
                f"   sim CPU {cpu_us:.0f} us/req (= {1e6 / cpu_us:,.0f} req/s per busy core)",
                flush=True,
            )
    out_dir = ROOT / "loadtests" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "wrk": f"-t{args.threads} -c{args.connections} -d{args.duration}s --latency",
        "repeat": args.repeat,
        "sim_cpu": args.sim_cpu,
        "wrk_cpu": args.wrk_cpu,
    }
    path = out_dir / f"bench_sim-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
