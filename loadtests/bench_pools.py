"""How requests are spread over a pool of engines: prefix-cache hits, time to first token and load balance,
for five ways of routing the same workload.

Usage: .venv/bin/python -m loadtests.bench_pools [--seconds 20] [--only round_robin tenant_scope ...] [--draws N]

The workload is shaped like llm-d's prefix-cache benchmark: many tenants, each with a long system prompt of
its own (the shared prefix of all its requests) and a short unique question per request, streamed chat with
a small `max_tokens`, offered open loop (Poisson arrivals) at 65% of the pool's capacity. Every tenant's
system prompt starts with the same boilerplate preamble, longer than the gateway's `prefix_tokens`, as tool
definitions or a provider's policy text would be. Tokens are words of three letters and a space, so the
simulator's one-token-per-word count and the gateway's four characters a token agree.

Four simulated vLLM engines (`gateway sim`), each with running slots and a bounded prefix cache that holds
about a quarter of all tenants' prefixes, and one gateway worker on Redis in front of them:

  round_robin      the gateway sends everything to one endpoint, an nginx `upstream` (round robin, nginx's
                   default) over the four engines: a pool behind a plain load balancer
  least_loaded     the gateway's pool with `routing.affinity: none`: the endpoint with the fewest requests
  shared_scope     the gateway's prefix affinity with every tenant in one cache scope (`group:all`), so the
                   placement key is the prompt alone, as a router that does not know tenants would route
  tenant_scope     the default: prefix affinity with each tenant in its own cache scope (ours)
  single_engine    reference: one engine with four times the slots and four times the cache
  *_short          tenant_scope and shared_scope again, with a preamble shorter than `prefix_tokens`
  tenant_scope_lf125  tenant_scope with `routing.load_factor: 1.25` (the default is 2)
  tenant_scope_roomy  tenant_scope with each engine's cache 1.5x larger

Where rendezvous hashing puts the tenants is a draw (of their salts and the endpoints' URLs); `--draws N`
runs the tenant-scoped variants with N sets of tenants.

Each variant runs on fresh engines (empty caches): a warm-up, then a measured window. Hit ratio is cached
prompt tokens over prompt tokens, from the usage of the requests sent in the window; TTFT is measured by
the client; the load per endpoint is what each engine counted itself (`/sim/stats`).

Then placement itself, with requests sent one at a time through two gateway replicas on one Redis: tenants
in separate scopes sending identical prompts, tenants of one group sending the same prompts, and every
request once through each replica. The engine that served each request is read from the engines' own
counters. Results: docs/bench/pools.json and Markdown tables on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import orjson
import yaml

from loadtests.harness import PY, ROOT, free_port, redis, start, stop, wait_port, wait_ready

ADMIN = "sk-admin-bench-0123456789"
CHAT = "/v1/chat/completions"


# --- the workload -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    tenants: int = 32
    preamble_tokens: int = 320
    """The boilerplate every tenant's system prompt starts with (the gateway's prefix_tokens is 256)."""
    system_tokens: int = 1600
    """Each tenant's own system prompt, after the preamble."""
    question_tokens: int = 40
    max_tokens: int = 32
    load: float = 0.65
    warmup_s: float = 8.0
    seconds: float = 20.0


@dataclass(frozen=True)
class Engines:
    count: int = 4
    slots: int = 32
    ttft_ms: float = 10.0
    itl_ms: float = 40.0
    prefill_us_per_token: float = 200.0
    block_tokens: int = 16
    cache_blocks: int = 0

    def args(self) -> list[str]:
        return [
            "--ttft-ms", str(self.ttft_ms),
            "--itl-ms", str(self.itl_ms),
            "--prefill-us-per-token", str(self.prefill_us_per_token),
            "--max-concurrency", str(self.slots),
            "--block-size", str(self.block_tokens),
            "--cache-blocks", str(self.cache_blocks),
        ]  # fmt: skip


def words(source: str, count: int) -> str:
    """`count` tokens of three letters each, the same for the same source."""
    rng = random.Random(source)
    letters = "abcdefghijklmnopqrstuvwxyz"
    return " ".join("".join(rng.choices(letters, k=3)) for _ in range(count))


def system_prompt(w: Workload, tenant: int, preamble: str) -> str:
    own = words(f"tenant {tenant}", w.system_tokens)
    return f"{preamble} {own}" if preamble else own


def prefix_blocks(w: Workload, block: int) -> int:
    """KV blocks a tenant's system message fills in the engine (its role marker is one token more)."""
    return (1 + w.preamble_tokens + w.system_tokens) // block


def sized(w: Workload, e: Engines) -> Engines:
    """Each engine's cache holds a quarter of all tenants' prefixes, plus a tenth for the unique questions."""
    total = w.tenants * prefix_blocks(w, e.block_tokens)
    return replace(e, cache_blocks=math.ceil(1.1 * total / 4))


def capacity_rps(w: Workload, e: Engines) -> float:
    """Requests per second the pool serves when every prefix is cached: slots over a request's time there."""
    uncached = w.question_tokens + 8  # the question, the chat template's markers, a partial block
    service_s = (e.ttft_ms + e.prefill_us_per_token * uncached / 1000 + e.itl_ms * (w.max_tokens - 1)) / 1000
    return e.count * e.slots / service_s


# --- the variants -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    name: str
    what: str
    affinity: str = "scope"
    scope: str = "tenant"
    nginx: bool = False
    single: bool = False
    short_preamble: bool = False
    load_factor: float = 2.0
    cache_scale: float = 1.0


VARIANTS = (
    Variant("round_robin", "nginx round robin over the 4 engines (the gateway sees one endpoint)", "none", nginx=True),
    Variant("least_loaded", "gateway pool, affinity: none (fewest requests in flight)", "none"),
    Variant("shared_scope", "gateway prefix affinity, all tenants in one scope (prompt-only key)", scope="group:all"),
    Variant("tenant_scope", "gateway prefix affinity, each tenant its own cache scope (default)"),
    Variant("single_engine", "one engine with 4x the slots and 4x the cache", "none", single=True),
    Variant("shared_scope_short", "shared_scope, preamble shorter than prefix_tokens", scope="group:all",
            short_preamble=True),
    Variant("tenant_scope_short", "tenant_scope, preamble shorter than prefix_tokens", short_preamble=True),
    Variant("tenant_scope_lf125", "tenant_scope, routing.load_factor 1.25 (spills more)", load_factor=1.25),
    Variant("tenant_scope_roomy", "tenant_scope, each cache 1.5x larger (41% of all prefixes)", cache_scale=1.5),
)  # fmt: skip
SHORT_PREAMBLE_TOKENS = 64

NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
error_log {tmp}/error.log warn;
pid {tmp}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    client_max_body_size 16m;
    upstream engines {{
{servers}
        keepalive 256;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://engines;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 300s;
        }}
    }}
}}
"""


class Engine:
    """One `gateway sim` process and its own counters."""

    def __init__(self, e: Engines, tmp: Path, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = start(
            [PY, "-m", "gateway", "sim", "--port", str(self.port), *e.args()], log=tmp / f"sim-{self.port}.log"
        )
        # One pooled client: a new one per call costs tens of milliseconds, and placement asks after every request.
        self.http = httpx.Client(base_url=self.url, timeout=10, trust_env=False)

    def wait(self) -> None:
        wait_ready(self.url + "/health", self.proc)

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = self.http.get("/sim/stats").json()
        return stats


@contextlib.contextmanager
def engines(e: Engines, tmp: Path, ports: list[int] | None = None) -> Iterator[list[Engine]]:
    ports = ports or [free_port() for _ in range(e.count)]
    started = [Engine(e, tmp, port) for port in ports[: e.count]]
    try:
        for engine in started:
            engine.wait()
        yield started
    finally:
        for engine in started:
            engine.http.close()
            stop(engine.proc)


@contextlib.contextmanager
def nginx_in_front(pool: list[Engine], tmp: Path) -> Iterator[str]:
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    port = free_port()
    home = tmp / "nginx"
    home.mkdir()
    os.chmod(home, 0o755)  # as root, the worker runs as nobody and must reach its temp dirs
    servers = "\n".join(f"        server 127.0.0.1:{engine.port};" for engine in pool)
    conf = home / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=home, port=port, servers=servers))
    proc = start([binary, "-p", str(home), "-c", str(conf)], log=home / "stderr.log")
    try:
        wait_port(port, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


@contextlib.contextmanager
def gateway(where: dict[str, Any], capacity: int, routing: dict[str, Any], redis_url: str, tmp: Path) -> Iterator[str]:
    port = free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    config = {
        "listen": {"host": "127.0.0.1", "port": port},
        "state_path": str(tmp / "state.db"),
        "redis_url": redis_url,
        "log_level": "warning",
        "backends": [
            {
                "name": "pool",
                "kind": "vllm",
                **where,
                "capacity": capacity,
                "capacity_mode": "fixed",
                "routing": routing,
            }
        ],
        "models": [{"name": "m", "backends": ["pool"]}],
    }
    (tmp / "gateway.yaml").write_text(yaml.safe_dump(config))
    env = {"GATEWAY_ADMIN_KEY": ADMIN, "GATEWAY_SALT_SECRET": "bench-salt-secret-0123456789abcdef"}
    proc = start(
        [PY, "-m", "gateway", "serve", "--config", str(tmp / "gateway.yaml")], env=env, log=tmp / "gateway.log"
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url + "/readyz", proc, timeout=60)
        yield url
    finally:
        stop(proc)


def tenant_keys(url: str, ids: list[str], scope: str) -> list[str]:
    keys: list[str] = []
    auth = {"Authorization": f"Bearer {ADMIN}"}
    with httpx.Client(base_url=url, headers=auth, timeout=10, trust_env=False) as http:
        for tenant in ids:
            http.post("/admin/tenants", json={"id": tenant, "cache_scope": scope}).raise_for_status()
            resp = http.post(f"/admin/tenants/{tenant}/keys", json={})
            resp.raise_for_status()
            keys.append(resp.json()["key"])
    return keys


# --- load -------------------------------------------------------------------------------------------------


@dataclass
class Sent:
    at: float
    tenant: int
    status: int = 0
    ttft: float | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    done: float | None = None


async def send(session: aiohttp.ClientSession, url: str, key: str, body: bytes, rec: Sent, t0: float) -> None:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    start_s = time.monotonic()
    try:
        async with session.post(url, data=body, headers=headers) as resp:
            rec.status = resp.status
            if resp.status != 200:
                await resp.read()
                return
            async for line in resp.content:
                if not line.startswith(b"data: {"):
                    continue
                if rec.ttft is None and b'"content":"' in line and b'"content":""' not in line:
                    rec.ttft = time.monotonic() - start_s
                if b'"usage":{' in line:
                    usage = orjson.loads(line[6:])["usage"]
                    rec.prompt_tokens = usage["prompt_tokens"]
                    rec.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        rec.done = time.monotonic() - t0
    except aiohttp.ClientError:
        rec.status = -1


def counters(pool: list[Engine]) -> list[dict[str, Any]]:
    out = []
    for engine in pool:
        s = engine.stats()
        out.append(
            {
                "requests": s["requests_by_path"].get(CHAT, 0),
                "queries": s["prefix_cache_queries"],
                "hits": s["prefix_cache_hits"],
                "salts": s["requests_by_cache_salt"],
            }
        )
    return out


def stickiness(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> tuple[float, list[int]] | None:
    """The share of requests served by their scope's main engine (the one that served most of them; 1.0:
    every scope on one engine), and how many scopes each engine is the main engine of.

    Read from the engines' requests per cache salt in the window; meaningless when all tenants share a salt.
    """
    per_scope: dict[str, list[int]] = {}
    for i, (b, a) in enumerate(zip(before, after, strict=True)):
        for salt, n in a["salts"].items():
            per_scope.setdefault(salt, [0] * len(after))[i] = n - b["salts"].get(salt, 0)
    total = sum(sum(counts) for counts in per_scope.values())
    if len(per_scope) < 2 or not total:
        return None
    mains = [counts.index(max(counts)) for counts in per_scope.values()]
    share = sum(max(counts) for counts in per_scope.values()) / total
    return round(share, 4), [mains.count(i) for i in range(len(after))]


async def offer(
    url: str, keys: list[str], systems: list[str], w: Workload, rate: float, pool: list[Engine]
) -> tuple[list[Sent], list[dict[str, Any]], list[dict[str, Any]]]:
    """Poisson arrivals at `rate` for warm-up plus the window; the engines' counters at the window's edges."""
    rng = random.Random(f"arrivals {w.tenants}")
    bodies = [
        {
            "model": "m",
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": ""}],
            "max_tokens": w.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        for system in systems
    ]
    sent: list[Sent] = []
    tasks: list[asyncio.Task[None]] = []
    edges: list[list[dict[str, Any]]] = []
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=300)
    ) as session:
        t0 = time.monotonic()
        end = w.warmup_s + w.seconds
        at = 0.0
        marks = [w.warmup_s, end]
        for n in itertools.count():
            at += rng.expovariate(rate)
            while marks and at >= marks[0]:
                await asyncio.sleep(max(0.0, t0 + marks.pop(0) - time.monotonic()))
                edges.append(await loop.run_in_executor(None, counters, pool))
            if at >= end:
                break
            tenant = rng.randrange(w.tenants)
            body = bodies[tenant]
            body["messages"][1]["content"] = f"request {n} " + words(f"question {n}", w.question_tokens - 2)
            rec = Sent(at, tenant)
            sent.append(rec)
            await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
            tasks.append(asyncio.create_task(send(session, url + CHAT, keys[tenant], orjson.dumps(body), rec, t0)))
        await asyncio.gather(*tasks)
    return sent, edges[0], edges[1]


def quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def summarize(
    v: Variant, sent: list[Sent], before: list[dict[str, Any]], after: list[dict[str, Any]], w: Workload
) -> dict[str, Any]:
    window = [s for s in sent if w.warmup_s <= s.at < w.warmup_s + w.seconds]
    ok = [s for s in window if s.status == 200 and s.ttft is not None]
    ttfts = [1000 * s.ttft for s in ok if s.ttft is not None]
    prompt = sum(s.prompt_tokens for s in ok)
    cached = sum(s.cached_tokens for s in ok)
    served = [a["requests"] - b["requests"] for a, b in zip(after, before, strict=True)]
    queries = [a["queries"] - b["queries"] for a, b in zip(after, before, strict=True)]
    hits = [a["hits"] - b["hits"] for a, b in zip(after, before, strict=True)]
    mean = sum(served) / len(served) if served else 0.0
    sticky = None if v.scope != "tenant" or v.single else stickiness(before, after)
    statuses: dict[str, int] = {}
    for s in window:
        statuses[str(s.status)] = statuses.get(str(s.status), 0) + 1
    return {
        "what": v.what,
        "requests": len(window),
        "statuses": statuses,
        "hit_ratio": round(cached / prompt, 4) if prompt else 0.0,
        "ttft_ms": {
            "p50": round(quantile(ttfts, 0.5), 1),
            "p90": round(quantile(ttfts, 0.9), 1),
            "p99": round(quantile(ttfts, 0.99), 1),
            "mean": round(statistics.fmean(ttfts), 1) if ttfts else None,
        },
        # Answered requests sent in the window, over the window: the offered rate unless the pool falls behind.
        "throughput_rps": round(len(ok) / w.seconds, 2),
        "endpoint_requests": served,
        "max_over_mean": round(max(served) / mean, 3) if mean else None,
        "endpoint_hit_ratio": [round(h / q, 4) if q else 0.0 for h, q in zip(hits, queries, strict=True)],
        "engine_hit_ratio": round(sum(hits) / sum(queries), 4) if sum(queries) else 0.0,
        "stickiness": sticky[0] if sticky else None,
        "scopes_per_main_engine": sticky[1] if sticky else None,
    }


def run_variant(
    v: Variant, w: Workload, e: Engines, rate: float, ports: list[int], tmp: Path, draw: int = 0
) -> dict[str, Any]:
    """`draw` names the tenants differently, so their scopes' salts, and so their placement, are another draw."""
    tmp = tmp / f"{v.name}-{draw}"
    tmp.mkdir()
    if v.short_preamble:
        w = replace(w, preamble_tokens=SHORT_PREAMBLE_TOKENS)
    preamble = words("preamble", w.preamble_tokens)
    systems = [system_prompt(w, t, preamble) for t in range(w.tenants)]
    e = sized(w, e)
    e = replace(e, cache_blocks=round(v.cache_scale * e.cache_blocks))
    if v.single:
        e = replace(e, count=1, slots=4 * e.slots, cache_blocks=4 * e.cache_blocks)
    with contextlib.ExitStack() as stack:
        redis_url = stack.enter_context(redis(None))
        pool = stack.enter_context(engines(e, tmp, ports))
        if v.nginx:
            where: dict[str, Any] = {"url": stack.enter_context(nginx_in_front(pool, tmp))}
            capacity = e.count * e.slots
        elif v.single:
            where, capacity = {"url": pool[0].url}, e.slots
        else:
            where, capacity = {"endpoints": [engine.url for engine in pool]}, e.slots
        routing = {"affinity": v.affinity, "load_factor": v.load_factor}
        url = stack.enter_context(gateway(where, capacity, routing, redis_url, tmp / "gw"))
        keys = tenant_keys(url, [f"t{i}" if not draw else f"d{draw}t{i}" for i in range(w.tenants)], v.scope)
        sent, before, after = asyncio.run(offer(url, keys, systems, w, rate, pool))
    result = summarize(v, sent, before, after, w)
    result["engines"] = asdict(e)
    result["preamble_tokens"] = w.preamble_tokens
    return result


# --- placement --------------------------------------------------------------------------------------------


def served_by(pool: list[Engine], before: list[int]) -> tuple[int, list[int]]:
    now = [engine.stats()["requests_by_path"].get(CHAT, 0) for engine in pool]
    moved = [i for i, (a, b) in enumerate(zip(now, before, strict=True)) if a != b]
    if len(moved) != 1:
        raise RuntimeError(f"expected one engine to serve the request, counters moved on {moved}")
    return moved[0], now


def place(url: str, pool: list[Engine], keys: list[str], prompts: list[str]) -> list[list[int]]:
    """The engine of each (tenant, prompt), one request at a time."""
    placed: list[list[int]] = []
    now = [engine.stats()["requests_by_path"].get(CHAT, 0) for engine in pool]
    with httpx.Client(base_url=url, timeout=30, trust_env=False) as http:
        for key in keys:
            row = []
            for j, prompt in enumerate(prompts):
                body = {
                    "model": "m",
                    "messages": [{"role": "system", "content": prompt}, {"role": "user", "content": f"q{j}"}],
                    "max_tokens": 1,
                }
                http.post(CHAT, json=body, headers={"Authorization": f"Bearer {key}"}).raise_for_status()
                where, now = served_by(pool, now)
                row.append(where)
            placed.append(row)
    return placed


def agreement(a: list[int], b: list[int]) -> float:
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def run_placement(e: Engines, tmp: Path, tenants: int = 8, prompts: int = 16) -> dict[str, Any]:
    tmp = tmp / "placement"
    tmp.mkdir()
    texts = [words(f"placement prompt {j}", 300) for j in range(prompts)]
    with contextlib.ExitStack() as stack:
        redis_url = stack.enter_context(redis(None))
        pool = stack.enter_context(engines(replace(e, cache_blocks=20000), tmp))
        where = {"endpoints": [engine.url for engine in pool]}
        a = stack.enter_context(gateway(where, e.slots, {"affinity": "scope"}, redis_url, tmp / "a"))
        b = stack.enter_context(gateway(where, e.slots, {"affinity": "scope"}, redis_url, tmp / "b"))
        own = tenant_keys(a, [f"own{i}" for i in range(tenants)], "tenant")
        grouped = tenant_keys(a, [f"grp{i}" for i in range(tenants)], "group:shared")
        own_a, grouped_a = place(a, pool, own, texts), place(a, pool, grouped, texts)
        own_b, grouped_b = place(b, pool, own, texts), place(b, pool, grouped, texts)
    pairs = list(itertools.combinations(range(tenants), 2))

    def pairwise(rows: list[list[int]]) -> float:
        return round(statistics.fmean(agreement(rows[i], rows[k]) for i, k in pairs), 4)

    per_engine = [sum(row.count(i) for row in own_a) for i in range(len(pool))]
    return {
        "tenants": tenants,
        "prompts": prompts,
        "separate_scopes": {
            "placements": own_a,
            "pairwise_same_engine": pairwise(own_a),
            "chance": round(1 / len(pool), 4),
            "requests_per_engine": per_engine,
        },
        "one_group": {"placements": grouped_a, "pairwise_same_engine": pairwise(grouped_a)},
        "replicas_identical": {
            "separate_scopes": statistics.fmean(agreement(x, y) for x, y in zip(own_a, own_b, strict=True)),
            "one_group": statistics.fmean(agreement(x, y) for x, y in zip(grouped_a, grouped_b, strict=True)),
        },
    }


# --- report -----------------------------------------------------------------------------------------------


def table(results: dict[str, Any]) -> str:
    lines = [
        "| variant | hit ratio | TTFT p50 ms | TTFT p90 ms | TTFT p99 ms | req/s | requests per engine | max/mean "
        "| on the tenant's main engine |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for name, r in results.items():
        t = r["ttft_ms"]
        lines.append(
            f"| {name} | {r['hit_ratio']:.1%} | {t['p50']:.0f} | {t['p90']:.0f} | {t['p99']:.0f} "
            f"| {r['throughput_rps']:.1f} | {' / '.join(map(str, r['endpoint_requests']))} "
            f"| {r['max_over_mean'] or 0:.2f} | {'-' if r['stickiness'] is None else format(r['stickiness'], '.1%')} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=Workload.seconds, help="the measured window per variant")
    parser.add_argument("--warmup", type=float, default=Workload.warmup_s)
    parser.add_argument("--only", nargs="*", help="run only these variants (placement: the placement checks)")
    parser.add_argument(
        "--draws", type=int, default=1, help="run each tenant-scoped affinity variant with this many sets of tenants"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench" / "pools.json")
    args = parser.parse_args()
    w = Workload(seconds=args.seconds, warmup_s=args.warmup)
    e = Engines()
    rate = w.load * capacity_rps(w, e)
    chosen = [v for v in VARIANTS if not args.only or v.name in args.only]
    started = time.monotonic()
    results: dict[str, Any] = {}
    # The engines listen on the same ports in every variant: rendezvous hashing ranks endpoints by URL, so every
    # variant with the same keys meets the same placement (the same draw of scopes per engine).
    ports = [free_port() for _ in range(e.count)]
    with tempfile.TemporaryDirectory(prefix="bench-pools-") as tmp:
        for v in chosen:
            draws = args.draws if v.affinity == "scope" and v.scope == "tenant" else 1
            for draw in range(draws):
                name = v.name if not draw else f"{v.name}_draw{draw}"
                results[name] = run_variant(v, w, e, rate, ports, Path(tmp), draw)
                brief = {k: results[name][k] for k in ("hit_ratio", "ttft_ms", "scopes_per_main_engine")}
                print(f"{name}: {json.dumps(brief)}", flush=True)
        placement = run_placement(e, Path(tmp)) if not args.only or "placement" in args.only else None
    out: dict[str, Any] = {
        "workload": asdict(w),
        "engines": asdict(sized(w, e)),
        "capacity_rps": round(capacity_rps(w, e), 1),
        "offered_rps": round(rate, 1),
        "gateway": {"prefix_tokens": 256, "block_tokens": 16, "load_factor": 2.0, "workers": 1, "redis": True},
        "variants": results,
        "placement": placement,
        "wall_s": round(time.monotonic() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(table(results))
    if placement:
        s, g, r = placement["separate_scopes"], placement["one_group"], placement["replicas_identical"]
        print(
            f"\nplacement: separate scopes agree on {s['pairwise_same_engine']:.1%} of identical prompts "
            f"(chance {s['chance']:.0%}), one group on {g['pairwise_same_engine']:.1%}; "
            f"replica B made the same choice as A for {r['separate_scopes']:.1%} / {r['one_group']:.1%}"
        )


if __name__ == "__main__":
    main()
