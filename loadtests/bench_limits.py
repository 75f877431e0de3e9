"""What one admission costs: admit + settle pairs against a local redis-server, and in process.

    .venv/bin/python loadtests/bench_limits.py                 # starts its own redis-server on a free port
    .venv/bin/python loadtests/bench_limits.py --url redis://127.0.0.1:6380/0 --pairs 5000 --loop uvloop

Each pair is one `admit` (one EVALSHA of lua/admit.lua) and one `settle` (one EVALSHA of lua/settle.lua)
for a request counted against a tenant scope and a key scope, both with every limit set (rpm, tpm,
concurrency, in-flight tokens, budget), set high enough that nothing is refused. A PING round trip is
measured alongside, so the scripts' own share is visible. Figures go to docs/BENCHMARKS.md by hand.

`--place ranked` adds a place in a pool of four endpoints to each admission (the fair queue's part of
admit.lua, granted at once) and gives it back at settle; `--place keyed` adds an affinity key to it, one
of 32, so the pool's table of keys to endpoints is read and refreshed as a pool with prefix affinity does.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import itertools
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

from gateway.admission.limits import (
    LocalQuotaStore,
    PlaceAsk,
    PoolAsk,
    QuotaLimits,
    QuotaStore,
    RedisQuotaStore,
    Release,
    Scope,
    fast_fail_client,
)

LIMITS = QuotaLimits(
    rpm=10**9, tpm=10**12, max_concurrency=10**6, max_inflight_tokens=10**12, budget_amount=1e12, budget_period="month"
)


@contextmanager
def redis_server() -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed; pass --url")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as workdir:
        args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        proc = subprocess.Popen([*args, "--dir", workdir], stdout=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.kill()
            proc.wait()


ENDPOINTS = ("http://10.0.0.1:8000", "http://10.0.0.2:8000", "http://10.0.0.3:8000", "http://10.0.0.4:8000")
KEYS = itertools.cycle([f"{i:016x}" for i in range(32)])


def pool_ask(place: str) -> PoolAsk:
    if place == "keyed":
        return PoolAsk("bench", ENDPOINTS, next(KEYS), 300.0)
    return PoolAsk("bench", ENDPOINTS)


async def pair(store: QuotaStore, tenant: str, scopes: list[Scope], place: str = "none") -> None:
    ask = None
    if place != "none":
        ask = PlaceAsk(uuid.uuid4().hex[:16], tenant, 1.0, 0, 1200.0, (pool_ask(place),), 60.0, load_factor=1.25)
    decision = await store.admit(tenant, scopes, tokens=1200, cost=0.002, place=ask)
    assert decision.reservation is not None, decision
    release = None
    if ask is not None:
        assert decision.permit is not None, decision
        release = Release(decision.permit, tenant, 1.0, 0, 1200.0, 900.0)
    await store.settle(decision.reservation, actual_tokens=700, actual_cost=0.001, release=release)


async def timed(n: int, concurrency: int, op: Callable[[], Awaitable[object]]) -> float:
    """Seconds to run `op` n times with `concurrency` workers."""
    remaining = n

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await op()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - start


def report(name: str, n: int, concurrency: int, seconds: float, calls_per_op: int) -> None:
    calls = n * calls_per_op
    print(
        f"{name:<28} c={concurrency:<3} {n} x {calls_per_op} calls: {seconds * 1e6 / n:8.1f} us/pair"
        f"  {seconds * 1e6 / calls:7.1f} us/call  {calls / seconds:9.0f} calls/s  {n / seconds:8.0f} pairs/s"
    )


async def bench(url: str, pairs: int, scopes_n: int, place: str = "none") -> None:
    client = fast_fail_client(url, timeout_s=1.0)
    try:
        scopes = [Scope("tenant:bench", LIMITS), Scope("key:k_bench", LIMITS)][:scopes_n]
        stores: list[tuple[str, QuotaStore]] = [("redis", RedisQuotaStore(client)), ("local", LocalQuotaStore())]
        for _, store in stores:
            await store.set_capacity("bench", dict.fromkeys(ENDPOINTS, 10**6))
        for concurrency in (1, 32):
            seconds = await timed(pairs, concurrency, client.ping)
            report("redis PING (baseline)", pairs, concurrency, seconds, 1)
            for name, store in stores:
                op = functools.partial(pair, store, "bench", scopes, place)
                await timed(200, concurrency, op)  # warm up, load the scripts
                await client.config_resetstat()
                seconds = await timed(pairs, concurrency, op)
                report(f"{name} admit+settle", pairs, concurrency, seconds, 2)
                if name == "redis":
                    stats = await client.info("commandstats")
                    print(
                        f"  (Redis server time per script, admit and settle averaged: "
                        f"{stats['cmdstat_evalsha']['usec_per_call']} us)"
                    )
    finally:
        await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="an existing Redis (default: start a redis-server on a free port)")
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--scopes", type=int, choices=(1, 2), default=2, help="tenant only, or tenant + key")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--place", choices=("none", "ranked", "keyed"), default="none", help="a place in a pool too")
    args = parser.parse_args()
    if args.loop == "uvloop":
        import uvloop

        uvloop.install()
    print(f"loop={args.loop} scopes={args.scopes} place={args.place}")
    if args.url:
        asyncio.run(bench(args.url, args.pairs, args.scopes, args.place))
        return
    with redis_server() as url:
        asyncio.run(bench(url, args.pairs, args.scopes, args.place))


if __name__ == "__main__":
    main()
