"""gateway.wire.httpclient against aiohttp: CPU per request and req/s of the client alone, no server in front.

    .venv/bin/python loadtests/bench_httpclient.py                  # everything, 3 s per run, 3 repeats
    .venv/bin/python loadtests/bench_httpclient.py --seconds 1 --repeat 1 --target nginx

Upstreams, each pinned to CPU 0 (``--server-cpu``):

- ``nginx``: a throwaway foreground nginx (one worker, keep-alive) answering every POST with a fixed ~300-byte
  ``chat.completion`` JSON, configured as in loadtests/clients/run.py;
- ``sim``: ``gateway sim`` with zero latencies, non-streaming chat (16 tokens);
- ``sim-stream``: the same simulator, streaming chat with usage (16 tokens: 19 SSE events in 17 chunks), the
  body read chunk by chunk as the gateway's relay does.

For each upstream, client (``httpclient``: ``Pool``; ``aiohttp``: a ``ClientSession`` over
``TCPConnector(limit=0)`` used as the gateway used it before it had its own client, with a
``ClientTimeout(connect, sock_read)``) and concurrency (1, 4, 64 tasks in a closed loop), a fresh process
pinned to CPU 1 (``--client-cpu``) runs uvloop, warms up for 0.5 s (so the pool grows to the concurrency),
then measures for ``--seconds``: requests per second (wall clock) and CPU microseconds per request (the
process's user + system time). Each cell is run ``--repeat`` times and the run with the least CPU per request
is kept (other tenants of a shared machine only ever add to it). Prints a Markdown table; results also go to
loadtests/results/bench_httpclient-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.procs import Proc, free_port, python_cmd, wait_http  # noqa: E402

PATH = "/v1/chat/completions"
UPSTREAM_BODY = (
    b'{"id":"chatcmpl-bench0001","object":"chat.completion","created":1700000000,"model":"bench-model-1",'
    b'"choices":[{"index":0,"message":{"role":"assistant",'
    b'"content":"Hello! A fixed reply from the bench upstream."},'
    b'"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":12,"completion_tokens":13,"total_tokens":25}}'
)
CHAT = {
    "model": "sim-model",
    "messages": [{"role": "user", "content": "Say hello in a few words, tersely."}],
    "max_tokens": 16,
}
BODIES = {
    "nginx": json.dumps(CHAT).encode(),
    "sim": json.dumps(CHAT).encode(),
    "sim-stream": json.dumps({**CHAT, "stream": True, "stream_options": {"include_usage": True}}).encode(),
}
# What the gateway sends (gateway/upstream/relay.py backend_headers).
HEADERS = {"content-type": "application/json", "x-request-id": "req_0123456789abcdef01234567"}
CLIENTS = ("httpclient", "aiohttp")
CONCURRENCY = (1, 4, 64)
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
        location / {{
            default_type application/json;
            return 200 '{body}';
        }}
    }}
}}
"""


def pinned(cmd: list[str], cpu: int | None) -> list[str]:
    if cpu is None or shutil.which("taskset") is None:
        return cmd
    return ["taskset", "-c", str(cpu), *cmd]


# --------------------------------------------------------------------------- upstreams


@contextlib.contextmanager
def nginx(cpu: int | None) -> Iterator[str]:
    """A foreground nginx answering UPSTREAM_BODY (as loadtests/clients/run.py starts it); yields its URL."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-nginx-") as tmp:
        os.chmod(tmp, 0o755)  # when run as root the worker drops to nobody and must reach its temp dirs
        conf = Path(tmp) / "nginx.conf"
        conf.write_text(NGINX_CONF.format(tmp=tmp, port=port, body=UPSTREAM_BODY.decode()))
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        with (Path(tmp) / "stderr.log").open("wb") as stderr:
            proc = subprocess.Popen(pinned([binary, "-p", tmp, "-c", str(conf)], cpu), stderr=stderr)
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    wait_http(f"http://127.0.0.1:{port}/", timeout=0.5)
                    break
                except TimeoutError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError("nginx did not start:\n" + (Path(tmp) / "stderr.log").read_text()) from None
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def simulator(cpu: int | None, log_dir: Path) -> Iterator[str]:
    """`gateway sim` with zero latencies, pinned to `cpu`; yields its URL."""
    port = free_port()
    args = ["--host", "127.0.0.1", "--port", str(port), "--ttft-ms", "0", "--itl-ms", "0"]
    args += ["--prefill-us-per-token", "0", "--max-concurrency", "1024"]
    proc = Proc(pinned(python_cmd("sim", *args), cpu), log_dir / "sim.log")
    proc.start()
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=15, proc=proc.popen)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop()


# --------------------------------------------------------------------------- the client process


async def _drive(client: str, url: str, target: str, concurrency: int, seconds: float) -> dict[str, Any]:
    body = BODIES[target]
    stream = target == "sim-stream"

    if client == "httpclient":
        from gateway.wire.httpclient import Pool

        pool = Pool(url, connect_timeout_s=5, read_timeout_s=300)

        async def once() -> int:
            async with await pool.request("POST", PATH, body, HEADERS) as resp:
                if stream:
                    async for _ in resp:
                        pass
                else:
                    await resp.read()
                return resp.status

        async def close() -> None:
            await pool.close()

    else:
        import aiohttp

        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30))
        timeout = aiohttp.ClientTimeout(total=None, connect=5, sock_read=300)
        full_url = url + PATH

        async def once() -> int:
            async with session.post(full_url, data=body, headers=HEADERS, timeout=timeout) as resp:
                if stream:
                    async for _ in resp.content.iter_any():
                        pass
                else:
                    await resp.read()
                return resp.status

        async def close() -> None:
            await session.close()

    count = 0

    async def worker(deadline: float) -> None:
        nonlocal count
        while time.monotonic() < deadline:
            status = await once()
            if status != 200:
                raise RuntimeError(f"upstream answered {status}")
            count += 1

    await asyncio.gather(*(worker(time.monotonic() + 0.5) for _ in range(concurrency)))  # warm-up
    count = 0
    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker(time.monotonic() + seconds) for _ in range(concurrency)))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    await close()
    return {"requests": count, "rps": round(count / wall), "cpu_us_per_req": round(cpu / count * 1e6, 1)}


def client_run(client: str, url: str, target: str, concurrency: int, seconds: float, cpu: int | None) -> Any:
    cmd = [sys.executable, __file__, "--worker", client, "--url", url, "--target", target]
    cmd += ["--concurrency", str(concurrency), "--seconds", str(seconds)]
    out = subprocess.run(pinned(cmd, cpu), capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"client run failed:\n{out.stdout}\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- main


def render(results: dict[str, Any]) -> str:
    lines = [
        "| upstream | concurrency | httpclient req/s | httpclient CPU µs/req | aiohttp req/s | aiohttp CPU µs/req "
        "| CPU ratio (aiohttp / httpclient) |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for target, by_conc in results.items():
        for conc, cell in by_conc.items():
            ours, theirs = cell["httpclient"], cell["aiohttp"]
            lines.append(
                f"| {target} | {conc} | {ours['rps']:,} | {ours['cpu_us_per_req']:.1f} | {theirs['rps']:,} "
                f"| {theirs['cpu_us_per_req']:.1f} | {theirs['cpu_us_per_req'] / ours['cpu_us_per_req']:.2f}x |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--target", action="append", choices=sorted(BODIES), help="default: all")
    parser.add_argument("--concurrency", type=int, action="append", help="default: 1, 4, 64")
    parser.add_argument("--client-cpu", type=int, default=1)
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--worker", choices=CLIENTS, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        import uvloop

        conc = args.concurrency[0] if args.concurrency else 1
        target = args.target[0] if args.target else "nginx"
        print(json.dumps(uvloop.run(_drive(args.worker, args.url, target, conc, args.seconds))))
        return

    targets = args.target or ["nginx", "sim", "sim-stream"]
    concurrencies = args.concurrency or list(CONCURRENCY)
    started = time.time()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-httpclient-") as tmp, contextlib.ExitStack() as stack:
        urls: dict[str, str] = {}
        if "nginx" in targets:
            urls["nginx"] = stack.enter_context(nginx(args.server_cpu))
        if {"sim", "sim-stream"} & set(targets):
            urls["sim"] = urls["sim-stream"] = stack.enter_context(simulator(args.server_cpu, Path(tmp)))
        for target in targets:
            results[target] = {}
            for conc in concurrencies:
                cell: dict[str, Any] = {}
                runs: dict[str, list[Any]] = {client: [] for client in CLIENTS}
                for _ in range(args.repeat):  # interleaved, so a noisy moment hits both clients alike
                    for client in CLIENTS:
                        runs[client].append(
                            client_run(client, urls[target], target, conc, args.seconds, args.client_cpu)
                        )
                for client in CLIENTS:
                    cell[client] = dict(min(runs[client], key=lambda r: r["cpu_us_per_req"]))
                    cell[client]["all_runs"] = runs[client]
                results[target][conc] = cell
                print(
                    f"{target} @{conc}: "
                    + ", ".join(
                        f"{c} {cell[c]['rps']:,} req/s {cell[c]['cpu_us_per_req']:.1f} us/req" for c in CLIENTS
                    ),
                    file=sys.stderr,
                )
    out_dir = ROOT / "loadtests" / "results"
    out_dir.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(started))
    meta = {
        "seconds": args.seconds,
        "repeat": args.repeat,
        "client_cpu": args.client_cpu,
        "server_cpu": args.server_cpu,
        "took_s": round(time.time() - started),
        "loadavg": os.getloadavg(),
    }
    (out_dir / f"bench_httpclient-{stamp}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(render(results))


if __name__ == "__main__":
    main()
