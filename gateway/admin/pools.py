"""Live figures of each backend pool: its fair queue and its engines, for `GET /admin/stats`.

A process reads them from the collectors the capacity control and the request path already update
(`gateway/admission/capacity.py`, `gateway/pipeline.py`): per backend, the total limit and the tenants
waiting in its fair queue; per endpoint, its limit and the permits held there, the engine's own running,
waiting, KV-cache usage and queue wait, and the requests and prompt tokens (all, and those its prefix cache held) it
served.

Several processes' readings combine by what each figure describes:

- the engine's own readings are the same engine read by every process: the freshest reading wins;
- an endpoint's limit is the one limit all processes apply to that engine: the largest wins (a replica
  that does not run the pool's capacity control reports its own, more cautious estimate);
- the fair queue's figures (the backend's total limit, permits, tenants waiting) describe one queue in
  Redis, which every process sharing it reports (only the one that runs the pool's control reads it; the
  others report their idle local queue): the largest wins. A process that keeps its own queue (no Redis,
  or Redis unreachable) reports that queue, holding its share of each limit: those add up;
- the counters add up, like the tenants' counters.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Field

from gateway.telemetry.metrics import Metrics

__all__ = ["BackendStats", "EndpointStats", "PoolReading", "merge_pools", "own_queues", "read_pools"]


class EndpointStats(BaseModel):
    id: str = Field(description="The engine endpoint, `host:port`.")
    limit: int | None = Field(
        default=None,
        description="Requests all replicas together may have at this engine now, set from its own load "
        "(0 while it is down or ejected); null if it is not in the pool now.",
    )
    permits: int | None = Field(default=None, description="Requests all replicas together have at this engine now.")
    running: int | None = Field(
        default=None,
        description="Requests running inside the engine, by its own count (vLLM's `num_requests_running`); "
        "null when the gateway does not read the engine's metrics (`capacity_mode: fixed`, hosted providers, "
        "engines without them).",
    )
    waiting: int | None = Field(
        default=None,
        description="Requests waiting inside the engine, by its own count (vLLM's `num_requests_waiting`). "
        "The engine serves them first come first served, blind to tenants: it should stay near 0.",
    )
    kv_cache_usage: float | None = Field(default=None, description="The engine's KV-cache usage, 0 to 1.")
    queue_wait_s: float | None = Field(
        default=None,
        description="How long requests wait inside the engine now, in seconds: the mean queue time of those that "
        "left its queue since the last reading (vLLM's `request_queue_time_seconds`). Part of each tenant's "
        "queue wait; it should stay near 0.",
    )
    requests: int = Field(default=0, description="Requests this engine served (a counter).")
    prompt_tokens: int = Field(default=0, description="Prompt tokens this engine processed (a counter).")
    cached_tokens: int = Field(
        default=0,
        description="Of those, the ones its prefix cache held (a counter): the difference of `cached_tokens` "
        "over the difference of `prompt_tokens` is its prefix-cache hit ratio.",
    )


class BackendStats(BaseModel):
    name: str = Field(description="The backend, as configured.")
    limit: int | None = Field(
        default=None,
        description="Requests all replicas together may have at the backend's engines now: the sum of its "
        "endpoints' limits.",
    )
    waiting_tenants: int | None = Field(
        default=None, description="Tenants with requests waiting in the backend's fair queue, across all replicas."
    )
    endpoints: list[EndpointStats] = Field(default_factory=list, description="By `id`.")


@dataclass(frozen=True, slots=True)
class PoolReading:
    """One process's pool figures, with when they were read and whose fair queue they describe."""

    time: float
    own_queues: bool
    backends: Sequence[BackendStats]


def own_queues(metrics: Metrics, *, shared: bool) -> bool:
    """Whether this process's fair-queue figures are its own queue's: it has no Redis to share (`shared`
    false), or has lost it (`gateway_redis_degraded` is 1 in some mode)."""
    return not shared or any(value >= 1 for _, value in _samples(metrics.redis_degraded))


def read_pools(metrics: Metrics) -> list[BackendStats]:
    """This process's figures of every backend pool it knows, from its collectors (read as
    `gateway.admin.stats.read_snapshot` reads them, without `collect()`)."""
    backends: dict[str, dict[str, Any]] = {}
    endpoints: dict[tuple[str, str], dict[str, Any]] = {}

    def backend(name: str) -> dict[str, Any]:
        return backends.setdefault(name, {"name": name})

    def endpoint(labels: dict[str, str]) -> dict[str, Any]:
        backend(labels["backend"])
        return endpoints.setdefault((labels["backend"], labels["endpoint"]), {"id": labels["endpoint"]})

    for labels, value in _samples(metrics.capacity_limit):
        backend(labels["backend"])["limit"] = round(value)
    for labels, value in _samples(metrics.capacity_waiting):
        backend(labels["backend"])["waiting_tenants"] = round(value)
    for labels, value in _samples(metrics.endpoint_limit):
        endpoint(labels)["limit"] = round(value)
    for labels, value in _samples(metrics.endpoint_held):
        endpoint(labels)["permits"] = round(value)
    for labels, value in _samples(metrics.engine_requests):
        if labels["state"] in ("running", "waiting"):
            endpoint(labels)[labels["state"]] = round(value)
    for labels, value in _samples(metrics.engine_kv_usage):
        endpoint(labels)["kv_cache_usage"] = value
    for labels, value in _samples(metrics.engine_queue_wait):
        endpoint(labels)["queue_wait_s"] = value
    for labels, value in _samples(metrics.endpoint_requests):
        endpoint(labels)["requests"] = round(value)
    for labels, value in _samples(metrics.endpoint_tokens):
        if labels["kind"] in ("prompt", "cached"):
            endpoint(labels)[f"{labels['kind']}_tokens"] = round(value)
    for (name, _), fields in sorted(endpoints.items()):
        backends[name].setdefault("endpoints", []).append(EndpointStats(**fields))
    return [BackendStats(**fields) for _, fields in sorted(backends.items())]


def merge_pools(readings: Iterable[PoolReading]) -> list[BackendStats]:
    """Several processes' pool figures as one (the rules are in the module's docstring)."""
    queues: dict[str, dict[str, _QueueFigure]] = {}  # backend -> figure -> what the processes reported
    engines: dict[str, dict[str, dict[str, Any]]] = {}  # backend -> endpoint -> fields
    read_at: dict[tuple[str, str], float] = {}  # when the engine reading kept was taken
    for reading in readings:
        for b in reading.backends:
            queue = queues.setdefault(b.name, {})
            merged_endpoints = engines.setdefault(b.name, {})
            for figure in ("limit", "waiting_tenants"):
                queue.setdefault(figure, _QueueFigure()).add(getattr(b, figure), reading.own_queues)
            for e in b.endpoints:
                queue.setdefault(f"permits {e.id}", _QueueFigure()).add(e.permits, reading.own_queues)
                merged = merged_endpoints.setdefault(
                    e.id, {"id": e.id, "requests": 0, "prompt_tokens": 0, "cached_tokens": 0}
                )
                for counter in ("requests", "prompt_tokens", "cached_tokens"):
                    merged[counter] += getattr(e, counter)
                if e.limit is not None:
                    merged["limit"] = max(merged.get("limit", e.limit), e.limit)
                if e.running is not None and reading.time >= read_at.get((b.name, e.id), -math.inf):
                    read_at[b.name, e.id] = reading.time
                    merged.update(
                        running=e.running,
                        waiting=e.waiting,
                        kv_cache_usage=e.kv_cache_usage,
                        queue_wait_s=e.queue_wait_s,
                    )
    return [
        BackendStats(
            name=name,
            limit=queues[name]["limit"].value(),
            waiting_tenants=queues[name]["waiting_tenants"].value(),
            endpoints=[
                EndpointStats(**fields, permits=queues[name][f"permits {endpoint}"].value())
                for endpoint, fields in sorted(engines[name].items())
            ],
        )
        for name in sorted(queues)
    ]


class _QueueFigure:
    """One figure of a fair queue as several processes report it: the largest of those that share the
    queue, plus the sum of those that keep their own."""

    def __init__(self) -> None:
        self._shared: int | None = None
        self._own: int | None = None

    def add(self, value: int | None, own: bool) -> None:
        if value is None:
            return
        if own:
            self._own = (self._own or 0) + value
        else:
            self._shared = value if self._shared is None else max(self._shared, value)

    def value(self) -> int | None:
        if self._shared is None and self._own is None:
            return None
        return (self._shared or 0) + (self._own or 0)


def _samples(metric: Any) -> list[tuple[dict[str, str], float]]:
    """A labelled metric's children as (labels, value), read directly (see `read_snapshot`)."""
    with metric._lock:
        names, items = metric._labelnames, list(metric._metrics.items())
    return [(dict(zip(names, values, strict=True)), child._value._value) for values, child in items]
