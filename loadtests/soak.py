"""Soak run: one gateway worker under a steady mixed load for a bounded time, its memory
and open file descriptors sampled throughout, and every request checked against the billing record.

    .venv/bin/python -m loadtests.soak --minutes 10

It starts its own redis-server, the simulator and one gateway worker with every feature on (Redis quotas,
the fair queue, metrics, billing to JSONL), creates two tenants over the admin API, and drives an open
loop at `--rate` requests/s of four kinds, each with its own share of the arrivals:

- `unary`: a non-streaming chat completion;
- `stream`: a stream read to its end;
- `cancel`: a stream the client walks away from after a few chunks (billed partial, status 499);
- `limited`: requests of a tenant whose rpm is far below what it sends, so most of them get 429.

Every `--sample-s` seconds it reads the gateway's RSS (`/proc/<pid>/status`) and open descriptors
(`/proc/<pid>/fd`). At the end it checks that the billing file holds exactly one event per request that
reached a backend (every answer but a 429), with unique ids, and no other; then writes `soak.json`, a
plot `soak.png` (RSS and descriptors over time) and, with `--doc`, the soak section of BENCHMARKS.md.

The verdict compares the end of the run with the end of the warm-up (the first fifth of the run, at least
30 s): it levels off when the least-squares slope of RSS after warm-up is under 0.1 MB/min, the median of
the last third is within 1 MB of the first third's, and descriptors do not climb.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import yaml

from loadtests.common import PY, ROOT, free_port, stop, wait_http

ADMIN_KEY = "sk-admin-soak-0123456789"
KINDS = {"unary": 0.45, "stream": 0.25, "cancel": 0.15, "limited": 0.15}
MARK_START = "<!-- soak:start -->"
MARK_END = "<!-- soak:end -->"


@dataclass
class Tally:
    sent: Counter[str] = field(default_factory=Counter)
    status: Counter[str] = field(default_factory=Counter)
    # Request ids of answers that reached a backend (every status but 429): what billing must hold.
    billed_expected: set[str] = field(default_factory=set)
    rejected_429: int = 0
    transport_errors: Counter[str] = field(default_factory=Counter)
    in_flight: int = 0


def spawn(args: list[str], *, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start a process with its output appended to `log` (the file is the child's; ours is closed at once)."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=str(ROOT)
        )


def proc_figures(pid: int) -> tuple[float, int]:
    """(RSS in MB, open file descriptors) of a process, from /proc."""
    rss = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def start_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed")
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = spawn([*args, "--dir", str(workdir)], log=workdir / "redis.log")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            import socket

            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return proc, f"redis://127.0.0.1:{port}/0"
        time.sleep(0.05)
    raise SystemExit("redis-server did not start")


def gateway_config(workdir: Path, redis_url: str, sim_url: str, port: int) -> dict[str, Any]:
    return {
        "listen": {"host": "127.0.0.1", "port": port},
        "redis_url": redis_url,
        "state_path": str(workdir / "state.db"),
        "backends": [{"name": "sim", "kind": "vllm", "url": sim_url, "capacity": 64}],
        "models": [
            {"name": "m", "backends": ["sim"], "price": {"input_per_1k": 0.5, "output_per_1k": 1.5, "currency": "USD"}}
        ],
        "billing": {"sinks": [{"kind": "jsonl", "path": str(workdir / "billing.jsonl")}]},
        "log_level": "warning",
    }


def provision(url: str) -> tuple[str, str]:
    """Two tenants over the admin API: `steady` (no practical limit) and `limited` (rpm 60)."""
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    keys = []
    for tenant, limits in (("steady", {"rpm": 1_000_000, "tpm": 100_000_000}), ("limited", {"rpm": 60})):
        resp = httpx.post(f"{url}/admin/tenants", json={"id": tenant, "limits": limits}, headers=admin)
        resp.raise_for_status()
        resp = httpx.post(f"{url}/admin/tenants/{tenant}/keys", json={"name": "soak"}, headers=admin)
        resp.raise_for_status()
        keys.append(resp.json()["key"])
    return keys[0], keys[1]


def body(rng: random.Random, stream: bool, max_tokens: int) -> dict[str, Any]:
    # A different prompt each time: the backend's prefix cache and the gateway see fresh input.
    words = " ".join(rng.choice(("alpha", "beta", "gamma", "delta", "omega")) for _ in range(rng.randint(4, 40)))
    out: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": words}], "max_tokens": max_tokens}
    if stream:
        out["stream"] = True
        if rng.random() < 0.5:
            out["stream_options"] = {"include_usage": True}
    return out


async def one(session: aiohttp.ClientSession, url: str, kind: str, key: str, rng: random.Random, tally: Tally) -> None:
    stream = kind in ("stream", "cancel")
    payload = body(rng, stream, 20 if stream else 8)
    tally.sent[kind] += 1
    tally.in_flight += 1
    try:
        async with session.post(
            url + "/v1/chat/completions", json=payload, headers={"Authorization": f"Bearer {key}"}
        ) as resp:
            rid = resp.headers.get("x-request-id", "")
            if kind == "cancel" and resp.status == 200:
                chunks = 0
                async for _ in resp.content:
                    chunks += 1
                    if chunks >= 3:
                        break
                resp.close()  # walk away mid-stream: the gateway sees the connection go
            else:
                await resp.read()
            tally.status[f"{kind}:{resp.status}"] += 1
            if resp.status == 429:
                tally.rejected_429 += 1
            elif rid:
                tally.billed_expected.add(rid)
    except (TimeoutError, aiohttp.ClientError) as exc:
        tally.transport_errors[type(exc).__name__] += 1
    finally:
        tally.in_flight -= 1


async def drive(url: str, keys: tuple[str, str], seconds: float, rate: float, seed: int, tally: Tally) -> None:
    rng = random.Random(seed)
    kinds, weights = zip(*KINDS.items(), strict=True)
    connector = aiohttp.TCPConnector(limit=200)
    timeout = aiohttp.ClientTimeout(total=60)
    tasks: set[asyncio.Task[None]] = set()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        loop = asyncio.get_running_loop()
        start = loop.time()
        n = 0
        while True:
            due = start + n / rate  # open loop: arrivals on a fixed schedule, whatever the answers do
            if due - start >= seconds:
                break
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            kind = rng.choices(kinds, weights)[0]
            key = keys[1] if kind == "limited" else keys[0]
            task = asyncio.create_task(one(session, url, kind, key, rng, tally))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            n += 1
        if tasks:
            await asyncio.wait(tasks, timeout=60)


def snapshot(pid: int, t_s: float, tally: Tally) -> dict[str, float]:
    rss, fds = proc_figures(pid)
    return {"t_s": round(t_s, 2), "rss_mb": round(rss, 2), "fds": fds, "sent": sum(tally.sent.values())}


async def sample(pid: int, every_s: float, samples: list[dict[str, float]], tally: Tally, stop_at: float) -> None:
    started = time.monotonic()
    while True:
        rss, fds = proc_figures(pid)
        samples.append(
            {
                "t_s": round(time.monotonic() - started, 2),
                "rss_mb": round(rss, 2),
                "fds": fds,
                "sent": sum(tally.sent.values()),
            }
        )
        if time.monotonic() >= stop_at:
            return
        await asyncio.sleep(max(0.0, min(every_s, stop_at - time.monotonic())))


def slope_per_min(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, per minute."""
    if len(points) < 2:
        return 0.0
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    if var == 0:
        return 0.0
    return 60.0 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var


def verdict(samples: list[dict[str, float]], seconds: float) -> dict[str, Any]:
    warm_s = max(30.0, seconds / 5)
    after = [s for s in samples if s["t_s"] >= warm_s] or samples[-2:]
    warm = after[0]
    end = samples[-1]
    # The last third after warm-up against the first third: a leak keeps climbing, a plateau does not.
    # Descriptors move with the connections in flight at the sampling instant, hence the slack of 8.
    third = max(1, len(after) // 3)
    early = statistics.median(s["rss_mb"] for s in after[:third])
    late = statistics.median(s["rss_mb"] for s in after[-third:])
    fds_early = statistics.median(s["fds"] for s in after[:third])
    fds_late = statistics.median(s["fds"] for s in after[-third:])
    rss_slope = slope_per_min([(s["t_s"], s["rss_mb"]) for s in after])
    fd_slope = slope_per_min([(s["t_s"], s["fds"]) for s in after])
    # Levelled off: less than 0.1 MB/min after warm-up (6 MB an hour; the leak this run found was 0.17),
    # and the last third within 1 MB of the first.
    flat = rss_slope < 0.1 and late - early <= max(1.0, 0.015 * early) and fds_late - fds_early <= 8
    return {
        "warm_up_s": warm_s,
        "rss_start_mb": samples[0]["rss_mb"],
        "rss_warm_mb": warm["rss_mb"],
        "rss_end_mb": end["rss_mb"],
        "rss_peak_mb": max(s["rss_mb"] for s in samples),
        "rss_growth_after_warm_mb": round(end["rss_mb"] - warm["rss_mb"], 2),
        "rss_median_first_third_after_warm_mb": early,
        "rss_median_last_third_mb": late,
        "rss_slope_after_warm_mb_per_min": round(rss_slope, 3),
        "fds_start": samples[0]["fds"],
        "fds_warm": warm["fds"],
        "fds_end": end["fds"],
        "fds_peak": max(s["fds"] for s in samples),
        "fds_slope_after_warm_per_min": round(fd_slope, 3),
        "levels_off": bool(flat),
    }


def read_billing(path: Path, deadline_s: float, expected: int) -> list[dict[str, Any]]:
    """The billing file's events, once it holds at least `expected` or the deadline passed."""
    deadline = time.monotonic() + deadline_s
    events: list[dict[str, Any]] = []
    while True:
        if path.exists():
            events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if len(events) >= expected or time.monotonic() > deadline:
            return events
        time.sleep(0.2)


def plot(samples: list[dict[str, float]], result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [s["t_s"] / 60 for s in samples]
    fig, rss_ax = plt.subplots(figsize=(8, 3.6), dpi=100)
    rss_ax.plot(minutes, [s["rss_mb"] for s in samples], color="tab:blue", label="RSS (MB)")
    rss_ax.set_xlabel("minutes")
    rss_ax.set_ylabel("RSS (MB)", color="tab:blue")
    low = min(s["rss_mb"] for s in samples)
    rss_ax.set_ylim(0, max(low * 1.6, max(s["rss_mb"] for s in samples) * 1.15))
    fd_ax = rss_ax.twinx()
    fd_ax.plot(minutes, [s["fds"] for s in samples], color="tab:orange", label="open FDs")
    fd_ax.set_ylabel("open file descriptors", color="tab:orange")
    fd_ax.set_ylim(0, max(s["fds"] for s in samples) * 1.5 + 5)
    rss_ax.axvline(result["verdict"]["warm_up_s"] / 60, color="grey", linestyle=":", linewidth=1)
    load = result["load"]
    rss_ax.set_title(
        f"Soak: one gateway worker, {load['rate_per_s']:.0f} req/s for {load['seconds'] / 60:.1f} min "
        f"({load['sent']:,} requests)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def doc_section(result: dict[str, Any]) -> str:
    v, load, bill = result["verdict"], result["load"], result["billing"]
    statuses = ", ".join(f"{k} {n:,}" for k, n in sorted(load["status"].items()))
    return f"""{MARK_START}
`.venv/bin/python -m loadtests.soak --minutes {load["seconds"] / 60:g}` (written by the script; raw samples in
[bench/soak.json](bench/soak.json)): one gateway worker with Redis quotas, the fair queue, metrics and billing
to JSONL, in front of the simulator, an open loop at {load["rate_per_s"]:g} req/s for {load["seconds"] / 60:g}
minutes ({load["sent"]:,} requests: {load["mix"]}); RSS and open descriptors sampled every
{load["sample_s"]:g} s ({len(result["samples"])} samples). Answers: {statuses}; transport errors:
{sum(load["transport_errors"].values())}.

![RSS and open file descriptors over the soak run](bench/soak.png)

| figure | start | end of warm-up ({v["warm_up_s"]:.0f} s) | end | peak |
|---|--:|--:|--:|--:|
| RSS (MB) | {v["rss_start_mb"]:.1f} | {v["rss_warm_mb"]:.1f} | {v["rss_end_mb"]:.1f} | {v["rss_peak_mb"]:.1f} |
| open file descriptors | {v["fds_start"]} | {v["fds_warm"]} | {v["fds_end"]} | {v["fds_peak"]} |

After warm-up: RSS slope **{v["rss_slope_after_warm_mb_per_min"]:+.3f} MB/min**, growth from the end of warm-up
to the end {v["rss_growth_after_warm_mb"]:+.1f} MB (median of the last third {v["rss_median_last_third_mb"]:.1f} MB
vs the first third {v["rss_median_first_third_after_warm_mb"]:.1f} MB); descriptors
{v["fds_slope_after_warm_per_min"]:+.3f}/min. **Verdict: {"levels off" if v["levels_off"] else "still growing"}.**
Billing: {bill["events"]:,} events for {bill["expected"]:,} requests that reached a backend (every answer but the
{load["rejected_429"]:,} 429s): {bill["missing"]} missing, {bill["unexpected"]} unexpected, {bill["duplicates"]}
duplicate ids.
{MARK_END}"""


def write_doc(doc: Path, section: str) -> None:
    text = doc.read_text()
    if MARK_START in text and MARK_END in text:
        head, rest = text.split(MARK_START, 1)
        _, tail = rest.split(MARK_END, 1)
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n## Soak\n\n" + section + "\n"
    doc.write_text(text)


def run(args: argparse.Namespace) -> dict[str, Any]:
    seconds = args.minutes * 60
    workdir = Path(tempfile.mkdtemp(prefix="soak-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        redis, redis_url = start_redis(workdir)
        procs.append(redis)
        sim_port = free_port()
        sim_args = ["--ttft-ms", "5", "--itl-ms", "5", "--host", "127.0.0.1", "--port", str(sim_port)]
        procs.append(spawn([PY, "-m", "gateway", "sim", *sim_args], log=workdir / "sim.log"))
        wait_http(f"http://127.0.0.1:{sim_port}/health")
        port = free_port()
        config_path = workdir / "gateway.yaml"
        config_path.write_text(yaml.safe_dump(gateway_config(workdir, redis_url, f"http://127.0.0.1:{sim_port}", port)))
        env = {"GATEWAY_ADMIN_KEY": ADMIN_KEY, "GATEWAY_SALT_SECRET": "soak-salt-secret-0123456789abcdef"}
        gateway = spawn(
            [PY, "-m", "gateway", "serve", "--config", str(config_path)], env=env, log=workdir / "gateway.log"
        )
        procs.append(gateway)
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/readyz")
        keys = provision(url)
        tally = Tally()
        samples: list[dict[str, float]] = []

        async def main() -> None:
            sampler = asyncio.create_task(
                sample(gateway.pid, args.sample_s, samples, tally, time.monotonic() + seconds)
            )
            await drive(url, keys, seconds, args.rate, args.seed, tally)
            await sampler
            # One last sample once the stragglers are done: what the process keeps when idle again.
            await asyncio.sleep(1)
            rss, fds = proc_figures(gateway.pid)
            samples.append(
                {"t_s": samples[-1]["t_s"] + 1, "rss_mb": round(rss, 2), "fds": fds, "sent": sum(tally.sent.values())}
            )

        asyncio.run(main())
        events = read_billing(workdir / "billing.jsonl", 20, len(tally.billed_expected))
        ids = [e["data"]["request_id"] for e in events]
        unique = set(ids)
        log_text = (workdir / "gateway.log").read_text(errors="replace")
        result: dict[str, Any] = {
            "load": {
                "seconds": seconds,
                "rate_per_s": args.rate,
                "sample_s": args.sample_s,
                "mix": ", ".join(f"{k} {int(w * 100)}%" for k, w in KINDS.items()),
                "sent": sum(tally.sent.values()),
                "sent_by_kind": dict(tally.sent),
                "status": dict(tally.status),
                "rejected_429": tally.rejected_429,
                "transport_errors": dict(tally.transport_errors),
            },
            "billing": {
                "expected": len(tally.billed_expected),
                "events": len(ids),
                "duplicates": len(ids) - len(unique),
                "missing": len(tally.billed_expected - unique),
                "unexpected": len(unique - tally.billed_expected),
                "partial": sum(1 for e in events if e["data"].get("partial")),
            },
            "gateway_log": {
                "lines": len(log_text.splitlines()),
                "errors": sum(1 for line in log_text.splitlines() if " ERROR " in line or "Traceback" in line),
                "admin_key_in_log": ADMIN_KEY in log_text or any(k in log_text for k in keys),
            },
            "gateway_alive": gateway.poll() is None,
            "samples": samples,
        }
        result["verdict"] = verdict(samples, seconds)
        return result
    finally:
        for proc in reversed(procs):
            stop(proc)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"kept {workdir}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=100.0, help="arrivals per second, all kinds together")
    parser.add_argument("--sample-s", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=9)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench", help="where soak.json and soak.png go")
    parser.add_argument("--doc", type=Path, default=None, help="BENCHMARKS.md to update (its soak section)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, billing file)")
    parser.add_argument("--from-json", type=Path, default=None, help="re-judge and re-render a saved soak.json")
    args = parser.parse_args()
    if args.from_json is not None:
        result = json.loads(args.from_json.read_text())
        result["verdict"] = verdict(result["samples"], result["load"]["seconds"])
    else:
        result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(result, indent=1) + "\n")
    if not args.no_plot:
        plot(result["samples"], result, args.out / "soak.png")
    if args.doc is not None:
        write_doc(args.doc, doc_section(result))
    summary = {k: result[k] for k in ("verdict", "billing", "gateway_log", "gateway_alive")}
    print(json.dumps({**summary, "load": {k: v for k, v in result["load"].items() if k != "mix"}}, indent=1))


if __name__ == "__main__":
    main()
