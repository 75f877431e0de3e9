"""What one request costs the gateway, in CPU instructions: a figure this shared machine cannot blur.

    .venv/bin/python -m loadtests.instructions [--baseline DIR] [--requests 400] [--rounds 2] [--json PATH]

Throughput and latency on a shared 2-core VM move by 20-50% between runs of the same build (other tenants
of the host), so a 5% change to the request path is invisible to them. Valgrind's callgrind counts the
instructions a process executes instead of timing it: the same build, config and requests give the same
count within about 1%, whatever else the machine does. Each build named runs as one gateway process under
callgrind (instrumentation switched on after start-up and a warm-up), with every feature on as in the
suite (`loadtests.suite.gateway_config`: auth, Redis quotas and fair queue, metrics, billing) against the
suite's fixed-answer nginx and a throwaway redis-server, and serves `--requests` chat requests one after
the other on one keep-alive connection (one at a time, so no batching differs between builds). The
figure is the process's instructions (every thread) divided by the requests.

Background work that runs by the clock, not per request (the capacity control's readings, the live stats)
is slowed down for the measurement (`capacity.interval_s` 30, `stats_interval_s` 60): under callgrind a
request takes tens of milliseconds, and per-second work would otherwise be charged to the requests.

`--baseline DIR`: a checkout of an earlier commit with its own .venv (or a symlink to this one when the
lock files match), measured in the same run. Needs valgrind (Debian's `valgrind` package).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml

from loadtests import harness, suite


def _config(tmp: Path, port: int, upstream: str, redis_url: str, checkout: Path) -> Path:
    path = suite.gateway_config(tmp, port, upstream, redis_url)
    config = yaml.safe_load(path.read_text())
    config["stats_interval_s"] = 60
    if "class CapacityConfig" in (checkout / "gateway" / "config.py").read_text():
        config["capacity"] = {"interval_s": 30}  # a build with the capacity control (not the oldest baselines)
    path.write_text(yaml.safe_dump(config))
    return path


def _send(port: int, count: int) -> None:
    """`count` chat requests, one after the other on one keep-alive connection; each must answer 200."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    headers = {"Authorization": f"Bearer {suite.KEY}", "Content-Type": "application/json"}
    try:
        for _ in range(count):
            conn.request("POST", harness.CHAT_PATH, harness.REQUEST_BODY, headers)
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 200:
                raise RuntimeError(f"the gateway answered {resp.status}: {body[:300]!r}")
    finally:
        conn.close()


def _callgrind(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True, timeout=120)


def measure(checkout: Path, tmp: Path, upstream: str, redis_url: str, requests: int) -> int:
    """Instructions per request of one gateway of `checkout`."""
    port = harness.free_port()
    config = _config(tmp, port, upstream, redis_url, checkout)
    out = tmp / f"callgrind-{port}.out"
    python = harness.PY if checkout == harness.ROOT else str(checkout / ".venv" / "bin" / "python")
    cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
    cmd += [python, "-m", "gateway", "serve", "--config", str(config)]
    # The checkout's own package (python -m runs from `cwd`), whatever PYTHONPATH this process has.
    env = {"BENCH_KEY": suite.KEY, "GATEWAY_ADMIN_KEY": suite.ADMIN, "GATEWAY_SALT_SECRET": "s" * 32, "PYTHONPATH": ""}
    proc = harness.start(cmd, cpu=0, env=env, log=tmp / f"gateway-{port}.log", cwd=checkout)
    try:
        harness.wait_ready(f"http://127.0.0.1:{port}/readyz", proc, timeout=300)
        _send(port, 100)  # warm: connections, caches, first-use paths
        _callgrind(proc.pid, "--instr=on")
        _send(port, requests)
        _callgrind(proc.pid, "--instr=off")
        _callgrind(proc.pid, "--dump")
    finally:
        harness.stop(proc, timeout=120)
    total = 0
    for dump in tmp.glob(f"callgrind-{port}.out*"):
        for line in dump.read_text(errors="replace").splitlines():
            if line.startswith("totals:"):
                total += int(line.split()[1])
    return round(total / requests)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, help="a checkout of an earlier commit with its own .venv")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=2, help="each build this many times, alternating")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("needs valgrind (apt-get install valgrind)")
    builds = {"gateway": harness.ROOT}
    if args.baseline is not None:
        builds[f"baseline {_commit(args.baseline)}"] = args.baseline.resolve()
    figures: dict[str, list[int]] = {name: [] for name in builds}
    with (
        tempfile.TemporaryDirectory(prefix="bench-instructions-") as tmp,
        harness.nginx(1) as (upstream_port, _),
        harness.redis(1) as redis_url,
    ):
        for _ in range(args.rounds):
            for name, checkout in builds.items():
                got = measure(checkout, Path(tmp), f"http://127.0.0.1:{upstream_port}", redis_url, args.requests)
                figures[name].append(got)
                print(f"  {name}: {got:,} instructions per request", flush=True)
    report: dict[str, Any] = {
        "commit": _commit(harness.ROOT),
        "requests": args.requests,
        "builds": {name: {"runs": runs, "median": statistics.median(runs)} for name, runs in figures.items()},
    }
    print("\n| build | instructions per request (median) | runs |\n|---|--:|---|")
    for name, runs in figures.items():
        print(f"| {name} | {statistics.median(runs):,.0f} | {', '.join(f'{r:,}' for r in runs)} |")
    if len(builds) == 2:
        (mine, base) = (statistics.median(runs) for runs in figures.values())
        print(f"\nthis build / baseline: {mine / base:.3f}")
        report["ratio"] = round(mine / base, 4)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


def _commit(checkout: Path) -> str:
    out = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "?"


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
