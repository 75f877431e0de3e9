"""`LocalFairShare`: the backend pools' fair queues in one process (embedded mode, and the fallback while
Redis is down). It mirrors lua/fairshare.lua decision for decision; the same test suite runs over both.

Per pool: permits (held by requests at one endpoint, with a lease), each endpoint's load and limit, each
tenant's weighted virtual token counter, and the waiting requests per tenant within priority bands. A
free permit goes to the highest band, then to the lowest counter; counters grow by cost / weight at
dispatch and are corrected at release; a tenant that starts waiting is lifted to the lowest counter among
those waiting in its band (or to its band's last dispatched counter). Each affinity key (a prefix within
its cache scope) stays on the endpoint it was assigned, while used, and keys are assigned evenly (see
`_choose`). No method awaits: each call is
atomic on the event loop. Grants to waiting requests are handed to `on_grant(waiter, endpoint)`.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.admission.limits._types import Permit, PlaceAsk, PoolStatus, Release

__all__ = ["LocalFairShare"]

OnGrant = Callable[[str, str], None]


@dataclass(slots=True)
class _Waiting:
    waiter: str
    tenant: str
    weight: float
    band: int
    cost: float
    ttl: float
    factor: float
    ranking: tuple[str, ...]
    key: str
    key_ttl: float


@dataclass(frozen=True, slots=True)
class _Note:
    """What to record of a granted request's affinity key (see `_remember`)."""

    key: str
    ttl: float
    endpoint: str | None = None
    assign: bool = False
    old: str | None = None


# At most this many expired affinity keys are dropped per call (as lua/fairshare.lua's FS_AFF_TRIM).
_AFF_TRIM = 16


@dataclass(slots=True)
class _Pool:
    limits: dict[str, int] = field(default_factory=dict)
    load: dict[str, int] = field(default_factory=dict)
    permits: dict[str, float] = field(default_factory=dict)  # member -> lease expiry
    vtc: dict[str, float] = field(default_factory=dict)
    last: dict[int, float] = field(default_factory=dict)
    # band -> tenant -> counter (while it waits); insertion order breaks ties, like the zset's member order
    backlog: dict[int, dict[str, float]] = field(default_factory=dict)
    queues: dict[str, deque[_Waiting]] = field(default_factory=dict)
    # Affinity keys: key -> endpoint, key -> expiry, endpoint -> keys; `expiries` is a heap of (expiry, key)
    # that may hold stale entries (an entry counts only while it matches `key_expiry`), so the oldest keys
    # come first, in the zset's order (score, then name).
    assigned: dict[str, str] = field(default_factory=dict)
    key_expiry: dict[str, float] = field(default_factory=dict)
    key_counts: dict[str, int] = field(default_factory=dict)
    expiries: list[tuple[float, str]] = field(default_factory=list)

    @property
    def limit(self) -> int:
        return sum(self.limits.values())

    @property
    def held(self) -> int:
        return sum(self.load.values())

    def free(self) -> int:
        return self.limit - self.held


class LocalFairShare:
    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._pools: dict[str, _Pool] = {}
        self.on_grant: OnGrant | None = None

    # --- the calls the quota store makes ---------------------------------------------------------------

    def place(self, ask: PlaceAsk, *, commit: bool) -> tuple[str, Permit | None, int, int]:
        """The fair queue's part of an admission: ("granted", permit), ("queued", None, ahead, backlog) or
        ("full", None, depth, backlog). With `commit` False nothing is written (the quotas refused)."""
        now = self._clock()
        pools = [self._pool(p.pool) for p in ask.pools]
        for pool in pools:
            self._purge(pool, now)
        for i, (pool, pool_ask) in enumerate(zip(pools, ask.pools, strict=True)):
            if i > 0 and not ask.spill:
                break
            if not _waiting(pool) and pool.free() > 0:
                endpoint, note = _choose(pool, pool_ask.ranking, ask.load_factor, pool_ask.key, pool_ask.key_ttl_s)
                if endpoint is not None:
                    if commit:
                        self._grant(
                            pool, ask.waiter, endpoint, ask.tenant, ask.weight, ask.band, ask.cost, ask.lease_ttl_s, now
                        )
                        _remember(pool, note, now)
                    return "granted", Permit(pool_ask.pool, endpoint, ask.waiter), 0, 0
        first, first_ask = pools[0], ask.pools[0]
        queue = first.queues.get(ask.tenant)
        depth = len(queue) if queue else 0
        if ask.max_queue_depth is not None and depth >= ask.max_queue_depth:
            return "full", None, depth, len(first.backlog.get(ask.band, {}))
        if not commit:
            return "queued", None, 0, 0
        waiting = _Waiting(
            ask.waiter,
            ask.tenant,
            ask.weight,
            ask.band,
            ask.cost,
            ask.lease_ttl_s,
            ask.load_factor,
            first_ask.ranking,
            first_ask.key,
            first_ask.key_ttl_s,
        )
        self._enqueue(first, waiting)
        mine = self._dispatch(first, now, ask.waiter)
        if mine is not None:
            return "granted", Permit(first_ask.pool, mine, ask.waiter), 0, 0
        queue = first.queues[ask.tenant]
        return "queued", None, len(queue) - 1, len(first.backlog.get(ask.band, {}))

    def release(self, release: Release) -> bool:
        pool = self._pools.get(release.permit.pool)
        if pool is None or pool.permits.pop(release.permit.member, None) is None:
            return False
        endpoint = release.permit.endpoint
        pool.load[endpoint] = max(0, pool.load.get(endpoint, 0) - 1)
        if release.actual != release.estimate:
            counter = pool.vtc.get(release.tenant, 0.0) + (release.actual - release.estimate) / release.weight
            pool.vtc[release.tenant] = counter
            band = pool.backlog.get(release.band)
            if band is not None and release.tenant in band:
                band[release.tenant] = counter
        now = self._clock()
        self._purge(pool, now)
        self._dispatch(pool, now, "")
        return True

    def renew(self, permit: Permit, ttl_s: float) -> bool:
        pool = self._pools.get(permit.pool)
        if pool is None or permit.member not in pool.permits:
            return False
        pool.permits[permit.member] = self._clock() + ttl_s
        return True

    def cancel(self, ask: PlaceAsk) -> bool:
        pool = self._pools.get(ask.pools[0].pool)
        queue = None if pool is None else pool.queues.get(ask.tenant)
        if pool is None or not queue:
            return False
        for waiting in queue:
            if waiting.waiter == ask.waiter:
                queue.remove(waiting)
                self._unqueued(pool, ask.tenant, ask.band)
                return True
        return False

    def set_capacity(self, name: str, limits: dict[str, int], *, load_factor: float = 1.25) -> PoolStatus:
        pool = self._pool(name)
        pool.limits = {endpoint: int(limit) for endpoint, limit in limits.items()}
        now = self._clock()
        self._purge(pool, now)
        self._dispatch(pool, now, "")
        return self.status(name)

    def status(self, name: str) -> PoolStatus:
        pool = self._pool(name)
        held = {endpoint: pool.load.get(endpoint, 0) for endpoint in pool.limits}
        return PoolStatus(pool.limit, pool.held, sum(len(b) for b in pool.backlog.values()), held)

    def counter(self, pool: str, tenant: str) -> float:
        return self._pool(pool).vtc.get(tenant, 0.0)

    # --- internals (each mirrors the function of the same name in lua/fairshare.lua) -------------------

    def _pool(self, name: str) -> _Pool:
        pool = self._pools.get(name)
        if pool is None:
            pool = self._pools[name] = _Pool()
        return pool

    @staticmethod
    def _purge(pool: _Pool, now: float) -> None:
        _forget(pool, now)
        expired = [m for m, expiry in pool.permits.items() if expiry <= now]
        for member in expired:
            del pool.permits[member]
            endpoint = member.rsplit("|", 1)[1]
            pool.load[endpoint] = max(0, pool.load.get(endpoint, 0) - 1)

    def _grant(
        self,
        pool: _Pool,
        waiter: str,
        endpoint: str,
        tenant: str,
        weight: float,
        band: int,
        cost: float,
        ttl: float,
        now: float,
    ) -> float:
        pool.permits[f"{waiter}|{endpoint}"] = now + ttl
        pool.load[endpoint] = pool.load.get(endpoint, 0) + 1
        counter = pool.vtc.get(tenant, 0.0) + cost / weight
        pool.vtc[tenant] = counter
        pool.last[band] = counter
        return counter

    @staticmethod
    def _floor(pool: _Pool, band: int, tenant: str) -> float | None:
        waiting = pool.backlog.get(band)
        others = [c for t, c in (waiting or {}).items() if t != tenant]
        if others:
            return min(others)
        return pool.last.get(band)

    def _enqueue(self, pool: _Pool, waiting: _Waiting) -> None:
        queue = pool.queues.setdefault(waiting.tenant, deque())
        if not queue:
            counter = pool.vtc.get(waiting.tenant, 0.0)
            floor = self._floor(pool, waiting.band, waiting.tenant)
            if floor is not None and floor > counter:
                counter = pool.vtc[waiting.tenant] = floor
            pool.backlog.setdefault(waiting.band, {})[waiting.tenant] = counter
        queue.append(waiting)

    @staticmethod
    def _unqueued(pool: _Pool, tenant: str, band: int) -> None:
        if not pool.queues.get(tenant):
            pool.queues.pop(tenant, None)
            waiting = pool.backlog.get(band)
            if waiting is not None:
                waiting.pop(tenant, None)
                if not waiting:
                    del pool.backlog[band]

    def _dispatch(self, pool: _Pool, now: float, self_waiter: str) -> str | None:
        mine = None
        while pool.free() > 0 and pool.backlog:
            band = max(pool.backlog)
            waiting = pool.backlog[band]
            # The lowest counter; among equals, the first by name (as the zset orders them).
            tenant = min(waiting, key=lambda t: (waiting[t], t))
            queue = pool.queues[tenant]
            head = queue[0]
            endpoint, note = _choose(pool, head.ranking, head.factor, head.key, head.key_ttl)
            if endpoint is None:
                break
            queue.popleft()
            counter = self._grant(pool, head.waiter, endpoint, tenant, head.weight, band, head.cost, head.ttl, now)
            _remember(pool, note, now)
            if queue:
                waiting[tenant] = counter
            else:
                self._unqueued(pool, tenant, band)
            if head.waiter == self_waiter:
                mine = endpoint
            elif self.on_grant is not None:
                self.on_grant(head.waiter, endpoint)
        return mine


def _waiting(pool: _Pool) -> bool:
    return bool(pool.backlog)


def _choose(
    pool: _Pool, ranking: tuple[str, ...], factor: float, key: str, key_ttl: float
) -> tuple[str | None, _Note | None]:
    """Where a granted request goes, and what to record of its key: fs_choose in lua/fairshare.lua, which
    says why."""
    n = len(pool.limits)
    if factor > 0 and n:
        bound = math.ceil(factor * (pool.held + 1) / n)

        def fits(endpoint: str) -> bool:
            limit = pool.limits.get(endpoint)
            load = pool.load.get(endpoint, 0)
            return limit is not None and load < limit and load + 1 <= bound

        note = None
        if key:
            held = pool.assigned.get(key)
            if held is not None and pool.limits.get(held, 0) > 0:
                note = _Note(key, key_ttl, held)
                if fits(held) and held in ranking:
                    return held, note
            else:
                alive = [e for e, limit in pool.limits.items() if limit > 0]
                keys = sum(pool.key_counts.get(e, 0) for e in alive)
                share = math.ceil((keys + 1) / max(len(alive), 1))
                note = _Note(key, key_ttl, old=held)
                for endpoint in ranking:
                    if pool.limits.get(endpoint, 0) > 0 and pool.key_counts.get(endpoint, 0) < share:
                        if fits(endpoint):
                            return endpoint, _Note(key, key_ttl, endpoint, True, held)
                        if note.endpoint is None:
                            note = _Note(key, key_ttl, endpoint, True, held)
        for endpoint in ranking:
            if fits(endpoint):
                return endpoint, note
        best = _least(pool, ranking)
        return best, note if best is not None else None
    return _least(pool, ranking), None


def _least(pool: _Pool, ranking: tuple[str, ...]) -> str | None:
    best, best_share = None, 0.0
    for endpoint in ranking:
        limit = pool.limits.get(endpoint)
        load = pool.load.get(endpoint, 0)
        if limit is not None and load < limit:
            share = load / limit
            if best is None or share < best_share:
                best, best_share = endpoint, share
    return best


def _uncount(pool: _Pool, endpoint: str) -> None:
    count = pool.key_counts.get(endpoint, 0) - 1
    if count <= 0:
        pool.key_counts.pop(endpoint, None)
    else:
        pool.key_counts[endpoint] = count


def _remember(pool: _Pool, note: _Note | None, now: float) -> None:
    if note is None or note.endpoint is None:
        return
    if note.assign:
        pool.assigned[note.key] = note.endpoint
        pool.key_counts[note.endpoint] = pool.key_counts.get(note.endpoint, 0) + 1
        if note.old is not None:
            _uncount(pool, note.old)
    expiry = now + note.ttl
    pool.key_expiry[note.key] = expiry
    heapq.heappush(pool.expiries, (expiry, note.key))
    if len(pool.expiries) > 2 * len(pool.key_expiry) + 64:
        pool.expiries = [(e, k) for k, e in pool.key_expiry.items()]
        heapq.heapify(pool.expiries)


def _forget(pool: _Pool, now: float) -> None:
    dropped = 0
    heap = pool.expiries
    while heap and heap[0][0] <= now and dropped < _AFF_TRIM:
        expiry, key = heapq.heappop(heap)
        if pool.key_expiry.get(key) != expiry:
            continue  # refreshed since (a newer entry stands for it) or already gone
        del pool.key_expiry[key]
        endpoint = pool.assigned.pop(key, None)
        if endpoint is not None:
            _uncount(pool, endpoint)
        dropped += 1
