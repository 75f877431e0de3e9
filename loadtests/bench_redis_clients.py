"""The quota scripts through each Redis client: the gateway's `PipelinedRedis` beside redis-py and coredis.

    .venv/bin/python loadtests/bench_redis_clients.py                    # 5 rounds, about 2.5 minutes
    .venv/bin/python loadtests/bench_redis_clients.py --rounds 3 --concurrency 32 --loop asyncio

coredis is not one of the gateway's dependencies; to measure it too, run from a separate venv that has it:

    python3.11 -m venv /tmp/rc-venv
    /tmp/rc-venv/bin/pip install -r requirements/runtime.lock --require-hashes
    /tmp/rc-venv/bin/pip install coredis
    PYTHONPATH=. /tmp/rc-venv/bin/python loadtests/bench_redis_clients.py

A client that is not installed is skipped, with a line saying so. redis-py uses hiredis to parse replies
when hiredis is installed (it is: `PipelinedRedis` needs it too).

The workload is a request's quota traffic as the gateway makes it: `RedisQuotaStore.admit` (lua/admit.lua:
a tenant scope and a key scope, every limit set, and a place in a backend pool's fair queue) then
`RedisQuotaStore.settle` (lua/settle.lua: the reservation and the permit given back), with 16 tenants in
turn, limits and pool capacity high enough that nothing is refused or waits. Only the client under the
store changes:

- ``pipelined``: `PipelinedRedis`, the gateway's (one connection; the commands of one event-loop turn go out
  in one write);
- ``redis-py``: `redis.asyncio.Redis` as `fast_fail_client` makes it, one command per await, each taking a
  connection of its pool (the pool grows to the concurrency);
- ``redis-py-batch``: the same client behind a batcher that sends the calls of one event-loop turn as one
  `pipeline(transaction=False)`, so concurrent calls share a round trip, as `PipelinedRedis`'s do;
- ``coredis``: `coredis.Redis` (RESP3; it shares a connection between concurrent commands), no retries;
- ``none (store alone)``: no Redis: each script's reply, recorded once, is replayed, so this row is what
  `RedisQuotaStore` itself costs per call (building arguments, reading replies), in every other row too.

One redis-server on a free port, pinned to one core, and this process pinned to the other
(loadtests/harness.py); uvloop by default, as the gateway runs. Each round measures every client, in an order
rotated from round to round, at concurrency 1 (latency of each call: p50, p99) and at `--concurrency`
tasks in a closed loop (calls per second, latency p99, and CPU microseconds per call: this process's user +
system time, and redis-server's from `INFO cpu`). A warm-up at the same concurrency comes first (scripts
loaded, pools grown). The table gives each figure's median over the rounds and its range, since a shared
machine is noisy. Results go to docs/bench/redis-clients.md by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import os
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from redis import exceptions as rx  # noqa: E402
from redis.asyncio import Redis  # noqa: E402
from redis.utils import HIREDIS_AVAILABLE  # noqa: E402

from gateway.admission.limits import (  # noqa: E402
    PipelinedRedis,
    PlaceAsk,
    PoolAsk,
    QuotaLimits,
    RedisQuotaStore,
    Release,
    Scope,
    ScriptClient,
    fast_fail_client,
)
from loadtests.harness import cores  # noqa: E402
from loadtests.harness import redis as redis_server  # noqa: E402

LIMITS = QuotaLimits(
    rpm=10**9, tpm=10**12, max_concurrency=10**6, max_inflight_tokens=10**12, budget_amount=1e12, budget_period="month"
)
POOL = "bench-pool"
ENDPOINTS = {"http://10.0.0.1:8000": 10**6, "http://10.0.0.2:8000": 10**6}
TENANTS = 16
TIMEOUT_S = 1.0


# --- the clients ------------------------------------------------------------------------------------


class BatchedRedisPy:
    """redis-py with the calls of one event-loop turn sent as one non-transactional pipeline."""

    def __init__(self, client: Redis) -> None:
        self._client = client
        self._batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._batch.append((("EVALSHA", sha, numkeys, *keys_and_args), fut))
        if len(self._batch) == 1:
            loop.call_soon(self._flush)
        return fut

    async def script_load(self, script: str) -> Any:
        return await self._client.script_load(script)

    def _flush(self) -> None:
        batch, self._batch = self._batch, []
        task = asyncio.ensure_future(self._send(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        pipe = self._client.pipeline(transaction=False)
        for args, _ in batch:
            pipe.execute_command(*args)
        try:
            replies = await pipe.execute(raise_on_error=False)
        except Exception as exc:
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            return
        for (_, fut), reply in zip(batch, replies, strict=True):
            if fut.done():
                continue
            if isinstance(reply, Exception):
                fut.set_exception(reply)
            else:
                fut.set_result(reply)


class CoredisScripts:
    """coredis's `evalsha(sha, keys, args)` in the store's calling convention, its errors as redis-py's."""

    def __init__(self, client: Any) -> None:
        self._client = client

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        from coredis.exceptions import NoScriptError

        try:
            return await self._client.evalsha(sha, keys_and_args[:numkeys], keys_and_args[numkeys:])
        except NoScriptError as exc:
            raise rx.NoScriptError(str(exc)) from None

    async def script_load(self, script: str) -> Any:
        return await self._client.script_load(script)


class Replayed:
    """No Redis at all: each script's reply recorded once from the server, replayed. What the store itself
    costs per call, to subtract from the others' CPU figures."""

    def __init__(self, client: ScriptClient) -> None:
        self._client = client
        self._replies: dict[str, Any] = {}

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        if sha not in self._replies:
            self._replies[sha] = await self._client.evalsha(sha, numkeys, *keys_and_args)
        return self._replies[sha]

    async def script_load(self, script: str) -> Any:
        return await self._client.script_load(script)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


@contextlib.asynccontextmanager
async def pipelined(url: str) -> AsyncIterator[ScriptClient]:
    client = PipelinedRedis.from_url(url, timeout_s=TIMEOUT_S)
    try:
        yield client
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def redis_py(url: str) -> AsyncIterator[ScriptClient]:
    client = fast_fail_client(url, timeout_s=TIMEOUT_S)
    try:
        yield client
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def redis_py_batch(url: str) -> AsyncIterator[ScriptClient]:
    client = fast_fail_client(url, timeout_s=TIMEOUT_S)
    try:
        yield BatchedRedisPy(client)
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def coredis_client(url: str) -> AsyncIterator[ScriptClient]:
    import coredis
    from coredis.retry import NoRetryPolicy

    parts = urlsplit(url)
    client = coredis.Redis(
        parts.hostname,
        parts.port,
        stream_timeout=TIMEOUT_S,
        connect_timeout=TIMEOUT_S,
        retry_policy=NoRetryPolicy(),
    )
    async with client:
        yield CoredisScripts(client)


@contextlib.asynccontextmanager
async def replayed(url: str) -> AsyncIterator[ScriptClient]:
    async with pipelined(url) as client:
        yield Replayed(client)


@dataclass(frozen=True)
class Client:
    name: str
    open: Callable[[str], AbstractAsyncContextManager[ScriptClient]]
    dist: str  # the distribution whose version is reported


CLIENTS = [
    Client("pipelined", pipelined, "hiredis"),
    Client("redis-py", redis_py, "redis"),
    Client("redis-py-batch", redis_py_batch, "redis"),
    Client("coredis", coredis_client, "coredis"),
    Client("none (store alone)", replayed, "hiredis"),
]


def available() -> list[Client]:
    out = []
    for client in CLIENTS:
        if _version(client.dist) is None:
            print(f"skipping {client.name}: {client.dist} is not installed (pip install {client.dist})")
        else:
            out.append(client)
    return out


# --- the workload ------------------------------------------------------------------------------------


class Workload:
    """A request's admit then settle, as the gateway's admission makes them; each call's latency recorded."""

    def __init__(self, store: RedisQuotaStore) -> None:
        self.store = store
        self.latencies: list[float] = []
        self._n = 0

    async def request(self) -> None:
        self._n += 1
        i = self._n % TENANTS
        tenant = f"acme-{i}"
        scopes = [Scope(f"tenant:{tenant}", LIMITS), Scope(f"key:k_{i}", LIMITS)]
        ask = PlaceAsk(
            waiter=os.urandom(8).hex(),
            tenant=tenant,
            weight=1.0,
            band=0,
            cost=1200.0 + 2 * 300,
            pools=(PoolAsk(POOL, tuple(ENDPOINTS)),),
            lease_ttl_s=60.0,
            max_queue_depth=1000,
        )
        clock = time.perf_counter
        start = clock()
        decision = await self.store.admit(tenant, scopes, tokens=1500, cost=0.002, lease_ttl_s=60.0, place=ask)
        admitted = clock()
        if not decision.allowed or decision.permit is None:
            raise RuntimeError(f"the benchmark's request was not admitted: {decision}")
        release = Release(decision.permit, tenant, ask.weight, ask.band, ask.cost, 1100.0, ask.load_factor)
        await self.store.settle(decision.reservation, actual_tokens=700, actual_cost=0.001, release=release)
        self.latencies += [admitted - start, clock() - admitted]


async def closed_loop(n: int, concurrency: int, op: Callable[[], Awaitable[None]]) -> float:
    """Seconds to run `op` n times with `concurrency` tasks."""
    remaining = n

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await op()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - start


async def redis_cpu(control: PipelinedRedis) -> float:
    info = (await control.execute_command("INFO", "cpu")).decode()
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    return float(fields["used_cpu_sys"]) + float(fields["used_cpu_user"])


@dataclass
class Figures:
    """One client's figures over the rounds."""

    p50_us: list[float] = field(default_factory=list)
    p99_us: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)
    calls_s: list[float] = field(default_factory=list)
    load_p99_us: list[float] = field(default_factory=list)
    load_cpu_us: list[float] = field(default_factory=list)
    redis_cpu_us: list[float] = field(default_factory=list)


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(
    client: Client, url: str, control: PipelinedRedis, requests: int, concurrency: int, figures: Figures
) -> None:
    async with client.open(url) as script_client:
        store = RedisQuotaStore(script_client, replica="bench")
        await store.beat(3600)
        work = Workload(store)
        for c, n in ((1, requests), (concurrency, requests * 2)):
            await closed_loop(max(200, c * 4), c, work.request)  # warm up: scripts loaded, pool grown
            work.latencies.clear()
            cpu0, redis0 = time.process_time(), await redis_cpu(control)
            seconds = await closed_loop(n, c, work.request)
            cpu, redis = time.process_time() - cpu0, await redis_cpu(control) - redis0
            calls = len(work.latencies)
            if c == 1:
                figures.p50_us.append(quantile(work.latencies, 0.50) * 1e6)
                figures.p99_us.append(quantile(work.latencies, 0.99) * 1e6)
                figures.cpu_us.append(cpu / calls * 1e6)
            else:
                figures.calls_s.append(calls / seconds)
                figures.load_p99_us.append(quantile(work.latencies, 0.99) * 1e6)
                figures.load_cpu_us.append(cpu / calls * 1e6)
                figures.redis_cpu_us.append(redis / calls * 1e6)


# --- the run -----------------------------------------------------------------------------------------


def cell(values: list[float], scale: float = 1.0, digits: int = 0) -> str:
    scaled = [v * scale for v in values]
    return f"{statistics.median(scaled):,.{digits}f} ({min(scaled):,.{digits}f}-{max(scaled):,.{digits}f})"


def table(results: dict[str, Figures], concurrency: int) -> str:
    c = concurrency
    lines = [
        f"| client | c=1 p50 us | c=1 p99 us | c=1 CPU us/call | c={c} calls/s | c={c} p99 ms "
        f"| c={c} CPU us/call | c={c} redis CPU us/call |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for name, f in results.items():
        lines.append(
            f"| {name} | {cell(f.p50_us)} | {cell(f.p99_us)} | {cell(f.cpu_us)} | {cell(f.calls_s)} "
            f"| {cell(f.load_p99_us, 1e-3, 1)} | {cell(f.load_cpu_us)} | {cell(f.redis_cpu_us)} |"
        )
    return "\n".join(lines)


async def bench(url: str, clients: list[Client], rounds: int, requests: int, concurrency: int) -> dict[str, Figures]:
    control = PipelinedRedis.from_url(url, timeout_s=5.0)
    try:
        setup = RedisQuotaStore(control, replica="bench")
        await setup.beat(3600)
        await setup.set_capacity(POOL, ENDPOINTS)
        results = {client.name: Figures() for client in clients}
        for r in range(rounds):
            order = clients[r % len(clients) :] + clients[: r % len(clients)]
            for client in order:
                await measure(client, url, control, requests, concurrency, results[client.name])
            print(f"round {r + 1}/{rounds} done ({', '.join(c.name for c in order)})", flush=True)
        return results
    finally:
        await control.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=1000, help="admit+settle pairs at c=1 (twice that at load)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="uvloop")
    parser.add_argument("--clients", help="comma-separated subset of: " + ", ".join(c.name for c in CLIENTS))
    args = parser.parse_args()
    clients = available()
    if args.clients:
        wanted = args.clients.split(",")
        clients = [c for c in clients if c.name in wanted]
    if args.loop == "uvloop":
        import uvloop

        uvloop.install()
    load_cpu, server_cpu = cores()
    if load_cpu is not None:
        os.sched_setaffinity(0, {load_cpu})
    redis_version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()[2]
    versions = ", ".join(f"{d} {_version(d)}" for d in ("redis", "hiredis", "coredis", "uvloop") if _version(d))
    versions += f" (redis-py parses with hiredis: {HIREDIS_AVAILABLE})"
    print(
        f"python {sys.version.split()[0]}, loop {args.loop}, redis-server {redis_version.removeprefix('v=')}, "
        f"{versions}; this process on CPU {load_cpu}, redis-server on CPU {server_cpu}; "
        f"{args.rounds} rounds, {args.requests} requests at c=1 and {2 * args.requests} at c={args.concurrency}",
        flush=True,
    )
    with redis_server(server_cpu) as url:
        results = asyncio.run(bench(url, clients, args.rounds, args.requests, args.concurrency))
    print("\nEach call is one EVALSHA (admit or settle); each cell: median over the rounds (min-max).\n")
    print(table(results, args.concurrency))


if __name__ == "__main__":
    main()
