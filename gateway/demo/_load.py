"""`gateway demo --load`: a steady tenant and a noisy one against the demo, with a live summary.

The steady tenant keeps a fixed number of requests open (a new one as each answer comes back); the noisy
one sends at a fixed rate whatever the answers (a batch job, or many users). `_scenario` says why the
numbers make the engine contended, the shares follow the weights and the noisy tenant meets 429s.

The summary is read from `GET /admin/stats`, the counters the console draws: served requests per second,
each tenant's share of the service (prompt + 2 x completion tokens, the fair queue's measure) against
its entitlement (its weight over the weights of the tenants active in the window), and its 429s by
reason since the load began. Outcomes the gateway does not count (connection errors) are counted here.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, deque
from typing import Any

import httpx

from gateway.demo._scenario import (
    LOAD_MAX_TOKENS,
    MODEL,
    NOISY,
    NOISY_RATE,
    SIM_CONCURRENCY,
    STEADY,
    STEADY_IN_FLIGHT,
)

__all__ = ["run_load"]

_EVERY_S = 3.0
_WINDOW = 2  # ticks: rates and shares over the last 6 s
_MAX_OPEN = 64  # the noisy sender's requests open at once, whatever happens to the gateway


async def run_load(base_url: str, keys: dict[str, str], admin_key: str, seconds: float) -> None:
    """Run the load for `seconds`, printing a summary every few seconds and a total at the end."""
    print(
        f"\nLoad for {seconds:g} s: {STEADY.id} keeps {STEADY_IN_FLIGHT} requests open, {NOISY.id} sends "
        f"{NOISY_RATE:g} a second, and the engine runs {SIM_CONCURRENCY} at a time.\n"
        f"Expect the gateway's fair queue to serve them by weight ({STEADY.weight}:{NOISY.weight}), and {NOISY.id} "
        "to get 429s when its queue is full (a refusal reserves nothing, so its rpm is spent only by what it is\n"
        "served). "
        f"The console draws the same: {base_url}/console/ (the Fairness page).\n",
        flush=True,
    )
    limits = httpx.Limits(max_connections=STEADY_IN_FLIGHT + _MAX_OPEN + 8, max_keepalive_connections=32)
    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as http:
        stats = _Stats(http, admin_key)
        first = await stats.read()
        failures: Counter[tuple[str, str]] = Counter()
        started = time.monotonic()
        workers = [asyncio.create_task(_steady(http, keys[STEADY.id], failures)) for _ in range(STEADY_IN_FLIGHT)]
        workers.append(asyncio.create_task(_noisy(http, keys[NOISY.id], failures)))
        workers.append(asyncio.create_task(_report(stats, first, started, failures)))
        try:
            await asyncio.sleep(seconds)
        finally:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        last = await stats.read()
    print(_total(first, last, time.monotonic() - started, failures), flush=True)


def _body(tenant: str) -> dict[str, Any]:
    question = "How do queues stay fair?" if tenant == STEADY.id else "Summarise this batch, please."
    return {"model": MODEL, "messages": [{"role": "user", "content": question}], "max_tokens": LOAD_MAX_TOKENS}


async def _send(http: httpx.AsyncClient, key: str, tenant: str, failures: Counter[tuple[str, str]]) -> float:
    """One request; returns how long the sender should pause before the next (a 429's retry-after)."""
    try:
        resp = await http.post("/v1/chat/completions", json=_body(tenant), headers={"Authorization": f"Bearer {key}"})
    except httpx.HTTPError as exc:
        failures[tenant, type(exc).__name__] += 1
        return 0.5
    if resp.status_code == 429:
        try:
            return float(resp.headers.get("retry-after", "1"))
        except ValueError:
            return 1.0
    if resp.status_code != 200:
        failures[tenant, f"HTTP {resp.status_code}"] += 1
        return 0.5
    return 0.0


async def _steady(http: httpx.AsyncClient, key: str, failures: Counter[tuple[str, str]]) -> None:
    while True:
        pause = await _send(http, key, STEADY.id, failures)
        if pause:
            # Only if someone lowered its limits meanwhile: it backs off as the OpenAI SDK would.
            await asyncio.sleep(min(pause, 5.0))


async def _noisy(http: httpx.AsyncClient, key: str, failures: Counter[tuple[str, str]]) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    sent = 0
    open_: set[asyncio.Task[float]] = set()
    try:
        while True:
            # Catch up after a late wake-up, so the rate holds on a busy machine.
            due = int((loop.time() - start) * NOISY_RATE) + 1 - sent
            for _ in range(due):
                sent += 1
                if len(open_) < _MAX_OPEN:
                    task = asyncio.create_task(_send(http, key, NOISY.id, failures))
                    open_.add(task)
                    task.add_done_callback(open_.discard)
            await asyncio.sleep(1 / NOISY_RATE)
    finally:
        for task in list(open_):
            task.cancel()
        await asyncio.gather(*open_, return_exceptions=True)


class _Stats:
    def __init__(self, http: httpx.AsyncClient, admin_key: str) -> None:
        self._http = http
        self._headers = {"Authorization": f"Bearer {admin_key}"}

    async def read(self) -> dict[str, dict[str, Any]]:
        """Each tenant's counters, by id (empty if the gateway cannot answer just now)."""
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
            resp = await self._http.get("/admin/stats", headers=self._headers)
            if resp.status_code == 200:
                return {t["id"]: t for t in resp.json()["tenants"]}
        return {}


async def _report(
    stats: _Stats, first: dict[str, dict[str, Any]], started: float, failures: Counter[tuple[str, str]]
) -> None:
    window: deque[tuple[float, dict[str, dict[str, Any]]]] = deque([(started, first)], maxlen=_WINDOW + 1)
    while True:
        await asyncio.sleep(_EVERY_S)
        now, snapshot = time.monotonic(), await stats.read()
        if not snapshot:
            continue
        then, old = window[0]
        window.append((now, snapshot))
        print(_lines(f"[{now - started:4.0f}s]", old, snapshot, first, now - then, failures), flush=True)


def _lines(
    label: str,
    old: dict[str, dict[str, Any]],
    new: dict[str, dict[str, Any]],
    first: dict[str, dict[str, Any]],
    seconds: float,
    failures: Counter[tuple[str, str]],
) -> str:
    """One line per tenant active in the window: served req/s, share against entitlement, 429s so far."""
    served = {t: _diff(c, old.get(t), "requests").get("200", 0) for t, c in new.items()}
    service = {t: _service(c) - _service(old.get(t)) for t, c in new.items()}
    active = [t for t, c in new.items() if service[t] > 0 or c.get("queued", 0) or c.get("inflight", 0)]
    total_service = sum(service[t] for t in active) or 1
    total_weight = sum(new[t].get("weight", 1) for t in active) or 1
    lines = []
    for i, tenant in enumerate(sorted(active)):
        counters = new[tenant]
        share = service[tenant] / total_service
        entitled = counters.get("weight", 1) / total_weight
        lines.append(
            f"{label if i == 0 else ' ' * len(label)} {tenant:<8} weight {counters.get('weight', 1):<3g} "
            f"{served[tenant] / seconds:5.1f} req/s   share {share:4.0%} (entitled to {entitled:3.0%})   "
            f"429s so far: {_rejections(_diff(counters, first.get(tenant), 'rejections'))}"
            f"{_failures(failures, tenant)}"
        )
    return "\n".join(lines) or f"{label} (no requests served in the last {seconds:.0f} s)"


def _total(
    first: dict[str, dict[str, Any]],
    last: dict[str, dict[str, Any]],
    seconds: float,
    failures: Counter[tuple[str, str]],
) -> str:
    served = {t: _diff(c, first.get(t), "requests").get("200", 0) for t, c in last.items()}
    service = {t: _service(c) - _service(first.get(t)) for t, c in last.items()}
    total_service = sum(service.values()) or 1
    parts = []
    for tenant in sorted(t for t in last if served[t] or _diff(last[t], first.get(t), "rejections")):
        refused = _rejections(_diff(last[tenant], first.get(tenant), "rejections"))
        parts.append(
            f"  {tenant:<8} weight {last[tenant].get('weight', 1):<3g} served {served[tenant]:>4} "
            f"({service[tenant] / total_service:.0%} of the service)   429s: {refused}{_failures(failures, tenant)}"
        )
    return (
        f"\nLoad done after {seconds:.0f} s:\n"
        + "\n".join(parts)
        + "\nThe demo keeps running (the console's charts included); Ctrl-C stops it."
    )


def _diff(new: dict[str, Any], old: dict[str, Any] | None, field: str) -> dict[str, int]:
    before = (old or {}).get(field, {})
    return {k: v - before.get(k, 0) for k, v in new.get(field, {}).items() if v - before.get(k, 0)}


def _service(counters: dict[str, Any] | None) -> int:
    tokens = (counters or {}).get("tokens", {})
    return int(tokens.get("prompt", 0)) + 2 * int(tokens.get("completion", 0))


def _rejections(by_reason: dict[str, int]) -> str:
    if not by_reason:
        return "none"
    detail = ", ".join(f"{reason} {count}" for reason, count in sorted(by_reason.items(), key=lambda kv: -kv[1]))
    return f"{sum(by_reason.values())} ({detail})"


def _failures(failures: Counter[tuple[str, str]], tenant: str) -> str:
    mine = {what: n for (who, what), n in failures.items() if who == tenant}
    return "   failed: " + ", ".join(f"{what} {n}" for what, n in sorted(mine.items())) if mine else ""
