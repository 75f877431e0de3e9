"""Measure which upstream HTTP client and server layer the gateway's hot path should use.

One command, from the repository root::

    .venv/bin/python loadtests/clients/run.py

What it does:

1. Starts nginx (foreground, ``worker_processes 1``, keep-alive on, its own config in a temp dir) answering
   every request with a fixed ~300-byte OpenAI ``chat.completion`` JSON. That is the upstream.
2. Measures nginx directly (a second instance, on the server core) as the ceiling reference.
3. For each variant in ``apps.VARIANTS`` starts one uvicorn worker (``--http httptools --loop uvloop``)
   that reads the POST body, parses and re-serialises it with orjson, forwards it to the upstream nginx and
   returns the upstream's status and body; checks one response end to end; then drives it with wrk:

   - saturation: 1 thread, 64 connections, 10 s (after a 2 s warm-up that is discarded);
   - low load, closed loop: 4 connections, 5 s;
   - low load, paced: 4 connections each waiting 7 ms between requests (about 500 req/s, the rate at
     which the gateway's added-latency target is set, docs/BENCHMARKS.md), 5 s.

4. Measures each client alone (client_bench.py: no server in front) at 1, 4 and 64 concurrent requests,
   and under cProfile the share of its CPU spent in its connection pool.
5. Writes ``loadtests/clients/results.json`` and ``docs/bench/clients.md``.

The machine has 2 cores and is shared, so absolute numbers move between runs; compare the ratios within
one run. The server under test is pinned to one core and everything else (wrk, the upstream nginx, this
script) to the other. Besides req/s and wrk's latency percentiles, each run records the server's CPU time
per request (from /proc) and hence its capacity (requests per CPU-second, what the worker serves with its
core to itself, which other tenants' load barely moves: variants are ranked by it), the share of the
server's core that other processes took (a run disturbed by more than 10% is repeated once, within a retry
budget, keeping the quieter attempt), and, from nginx's stub_status, how many upstream connections the
client's pool opened and held, which shows pool churn or serialisation.

Options: ``--only VARIANT...``, shorter ``--duration``/``--low-duration``/``--warmup`` for a quick check,
``--no-write`` to leave both files alone, ``--render-only`` to regenerate the Markdown from results.json.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apps import PATH, VARIANTS
from client_bench import POOL_FUNCTIONS

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: the repo for loadtests.harness
from loadtests.harness import core_busy_seconds, cpu_seconds, free_port, pinned, process_tree

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
RESULTS = HERE / "results.json"
DOC = REPO / "docs" / "bench" / "clients.md"
COMMAND = ".venv/bin/python loadtests/clients/run.py"

#: What nginx returns for every request: a realistic non-streaming OpenAI response, about 300 bytes.
UPSTREAM_BODY = (
    b'{"id":"chatcmpl-bench0001","object":"chat.completion","created":1700000000,"model":"bench-model-1",'
    b'"choices":[{"index":0,"message":{"role":"assistant",'
    b'"content":"Hello! A fixed reply from the bench upstream."},'
    b'"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":12,"completion_tokens":13,"total_tokens":25}}'
)
#: What wrk POSTs: a small chat request.
REQUEST_BODY = (
    b'{"model":"bench-model-1","messages":[{"role":"system","content":"You are terse."},'
    b'{"role":"user","content":"Say hello."}],"max_tokens":16,"temperature":0}'
)
CLIENTS = ("httpx", "httpx2", "aiohttp")
CLIENT_CONCURRENCY = (1, 4, 64)
PACKAGES = [
    "fastapi",
    "starlette",
    "uvicorn",
    "httptools",
    "uvloop",
    "httpx",
    "httpcore",
    "httpx2",
    "httpcore2",
    "aiohttp",
    "orjson",
]
UVICORN_FLAGS = [
    "--http",
    "httptools",
    "--loop",
    "uvloop",
    "--no-access-log",
    "--log-level",
    "warning",
    "--lifespan",
    "on",
    "--workers",
    "1",
]
NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
error_log {tmp}/error.log warn;
pid {tmp}/nginx.pid;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_timeout 75s;
    keepalive_requests 10000000;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = /nginx_status {{
            stub_status;
        }}
        location / {{
            default_type application/json;
            return 200 '{body}';
        }}
    }}
}}
"""
LUA = """\
wrk.method = "POST"
wrk.body = [[{body}]]
wrk.headers["Content-Type"] = "application/json"
{delay}
done = function(summary, latency, requests)
    local e = summary.errors
    io.write(string.format(
        'BENCHJSON {{"requests":%.0f,"duration_us":%.0f,"bytes":%.0f,"p50_us":%.1f,"p90_us":%.1f,'
        .. '"p99_us":%.1f,"max_us":%.1f,"mean_us":%.1f,"err_connect":%.0f,"err_read":%.0f,'
        .. '"err_write":%.0f,"err_status":%.0f,"err_timeout":%.0f}}\\n',
        summary.requests, summary.duration, summary.bytes, latency:percentile(50), latency:percentile(90),
        latency:percentile(99), latency.max, latency.mean, e.connect, e.read, e.write, e.status, e.timeout))
end
"""


@dataclass(frozen=True)
class Settings:
    warmup: int = 2
    duration: int = 10
    low_duration: int = 5
    connections: int = 64
    low_connections: int = 4
    paced_delay_ms: int = 7
    client_seconds: float = 2.0
    noise_limit: float = 0.10  # other tenants' share of the server CPU above which a run is repeated once
    retry_budget: int = 90  # seconds of repeated runs allowed in total
    load_cpu: int | None = None
    server_cpu: int | None = None


# --------------------------------------------------------------------------- processes


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port} after {timeout}s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop one child we started, by its pid only."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def nginx(cpu: int | None) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """A foreground nginx answering UPSTREAM_BODY on a free loopback port; yields (port, process)."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-nginx-") as tmp:
        os.chmod(tmp, 0o755)  # when run as root the worker drops to nobody and must reach its temp dirs
        conf = Path(tmp) / "nginx.conf"
        conf.write_text(NGINX_CONF.format(tmp=tmp, port=port, body=UPSTREAM_BODY.decode()))
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        with (Path(tmp) / "stderr.log").open("wb") as stderr:
            proc = subprocess.Popen(pinned([binary, "-p", tmp, "-c", str(conf)], cpu), stderr=stderr)
        try:
            wait_for_port(port, proc)
            got = http_post(f"http://127.0.0.1:{port}{PATH}", REQUEST_BODY)
            if got != (200, UPSTREAM_BODY):
                raise RuntimeError(f"nginx answered {got!r}")
            yield port, proc
        except BaseException:
            for log in ("stderr.log", "error.log"):
                with contextlib.suppress(OSError):
                    sys.stderr.write((Path(tmp) / log).read_text()[-2000:])
            raise
        finally:
            stop(proc)


@contextlib.contextmanager
def forwarding_server(
    variant: str, upstream_port: int, cpu: int | None
) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """One uvicorn worker running apps.create_app for ``variant``; yields (port, process) once it forwards."""
    port = free_port()
    env = dict(os.environ, BENCH_VARIANT=variant, BENCH_UPSTREAM=f"http://127.0.0.1:{upstream_port}{PATH}")
    cmd = [
        sys.executable,
        "-m",
        "uvicorn",
        "--app-dir",
        str(HERE),
        "apps:create_app",
        "--factory",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *UVICORN_FLAGS,
    ]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(pinned(cmd, cpu), env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_port(port, proc)
            got = http_post(f"http://127.0.0.1:{port}{PATH}", REQUEST_BODY)
            if got != (200, UPSTREAM_BODY):
                raise RuntimeError(f"{variant} answered {got!r}")
            yield port, proc
        except BaseException:
            stop(proc)
            log.seek(0)
            sys.stderr.write(log.read().decode(errors="replace")[-4000:])
            raise
        stop(proc)


# --------------------------------------------------------------------------- measuring

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_post(url: str, body: bytes) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with _NO_PROXY.open(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def stub_status(port: int) -> dict[str, int]:
    """nginx's counters; the status request itself is one active connection, one accept, one request."""
    with _NO_PROXY.open(f"http://127.0.0.1:{port}/nginx_status", timeout=5) as response:
        lines = response.read().decode().splitlines()
    accepts, _handled, requests = (int(x) for x in lines[2].split())
    return {"active": int(lines[0].split(":")[1]), "accepts": accepts, "requests": requests}


def wrk(
    port: int, connections: int, seconds: int, cpu: int | None, delay_ms: int | None = None, tmp: Path | None = None
) -> tuple[subprocess.Popen[str], list[str]]:
    """Start wrk (1 thread, --latency) POSTing REQUEST_BODY; returns the process and its command line."""
    assert tmp is not None
    delay = f"function delay() return {delay_ms} end" if delay_ms else ""
    script = tmp / f"post-{delay_ms or 0}.lua"
    script.write_text(LUA.format(body=REQUEST_BODY.decode(), delay=delay))
    cmd = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        "--timeout",
        "5s",
        "--latency",
        "-s",
        str(script),
        f"http://127.0.0.1:{port}{PATH}",
    ]
    return subprocess.Popen(pinned(cmd, cpu), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), cmd


def load(
    port: int,
    server_pids: list[int],
    settings: Settings,
    connections: int,
    seconds: int,
    tmp: Path,
    delay_ms: int | None = None,
    upstream_port: int | None = None,
) -> dict[str, Any]:
    """One wrk run against ``port``, with the server's CPU time and (optionally) the upstream's counters."""
    before_status = stub_status(upstream_port) if upstream_port else None
    cpu_before = cpu_seconds(server_pids)
    core_before = core_busy_seconds(settings.server_cpu)
    proc, cmd = wrk(port, connections, seconds, settings.load_cpu, delay_ms, tmp)
    mid: dict[str, int] = {}
    if upstream_port:  # sample how many upstream connections the pool holds while loaded

        def sample() -> None:
            time.sleep(seconds / 2)
            mid.update(stub_status(upstream_port))

        sampler = threading.Thread(target=sample)
        sampler.start()
    output, _ = proc.communicate(timeout=seconds + 30)
    cpu_used = cpu_seconds(server_pids) - cpu_before
    core_used = core_busy_seconds(settings.server_cpu) - core_before
    if upstream_port:
        sampler.join()
    line = next((x for x in output.splitlines() if x.startswith("BENCHJSON ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}):\n{output}")
    raw = json.loads(line.removeprefix("BENCHJSON "))
    requests = raw["requests"]
    errors = sum(raw[k] for k in ("err_connect", "err_read", "err_write", "err_status", "err_timeout"))
    result: dict[str, Any] = {
        "wrk": " ".join([*cmd[:-3], "<script>", cmd[-1]]),
        "connections": connections,
        "paced_delay_ms": delay_ms,
        "requests": int(requests),
        "errors": int(errors),
        "error_detail": {k.removeprefix("err_"): int(raw[k]) for k in raw if k.startswith("err_") and raw[k]},
        "rps": round(requests / (raw["duration_us"] / 1e6), 1),
        "p50_ms": round(raw["p50_us"] / 1000, 3),
        "p90_ms": round(raw["p90_us"] / 1000, 3),
        "p99_ms": round(raw["p99_us"] / 1000, 3),
        "max_ms": round(raw["max_us"] / 1000, 3),
        "server_cpu_s": round(cpu_used, 2),
        "server_cpu_util": round(cpu_used / (raw["duration_us"] / 1e6), 3),
        "server_cpu_us_per_req": round(cpu_used / requests * 1e6, 1) if requests else None,
        # req/s per second of server CPU: what the worker would serve with its core to itself
        "capacity_rps": round(requests / cpu_used) if cpu_used else None,
        # busy time of the server's core not spent by the server: other tenants of this shared machine
        "other_load_on_server_cpu": round(max(core_used - cpu_used, 0.0) / (raw["duration_us"] / 1e6), 3),
    }
    if upstream_port and before_status and mid:
        after = stub_status(upstream_port)
        # minus the mid and after status requests themselves (each a fresh connection)
        result["upstream"] = {
            "connections_opened": after["accepts"] - before_status["accepts"] - 2,
            "requests": after["requests"] - before_status["requests"] - 2,
            "connections_active_mid_run": mid["active"] - 1,
        }
    return result


class RetryBudget:
    """Seconds of load that may be spent re-running measurements disturbed by other tenants."""

    def __init__(self, seconds: float) -> None:
        self.left = seconds


def quietest(
    run: Callable[[], dict[str, Any]], seconds: int, settings: Settings, budget: RetryBudget
) -> dict[str, Any]:
    """Run once; if another tenant used the server CPU noticeably meanwhile, run again (budget allowing) and
    keep the less disturbed attempt."""
    result = run()
    result["attempts"] = 1
    if result["other_load_on_server_cpu"] > settings.noise_limit and budget.left >= seconds:
        budget.left -= seconds
        again = run()
        again["attempts"] = 2
        result = min(result, again, key=lambda r: r["other_load_on_server_cpu"])
    return result


def measure(
    port: int,
    server_pids: list[int],
    settings: Settings,
    tmp: Path,
    budget: RetryBudget,
    upstream_port: int | None = None,
) -> dict[str, Any]:
    """Warm-up (discarded), saturation at 64 connections, then closed-loop and paced low load."""
    load(port, server_pids, settings, settings.connections, settings.warmup, tmp)
    return {
        "saturation": quietest(
            lambda: load(
                port, server_pids, settings, settings.connections, settings.duration, tmp, upstream_port=upstream_port
            ),
            settings.duration,
            settings,
            budget,
        ),
        "low": load(port, server_pids, settings, settings.low_connections, settings.low_duration, tmp),
        "paced": quietest(
            lambda: load(
                port,
                server_pids,
                settings,
                settings.low_connections,
                settings.low_duration,
                tmp,
                delay_ms=settings.paced_delay_ms,
            ),
            settings.low_duration,
            settings,
            budget,
        ),
    }


def client_bench(
    url: str, client: str, concurrency: int, seconds: float, cpu: int | None, profile: bool = False
) -> Any:
    """One client_bench.py run (the client alone, no server in front), pinned to the server CPU."""
    cmd = [sys.executable, str(HERE / "client_bench.py"), "--upstream", url, "--client", client]
    cmd += ["--concurrency", str(concurrency), "--seconds", str(seconds), *(["--profile"] if profile else [])]
    out = subprocess.run(pinned(cmd, cpu), capture_output=True, text=True, cwd=REPO, timeout=120, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"client_bench failed:\n{out.stdout}\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def clients_alone(upstream_port: int, settings: Settings) -> dict[str, Any]:
    """CPU per request of each client at 1, 4 and 64 concurrent requests, and its pool's share under cProfile."""
    url = f"http://127.0.0.1:{upstream_port}{PATH}"
    runs = [
        client_bench(url, client, concurrency, settings.client_seconds, settings.server_cpu)
        for client in CLIENTS
        for concurrency in CLIENT_CONCURRENCY
    ]
    profiles = [
        client_bench(url, client, CLIENT_CONCURRENCY[-1], 1.0, settings.server_cpu, profile=True) for client in CLIENTS
    ]
    return {"runs": runs, "profiles": profiles}


# --------------------------------------------------------------------------- report


def machine() -> dict[str, Any]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    tools = {}
    for cmd in (["nginx", "-v"], ["wrk", "-v"]):
        with contextlib.suppress(OSError):
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            tools[cmd[0]] = (out.stdout + out.stderr).strip().splitlines()[0]
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": versions,
        "tools": tools,
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def added(target: dict[str, Any], base: dict[str, Any], key: str) -> float:
    """Paced latency of ``target`` minus that of nginx direct, in ms."""
    return float(target["paced"][key] - base["paced"][key])


def render(results: dict[str, Any]) -> str:
    targets = results["targets"]
    base = targets[0]  # nginx direct
    best = best_variant(results)
    best_cap = capacity(best)
    m, s = results["machine"], results["settings"]
    lines = [
        "# Upstream HTTP client and server layer for the hot path",
        "",
        "Generated by `loadtests/clients/run.py` (do not edit by hand: rerun it). Raw figures, including wrk's",
        "p90 and max, in `loadtests/clients/results.json`.",
        "",
        "## Conclusion",
        "",
        conclusion(results),
        "",
        "## How it was measured",
        "",
        f"Command, from the repository root: `{COMMAND}` "
        f"(run {results['generated_at']}, took {results['elapsed_s']:.0f} s); `--render-only` rewrites this page "
        "from results.json, `--help` lists the other options.",
        "",
        "Every variant is one uvicorn worker (`" + " ".join(UVICORN_FLAGS) + "`) that reads the POST body, "
        "parses and re-serialises it with orjson, forwards it to a fixed-response nginx upstream "
        f"({len(UPSTREAM_BODY)}-byte `chat.completion` JSON, keep-alive, 1 worker process) and returns the "
        "upstream's status and body; the client and its pool are created once, in the ASGI lifespan "
        "(`loadtests/clients/apps.py`). Before loading, one request is checked end to end. The load is wrk, "
        f"1 thread, POSTing a {len(REQUEST_BODY)}-byte chat request: a {s['warmup']} s warm-up (discarded), "
        f"{s['connections']} connections for {s['duration']} s (saturation), {s['low_connections']} connections "
        f"for {s['low_duration']} s back to back (closed loop), and {s['low_connections']} connections each "
        f"pausing {s['paced_delay_ms']} ms between requests for {s['low_duration']} s (paced, about 500 req/s: "
        "the rate at which the gateway's added-latency target is set). The server under test is pinned to CPU "
        f"{s['server_cpu']}; wrk, the upstream nginx and the harness to CPU {s['load_cpu']}. nginx direct is wrk "
        "against a second nginx pinned to the server CPU: the ceiling and the latency baseline. Server CPU is "
        "user + system time of the server process from /proc over the run; upstream connections come from the "
        "upstream nginx's stub_status (opened: accepted during the saturation run; held: active half-way through). "
        "Other load on server CPU: the share of the server's core used by other processes on this shared machine "
        f"(from /proc/stat); a saturation or paced run with more than {100 * s['noise_limit']:.0f}% is run a second "
        f"time (within a {s['retry_budget']} s budget) and the less disturbed attempt kept.",
        "",
        f"Machine: {m['nproc']} CPUs ({m['cpu_model']}), Linux {m['kernel']}, Python {m['python']}, "
        f"{m['tools'].get('nginx', 'nginx')}, {m['tools'].get('wrk', 'wrk')}. Load average "
        f"{', '.join(str(x) for x in m['loadavg_at_start'])} at the start and "
        f"{', '.join(str(x) for x in m['loadavg_at_end'])} at the end: a shared machine, so compare ratios "
        "within this run rather than absolute figures across runs.",
        "",
        "Packages: " + ", ".join(f"{k} {v}" for k, v in m["packages"].items() if v) + ".",
        "",
        f"## Throughput ({s['connections']} connections, saturation)",
        "",
        "req/s is what wrk measured. Other tenants of this machine took part of the server's core during some "
        "runs (last column), so the comparison uses capacity: requests per second of server CPU (1,000,000 / "
        "CPU µs per request), what one worker serves with its core to itself. For nginx direct wrk, not nginx, "
        "is the limit, hence its server CPU below 100%.",
        "",
        "| Variant | req/s | capacity req/s | vs best | % of nginx | p50 ms | p99 ms | server CPU | CPU µs/req "
        "| upstream conns opened | upstream conns held | errors | other load on server CPU |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for t in targets:
        sat = t["saturation"]
        up = sat.get("upstream", {})
        lines.append(
            f"| {t['label']} | {fmt(sat['rps'], 0)} | {fmt(capacity(t), 0)} | {capacity(t) / best_cap:.3f} | "
            f"{100 * capacity(t) / capacity(base):.1f}% | {fmt(sat['p50_ms'])} | {fmt(sat['p99_ms'])} | "
            f"{100 * sat['server_cpu_util']:.0f}% | {fmt(sat['server_cpu_us_per_req'], 0)} | "
            f"{up.get('connections_opened', '-')} | {up.get('connections_active_mid_run', '-')} | {sat['errors']} | "
            f"{100 * sat['other_load_on_server_cpu']:.0f}% |"
        )
    lines += [
        "",
        "## Latency at low load",
        "",
        f"Closed loop: {s['low_connections']} connections back to back (this saturates the slower variants). "
        f"Paced: {s['low_connections']} connections pausing {s['paced_delay_ms']} ms between requests. "
        "Added: the paced figure minus nginx direct's (the target for the whole gateway with every "
        "feature on: p50 <= 0.5 ms, p99 <= 2 ms).",
        "",
        "| Variant | closed req/s | closed p50 ms | closed p99 ms | paced req/s | paced p50 ms | paced p99 ms "
        "| added p50 ms | added p99 ms | paced CPU µs/req | errors | other load on server CPU (paced) |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for t in targets:
        low, paced = t["low"], t["paced"]
        is_base = t is base
        lines.append(
            f"| {t['label']} | {fmt(low['rps'], 0)} | {fmt(low['p50_ms'], 3)} | {fmt(low['p99_ms'], 3)} | "
            f"{fmt(paced['rps'], 0)} | {fmt(paced['p50_ms'], 3)} | {fmt(paced['p99_ms'], 3)} | "
            f"{fmt(None if is_base else added(t, base, 'p50_ms'), 3)} | "
            f"{fmt(None if is_base else added(t, base, 'p99_ms'), 3)} | {fmt(paced['server_cpu_us_per_req'], 0)} | "
            f"{low['errors'] + paced['errors']} | {100 * paced['other_load_on_server_cpu']:.0f}% |"
        )
    alone = results.get("clients_alone")
    if alone:
        top = CLIENT_CONCURRENCY[-1]
        lines += [
            "",
            "## The upstream clients alone",
            "",
            "`loadtests/clients/client_bench.py`: each client (generous pool limits, uvloop, the same forwarder "
            f"code as the servers) POSTing to the upstream nginx from {', '.join(map(str, CLIENT_CONCURRENCY))} "
            f"concurrent tasks for {s['client_seconds']:g} s each, no server in front, pinned to the server CPU, "
            "after a 0.5 s warm-up in which all tasks start at once (so the pool grows to the concurrency). "
            f"Conns: connections in the pool at the end of the {top}-task run. The last three columns come from a "
            f"separate {top}-task run under cProfile (indicative): the share of CPU in the pool's bookkeeping ("
            + ", ".join(f"{k}: " + " + ".join(f"`{f}`" for _, f in v) for k, v in POOL_FUNCTIONS.items())
            + "), assignment passes per request, and requests re-queued after losing the connection they had "
            "been assigned (`ConnectionNotAvailable`), per request.",
            "",
            "| Client | "
            + " | ".join(f"req/s @{c} | CPU µs/req @{c}" for c in CLIENT_CONCURRENCY)
            + f" | CPU @{top} / @{CLIENT_CONCURRENCY[0]} | conns @{top} | bookkeeping share | assign passes/req "
            "| re-queued/req |",
            "|---|" + "--:|" * (2 * len(CLIENT_CONCURRENCY) + 5),
        ]
        for client in CLIENTS:
            runs = {r["concurrency"]: r for r in alone["runs"] if r["client"] == client}
            prof = next(p for p in alone["profiles"] if p["client"] == client)
            cells = " | ".join(
                f"{fmt(runs[c]['rps'], 0)} | {fmt(runs[c]['cpu_us_per_req'], 0)}" for c in CLIENT_CONCURRENCY
            )
            growth = runs[top]["cpu_us_per_req"] / runs[CLIENT_CONCURRENCY[0]]["cpu_us_per_req"]
            lines.append(
                f"| {client} | {cells} | {growth:.2f}x | {runs[top]['pool_connections_at_end'] or '-'} | "
                f"{100 * prof['pool_share']:.0f}% | {fmt(prof.get('assign_passes_per_req'))} | "
                f"{fmt(prof.get('requeued_per_req'))} |"
            )
    lines += ["", "## Observations", "", *(f"- {o}" for o in observations(results)), ""]
    return "\n".join(lines)


def capacity(target: dict[str, Any]) -> float:
    """Saturation requests per second of server CPU: robust to other tenants taking part of the core."""
    return float(target["saturation"]["capacity_rps"])


def best_variant(results: dict[str, Any]) -> dict[str, Any]:
    """The variant with the highest capacity among those that answered every request correctly."""
    ok = [t for t in results["targets"][1:] if t["saturation"]["errors"] == 0]
    return max(ok, key=capacity)


def conclusion(results: dict[str, Any]) -> str:
    """3-5 sentences, every figure taken from this run."""
    base, variants = results["targets"][0], results["targets"][1:]
    by_name = {t["name"]: t for t in variants}
    best = best_variant(results)
    cap = capacity(best)
    others = sorted((t for t in variants if t is not best), key=lambda t: -capacity(t))
    ratios = "; ".join(f"{cap / capacity(t):.1f}x {t['label']}" for t in others) or "the only variant measured"
    sentences = [
        f"The hot path should use **{best['label']}**: it spent {best['saturation']['server_cpu_us_per_req']:,.0f} "
        f"µs of CPU per forwarded request, a capacity of {cap:,.0f} req/s per worker core (wrk measured "
        f"{best['saturation']['rps']:,.0f} req/s while other tenants took "
        f"{100 * best['saturation']['other_load_on_server_cpu']:.0f}% of that core), which is {ratios}.",
        f"nginx alone needs {base['saturation']['server_cpu_us_per_req']:,.0f} µs per request "
        f"({capacity(base):,.0f} req/s per core), so the Python forwarder, not the upstream, is the bottleneck in "
        "every variant.",
    ]
    r = {name: capacity(t) for name, t in by_name.items()}
    pairs = [
        client
        for client in ("httpx", "httpx2")
        if {f"fastapi-{client}", f"asgi-{client}", "fastapi-aiohttp", "asgi-aiohttp"} <= r.keys()
    ]
    if pairs:
        sentences.append(
            f"The two choices compound: with aiohttp fixed, dropping FastAPI for a bare ASGI callable is worth "
            f"{r['asgi-aiohttp'] / r['fastapi-aiohttp']:.1f}x, and with the server layer fixed, aiohttp is worth "
            + " and ".join(
                f"{r['fastapi-aiohttp'] / r[f'fastapi-{c}']:.1f}x (FastAPI) and "
                f"{r['asgi-aiohttp'] / r[f'asgi-{c}']:.1f}x (bare ASGI) over {c}"
                for c in pairs
            )
            + "."
        )
    a50, a99 = added(best, base, "p50_ms"), added(best, base, "p99_ms")
    cpu_ms = best["paced"]["server_cpu_us_per_req"] / 1000
    lowest = min(variants, key=lambda t: added(t, base, "p50_ms"))
    latency = (
        f"At about {best['paced']['rps']:,.0f} req/s it adds {a50:.2f} ms at p50 and {a99:.2f} ms at p99 over "
        "calling nginx directly, "
    )
    if a50 <= 0.5 and a99 <= 2.0:
        latency += (
            f"inside the 0.5 ms / 2 ms target for the whole gateway, leaving {0.5 - a50:.2f} ms at "
            "p50 for auth, rate limiting, queueing, metrics and billing."
        )
    else:
        latency += (
            "over the 0.5 ms / 2 ms target for the whole gateway on this shared machine, though only "
            f"{cpu_ms:.2f} ms per request is CPU time in the forwarder (the rest is off its CPU: the extra "
            "loopback hop, waiting for a core); "
            + (
                "no variant added less."
                if lowest is best
                else f"the lowest added p50 of any variant was {lowest['label']}'s "
                f"{added(lowest, base, 'p50_ms'):.2f} ms."
            )
        )
    sentences.append(latency)
    reaching = [t for t in variants if capacity(t) >= 4000]
    if not reaching:
        sentences.append(
            "No variant has the capacity for the target of 4,000 req/s per worker, even with no feature on."
        )
    elif reaching == [best]:
        sentences.append(
            f"It is the only combination with the capacity for the target of 4,000 req/s per worker "
            f"({cap / 4000:.1f}x the target before any gateway feature runs); every other one misses it with no "
            "features at all."
        )
    else:
        sentences.append(
            f"{len(reaching)} combinations have the capacity for the target of 4,000 req/s per worker with no "
            "feature on (" + ", ".join(t["label"] for t in reaching) + f"), the best {cap / 4000:.1f}x the target."
        )
    return " ".join(sentences)


def observations(results: dict[str, Any]) -> list[str]:
    """Data-driven notes on the pools: default limits, and what happens at 64 concurrent requests."""
    by_name = {t["name"]: t for t in results["targets"]}
    notes = []
    for client in ("httpx", "httpx2"):
        default, generous = by_name.get(f"fastapi-{client}-default"), by_name.get(f"fastapi-{client}")
        if default and generous:
            d, g = default["saturation"], generous["saturation"]
            ratio = capacity(generous) / capacity(default)
            effect = (
                "so the pool's size limits are not what holds it back"
                if 0.85 <= ratio <= 1.15
                else ("so the default limits cost capacity" if ratio > 1.15 else "so the larger pool costs capacity")
            )
            notes.append(
                f"{client} with its default `Limits(max_connections=100, max_keepalive_connections=20)` opened "
                f"{d['upstream']['connections_opened']} upstream connections during the saturation run and held "
                f"{d['upstream']['connections_active_mid_run']} half-way, at a capacity of {capacity(default):,.0f} "
                f"req/s; with `Limits(1000, 1000)` it opened {g['upstream']['connections_opened']} and held "
                f"{g['upstream']['connections_active_mid_run']}, at {capacity(generous):,.0f} req/s ({ratio:.2f}x), "
                f"{effect}."
            )
    held = {
        t["label"]: t["saturation"]["upstream"]["connections_active_mid_run"]
        for t in results["targets"]
        if "upstream" in t["saturation"]
    }
    if held:
        notes.append(
            "Upstream connections held half-way through the 64-connection run: "
            + "; ".join(f"{label} {n}" for label, n in held.items())
            + "."
        )
    for client in ("httpx", "httpx2"):
        runs_of = [t for t in results["targets"] if t.get("client") == client and "upstream" in t["saturation"]]
        if len(runs_of) >= 2:
            few = min(runs_of, key=lambda t: t["saturation"]["upstream"]["connections_active_mid_run"])
            many = max(runs_of, key=lambda t: t["saturation"]["upstream"]["connections_active_mid_run"])
            n_few = few["saturation"]["upstream"]["connections_active_mid_run"]
            n_many = many["saturation"]["upstream"]["connections_active_mid_run"]
            if n_many >= 2 * max(n_few, 1):
                notes.append(
                    f"{client}'s cost depends on how far its pool has grown: {many['label']} held {n_many} upstream "
                    f"connections and spent {many['saturation']['server_cpu_us_per_req']:,.0f} µs of CPU per request, "
                    f"{few['label']} held {n_few} and spent {few['saturation']['server_cpu_us_per_req']:,.0f} µs, so "
                    f"{client}'s figures move between runs with how many connections its pool happened to open."
                )
    alone = results.get("clients_alone")
    if alone:
        top, low = CLIENT_CONCURRENCY[-1], CLIENT_CONCURRENCY[0]
        runs = {(r["client"], r["concurrency"]): r for r in alone["runs"]}
        prof = {p["client"]: p for p in alone["profiles"]}
        parts = [
            f"{c} {runs[(c, low)]['cpu_us_per_req']:,.0f} -> {runs[(c, top)]['cpu_us_per_req']:,.0f} µs "
            f"({runs[(c, top)]['cpu_us_per_req'] / runs[(c, low)]['cpu_us_per_req']:.2f}x)"
            for c in CLIENTS
        ]
        notes.append(
            f"CPU per request of the client alone at {low} and {top} concurrent requests: " + "; ".join(parts) + "."
        )
        for client in ("httpx", "httpx2"):
            p = prof.get(client)
            if not p or p.get("requeued_per_req") is None:
                continue
            conns = runs[(client, top)]["pool_connections_at_end"]
            text = (
                f"{client} at {top} concurrent requests: the pool ran its assignment pass "
                f"{p['assign_passes_per_req']:.1f} times per request (2 is the minimum: one at the start, one at the "
                f"end) and re-queued {p['requeued_per_req']:.2f} requests per request; it held {conns} connections "
                f"for {top} concurrent requests, and its bookkeeping took {100 * p['pool_share']:.0f}% of the CPU."
            )
            if p["requeued_per_req"] >= 0.5:
                text += (
                    " So the pool does serialise under concurrency: httpcore 1.0 hands the same idle connection to "
                    "several queued requests, all but one get `ConnectionNotAvailable` and go back to the queue for "
                    "another pass, and each pass (`_assign_requests_to_connections`, synchronous, so it blocks the "
                    "event loop) costs O(connections x idle connections) for its keep-alive check plus "
                    "O(queued requests x connections) for the assignment: the cost per request grows with the number "
                    "of pooled connections."
                )
            notes.append(text)
    for t in results["targets"]:
        for phase in ("saturation", "low", "paced"):
            if t[phase]["errors"]:
                notes.append(
                    f"{t['label']}: {t[phase]['errors']} errors in the {phase} run {t[phase]['error_detail']}."
                )
    return notes


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", choices=sorted(VARIANTS), help="run only these variants")
    parser.add_argument("--duration", type=int, default=Settings.duration, help="saturation run, seconds")
    parser.add_argument("--low-duration", type=int, default=Settings.low_duration, help="low-load runs, seconds")
    parser.add_argument("--warmup", type=int, default=Settings.warmup, help="discarded warm-up, seconds")
    parser.add_argument("--client-seconds", type=float, default=Settings.client_seconds, help="client-alone runs")
    parser.add_argument("--skip-clients-alone", action="store_true", help="skip the client-only measurement")
    parser.add_argument("--no-write", action="store_true", help="print results, write neither file")
    parser.add_argument("--render-only", action="store_true", help="rewrite the Markdown from results.json, no load")
    args = parser.parse_args()
    if args.render_only:
        DOC.write_text(render(json.loads(RESULTS.read_text())))
        print(f"wrote {DOC.relative_to(REPO)} from {RESULTS.relative_to(REPO)}")
        return

    if not shutil.which("wrk") or not shutil.which("nginx", path=f"{os.environ.get('PATH', '')}:/usr/sbin"):
        sys.exit("needs wrk and nginx (apt-get install wrk nginx)")
    cpus = sorted(os.sched_getaffinity(0))
    load_cpu, server_cpu = (cpus[0], cpus[1]) if len(cpus) >= 2 and shutil.which("taskset") else (None, None)
    if load_cpu is not None:
        os.sched_setaffinity(0, {load_cpu})  # the harness, and the upstream nginx it starts, stay off the server CPU
    settings = Settings(
        warmup=args.warmup,
        duration=args.duration,
        low_duration=args.low_duration,
        client_seconds=args.client_seconds,
        load_cpu=load_cpu,
        server_cpu=server_cpu,
    )
    names = args.only or list(VARIANTS)
    budget = RetryBudget(settings.retry_budget)
    started = time.monotonic()
    results: dict[str, Any] = {
        "command": COMMAND,
        "generated_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "settings": settings.__dict__,
        "upstream_body_bytes": len(UPSTREAM_BODY),
        "request_body_bytes": len(REQUEST_BODY),
        "targets": [],
    }

    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as tmp_name:
        tmp = Path(tmp_name)
        print("nginx-direct ...", flush=True)
        with nginx(server_cpu) as (port, proc):
            figures = measure(port, process_tree(proc.pid), settings, tmp, budget)
        results["targets"].append({"name": "nginx-direct", "label": "nginx direct (ceiling)", **figures})
        print_row(results["targets"][-1])

        with nginx(load_cpu) as (upstream_port, _upstream):
            for name in names:
                print(f"{name} ...", flush=True)
                variant = VARIANTS[name]
                with forwarding_server(name, upstream_port, server_cpu) as (port, proc):
                    figures = measure(port, [proc.pid], settings, tmp, budget, upstream_port=upstream_port)
                results["targets"].append(
                    {
                        "name": name,
                        "label": variant.label,
                        "server": variant.server,
                        "client": variant.client,
                        "limits": variant.limits,
                        **figures,
                    }
                )
                print_row(results["targets"][-1])
            if not args.skip_clients_alone:
                print("clients alone ...", flush=True)
                results["clients_alone"] = clients_alone(upstream_port, settings)
                for run in results["clients_alone"]["runs"] + results["clients_alone"]["profiles"]:
                    print(f"  {run}")

    results["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    print(f"done in {results['elapsed_s']} s")
    if args.no_write:
        print(json.dumps(results, indent=2))
        return
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(render(results))
    print(f"wrote {RESULTS.relative_to(REPO)} and {DOC.relative_to(REPO)}")


def print_row(target: dict[str, Any]) -> None:
    sat, low, paced = target["saturation"], target["low"], target["paced"]
    up = sat.get("upstream", {})
    print(
        f"  @64: {sat['rps']:>9,.0f} req/s  p50 {sat['p50_ms']:.2f} ms  p99 {sat['p99_ms']:.2f} ms  "
        f"cpu {sat['server_cpu_us_per_req']} µs/req ({100 * sat['server_cpu_util']:.0f}%)  errors {sat['errors']}  "
        f"upstream conns opened {up.get('connections_opened', '-')} held {up.get('connections_active_mid_run', '-')}  "
        f"other load {100 * sat['other_load_on_server_cpu']:.0f}% (attempts {sat['attempts']})"
    )
    print(
        f"  @4:  {low['rps']:>9,.0f} req/s  p50 {low['p50_ms']:.3f} ms  p99 {low['p99_ms']:.3f} ms   "
        f"paced: {paced['rps']:,.0f} req/s  p50 {paced['p50_ms']:.3f} ms  p99 {paced['p99_ms']:.3f} ms  "
        f"other load {100 * paced['other_load_on_server_cpu']:.0f}% (attempts {paced['attempts']})",
        flush=True,
    )


if __name__ == "__main__":
    main()
