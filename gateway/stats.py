"""Live per-tenant statistics: what `GET /admin/stats` answers and the console draws.

A snapshot is read from this process's Prometheus collectors, so the request path does no extra work: per
tenant, cumulative requests by status, tokens by kind, 429s by reason, the queue-wait histogram and spend by
currency (counters, which only grow), and the in-flight and queued gauges. A reader differences two
snapshots to get rates, shares and queue-wait quantiles over the interval between them.

Several processes (the workers of a replica, replicas sharing Redis) each publish their own snapshot into
the store every `stats_interval_s`, with a TTL; a read sums this process's fresh snapshot with the other
live ones. The ids of the processes summed come with the answer: when they change (a process started or
died), the sum jumps like a Prometheus counter reset, and a reader skips that interval. A single embedded
process (no Redis, one worker) publishes nothing: its own snapshot is the whole answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import time
from collections.abc import Iterable

from pydantic import BaseModel, Field

from gateway.metrics import Metrics
from gateway.store import Store
from gateway.tenancy import Budget, Tenant

__all__ = ["LiveStats", "Snapshot", "StatsReport", "TenantCounters", "merge", "read_snapshot"]

log = logging.getLogger("gateway.stats")


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


def read_snapshot(metrics: Metrics, replica: str, started_at: float) -> Snapshot:
    """This process's counters, from the collectors the request path already updates."""
    tenants: dict[str, TenantCounters] = {}
    buckets: dict[str, dict[float, int]] = {}

    def of(labels: dict[str, str]) -> TenantCounters:
        tenant = labels["tenant"]
        found = tenants.get(tenant)
        if found is None:
            found = tenants[tenant] = TenantCounters()
        return found

    def add(into: dict[str, int], name: str, value: float) -> None:
        into[name] = into.get(name, 0) + round(value)

    for name, labels, value in _samples(metrics.requests):
        if name.endswith("_total"):
            add(of(labels).requests, labels["status"], value)
    for name, labels, value in _samples(metrics.tokens):
        if name.endswith("_total"):
            add(of(labels).tokens, labels["kind"], value)
    for name, labels, value in _samples(metrics.rejections):
        if name.endswith("_total"):
            add(of(labels).rejections, labels["reason"], value)
    for name, labels, value in _samples(metrics.spend):
        if name.endswith("_total"):
            spend = of(labels).spend
            spend[labels["currency"]] = spend.get(labels["currency"], 0.0) + value
    for name, labels, value in _samples(metrics.queue_wait):
        counters = of(labels)
        if name.endswith("_count"):
            counters.queue_wait.count += round(value)
        elif name.endswith("_sum"):
            counters.queue_wait.sum += value
        elif name.endswith("_bucket"):
            per_tenant = buckets.setdefault(labels["tenant"], {})
            bound = float(labels["le"])
            per_tenant[bound] = per_tenant.get(bound, 0) + round(value)
    for _, labels, value in _samples(metrics.inflight):
        of(labels).inflight += round(value)
    for _, labels, value in _samples(metrics.queued):
        of(labels).queued += round(value)
    bounds = [b for b in metrics.queue_wait_bounds if math.isfinite(b)]
    for tenant, counters in tenants.items():
        per_tenant = buckets.get(tenant, {})
        counters.queue_wait.buckets = [per_tenant.get(b, 0) for b in bounds]
    return Snapshot(replica=replica, started_at=started_at, time=time.time(), queue_wait_bounds=bounds, tenants=tenants)


def _samples(metric: object) -> Iterable[tuple[str, dict[str, str], float]]:
    for family in metric.collect():  # type: ignore[attr-defined]
        for sample in family.samples:
            yield sample.name, sample.labels, sample.value


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

    def __init__(self, metrics: Metrics, store: Store, *, interval_s: float, publish: bool) -> None:
        self._metrics = metrics
        self._store = store
        self._interval = interval_s
        self._publish = publish
        # A restarted process gets a new id, so readers see its counters start again from zero.
        self.replica = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"
        self.started_at = time.time()
        self._task: asyncio.Task[None] | None = None

    @property
    def ttl_s(self) -> float:
        return max(5.0, 5 * self._interval)

    def snapshot(self) -> Snapshot:
        return read_snapshot(self._metrics, self.replica, self.started_at)

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
        )
