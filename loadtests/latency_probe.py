"""Where the added latency at 500 req/s goes: the evidence behind BENCHMARKS.md's "why the latency misses".

    .venv/bin/python -m loadtests.latency_probe [--rate 500] [--seconds 8] [--doc docs/BENCHMARKS.md]

Same set-up as the suite (gateway on one core; nginx, Redis, wrk on the other; every feature on), then:

1. the gateway's CPU per request at the paced rate against the same gateway saturated (closed loop, 64
   connections): what batching saves, and what an idle core costs per request;
2. the quota scripts' own run time inside Redis at that rate (SLOWLOG with a zero threshold, which adds a
   little to each entry), per script;
3. a Redis PING round trip from the gateway's core and from Redis's own core, with 2 ms idle between
   pings (what a request at 500 req/s sees): the price of crossing to a core that went idle;
4. the same paced load against a gateway whose event loop never sleeps (a task that yields forever, so
   the core never idles): how much of the gap is the gateway's core waking up.

It prints a Markdown block; `--doc` also writes it between `<!-- probe:begin -->` and `<!-- probe:end -->`.
Figures, not assertions: nothing here fails on time.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import socket
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis

from gateway.admission.limits._redis import _Script
from loadtests import harness, suite
from loadtests.harness import Pacing, Target

# The gateway, with one task that yields to the loop forever: the loop polls instead of sleeping.
_SPINNING = (
    "import asyncio, sys\n"
    "from gateway import app, cli\n"
    "lifespan = app.GatewayApp._lifespan\n"
    "async def spin():\n"
    "    while True:\n"
    "        await asyncio.sleep(0)\n"
    "async def spinning(self, receive, send):\n"
    "    task = asyncio.get_running_loop().create_task(spin())\n"
    "    try:\n"
    "        return await lifespan(self, receive, send)\n"
    "    finally:\n"
    "        task.cancel()\n"
    "app.GatewayApp._lifespan = spinning\n"
    "sys.exit(cli.main(sys.argv[1:]))\n"
)


@contextlib.contextmanager
def _gateway(tmp: Path, upstream: str, redis_url: str, cpu: int | None, *, spinning: bool) -> Iterator[Target]:
    if not spinning:
        with suite.gateway(tmp, upstream, redis_url, cpu) as (target, _proc, _ready):
            yield target
        return
    port = harness.free_port()
    config = suite.gateway_config(tmp, port, upstream, redis_url)
    env = {"BENCH_KEY": suite.KEY, "GATEWAY_ADMIN_KEY": suite.ADMIN, "GATEWAY_SALT_SECRET": "s" * 32}
    cmd = [harness.PY, "-c", _SPINNING, "serve", "--config", str(config)]
    proc = harness.start(cmd, cpu=cpu, env=env, log=tmp / f"gateway-spinning-{port}.log", cwd=harness.ROOT)
    try:
        harness.wait_ready(f"http://127.0.0.1:{port}/readyz", proc)
        yield Target(
            "gateway, loop never sleeps",
            f"http://127.0.0.1:{port}{harness.CHAT_PATH}",
            lambda: harness.process_tree(proc.pid),
            cpu,
            {"Authorization": f"Bearer {suite.KEY}"},
        )
    finally:
        harness.stop(proc, timeout=30)


def _script_times(client: redis.Redis, run: Any) -> dict[str, dict[str, int]]:
    """Each quota script's run time inside Redis (us) while `run()` loads the gateway."""
    names = {_Script(name).sha: name for name in ("admit", "settle", "renew")}
    client.config_set("slowlog-max-len", 1_000_000)
    client.config_set("slowlog-log-slower-than", 0)
    client.slowlog_reset()
    try:
        run()
        entries = client.slowlog_get(1_000_000)
    finally:
        client.config_set("slowlog-log-slower-than", 10_000)
        client.slowlog_reset()
    times: dict[str, list[int]] = collections.defaultdict(list)
    for entry in entries:
        words = entry["command"].split(b" ", 2)
        if words[0].upper() == b"EVALSHA" and len(words) > 1:
            times[names.get(words[1].decode(), "other")].append(int(entry["duration"]))
    out = {}
    for name, values in times.items():
        values.sort()
        out[name] = {
            "calls": len(values),
            "p50_us": values[len(values) // 2],
            "p99_us": values[min(len(values) - 1, int(len(values) * 0.99))],
        }
    return out


def _ping_rtt(port: int, cpu: int | None, count: int = 400, gap_s: float = 0.002) -> dict[str, float]:
    """PING round trips from this process pinned to `cpu`, idle `gap_s` between them (us)."""
    before = os.sched_getaffinity(0)
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    try:
        return _pings(port, count, gap_s)
    finally:
        os.sched_setaffinity(0, before)


def _pings(port: int, count: int, gap_s: float) -> dict[str, float]:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rtts = []
        for _ in range(count):
            time.sleep(gap_s)
            started = time.perf_counter()
            sock.sendall(b"PING\r\n")
            sock.recv(64)
            rtts.append((time.perf_counter() - started) * 1e6)
    rtts.sort()
    return {"p50_us": round(statistics.median(rtts), 1), "p99_us": round(rtts[int(len(rtts) * 0.99)], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=500)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--doc", type=Path, help="write the block into this Markdown file")
    args = parser.parse_args()
    load_cpu, server_cpu = harness.cores()
    if load_cpu is not None:
        os.sched_setaffinity(0, {load_cpu})
    pacing = Pacing.for_rate(args.rate)
    result: dict[str, Any] = {"rate": args.rate}
    with (
        tempfile.TemporaryDirectory(prefix="latency-probe-") as tmpdir,
        harness.nginx(load_cpu) as (
            up_port,
            up_proc,
        ),
        harness.redis(load_cpu) as redis_url,
    ):
        tmp = Path(tmpdir)
        upstream = f"http://127.0.0.1:{up_port}"
        client = redis.Redis.from_url(redis_url)
        direct = Target("direct", f"{upstream}{harness.CHAT_PATH}", lambda: [up_proc.pid], load_cpu, {})

        def paced(target: Target) -> dict[str, Any]:
            return harness.measure(
                target, connections=pacing.connections, seconds=args.seconds, load_cpu=load_cpu, pacing=pacing
            )

        result["direct"] = paced(direct)
        with _gateway(tmp, upstream, redis_url, server_cpu, spinning=False) as gw:
            harness.measure(gw, connections=8, seconds=2, load_cpu=load_cpu)  # warm-up
            result["paced"] = paced(gw)
            result["saturated"] = harness.measure(gw, connections=64, seconds=args.seconds, load_cpu=load_cpu)
            result["scripts"] = _script_times(client, lambda: paced(gw))
        with _gateway(tmp, upstream, redis_url, server_cpu, spinning=True) as hot:
            harness.measure(hot, connections=8, seconds=2, load_cpu=load_cpu)
            result["spinning"] = paced(hot)
        port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
        result["ping_cross_core"] = _ping_rtt(port, server_cpu)
        result["ping_same_core"] = _ping_rtt(port, load_cpu)
    block = render(result)
    print(block)
    if args.doc is not None:
        text = args.doc.read_text()
        begin, end = "<!-- probe:begin -->", "<!-- probe:end -->"
        head, _, rest = text.partition(begin)
        _, _, tail = rest.partition(end)
        args.doc.write_text(f"{head}{begin}\n{block}\n{end}{tail}" if rest else f"{text}\n{begin}\n{block}\n{end}\n")


def render(r: dict[str, Any]) -> str:
    d, p, s, h = r["direct"], r["paced"], r["saturated"], r["spinning"]
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [
        f"Generated by `.venv/bin/python -m loadtests.latency_probe` on {when}, paced load of about "
        f"{r['rate']:.0f} req/s.",
        "",
        "| what | p50 ms | p99 ms | req/s | gateway CPU us per request |",
        "|---|--:|--:|--:|--:|",
        f"| direct to nginx | {d['p50_ms']:.3f} | {d['p99_ms']:.3f} | {d['rps']:,.0f} | |",
        f"| gateway, paced | {p['p50_ms']:.3f} | {p['p99_ms']:.3f} | {p['rps']:,.0f} | {p['cpu_us_per_req']} |",
        f"| gateway, loop never sleeps, paced | {h['p50_ms']:.3f} | {h['p99_ms']:.3f} | {h['rps']:,.0f} | "
        f"(spins: {h['cpu_util']:.0%} of its core) |",
        f"| gateway, saturated (64 connections) | {s['p50_ms']:.3f} | {s['p99_ms']:.3f} | {s['rps']:,.0f} | "
        f"{s['cpu_us_per_req']} |",
        "",
        "Quota scripts inside Redis at that rate (SLOWLOG, zero threshold): "
        + ", ".join(
            f"{name} p50 {t['p50_us']} us, p99 {t['p99_us']} us ({t['calls']:,} calls)"
            for name, t in sorted(r["scripts"].items())
        )
        + ".",
        "",
        f"Redis PING with 2 ms idle between pings: from the gateway's core p50 {r['ping_cross_core']['p50_us']} us, "
        f"p99 {r['ping_cross_core']['p99_us']} us; from Redis's own core p50 {r['ping_same_core']['p50_us']} us, "
        f"p99 {r['ping_same_core']['p99_us']} us.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
