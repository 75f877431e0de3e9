"""Weighted fair share across gateway replicas: one engine, one Redis, one to three gateway replicas.

Usage: python -m loadtests.bench_scaleout [--seconds 10] [--no-write]

One simulated vLLM engine runs 8 requests at a time, each for about 150 ms, so the engine is the
bottleneck. Every replica reads the same config file (the listen port comes from the command line),
with `capacity: 64`, as an operator would copy it: the engine's own metrics, not the config, must bring
what all replicas together send it down to 8, so that requests wait in the gateway's shared fair queue and
not inside the engine. Tenants are closed loops of non-streaming clients, either spread round-robin over
the replicas or pinned (all clients of a tenant on one replica). Each workload starts fresh tenants; the
figures are taken over a steady window after a warm-up.

What is measured, per replica count:

1. shares of completed requests of two backlogged tenants: equal weights at 10:1 offered load, and
   weights 1:3 with each tenant on a different replica (the heavier offered load on the lighter weight);
2. the engine's own gauges, sampled every 50 ms: requests waiting inside it and the slots it runs,
   including one tenant alone on one replica (the queue must not hold back a lone tenant);
3. the light tenant's p99 latency with 2 and 3 replicas against 1;
4. a replica SIGKILLed mid-run (the one leading the pool's capacity control): how long its permits stay
   lost (the permits it held are found in Redis at the kill), when the engine runs its 8 again, and the
   shares after, against the configured lease.

Results: docs/bench/scaleout.json and tables on stdout (docs/bench/scaleout.md is their write-up).
Benchmarks record figures; nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import inspect
import json
import os
import platform
import signal
import statistics
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis
import yaml

from gateway.admission.capacity import parse_engine_metrics
from gateway.admission.limits import ReplicaLink
from loadtests import harness
from loadtests.harness import PY, ROOT

ADMIN = "sk-admin-bench-0123456789"
SLOTS = 8
# The engine's service time per request: time to first token plus 19 more tokens 7 ms apart.
TTFT_MS, ITL_MS, MAX_TOKENS = 10, 7, 20
CAPACITY = 64
LEASE_TTL_S = 10.0
SAMPLE_S = 0.05
# A reading of the engine's /metrics that takes longer is skipped: a sample is a moment, not a wait.
METRICS_TIMEOUT = aiohttp.ClientTimeout(total=1.0)
WARMUP_S = 3.0
POOL = "gw:pool:{engine}:"
REPLICAS, GRANTS = "gw:replicas", "gw:grants:"
JSON_OUT = ROOT / "docs" / "bench" / "scaleout.json"
BODY = {"model": "m", "messages": [{"role": "user", "content": "x " * 40}], "max_tokens": MAX_TOKENS}

# Targets: share within 5 percentage points of the weights' entitlement; inside the engine at most one
# request waiting on average while it runs at least 95% of its slots; the light tenant's p99 with more
# replicas at most 1.25 times its p99 with one.
SHARE_TOLERANCE = 0.05
WAITING_MAX = 1.0
RUNNING_MIN = 0.95
P99_RATIO_MAX = 1.25


# --- processes ------------------------------------------------------------------------------------


class Stack:
    """A redis-server, the simulated engine, and gateway replicas that all read one config file."""

    def __init__(self, tmp: Path, redis_url: str) -> None:
        self.tmp = tmp
        self.redis_url = redis_url
        sim_port = harness.free_port()
        self.engine_url = f"http://127.0.0.1:{sim_port}"
        sim = [PY, "-m", "gateway", "sim", "--port", str(sim_port), "--max-concurrency", str(SLOTS)]
        sim += ["--ttft-ms", str(TTFT_MS), "--itl-ms", str(ITL_MS), "--prefill-us-per-token", "0"]
        self.sim = harness.start(sim, log=tmp / "sim.log")
        harness.wait_ready(self.engine_url + "/health", self.sim)
        self.config = tmp / "gateway.yaml"
        self.config.write_text(
            yaml.safe_dump(
                {
                    "redis_url": redis_url,
                    "lease_ttl_s": LEASE_TTL_S,
                    "backends": [{"name": "engine", "kind": "vllm", "url": self.engine_url, "capacity": CAPACITY}],
                    "models": [{"name": "m", "backends": ["engine"]}],
                    "log_level": "warning",
                }
            )
        )
        self.replicas: list[tuple[str, subprocess.Popen[bytes]]] = []

    def add_replica(self) -> str:
        port = harness.free_port()
        # Its own working directory: the default state_path and billing spool are relative to it.
        workdir = self.tmp / f"replica-{len(self.replicas)}"
        workdir.mkdir()
        env = {"GATEWAY_ADMIN_KEY": ADMIN, "GATEWAY_SALT_SECRET": "s" * 32}
        if "PYTHONPATH" not in os.environ:
            env["PYTHONPATH"] = str(ROOT)  # run from another directory, it still imports this checkout
        cmd = [PY, "-m", "gateway", "serve", "--config", str(self.config), "--port", str(port)]
        proc = harness.start(cmd, env=env, log=workdir / "gateway.log", cwd=workdir)
        url = f"http://127.0.0.1:{port}"
        harness.wait_ready(url + "/readyz", proc)
        self.replicas.append((url, proc))
        return url

    @property
    def urls(self) -> list[str]:
        return [url for url, proc in self.replicas if proc.poll() is None]

    def close(self) -> None:
        for _, proc in self.replicas:
            harness.stop(proc)
        harness.stop(self.sim)


# --- load -----------------------------------------------------------------------------------------


@dataclass
class Tenant:
    id: str
    weight: float
    # One replica URL per closed-loop client.
    clients: list[str]
    key: str = ""
    done: list[tuple[float, float]] = field(default_factory=list)  # (finish time, latency s)
    codes: Counter[str] = field(default_factory=Counter)


def provision(gateway: str, tenant: Tenant) -> None:
    auth = {"Authorization": f"Bearer {ADMIN}"}
    body = json.dumps({"id": tenant.id, "weight": tenant.weight}).encode()
    status, text = harness.http(gateway + "/admin/tenants", body, auth)
    if status != 201:
        raise RuntimeError(f"creating tenant {tenant.id}: {status} {text!r}")
    status, text = harness.http(gateway + f"/admin/tenants/{tenant.id}/keys", b"{}", auth)
    if status != 201:
        raise RuntimeError(f"creating a key of {tenant.id}: {status} {text!r}")
    tenant.key = json.loads(text)["key"]


async def client(session: aiohttp.ClientSession, url: str, tenant: Tenant, t0: float) -> None:
    headers = {"Authorization": f"Bearer {tenant.key}"}
    while True:
        start = time.monotonic()
        try:
            async with session.post(url + "/v1/chat/completions", json=BODY, headers=headers) as resp:
                await resp.read()
                status = resp.status
        except aiohttp.ClientError as exc:
            tenant.codes[type(exc).__name__] += 1
            return  # its replica is gone (the kill): this client stops, as its user would see an error
        tenant.codes[str(status)] += 1
        if status == 200:
            end = time.monotonic()
            tenant.done.append((end - t0, end - start))
        else:
            await asyncio.sleep(0.1)


@dataclass
class Sample:
    at: float
    running: float
    waiting: float
    held: int
    limit: int


class Sampler:
    """The engine's gauges from its /metrics, and the pool's permits and limit in Redis, every 50 ms."""

    def __init__(self, session: aiohttp.ClientSession, engine_url: str, store: aioredis.Redis, t0: float) -> None:
        self.session, self.engine_url, self.store, self.t0 = session, engine_url, store, t0
        self.samples: list[Sample] = []
        self.missed = 0  # readings that did not answer in time
        # A killed replica: the permits it held at the kill, and the list of grants made to its waiting
        # requests (which nobody pops any more); per sample, how many of those are still held.
        self.dead: tuple[set[bytes], str] | None = None
        self.dead_held: list[tuple[float, int]] = []

    async def run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                async with self.session.get(self.engine_url + "/metrics", timeout=METRICS_TIMEOUT) as resp:
                    text = await resp.text()
            except (aiohttp.ClientError, TimeoutError):
                self.missed += 1
                continue
            load = parse_engine_metrics(text, started)
            permits = await self.store.zrange(POOL + "permits", 0, -1)
            limits = await self.store.hgetall(POOL + "limits")
            assert load is not None
            limit = sum(int(v) for v in limits.values())
            self.samples.append(Sample(started - self.t0, load.running, load.waiting, len(permits), limit))
            if self.dead is not None:
                held_at_kill, grants = self.dead
                granted = set(await self.store.lrange(grants, 0, -1))
                self.dead_held.append((started - self.t0, len((held_at_kill | granted) & set(permits))))
            await asyncio.sleep(max(0.0, SAMPLE_S - (time.monotonic() - started)))

    def window(self, lo: float, hi: float) -> list[Sample]:
        return [s for s in self.samples if lo <= s.at < hi]


async def drain(stack: Stack, store: aioredis.Redis) -> None:
    """Wait until nothing holds a permit and the engine is idle (at most a few seconds)."""
    deadline = time.monotonic() + 5
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(stack.engine_url + "/metrics", timeout=METRICS_TIMEOUT) as resp:
                    load = parse_engine_metrics(await resp.text(), 0.0)
            except (aiohttp.ClientError, TimeoutError):
                continue
            if await store.zcard(POOL + "permits") == 0 and load is not None and load.running == 0:
                return
            await asyncio.sleep(0.1)


# --- one workload ---------------------------------------------------------------------------------


@dataclass
class Kill:
    """SIGKILL replica `index` at `at_s` into the run; the run goes on until the dead replica's permits are
    all back, then `after_s` more."""

    index: int
    at_s: float
    after_s: float


async def run_workload(
    stack: Stack, tenants: list[Tenant], seconds: float, kill: Kill | None = None
) -> tuple[Sampler, dict[str, Any]]:
    for tenant in tenants:
        provision(stack.urls[0], tenant)
    store = aioredis.from_url(stack.redis_url)
    extra: dict[str, Any] = {}
    try:
        await drain(stack, store)
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=120)
        ) as session:
            t0 = time.monotonic()
            # Its own connections, one per reading: the clients' pool never delays a sample.
            readings = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
            sampler = Sampler(readings, stack.engine_url, store, t0)
            tasks = [asyncio.create_task(sampler.run())]
            tasks += [asyncio.create_task(client(session, url, t, t0)) for t in tenants for url in t.clients]
            try:
                if kill is None:
                    await asyncio.sleep(WARMUP_S + seconds)
                else:
                    extra = await killing(stack, store, sampler, kill)
            finally:
                for task in tasks:
                    task.cancel()
                _, stuck = await asyncio.wait(tasks, timeout=10)
                if stuck:
                    print(f"  {len(stuck)} tasks did not stop when cancelled", flush=True)
                await readings.close()
        await drain(stack, store)
    finally:
        await store.aclose()
    return sampler, extra


async def killing(stack: Stack, store: aioredis.Redis, sampler: Sampler, kill: Kill) -> dict[str, Any]:
    await asyncio.sleep(kill.at_s)
    url, proc = stack.replicas[kill.index]
    leader = (await store.get(POOL + "lead") or b"").decode()
    replica = next(r.decode() for r in await store.zrange(REPLICAS, 0, -1) if f"-{proc.pid}-".encode() in r)
    held = set(await store.zrange(POOL + "permits", 0, -1))
    proc.send_signal(signal.SIGKILL)
    killed = time.monotonic() - sampler.t0
    proc.wait()
    # Of the permits held at the kill, the other replicas' end within one service time (150 ms): whatever
    # is still held a second later was the dead replica's.
    await asyncio.sleep(1.0)
    held &= set(await store.zrange(POOL + "permits", 0, -1))
    sampler.dead = (held, GRANTS + replica)
    # Until the dead replica counts as gone (its last beat has expired) and none of its permits is held.
    deadline = time.monotonic() + 3 * LEASE_TTL_S + 30
    while time.monotonic() < deadline:
        await asyncio.sleep(0.25)
        gone = (await store.zscore(REPLICAS, replica) or 0) < time.time()
        if gone and sampler.dead_held and sampler.dead_held[-1][1] == 0:
            break
    last_held = max((at for at, n in sampler.dead_held if n > 0), default=killed)
    await asyncio.sleep(kill.after_s)
    return {
        "killed_at_s": round(killed, 2),
        "killed_replica": url,
        "killed_replica_led_capacity_control": leader == replica,
        "permits_held_at_kill": len(held),
        "permits_of_dead_replica_max": max((n for _, n in sampler.dead_held), default=0),
        "permits_back_at_s": round(last_held + SAMPLE_S, 2),
        "end_s": round(time.monotonic() - sampler.t0, 2),
    }


# --- figures --------------------------------------------------------------------------------------


def p(values: list[float], q: int) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100)[q - 1]


def shares(tenants: list[Tenant], lo: float, hi: float) -> dict[str, Any]:
    counts = {t.id: sum(1 for at, _ in t.done if lo <= at < hi) for t in tenants}
    total = sum(counts.values()) or 1
    weight = sum(t.weight for t in tenants)
    out: dict[str, Any] = {}
    for t in tenants:
        share, target = counts[t.id] / total, t.weight / weight
        out[t.id] = {
            "completed": counts[t.id],
            "share": round(share, 4),
            "target": round(target, 4),
            "error": round(share - target, 4),
            "p50_ms": round(1000 * p([lat for at, lat in t.done if lo <= at < hi], 50), 1),
            "p99_ms": round(1000 * p([lat for at, lat in t.done if lo <= at < hi], 99), 1),
            "codes": dict(t.codes),
        }
    out["met"] = all(abs(v["error"]) <= SHARE_TOLERANCE for k, v in out.items() if k != "met")
    return out


def engine(samples: list[Sample]) -> dict[str, Any]:
    running = statistics.mean(s.running for s in samples)
    waiting = statistics.mean(s.waiting for s in samples)
    return {
        "samples": len(samples),
        "running_mean": round(running, 2),
        "running_share": round(running / SLOTS, 3),
        "waiting_mean": round(waiting, 2),
        "waiting_max": max(s.waiting for s in samples),
        "held_mean": round(statistics.mean(s.held for s in samples), 2),
        "limit_mean": round(statistics.mean(s.limit for s in samples), 2),
        "met": waiting <= WAITING_MAX and running / SLOTS >= RUNNING_MIN,
    }


def recovered_at(samples: list[Sample], after: float, span: float = 1.0) -> float | None:
    """The first time after `after` from which the engine runs 95% of its slots on average for `span`."""
    for i, s in enumerate(samples):
        if s.at < after:
            continue
        ahead = [x.running for x in samples[i:] if x.at < s.at + span]
        if samples[-1].at >= s.at + span and statistics.mean(ahead) >= RUNNING_MIN * SLOTS:
            return s.at
    return None


# --- the workloads --------------------------------------------------------------------------------


def spread(urls: list[str], n: int) -> list[str]:
    return [urls[i % len(urls)] for i in range(n)]


async def measure(stack: Stack, seconds: float) -> dict[str, Any]:
    results: dict[str, Any] = {"fairness": [], "engine": [], "light_p99": [], "kill": None}
    window = (WARMUP_S, WARMUP_S + seconds)

    async def steady(name: str, tenants: list[Tenant], placement: str, span: float = seconds) -> None:
        sampler, _ = await run_workload(stack, tenants, span)
        lo, hi = WARMUP_S, WARMUP_S + span
        row = {
            "workload": name,
            "replicas": len(stack.urls),
            "placement": placement,
            "clients": {t.id: len(t.clients) for t in tenants},
            "weights": {t.id: t.weight for t in tenants},
        }
        if len(tenants) > 1:
            results["fairness"].append({**row, "shares": shares(tenants, lo, hi)})
        else:
            row["solo"] = shares(tenants, lo, hi)
        results["engine"].append({**row, "engine": engine(sampler.window(lo, hi)), "missed_readings": sampler.missed})
        print(f"  {name} ({len(stack.urls)} replicas, {placement}) done", flush=True)

    for n in (1, 2, 3):
        while len(stack.urls) < n:
            stack.add_replica()
        urls = stack.urls
        tag = f"r{n}"
        # 1. equal weights, 10:1 offered load, clients spread round-robin over the replicas.
        heavy = Tenant(f"{tag}-eq-heavy", 1, spread(urls, 80))
        light = Tenant(f"{tag}-eq-light", 1, spread(urls[1:] + urls[:1], 8))
        await steady("equal 10:1", [heavy, light], "spread")
        lo, hi = window
        latencies = [lat for at, lat in light.done if lo <= at < hi]
        results["light_p99"].append(
            {"replicas": n, "p50_ms": round(1000 * p(latencies, 50), 1), "p99_ms": round(1000 * p(latencies, 99), 1)}
        )
        if n > 1:
            # The same with each tenant's clients all on one replica.
            await steady(
                "equal 10:1",
                [Tenant(f"{tag}-eqp-heavy", 1, [urls[0]] * 80), Tenant(f"{tag}-eqp-light", 1, [urls[-1]] * 8)],
                "pinned, one replica each",
            )
        # Weights 1:3, the weight-1 tenant offering three times the load, each tenant on its own replica.
        await steady(
            "weights 1:3",
            [Tenant(f"{tag}-w1", 1, [urls[0]] * 36), Tenant(f"{tag}-w3", 3, [urls[-1]] * 12)],
            "pinned, one replica each" if n > 1 else "one replica",
        )
        # 2. one tenant alone, on the last replica: the engine must still be kept full.
        await steady("one tenant alone", [Tenant(f"{tag}-solo", 1, [urls[-1]] * 16)], "pinned, last replica", 6.0)
    base = results["light_p99"][0]["p99_ms"]
    for row in results["light_p99"]:
        row["ratio_to_1"] = round(row["p99_ms"] / base, 3)
        row["met"] = row["ratio_to_1"] <= P99_RATIO_MAX
    results["kill"] = await kill_run(stack, seconds)
    return results


async def kill_run(stack: Stack, seconds: float) -> dict[str, Any]:
    """Three replicas, one tenant pinned to each, equal weights; the replica leading the capacity control is
    SIGKILLed after the warm-up and a few steady seconds; its tenant's clients stop with it."""
    store = aioredis.from_url(stack.redis_url)
    leader = (await store.get(POOL + "lead") or b"").decode()
    await store.aclose()
    pids = [proc.pid for _, proc in stack.replicas]
    index = next((i for i, pid in enumerate(pids) if f"-{pid}-" in leader), 0)
    urls = [url for url, _ in stack.replicas]
    others = [u for i, u in enumerate(urls) if i != index]
    tenants = [
        Tenant("kill-doomed", 1, [urls[index]] * 24),
        Tenant("kill-a", 1, [others[0]] * 24),
        Tenant("kill-b", 1, [others[1]] * 24),
    ]
    after = max(6.0, seconds * 0.8)
    sampler, info = await run_workload(stack, tenants, 0, Kill(index, WARMUP_S + 3.0, after))
    killed, back, end = info["killed_at_s"], info["permits_back_at_s"], info["end_s"]
    engine_back = recovered_at(sampler.samples, killed + 0.2)
    before = engine(sampler.window(WARMUP_S, killed))
    during = sampler.window(killed + 0.2, back)
    settle = (engine_back or back) + 1.0
    info.update(
        lease_ttl_s=LEASE_TTL_S,
        permits_back_after_s=round(back - killed, 2),
        engine_back_after_s=None if engine_back is None else round(engine_back - killed, 2),
        engine_before=before,
        engine_running_while_lost=round(statistics.mean(s.running for s in during), 2) if during else None,
        shares_before=shares(tenants, WARMUP_S, killed),
        shares_after=shares(tenants[1:], settle, end),
        engine_after=engine(sampler.window(settle, end)),
        after_window_s=[round(settle, 2), round(end, 2)],
        missed_readings=sampler.missed,
    )
    info["met"] = (
        info["engine_back_after_s"] is not None
        and info["permits_back_after_s"] <= LEASE_TTL_S + 1.0
        and info["engine_back_after_s"] <= LEASE_TTL_S + 1.0
        and info["shares_after"]["met"]
    )
    return info


# --- report ---------------------------------------------------------------------------------------


def verdict(met: bool) -> str:
    return "met" if met else "**missed**"


def render(r: dict[str, Any]) -> str:
    out = ["### 1. Shares of completed requests (steady window)", ""]
    out.append("| replicas | workload | clients | placement | shares (target) | worst error | verdict |")
    out.append("|---:|---|---|---|---|---:|---|")
    for row in r["fairness"]:
        s = row["shares"]
        tenants = [k for k in s if k != "met"]
        text = ", ".join(f"{k} {s[k]['share']:.1%} ({s[k]['target']:.0%})" for k in tenants)
        clients = " / ".join(f"{row['clients'][k]} (w{row['weights'][k]:g})" for k in tenants)
        worst = max(abs(s[k]["error"]) for k in tenants)
        out.append(
            f"| {row['replicas']} | {row['workload']} | {clients} | {row['placement']} | {text} | "
            f"{worst:.1%} | {verdict(s['met'])} |"
        )
    out += ["", "### 2. The engine (8 slots), sampled every 50 ms", ""]
    out.append("| replicas | workload | placement | running / 8 | waiting mean (max) | limit | verdict |")
    out.append("|---:|---|---|---:|---:|---:|---|")
    for row in r["engine"]:
        e = row["engine"]
        out.append(
            f"| {row['replicas']} | {row['workload']} | {row['placement']} | {e['running_share']:.1%} | "
            f"{e['waiting_mean']:.2f} ({e['waiting_max']:g}) | {e['limit_mean']:g} | {verdict(e['met'])} |"
        )
    out += ["", "### 3. The light tenant's latency (equal 10:1, spread)", ""]
    out.append("| replicas | p50 ms | p99 ms | p99 / p99 with 1 replica | verdict |")
    out.append("|---:|---:|---:|---:|---|")
    for row in r["light_p99"]:
        out.append(
            f"| {row['replicas']} | {row['p50_ms']} | {row['p99_ms']} | {row['ratio_to_1']:.2f} | "
            f"{verdict(row['met'])} |"
        )
    k = r["kill"]
    out += ["", "### 4. A replica SIGKILLed mid-run (3 replicas, one tenant each, equal weights)", ""]
    out.append("| figure | value | target |")
    out.append("|---|---:|---|")
    after = k["shares_after"]
    out += [
        f"| the killed replica led the capacity control | {k['killed_replica_led_capacity_control']} | |",
        f"| permits it held at the kill | {k['permits_held_at_kill']} | |",
        f"| permits held for it at most (with those granted to its queued requests after the kill) | "
        f"{k['permits_of_dead_replica_max']} | |",
        f"| engine running / 8 before the kill | {k['engine_before']['running_share']:.1%} | |",
        f"| engine running while they were lost (mean) | {k['engine_running_while_lost']} | |",
        f"| its permits back after | {k['permits_back_after_s']} s | <= lease ({k['lease_ttl_s']:g} s) + 1 s |",
        f"| engine back to >= 95% of its slots after | {k['engine_back_after_s']} s | <= lease + 1 s |",
        "| shares after recovery | "
        + ", ".join(f"{t} {after[t]['share']:.1%}" for t in after if t != "met")
        + " | 50% each, within 5 points |",
        f"| engine after recovery: running / 8, waiting | {k['engine_after']['running_share']:.1%}, "
        f"{k['engine_after']['waiting_mean']:.2f} | >= 95%, <= 1 |",
        f"| verdict | {verdict(k['met'])} | |",
    ]
    return "\n".join(out)


def machine() -> dict[str, Any]:
    return {"python": platform.python_version(), "cpus": os.cpu_count(), "loadavg": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10, help="steady window per workload (default 10)")
    parser.add_argument("--no-write", action="store_true", help="print the tables, write no file")
    args = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-scaleout-") as tmp, harness.redis(None) as redis_url:
        stack = Stack(Path(tmp), redis_url)
        try:
            results = asyncio.run(measure(stack, args.seconds))
        finally:
            stack.close()
    results = {
        "command": "python -m loadtests.bench_scaleout"
        + (f" --seconds {args.seconds:g}" if args.seconds != 10 else ""),
        "generated_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "setup": {
            "engine_slots": SLOTS,
            "engine_ttft_ms": TTFT_MS,
            "engine_itl_ms": ITL_MS,
            "max_tokens": MAX_TOKENS,
            "config_capacity": CAPACITY,
            "lease_ttl_s": LEASE_TTL_S,
            # How long a replica that stopped beating still counts as alive (its waiting requests stay queued).
            "replica_beat_ttl_s": inspect.signature(ReplicaLink).parameters["ttl_s"].default,
            "warmup_s": WARMUP_S,
            "steady_s": args.seconds,
            "sample_s": SAMPLE_S,
        },
        **results,
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    print(render(results))
    if not args.no_write:
        JSON_OUT.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {JSON_OUT.relative_to(ROOT)} in {results['elapsed_s']} s")


if __name__ == "__main__":
    main()
