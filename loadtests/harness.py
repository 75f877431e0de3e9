"""What the benchmark suite is made of: processes pinned to cores, a fixed-response nginx upstream, a Redis,
wrk runs read as JSON, and the CPU each server used during a run.

The machine has 2 cores and is shared, so the suite pins the server under test to one core and everything
else (wrk, the upstream, Redis, this script) to the other, records the server's own CPU time per request
(steadier than req/s when other tenants load the machine) and how much of the server's core other
processes took meanwhile (`other_load`), and repeats a disturbed run once within a retry budget.
Benchmarks record figures; nothing here asserts on time.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

#: What the nginx upstream answers to a chat completion: a realistic non-streaming answer, about 300 bytes.
UPSTREAM_BODY = (
    b'{"id":"chatcmpl-bench0001","object":"chat.completion","created":1700000000,"model":"bench-up",'
    b'"choices":[{"index":0,"message":{"role":"assistant",'
    b'"content":"Hello! A fixed reply from the bench upstream."},'
    b'"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":12,"completion_tokens":13,"total_tokens":25}}'
)
#: What wrk POSTs: a small chat request.
REQUEST_BODY = (
    b'{"model":"bench-model","messages":[{"role":"system","content":"You are terse."},'
    b'{"role":"user","content":"Say hello."}],"max_tokens":16,"temperature":0}'
)
CHAT_PATH = "/v1/chat/completions"

# nginx as a vLLM stand-in: chat completions get the fixed answer; the gateway's start-up probe (an empty
# cache_salt on /v1/completions) gets vLLM's 400, so the backend counts as salt-enforcing and every request
# carries a salt, as in production.
_NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
error_log {tmp}/error.log warn;
pid {tmp}/nginx.pid;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_timeout 75s;
    keepalive_requests 100000000;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        default_type application/json;
        location = /nginx_status {{ stub_status; }}
        location = /v1/completions {{
            return 400 '{{"error":{{"message":"cache_salt must be a non-empty string","param":"cache_salt"}}}}';
        }}
        location = /v1/models {{ return 200 '{{"object":"list","data":[{{"id":"bench-up","object":"model"}}]}}'; }}
        location / {{ return 200 '{body}'; }}
    }}
}}
"""

_WRK_LUA = """\
wrk.method = "POST"
wrk.body = [[{body}]]
wrk.headers["Content-Type"] = "application/json"
{headers}
{delay}
done = function(summary, latency, requests)
    local e = summary.errors
    io.write(string.format(
        'BENCHJSON {{"requests":%.0f,"duration_us":%.0f,"p50_us":%.1f,"p90_us":%.1f,"p99_us":%.1f,'
        .. '"p999_us":%.1f,"max_us":%.1f,"mean_us":%.1f,"err_connect":%.0f,"err_read":%.0f,'
        .. '"err_write":%.0f,"err_status":%.0f,"err_timeout":%.0f}}\\n',
        summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
        latency:percentile(99), latency:percentile(99.9), latency.max, latency.mean, e.connect, e.read,
        e.write, e.status, e.timeout))
end
"""


# --- processes -------------------------------------------------------------------------------------


def cores() -> tuple[int | None, int | None]:
    """(load core, server core): the last CPU for the server under test, the first for everything else."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2 and shutil.which("taskset"):
        return cpus[0], cpus[-1]
    return None, None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pinned(cmd: list[str], cpu: int | None) -> list[str]:
    """`taskset -c cpu cmd` (taskset execs, so the pid stays the command's)."""
    return cmd if cpu is None else ["taskset", "-c", str(cpu), *cmd]


def start(
    cmd: list[str],
    *,
    cpu: int | None = None,
    env: dict[str, str] | None = None,
    log: Path | None = None,
    cwd: Path = ROOT,
) -> subprocess.Popen[bytes]:
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - the child keeps it
    return subprocess.Popen(
        pinned(cmd, cpu), stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=str(cwd)
    )


def stop(proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_port(port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.02)
    raise RuntimeError(f"nothing listening on {port} after {timeout}s")


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http(url: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with _NO_PROXY.open(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_ready(url: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = 30.0) -> float:
    """Poll `url` until it answers 200; returns the seconds it took."""
    started = time.perf_counter()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        with contextlib.suppress(OSError):
            if http(url)[0] == 200:
                return time.perf_counter() - started
        time.sleep(0.01)
    raise RuntimeError(f"{url} not ready after {timeout}s")


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (nginx master and worker; gateway supervisor and workers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of the processes, from /proc/<pid>/stat."""
    ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def core_busy_seconds(cpu: int | None) -> float:
    """Time one CPU spent running anything (and hypervisor steal), from /proc/stat; 0 when not pinned."""
    if cpu is None:
        return 0.0
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{cpu} "):
            user, nice, system, _idle, _iowait, _irq, _softirq, steal = (int(x) for x in line.split()[1:9])
            return (user + nice + system + steal) / os.sysconf("SC_CLK_TCK")
    return 0.0


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return round(total / 1024, 1)


# --- upstreams ------------------------------------------------------------------------------------


@contextlib.contextmanager
def nginx(cpu: int | None) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """A foreground nginx answering UPSTREAM_BODY (a vLLM stand-in); yields (port, process)."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-nginx-") as tmp:
        os.chmod(tmp, 0o755)  # as root, the worker runs as nobody and must reach its temp dirs
        conf = Path(tmp) / "nginx.conf"
        conf.write_text(_NGINX_CONF.format(tmp=tmp, port=port, body=UPSTREAM_BODY.decode()))
        proc = start([binary, "-p", tmp, "-c", str(conf)], cpu=cpu, log=Path(tmp) / "stderr.log")
        try:
            wait_port(port, proc)
            got = http(f"http://127.0.0.1:{port}{CHAT_PATH}", REQUEST_BODY)
            if got != (200, UPSTREAM_BODY):
                raise RuntimeError(f"nginx answered {got!r}")
            yield port, proc
        finally:
            stop(proc)


@contextlib.contextmanager
def redis(cpu: int | None) -> Iterator[str]:
    """A throwaway redis-server on a free port; yields its URL."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-redis-") as tmp:
        cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        proc = start([*cmd, "--dir", tmp], cpu=cpu)
        try:
            wait_port(port, proc)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            stop(proc)


# --- load -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pacing:
    """Each wrk connection waits a random 5-15 ms between requests: an arrival rate of about
    connections / (10 ms + latency), spread out (fixed delays would make the connections send in step).
    A paced closed loop, not an open one: a slow answer delays that connection's next request."""

    connections: int
    min_ms: int = 5
    max_ms: int = 15

    @classmethod
    def for_rate(cls, rate: float) -> Pacing:
        return cls(max(1, round(rate * 0.0105)))


def wrk(
    url: str,
    *,
    connections: int,
    seconds: float,
    cpu: int | None,
    headers: dict[str, str] | None = None,
    body: bytes = REQUEST_BODY,
    pacing: Pacing | None = None,
) -> dict[str, Any]:
    """One wrk run (1 thread, 5 s timeout); wrk's own figures, parsed."""
    lua_headers = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in (headers or {}).items())
    delay = f"function delay() return math.random({pacing.min_ms}, {pacing.max_ms}) end" if pacing is not None else ""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(_WRK_LUA.format(body=body.decode(), headers=lua_headers, delay=delay))
    cmd = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "5s",
        "--latency",
        "-s",
        script.name,
        url,
    ]
    try:
        out = subprocess.run(pinned(cmd, cpu), capture_output=True, text=True, timeout=seconds + 60, check=False)
    finally:
        os.unlink(script.name)
    line = next((x for x in out.stdout.splitlines() if x.startswith("BENCHJSON ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    raw = json.loads(line.removeprefix("BENCHJSON "))
    errors = {k.removeprefix("err_"): int(v) for k, v in raw.items() if k.startswith("err_") and v}
    seconds_run = raw["duration_us"] / 1e6
    return {
        "connections": connections,
        "pacing_ms": None if pacing is None else [pacing.min_ms, pacing.max_ms],
        "requests": int(raw["requests"]),
        "errors": sum(errors.values()),
        "error_detail": errors,
        "seconds": round(seconds_run, 2),
        "rps": round(raw["requests"] / seconds_run, 1),
        "p50_ms": round(raw["p50_us"] / 1000, 3),
        "p90_ms": round(raw["p90_us"] / 1000, 3),
        "p99_ms": round(raw["p99_us"] / 1000, 3),
        "p999_ms": round(raw["p999_us"] / 1000, 3),
        "max_ms": round(raw["max_us"] / 1000, 3),
    }


@dataclass
class Target:
    """A server under test: where to send load, which processes' CPU to count, on which core it runs."""

    name: str
    url: str
    pids: Callable[[], list[int]]
    cpu: int | None
    headers: dict[str, str]


def measure(
    target: Target,
    *,
    connections: int,
    seconds: float,
    load_cpu: int | None,
    pacing: Pacing | None = None,
    body: bytes = REQUEST_BODY,
) -> dict[str, Any]:
    """One wrk run against `target`, with the target's CPU time per request and the other load on its core."""
    pids = target.pids()
    cpu_before = cpu_seconds(pids)
    core_before = core_busy_seconds(target.cpu)
    result = wrk(
        target.url,
        connections=connections,
        seconds=seconds,
        cpu=load_cpu,
        headers=target.headers,
        body=body,
        pacing=pacing,
    )
    used = cpu_seconds(pids) - cpu_before
    core = core_busy_seconds(target.cpu) - core_before
    duration = result["seconds"] or seconds
    result.update(
        cpu_s=round(used, 2),
        cpu_util=round(used / duration, 3),
        cpu_us_per_req=round(used / result["requests"] * 1e6, 1) if result["requests"] else None,
        # Requests per CPU-second: what the target would serve with its core(s) to itself.
        capacity_rps=round(result["requests"] / used) if used else None,
        other_load=round(max(core - used, 0.0) / duration, 3) if target.cpu is not None else None,
    )
    return result


class RetryBudget:
    """Seconds of load that may be spent re-running measurements disturbed by other tenants."""

    def __init__(self, seconds: float, noise_limit: float = 0.10) -> None:
        self.left = seconds
        self.noise_limit = noise_limit

    def quietest(self, run: Callable[[], dict[str, Any]], seconds: float) -> dict[str, Any]:
        """Run once; if other processes took more than `noise_limit` of the server's core, run once more
        (budget allowing) and keep the less disturbed attempt."""
        result = run()
        result["attempts"] = 1
        if (result.get("other_load") or 0) > self.noise_limit and self.left >= seconds:
            self.left -= seconds
            again = run()
            again["attempts"] = 2
            result = min(result, again, key=lambda r: r.get("other_load") or 0)
        return result
