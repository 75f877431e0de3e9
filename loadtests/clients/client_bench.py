"""The upstream clients alone: CPU per request at a given concurrency, no server in front (run.py calls this).

Uses the same forwarders as the servers (apps.make_forwarder, generous pool limits) on uvloop, POSTing a
small JSON body to the upstream from ``concurrency`` tasks for ``seconds``, and prints one JSON line:
requests/s and CPU microseconds per request. With ``--profile`` it runs under cProfile instead and reports
the share of CPU time spent in the pool's bookkeeping (POOL_FUNCTIONS) and, for httpx and httpx2, how often
per request the pool re-ran its assignment and how often a request lost the connection it had been given
and had to queue again (``ConnectionNotAvailable``), and how many connections the pool held at the end.

    python loadtests/clients/client_bench.py --upstream http://127.0.0.1:8080/v1/chat/completions \
        --client httpx --concurrency 64 --seconds 2
"""

import argparse
import asyncio
import cProfile
import importlib
import json
import pstats
import time
from typing import Any

import uvloop
from apps import Variant, make_forwarder

Counters = dict[str, int]


def count_pool_events(client: str) -> Counters:
    """For httpx/httpx2: count pool assignment passes and requests re-queued after losing their connection."""
    counters = {"assign_passes": 0, "requeued": 0}
    if client == "aiohttp":
        return counters
    pool_module = importlib.import_module(
        ("httpcore2" if client == "httpx2" else "httpcore") + "._async.connection_pool"
    )
    assign = pool_module.AsyncConnectionPool._assign_requests_to_connections
    clear = pool_module.AsyncPoolRequest.clear_connection

    def counted_assign(self: Any) -> Any:
        counters["assign_passes"] += 1
        return assign(self)

    def counted_clear(self: Any) -> None:
        counters["requeued"] += 1
        clear(self)

    pool_module.AsyncConnectionPool._assign_requests_to_connections = counted_assign
    pool_module.AsyncPoolRequest.clear_connection = counted_clear
    return counters


#: Each client's pool bookkeeping: (end of the file name, function) pairs whose cumulative times are summed.
POOL_FUNCTIONS = {
    "httpx": [("httpcore/_async/connection_pool.py", "_assign_requests_to_connections")],
    "httpx2": [("httpcore2/_async/connection_pool.py", "_assign_requests_to_connections")],
    "aiohttp": [("aiohttp/connector.py", "connect"), ("aiohttp/connector.py", "_release")],
}
BODY = b'{"model":"bench-model-1","messages":[{"role":"user","content":"Say hello."}],"max_tokens":16}'


async def drive(client: str, upstream: str, concurrency: int, seconds: float, profile: bool) -> dict[str, object]:
    forwarder = make_forwarder(Variant("asgi", client, "generous", client), upstream)
    counters = count_pool_events(client) if profile else None
    await forwarder.start()
    count = 0

    async def worker(deadline: float) -> None:
        nonlocal count
        while time.monotonic() < deadline:
            status, _, _ = await forwarder.post(BODY)
            if status != 200:
                raise RuntimeError(f"upstream answered {status}")
            count += 1

    # warm-up: open the connections and fill caches
    await asyncio.gather(*(worker(time.monotonic() + 0.5) for _ in range(concurrency)))
    count = 0
    if counters:
        counters.update(dict.fromkeys(counters, 0))
    profiler = cProfile.Profile() if profile else None
    wall, cpu = time.perf_counter(), time.process_time()
    if profiler:
        profiler.enable()
    await asyncio.gather(*(worker(time.monotonic() + seconds) for _ in range(concurrency)))
    if profiler:
        profiler.disable()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    pool = getattr(getattr(forwarder, "client", None), "_transport", None)
    pool_size = len(pool._pool._connections) if pool is not None else None
    await forwarder.close()

    result: dict[str, object] = {
        "client": client,
        "concurrency": concurrency,
        "requests": count,
        "rps": round(count / wall, 1),
        "cpu_us_per_req": round(cpu / count * 1e6, 1),
        "pool_connections_at_end": pool_size,
    }
    if profiler:
        stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]  # {(file, line, func): (.., tt, ct, ..)}
        total = sum(entry[2] for entry in stats.values())
        bookkeeping = sum(
            entry[3]
            for (file, _line, func), entry in stats.items()
            if any(file.endswith(suffix) and func == name for suffix, name in POOL_FUNCTIONS[client])
        )
        result = {
            "client": client,
            "concurrency": concurrency,
            "requests": count,
            "pool_share": round(bookkeeping / total, 3),
            "pool_connections_at_end": pool_size,
            **{f"{k}_per_req": round(v / count, 2) for k, v in (counters or {}).items() if client != "aiohttp"},
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--client", choices=sorted(POOL_FUNCTIONS), required=True)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    result = uvloop.run(drive(args.client, args.upstream, args.concurrency, args.seconds, args.profile))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
