"""Live statistics: what `GET /admin/stats` answers and the console draws.

A snapshot is read from this process's Prometheus collectors, so the request path does no extra work: per
tenant, cumulative requests by status, tokens by kind, 429s by reason, the queue-wait histogram and spend by
currency (counters, which only grow), and the in-flight and queued gauges; and per backend pool, its fair
queue and its engines (`gateway.admin.pools`). A reader differences two snapshots to get rates, shares and
queue-wait quantiles over the interval between them.

Several processes (the workers of a replica, replicas sharing Redis) each publish their own snapshot into
the store every `stats_interval_s`, with a TTL, while a reader has asked for them in the last `WANTED_S`
seconds; a read asks, then sums this process's fresh snapshot with the other live ones (so the first read
after a quiet spell sees this process alone). The ids of the processes summed come with the answer: when
they change (a process started or died), the sum jumps like a Prometheus counter reset, and a reader skips
that interval. The pools' gauges describe state the processes share (one engine, one fair queue), so they
are not summed: `gateway.admin.pools` says how they combine. A single embedded process (no Redis, one
worker) publishes nothing: its own snapshot is the whole answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import operator
import os
import socket
import time
from itertools import accumulate
from typing import Any

from pydantic import BaseModel, Field

from gateway.admin.pools import BackendStats, PoolReading, merge_pools, own_queues, read_pools
from gateway.telemetry.metrics import Metrics
from gateway.tenancy import Budget, Tenant
from gateway.tenancy.store import Store

__all__ = ["LiveStats", "Snapshot", "StatsReport", "TenantCounters", "merge", "read_snapshot"]

log = logging.getLogger("gateway.admin.stats")

# A read asks the other processes to publish for this long: the console polls every 2 s, so they stop
# half a minute after the last console closes.
WANTED_S = 30.0


class QueueWait(BaseModel):
    """Cumulative histogram of queue waits: `buckets[i]` counts waits <= `queue_wait_bounds[i]` seconds."""

    count: int = 0
    sum: float = 0.0
    buckets: list[int] = Field(default_factory=list)


class TenantCounters(BaseModel):
    requests: dict[str, int] = Field(default_factory=dict, description="Answers by HTTP status.")
    tokens: dict[str, int] = Field(default_factory=dict, description="prompt, completion, cached.")
    rejections: dict[str, int] = Field(default_factory=dict, description="429s by reason.")
    queue_wait: QueueWait = QueueWait()
    spend: dict[str, float] = Field(default_factory=dict, description="Spend per currency.")
    inflight: int = Field(default=0, description="Requests at a backend now (a gauge).")
    queued: int = Field(default=0, description="Requests waiting in the fair queue now (a gauge).")


class Snapshot(BaseModel):
    """One process's counters at one instant."""

    replica: str
    started_at: float
    time: float
    queue_wait_bounds: list[float] = Field(default_factory=list)
    tenants: dict[str, TenantCounters] = Field(default_factory=dict)
    # True when this process's fair-queue figures are its own queue's, not the one shared through Redis.
    own_queues: bool = True
    backends: list[BackendStats] = Field(default_factory=list)


class ReplicaOut(BaseModel):
    id: str
    started_at: float
    time: float = Field(description="When this process's counters were read.")


class TenantStats(TenantCounters):
    id: str
    weight: float = Field(description="From the tenant's record (1 for a tenant no longer stored).")
    priority: int = 0
    budget: Budget | None = None
    exists: bool = Field(description="False for the `other` label and for deleted tenants with counters.")


class StatsReport(BaseModel):
    object: str = "stats"
    time: float
    complete: bool = Field(description="False when other processes' snapshots could not be read.")
    replicas: list[ReplicaOut]
    queue_wait_bounds: list[float]
    tenants: list[TenantStats]
    backends: list[BackendStats] = Field(
        description="Each backend pool's fair queue and engines, by `name`. The figures of shared state (the "
        "engines, the fair queue all replicas share through Redis) are not summed over the processes: an "
        "engine's own readings are the freshest, its limit the largest reported; a pool's total limit, "
        "permits and tenants waiting are the largest reported, plus the sum over processes that keep their "
        "own queue (without Redis, or while it is unreachable). The request and token counters are summed."
    )


def read_snapshot(metrics: Metrics, replica: str, started_at: float, *, shared_queues: bool = False) -> Snapshot:
    """This process's counters, read from the collectors the request path already updates.

    The children's values are read directly (`_by_tenant`, and each value's float without its lock: the
    request path updates them on this thread, and reading a float attribute is atomic): `collect()`
    builds a sample object per bucket and costs several times more (30 ms for 100 tenants on three
    models, most of it the histogram), a pause the event loop would feel. tests/test_stats.py holds the
    two readings together, so a prometheus_client upgrade that changes these internals fails there.

    `shared_queues`: the backends' fair queues are shared through Redis (this process is one of several
    reporting the same queues).
    """
    bounds = [b for b in metrics.queue_wait_bounds if math.isfinite(b)]
    requests = _by_tenant(metrics.requests, "status")
    tokens = _by_tenant(metrics.tokens, "kind")
    rejections = _by_tenant(metrics.rejections, "reason")
    spend = _by_tenant(metrics.spend, "currency")
    inflight = _by_tenant(metrics.inflight, None)
    queued = _by_tenant(metrics.queued, None)
    waits = _histograms(metrics.queue_wait)
    tenants: dict[str, TenantCounters] = {}
    seen = set().union(requests, tokens, rejections, spend, waits, inflight, queued)
    for tenant in seen:
        counts, total = waits.get(tenant, ([0.0] * (len(bounds) + 1), 0.0))
        tenants[tenant] = TenantCounters(
            requests={k: round(v) for k, v in requests.get(tenant, {}).items()},
            tokens={k: round(v) for k, v in tokens.get(tenant, {}).items()},
            rejections={k: round(v) for k, v in rejections.get(tenant, {}).items()},
            spend=spend.get(tenant, {}),
            queue_wait=QueueWait(count=round(counts[-1]), sum=total, buckets=[round(n) for n in counts[: len(bounds)]]),
            inflight=round(inflight.get(tenant, {}).get("", 0.0)),
            queued=round(queued.get(tenant, {}).get("", 0.0)),
        )
    return Snapshot(
        replica=replica,
        started_at=started_at,
        time=time.time(),
        queue_wait_bounds=bounds,
        tenants=tenants,
        own_queues=own_queues(metrics, shared=shared_queues),
        backends=read_pools(metrics),
    )


def _items(metric: Any) -> tuple[tuple[str, ...], list[tuple[tuple[str, ...], Any]]]:
    """A labelled metric's label names and children (prometheus_client keeps them in `_metrics`)."""
    with metric._lock:
        return metric._labelnames, list(metric._metrics.items())


def _by_tenant(metric: Any, label: str | None) -> dict[str, dict[str, float]]:
    """Counter or gauge values summed per tenant and per value of `label` (all under "" if None)."""
    names, items = _items(metric)
    at_tenant = names.index("tenant")
    at_label = names.index(label) if label is not None else None
    out: dict[str, dict[str, float]] = {}
    for values, child in items:
        per = out.get(values[at_tenant])
        if per is None:
            per = out[values[at_tenant]] = {}
        key = values[at_label] if at_label is not None else ""
        per[key] = per.get(key, 0.0) + child._value._value
    return out


def _histograms(metric: Any) -> dict[str, tuple[list[float], float]]:
    """Per tenant, the cumulative bucket counts (the last is +Inf, the count) and the sum, over models."""
    names, items = _items(metric)
    at_tenant = names.index("tenant")
    out: dict[str, tuple[list[float], float]] = {}
    for values, child in items:
        # A child keeps one count per bucket; the snapshot's are cumulative.
        counts = list(accumulate([bucket._value for bucket in child._buckets]))
        found = out.get(values[at_tenant])
        if found is not None:
            counts = list(map(operator.add, found[0], counts))
        out[values[at_tenant]] = (counts, (found[1] if found else 0.0) + child._sum._value)
    return out


def merge(snapshots: list[Snapshot]) -> dict[str, TenantCounters]:
    """Sum the counters of several processes, tenant by tenant."""
    total: dict[str, TenantCounters] = {}
    for snapshot in snapshots:
        for tenant, counters in snapshot.tenants.items():
            into = total.setdefault(tenant, TenantCounters())
            for mine, theirs in (
                (into.requests, counters.requests),
                (into.tokens, counters.tokens),
                (into.rejections, counters.rejections),
            ):
                for name, value in theirs.items():
                    mine[name] = mine.get(name, 0) + value
            for currency, amount in counters.spend.items():
                into.spend[currency] = into.spend.get(currency, 0.0) + amount
            wait = counters.queue_wait
            into.queue_wait.count += wait.count
            into.queue_wait.sum += wait.sum
            if not into.queue_wait.buckets:
                into.queue_wait.buckets = [0] * len(wait.buckets)
            if len(wait.buckets) == len(into.queue_wait.buckets):  # a replica of another version: skip its shape
                into.queue_wait.buckets = [a + b for a, b in zip(into.queue_wait.buckets, wait.buckets, strict=True)]
            into.inflight += counters.inflight
            into.queued += counters.queued
    return total


class LiveStats:
    """This process's side of the live statistics: its snapshot on demand, and (when others may read it)
    a task that publishes it into the store."""

    def __init__(
        self, metrics: Metrics, store: Store, *, interval_s: float, publish: bool, shared_queues: bool = False
    ) -> None:
        """`shared_queues`: the backends' fair queues are shared through Redis."""
        self._metrics = metrics
        self._store = store
        self._interval = interval_s
        self._publish = publish
        self._shared_queues = shared_queues
        # A restarted process gets a new id, so readers see its counters start again from zero.
        self.replica = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"
        self.started_at = time.time()
        self._task: asyncio.Task[None] | None = None

    @property
    def ttl_s(self) -> float:
        return max(5.0, 5 * self._interval)

    def snapshot(self) -> Snapshot:
        return read_snapshot(self._metrics, self.replica, self.started_at, shared_queues=self._shared_queues)

    def start(self) -> None:
        if self._publish:
            self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            try:
                # Only while someone reads: with no console open, a process does not read its collectors.
                if await self._store.stats_wanted():
                    await self.publish()
            except Exception:  # the store may be down: the next round tries again
                log.debug("could not publish live stats", exc_info=True)
            await asyncio.sleep(self._interval)

    async def publish(self) -> None:
        await self._store.put_stats(self.replica, self.snapshot().model_dump_json(), ttl_s=self.ttl_s)

    async def report(self, tenants: list[Tenant]) -> StatsReport:
        """This process's fresh counters plus every other live process's last published ones."""
        mine = self.snapshot()
        snapshots = [mine]
        complete = True
        if self._publish:
            try:
                await self._store.want_stats(WANTED_S)
                published = await self._store.list_stats()
            except Exception:
                log.warning("could not read other processes' live stats; answering with this one's", exc_info=True)
                published, complete = {}, False
            for replica, doc in sorted(published.items()):
                if replica != self.replica:
                    snapshots.append(Snapshot.model_validate_json(doc))
        totals = merge(snapshots)
        records = {t.id: t for t in tenants}
        out = []
        for tenant_id in sorted(records.keys() | totals.keys()):
            record = records.get(tenant_id)
            counters = totals.get(tenant_id) or TenantCounters(
                queue_wait=QueueWait(buckets=[0] * len(mine.queue_wait_bounds))
            )
            out.append(
                TenantStats(
                    **counters.model_dump(),
                    id=tenant_id,
                    weight=record.weight if record else 1.0,
                    priority=record.priority if record else 0,
                    budget=record.budget if record else None,
                    exists=record is not None,
                )
            )
        replicas = [ReplicaOut(id=s.replica, started_at=s.started_at, time=s.time) for s in snapshots]
        return StatsReport(
            time=mine.time,
            complete=complete,
            replicas=sorted(replicas, key=lambda r: r.id),
            queue_wait_bounds=mine.queue_wait_bounds,
            tenants=out,
            backends=merge_pools(PoolReading(s.time, s.own_queues, s.backends) for s in snapshots),
        )
