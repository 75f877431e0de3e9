"""Capacity control: how many requests all gateway replicas together let through to each engine.

The point is where the queue forms. An engine handed more requests than it can run queues them itself,
first come first served, blind to tenants and weights; a gateway that hands it just what it can run keeps
the queue at home, where the fair queue orders it. So the limit of each endpoint follows the engine's own
load, read every `capacity.interval_s`:

- vLLM (and the simulator) expose `vllm:num_requests_running`, `vllm:num_requests_waiting` and
  `vllm:kv_cache_usage_perc` on `/metrics`. When requests wait inside the engine, or its KV cache is full,
  the engine is saturated and runs `running` requests at most: that is its capacity, and the limit becomes
  it (so the waiting drains and no more are sent than it runs). When nothing waits and the limit binds
  (the gateway holds requests back and all the limit is in use), the limit grows: by a quarter while the
  engine's capacity is unknown, and to a newly seen higher `running` once it is. Metrics older than
  `stale_s` count as saturated (GIE's saturation detector does the same): nothing more is sent until they
  are fresh again; after `stale_fallback_s` the endpoint is governed by latency instead.
- Engines without those metrics (other OpenAI-compatible servers) get a latency-driven limit in the manner
  of Netflix's Gradient2, starting from the configured `capacity`: the limit shrinks as the time a request
  holds its permit, per token generated, rises well above its long-run level (1.5x), and grows back by a
  small allowance while it binds; while less than half of it is in use it is left alone (`gradient2`).
- `capacity_mode: fixed` backends, and hosted providers (`kind: litellm`), get their configured `capacity`.

Whatever governs the limit, a request may still wait inside the engine (a limit still settling, or
`capacity_mode: fixed` above what the engine runs). That wait is read from vLLM's queue-time histogram
(`engine_wait`: the mean over the requests that left the engine's queue since the last reading) and
handed to admission, which adds it to the queue wait of each request it sends there: the wait a tenant
sees is the whole wait, not only the part in the gateway's fair queue.

The configured `capacity` is always the ceiling, and 1 the floor. An endpoint that is down or ejected gets
0, so the fair queue holds its requests rather than failing them.

With Redis, one replica per pool computes and writes the shared limits (the leader, elected through a key
with a short TTL, so another takes over within seconds when it goes); every replica also keeps its own
share (limit / replicas) for when Redis is away. Without Redis the one process does both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp

from gateway.config import BackendConfig, CapacityConfig
from gateway.telemetry.metrics import Metrics
from gateway.upstream.backends import Backend, BackendPool, Endpoint

__all__ = ["CapacityControl", "EngineLoad", "engine_wait", "gradient2", "parse_engine_metrics"]

log = logging.getLogger("gateway.capacity")

# Limits a pool's shared state keeps if nobody refreshes them (the leader writes them every interval).
LIMITS_TTL_S = 3600.0
GROWTH = 0.25
# Gradient2: how much slower than its long-run level a request may run before the limit shrinks.
TOLERANCE = 1.5


def gradient2(limit: float, short_s: float, long_s: float, *, held: int, binding: bool) -> float:
    """One step of the latency-driven limit (Netflix concurrency-limits' Gradient2).

    While fewer than half the permits are in use the limit is left alone: latency then says nothing about
    the limit (the load is set by the callers, and a busy gateway process slows its own timings), and a
    limit that shrank on noise would never grow back. Otherwise it shrinks as the short-run time per token
    rises above `TOLERANCE` x its long-run level (by half at most per step), and grows by sqrt(limit) while
    it binds, smoothed by 0.2."""
    if held < limit / 2:
        return limit
    gradient = max(0.5, min(1.0, TOLERANCE * long_s / short_s))
    allowance = math.sqrt(limit) if binding else 0.0
    return 0.8 * limit + 0.2 * (limit * gradient + allowance)


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """One reading of an engine's own metrics."""

    running: float
    waiting: float
    kv_usage: float
    at: float
    # vLLM's `vllm:request_queue_time_seconds` histogram: the time requests spent waiting inside the engine
    # (sum and count since it started); None where the engine does not expose it.
    queue_s: float | None = None
    queued: float | None = None


def parse_engine_metrics(text: str, at: float) -> EngineLoad | None:
    """vLLM's gauges, summed over their label sets (an engine may serve several models); None if absent."""
    running = waiting = 0.0
    kv = 0.0
    seen = False
    queue_s: float | None = None
    queued: float | None = None
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        try:
            value = float(line.rsplit(" ", 1)[1])
        except (IndexError, ValueError):
            continue
        if name == "vllm:num_requests_running":
            running += value
            seen = True
        elif name == "vllm:num_requests_waiting":
            waiting += value
            seen = True
        elif name in ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"):
            kv = max(kv, value)
        elif name == "vllm:request_queue_time_seconds_sum":
            queue_s = (queue_s or 0.0) + value
        elif name == "vllm:request_queue_time_seconds_count":
            queued = (queued or 0.0) + value
    return EngineLoad(running, waiting, kv, at, queue_s, queued) if seen else None


def engine_wait(previous: EngineLoad | None, load: EngineLoad, last: float) -> float:
    """How long a request waits inside the engine now, from two readings: the mean time spent waiting by the
    requests that left its queue in between (its queue-time histogram). With none leaving, 0 if nothing
    waits and `last` (the previous figure) if something does; 0 for an engine without the histogram."""
    if load.queue_s is None or load.queued is None:
        return 0.0
    if previous is None or previous.queue_s is None or previous.queued is None or load.queued < previous.queued:
        return last if load.waiting > 0 else 0.0  # a first reading, or a restarted engine
    left = load.queued - previous.queued
    if left > 0:
        return max(0.0, (load.queue_s - previous.queue_s) / left)
    return last if load.waiting > 0 else 0.0


@dataclass(slots=True)
class _Control:
    """What the control knows of one endpoint."""

    limit: float
    slots: float | None = None  # the engine's capacity, once seen saturated
    load: EngineLoad | None = None
    # How long requests wait inside the engine now, in seconds (`engine_wait`).
    engine_wait_s: float = 0.0
    metrics: bool | None = None  # None: not tried yet; False: the endpoint exposes none
    last_fresh: float = 0.0
    # Gradient2 (latency mode): per-token service time, short and long EWMAs.
    short_s: float | None = None
    long_s: float | None = None


class CapacityControl:
    def __init__(
        self,
        *,
        config: CapacityConfig,
        backends: Callable[[], BackendPool],
        publish: Callable[[str, dict[str, int], bool], Awaitable[tuple[int, dict[str, int], int]]],
        lead: Callable[[str], Awaitable[bool]],
        metrics: Metrics,
        session: aiohttp.ClientSession,
        clock: Callable[[], float] = time.monotonic,
        engine_wait: Callable[[str, float], None] | None = None,
    ) -> None:
        """`publish(pool, limits, shared)` writes a pool's limits (to Redis too when `shared`) and answers
        (total limit, permits held per endpoint, tenants waiting); `lead(pool)` says whether this replica
        runs the pool's control (and keeps it so); `engine_wait(endpoint, seconds)` is told, at every
        reading, how long requests wait inside that engine now."""
        self._engine_wait = engine_wait
        self._config = config
        self._backends = backends
        self._publish = publish
        self._lead = lead
        self._metrics = metrics
        self._session = session
        self._clock = clock
        self._controls: dict[tuple[str, str], _Control] = {}
        self._waiting: dict[str, int] = {}
        self._held: dict[str, dict[str, int]] = {}

    async def run(self) -> None:
        while True:
            started = self._clock()
            try:
                await self.tick()
            except Exception:  # the control must never stop
                log.exception("capacity control failed")
            await asyncio.sleep(max(0.0, self._config.interval_s - (self._clock() - started)))

    async def tick(self) -> None:
        pool = self._backends()
        await asyncio.gather(
            *(
                self._read(b, e)
                for b in pool.backends.values()
                if _reads_metrics(b.config)
                for e in list(b.endpoints.values())
            )
        )
        now = self._clock()
        for backend in pool.backends.values():
            limits = {e.id: self._limit(backend, e, now) for e in backend.endpoints.values()}
            shared = await self._lead(backend.name)
            total, held, waiting = await self._publish(backend.name, limits, shared)
            self._waiting[backend.name], self._held[backend.name] = waiting, held
            self._export(backend, limits, held, waiting, total)

    def observe(self, backend: str, endpoint: str, seconds: float, tokens: int) -> None:
        """A request held its permit at `endpoint` for `seconds` and generated `tokens` (latency mode)."""
        control = self._controls.get((backend, endpoint))
        if control is None or control.metrics:
            return
        sample = seconds / max(1, tokens)
        control.short_s = sample if control.short_s is None else control.short_s + 0.1 * (sample - control.short_s)
        if control.long_s is None:
            control.long_s = sample
        else:
            control.long_s += 0.01 * (sample - control.long_s)

    # --- one endpoint ---------------------------------------------------------------------------------

    def _control(self, backend: Backend, endpoint: Endpoint) -> _Control:
        key = (backend.name, endpoint.id)
        control = self._controls.get(key)
        if control is None:
            config = backend.config
            start = config.capacity if config.capacity_mode == "fixed" else min(config.capacity, self._config.initial)
            control = self._controls[key] = _Control(limit=float(start))
        return control

    async def _read(self, backend: Backend, endpoint: Endpoint) -> None:
        control = self._control(backend, endpoint)
        if control.metrics is False and self._clock() < control.last_fresh + self._config.stale_fallback_s:
            return
        try:
            async with self._session.get(
                endpoint.base_url + "/metrics", timeout=aiohttp.ClientTimeout(total=self._config.interval_s * 2)
            ) as resp:
                if resp.status != 200:
                    raise ValueError(f"status {resp.status}")
                text = await resp.text()
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError):
            if control.metrics is None:
                self._no_metrics(backend, control)
            return
        load = parse_engine_metrics(text, self._clock())
        if load is None:
            self._no_metrics(backend, control)
            return
        control.engine_wait_s = engine_wait(control.load, load, control.engine_wait_s)
        control.metrics, control.load, control.last_fresh = True, load, load.at
        if self._engine_wait is not None:
            self._engine_wait(endpoint.id, control.engine_wait_s)

    def _no_metrics(self, backend: Backend, control: _Control) -> None:
        """An engine without vLLM's metrics: latency governs it from the configured capacity down, so a
        server that keeps its latency keeps what the operator gave it."""
        if control.metrics is None and control.short_s is None:
            control.limit = float(backend.config.capacity)
        control.metrics = False
        control.last_fresh = self._clock()

    def _limit(self, backend: Backend, endpoint: Endpoint, now: float) -> int:
        config = backend.config
        if not endpoint.healthy or endpoint.ejected_until > now:
            return 0
        if config.capacity_mode == "fixed" or config.kind == "litellm":
            return config.capacity
        control = self._control(backend, endpoint)
        held = self._held.get(backend.name, {}).get(endpoint.id, 0)
        binding = held >= math.floor(control.limit) and self._waiting.get(backend.name, 0) > 0
        if control.metrics and control.load is not None:
            if now - control.load.at > self._config.stale_s:
                if now - control.load.at > self._config.stale_fallback_s:
                    control.metrics = None  # try again later; meanwhile latency governs
                else:
                    # Stale counts as saturated: nothing beyond what is already there.
                    control.limit = float(max(1, min(control.limit, held)))
            else:
                self._from_engine(control, control.load, binding)
        elif control.short_s is not None and control.long_s is not None:
            control.limit = gradient2(control.limit, control.short_s, control.long_s, held=held, binding=binding)
        control.limit = min(float(config.capacity), max(1.0, control.limit))
        return math.floor(control.limit)

    def _from_engine(self, control: _Control, load: EngineLoad, binding: bool) -> None:
        saturated = load.waiting > 0 or load.kv_usage >= self._config.kv_high
        if saturated:
            # The engine runs `running` at most right now: send it that many, and let what waits there drain.
            control.slots = max(1.0, load.running)
            control.limit = control.slots
            return
        if control.slots is not None and load.running > control.slots:
            control.slots = load.running  # it runs more than it did: its capacity grew
        if binding:
            if control.slots is None or control.limit < control.slots:
                grown = control.limit * (1 + GROWTH)
                control.limit = max(control.limit + 1, grown if control.slots is None else min(grown, control.slots))
            else:
                # At the known capacity with nothing waiting inside: probe one more, now and then.
                control.limit += 1.0 / max(1.0, control.limit)

    def _export(self, backend: Backend, limits: dict[str, int], held: dict[str, int], waiting: int, total: int) -> None:
        m = self._metrics
        m.capacity_limit.labels(backend.name).set(total)
        m.capacity_waiting.labels(backend.name).set(waiting)
        for endpoint in backend.endpoints.values():
            label = _endpoint_label(endpoint.id)
            m.endpoint_limit.labels(backend.name, label).set(limits.get(endpoint.id, 0))
            m.endpoint_held.labels(backend.name, label).set(held.get(endpoint.id, 0))
            control = self._controls.get((backend.name, endpoint.id))
            if control is not None and control.load is not None:
                m.engine_requests.labels(backend.name, label, "running").set(control.load.running)
                m.engine_requests.labels(backend.name, label, "waiting").set(control.load.waiting)
                m.engine_kv_usage.labels(backend.name, label).set(control.load.kv_usage)
                m.engine_queue_wait.labels(backend.name, label).set(control.engine_wait_s)

    def forget(self, backend: str, endpoint: str) -> None:
        """An endpoint left its pool: drop its state and its series."""
        self._controls.pop((backend, endpoint), None)
        label = _endpoint_label(endpoint)
        m = self._metrics
        for collector, labels in (
            (m.endpoint_limit, (backend, label)),
            (m.endpoint_held, (backend, label)),
            (m.engine_requests, (backend, label, "running")),
            (m.engine_requests, (backend, label, "waiting")),
            (m.engine_kv_usage, (backend, label)),
            (m.engine_queue_wait, (backend, label)),
        ):
            with contextlib.suppress(KeyError):
                collector.remove(*labels)


def _reads_metrics(config: BackendConfig) -> bool:
    # `capacity_mode: fixed` engines are read too: their limit is the operator's, but what waits inside them
    # (and for how long) is still the wait their tenants see.
    return config.kind != "litellm"


def _endpoint_label(endpoint: str) -> str:
    """host:port, the endpoint's label in metrics (no scheme)."""
    return endpoint.split("://", 1)[-1]
