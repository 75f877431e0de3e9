"""`LocalQuotaStore`: the quota state in one process (the embedded mode, and the fallback when Redis is down).

It mirrors lua/admit.lua, lua/settle.lua and lua/renew.lua decision for decision, down to rounding
durations up to whole microseconds; the same test suite runs over both. No method awaits, so each call
is atomic on the event loop. Buckets and leases read `clock` (monotonic); budget periods read
`wall_clock` (the UTC calendar).
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

from gateway.admission.limits._fairshare import LocalFairShare
from gateway.admission.limits._period import period_window
from gateway.admission.limits._types import (
    Decision,
    LimitName,
    Permit,
    Place,
    PlaceAsk,
    PoolStatus,
    QuotaLimits,
    RateHeaders,
    Release,
    Reservation,
    Scope,
    check_request,
    check_usage,
)
from gateway.ids import unique_id

__all__ = ["LocalQuotaStore"]

# The same constants as lua/common.lua; see there for why each exists.
SLACK_S = 1e-6
COST_EPS = 1e-9
LEASE_HINT_S = 1.0
EXPIRED_GRACE_S = 3600.0
TTL_MARGIN_S = 1.0


def _us(seconds: float) -> float:
    """Round a duration up to whole microseconds, as the scripts answer them."""
    return 0.0 if seconds <= 0 else math.ceil(seconds * 1e6) / 1e6


@dataclass(slots=True)
class _Lease:
    expiry: float
    tokens: int
    cost: float


@dataclass(slots=True)
class _State:
    """One scope: the equivalent of its Redis state hash and lease zset."""

    r: float | None = None  # TAT of the requests bucket: when it is full again (GCRA; see lua/common.lua)
    k: float | None = None  # TAT of the tokens bucket
    leases: dict[str, _Lease] = field(default_factory=dict)
    # (expiry, member); entries of settled or renewed leases are skipped lazily and compacted away.
    heap: list[tuple[float, str]] = field(default_factory=list)
    t: float = 0.0
    c: float = 0.0
    expires: float = 0.0  # when the Redis key would have expired: the sweep may drop it after that


@dataclass(slots=True)
class _Spend:
    period: str
    spent: float
    ends: float  # wall clock


@dataclass(slots=True)
class _View:
    """One scope during an admission: effective TATs (never before now), purged sums, budget read."""

    scope: Scope
    state: _State
    r: float
    k: float
    spent: float = 0.0
    period_end: float = 0.0


def _tat(stored: float | None, now: float) -> float:
    return now if stored is None or stored < now else stored


def _level(tat: float, cap: int, now: float) -> float:
    # With the admission slack, so a level that is a whole number is not floored one below it.
    return cap - (tat - now - SLACK_S) * cap / 60


class LocalQuotaStore:
    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        sweep_interval_s: float = 60.0,
    ) -> None:
        self._clock = clock
        self._wall_clock = wall_clock
        self._states: dict[tuple[str, str], _State] = {}
        self._spend: dict[tuple[str, str], _Spend] = {}
        self._expired: dict[tuple[str, str], float] = {}  # (tenant, member) -> forget after
        self._sweep_interval_s = sweep_interval_s
        self._next_sweep = clock() + sweep_interval_s
        # The backends' fair queues (the same clock: leases of permits expire like quota leases).
        self.fairshare = LocalFairShare(clock=clock)

    async def admit(
        self,
        tenant: str,
        scopes: Sequence[Scope],
        *,
        tokens: int,
        cost: float,
        lease_ttl_s: float = 60.0,
        timeout_s: float | None = None,
        place: PlaceAsk | None = None,
    ) -> Decision:
        scopes = tuple(scopes)
        check_request(tenant, scopes, tokens, cost, lease_ttl_s, allow_no_scopes=place is not None)
        now, wall = self._clock(), self._wall_clock()
        self._housekeeping(now, wall)
        views = [self._view(tenant, scope, i == 0, now, wall) for i, scope in enumerate(scopes)]

        reason: tuple[LimitName, Scope] | None = None
        exceeds, retry = False, 0.0

        def fail(limit: LimitName, view: _View, wait: float, never: bool = False) -> None:
            nonlocal reason, exceeds, retry
            if never:
                if not exceeds:
                    reason, exceeds = (limit, view.scope), True
            elif reason is None:
                reason = (limit, view.scope)
            retry = max(retry, wait)

        for v in views:
            amount = v.scope.limits.budget_amount
            if amount is not None:
                if cost > amount + COST_EPS:
                    fail("budget", v, 0.0, True)
                elif v.spent + cost > amount + COST_EPS:
                    fail("budget", v, v.period_end - wall)
                elif v.spent + v.state.c + cost > amount + COST_EPS:
                    fail("budget", v, self._lease_wait(v.state, now))
        for v in views:
            rpm = v.scope.limits.rpm
            if rpm is not None and (wait := (v.r - now) - (rpm - 1) * 60 / rpm) > SLACK_S:
                fail("rpm", v, wait)
        for v in views:
            tpm = v.scope.limits.tpm
            if tpm is not None:
                wait = (v.k - now) - (tpm - tokens) * 60 / tpm
                if tokens > tpm:
                    fail("tpm", v, 0.0, True)
                elif wait > SLACK_S:
                    fail("tpm", v, wait)
        for v in views:
            conc = v.scope.limits.max_concurrency
            if conc is not None and len(v.state.leases) >= conc:
                fail("concurrency", v, self._lease_wait(v.state, now))
        for v in views:
            inflight = v.scope.limits.max_inflight_tokens
            if inflight is not None:
                if tokens > inflight:
                    fail("inflight_tokens", v, 0.0, True)
                elif v.state.t + tokens > inflight:
                    fail("inflight_tokens", v, self._lease_wait(v.state, now))

        if reason is not None:
            return Decision(
                allowed=False,
                reservation=None,
                headers=_headers(views, now),
                limit=reason[0],
                scope=reason[1].name,
                retry_after_s=0.0 if exceeds else _us(retry),
                exceeds_limit=exceeds,
            )
        if place is not None:
            # The fair queue decides before anything is reserved: a full queue refuses the whole admission.
            placed, _, ahead, backlog = self.fairshare.place(place, commit=False)
            if placed == "full":
                return Decision(
                    allowed=False,
                    reservation=None,
                    headers=_headers(views, now),
                    limit="queue_full",
                    place="full",
                    ahead=ahead,
                    backlog=backlog,
                )
        reservation = Reservation(
            id=unique_id(),
            tenant=tenant,
            scopes=scopes,
            tokens=tokens,
            cost=cost,
            lease_ttl_s=lease_ttl_s,
            backend="local",
        )
        for i, v in enumerate(views):
            self._reserve(v, i == 0, reservation, now)
        if place is None:
            return Decision(allowed=True, reservation=reservation, headers=_headers(views, now))
        placed, permit, ahead, backlog = self.fairshare.place(place, commit=True)
        return Decision(
            allowed=True,
            reservation=reservation if scopes else None,
            headers=_headers(views, now),
            place=cast(Place, placed),
            permit=permit,
            ahead=ahead,
            backlog=backlog,
        )

    async def settle(
        self,
        reservation: Reservation | None,
        *,
        actual_tokens: int,
        actual_cost: float,
        release: Release | None = None,
    ) -> bool:
        check_usage(actual_tokens, actual_cost)
        if reservation is None:
            return release is not None and self.fairshare.release(release)
        if not self._settle_quotas(reservation, actual_tokens, actual_cost):
            return False
        if release is not None:
            self.fairshare.release(release)
        return True

    def _settle_quotas(self, reservation: Reservation, actual_tokens: int, actual_cost: float) -> bool:
        now, wall = self._clock(), self._wall_clock()
        tenant, member = reservation.tenant, reservation.member
        first = self._drop_lease(self._states.get((tenant, reservation.scopes[0].name)), member)
        if not first and self._expired.pop((tenant, member), now) <= now:
            return False
        for i, scope in enumerate(reservation.scopes):
            state = self._states.setdefault((tenant, scope.name), _State())
            if i > 0:
                self._drop_lease(state, member)
            tpm = scope.limits.tpm
            if tpm is not None:
                # Unused tokens come back (never above capacity); extra use becomes debt (see settle.lua).
                k = max(now, _tat(state.k, now) + (actual_tokens - reservation.tokens) * 60 / tpm)
                if state.k is not None or k > now:
                    state.k = k
                    state.expires = max(state.expires, k + TTL_MARGIN_S)
            if scope.limits.budget_amount is not None:
                self._current_spend(tenant, scope, wall).spent += actual_cost
        return True

    async def renew(self, reservation: Reservation | None, permit: Permit | None = None, *, ttl_s: float = 0.0) -> bool:
        renewed = True
        if permit is not None:
            renewed = self.fairshare.renew(permit, reservation.lease_ttl_s if reservation is not None else ttl_s)
        if reservation is None:
            return renewed
        now = self._clock()
        tenant, member = reservation.tenant, reservation.member
        first = self._states.get((tenant, reservation.scopes[0].name))
        if first is None or member not in first.leases:
            return False
        expiry = now + reservation.lease_ttl_s
        for scope in reservation.scopes:
            state = self._states.get((tenant, scope.name))
            lease = None if state is None else state.leases.get(member)
            if state is not None and lease is not None:
                lease.expiry = expiry
                heapq.heappush(state.heap, (expiry, member))
                state.expires = max(state.expires, expiry + TTL_MARGIN_S)
        return True

    async def cancel(self, place: PlaceAsk, origin: str = "") -> bool:
        return self.fairshare.cancel(place)

    async def set_capacity(
        self, pool: str, limits: dict[str, int], *, load_factor: float = 1.25, ttl_s: float = 3600.0
    ) -> PoolStatus:
        return self.fairshare.set_capacity(pool, limits, load_factor=load_factor)

    async def close(self) -> None:
        self._states.clear()
        self._spend.clear()
        self._expired.clear()

    # -- one scope ------------------------------------------------------------------------------------

    def _view(self, tenant: str, scope: Scope, first: bool, now: float, wall: float) -> _View:
        state = self._states.setdefault((tenant, scope.name), _State())
        self._purge(tenant, state, first, now)
        view = _View(scope, state, _tat(state.r, now), _tat(state.k, now))
        if scope.limits.budget_amount is not None:
            spend = self._current_spend(tenant, scope, wall)
            view.spent, view.period_end = spend.spent, spend.ends
        return view

    def _purge(self, tenant: str, state: _State, first: bool, now: float) -> None:
        """Give back the slots of leases whose holders crashed or stalled; remember them for settle."""
        heap = state.heap
        while heap and heap[0][0] <= now:
            expiry, member = heapq.heappop(heap)
            lease = state.leases.get(member)
            if lease is not None and lease.expiry == expiry:
                self._drop_lease(state, member)
                if first:
                    self._expired[(tenant, member)] = now + EXPIRED_GRACE_S

    def _reserve(self, view: _View, first: bool, reservation: Reservation, now: float) -> None:
        state, lim = view.state, view.scope.limits
        need = 0.0
        if lim.rpm is not None:
            view.r += 60 / lim.rpm
            state.r = view.r
            need = view.r - now
        if lim.tpm is not None:
            view.k += reservation.tokens * 60 / lim.tpm
            state.k = view.k
            need = max(need, view.k - now)
        if first or _holds_lease(lim):
            expiry = now + reservation.lease_ttl_s
            state.leases[reservation.member] = _Lease(expiry, reservation.tokens, reservation.cost)
            heapq.heappush(state.heap, (expiry, reservation.member))
            state.t += reservation.tokens
            state.c += reservation.cost
            need = max(need, reservation.lease_ttl_s)
        state.expires = max(state.expires, now + need + TTL_MARGIN_S)

    def _drop_lease(self, state: _State | None, member: str) -> bool:
        lease = None if state is None else state.leases.pop(member, None)
        if state is None or lease is None:
            return False
        if state.leases:
            state.t -= lease.tokens
            state.c -= lease.cost
            if len(state.heap) > 2 * len(state.leases) + 64:
                state.heap = [(v.expiry, m) for m, v in state.leases.items()]
                heapq.heapify(state.heap)
        else:
            state.t = state.c = 0.0  # no float drift survives an empty set
            state.heap.clear()
        return True

    @staticmethod
    def _lease_wait(state: _State, now: float) -> float:
        heap = state.heap
        while heap and (heap[0][1] not in state.leases or state.leases[heap[0][1]].expiry != heap[0][0]):
            heapq.heappop(heap)
        return min(LEASE_HINT_S, heap[0][0] - now) if heap else LEASE_HINT_S

    def _current_spend(self, tenant: str, scope: Scope, wall: float) -> _Spend:
        period, ends = period_window(scope.limits.budget_period, wall)
        spend = self._spend.get((tenant, scope.name))
        if spend is None or spend.period != period:
            spend = self._spend[(tenant, scope.name)] = _Spend(period, 0.0, ends)
        return spend

    def _housekeeping(self, now: float, wall: float) -> None:
        """What Redis TTLs do for the other store: forget idle scopes, finished periods, old expired leases."""
        if now < self._next_sweep:
            return
        self._next_sweep = now + self._sweep_interval_s
        self._states = {k: s for k, s in self._states.items() if s.leases or s.expires > now}
        self._spend = {k: s for k, s in self._spend.items() if s.ends > wall}
        self._expired = {k: t for k, t in self._expired.items() if t > now}


def _holds_lease(lim: QuotaLimits) -> bool:
    return lim.max_concurrency is not None or lim.max_inflight_tokens is not None or lim.budget_amount is not None


def _headers(views: list[_View], now: float) -> RateHeaders:
    """Per dimension, the most constraining scope (fewest whole units left), as lua/admit.lua picks it."""
    requests = tokens = None  # (level, cap, tat)
    for v in views:
        rpm, tpm = v.scope.limits.rpm, v.scope.limits.tpm
        if rpm is not None and (requests is None or math.floor(_level(v.r, rpm, now)) < math.floor(requests[0])):
            requests = (_level(v.r, rpm, now), rpm, v.r)
        if tpm is not None and (tokens is None or math.floor(_level(v.k, tpm, now)) < math.floor(tokens[0])):
            tokens = (_level(v.k, tpm, now), tpm, v.k)
    return RateHeaders(
        limit_requests=None if requests is None else requests[1],
        remaining_requests=None if requests is None else max(0, math.floor(requests[0])),
        reset_requests_s=None if requests is None else _us(requests[2] - now),
        limit_tokens=None if tokens is None else tokens[1],
        remaining_tokens=None if tokens is None else max(0, math.floor(tokens[0])),
        reset_tokens_s=None if tokens is None else _us(tokens[2] - now),
    )
