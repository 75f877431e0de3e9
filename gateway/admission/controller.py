"""Admission: whether a request may go to a backend now, which backend, and what it holds while it runs.

One owner makes the whole decision, behind three calls:

    place(principal, request, model)   quotas (budget, rpm, tpm, concurrency; one atomic call to the quota
                                       store), the tenant's `on_limit` policy (reject, or downgrade to a
                                       smaller model), the backends that may serve it (healthy, isolating),
                                       a slot of the chosen backend's capacity (at once, or in its fair
                                       queue), spilling to a later backend when the tenant allows it
                                       -> a `Placement`, or a 429/503 error
    move(placement, reason)            the backend failed before answering: its slot is given back and the
                                       request takes the next backend's, keeping its one admission
    settle(placement, usage, cost)     everything the request held comes back, and the usage it really made
                                       is charged (tpm, budget, the fair queue's counter); exactly once

The request path (`gateway.pipeline`) never sees a slot, a ticket or a reservation: only the `Placement`,
whose public fields say where the request goes and what to tell the client and the bill.

Settlement survives cancellation: at shutdown the drain cancels requests in flight, and their settlement
runs in a task of its own that `drain()` waits for before the quota store's client closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.admission.demand import resolve_demand
from gateway.admission.limits import (
    Decision,
    Permit,
    PlaceAsk,
    PoolAsk,
    QuotaBackendError,
    QuotaLimits,
    QuotaStore,
    RateHeaders,
    Release,
    Reservation,
    Scope,
)
from gateway.admission.tokens import ByteCounter, TokenCounter
from gateway.asgi import ClientDisconnected, Receive
from gateway.config import ModelConfig, Settings
from gateway.errors import QuotaExceededError, RateLimitError
from gateway.ids import unique_id
from gateway.requests import ParsedRequest
from gateway.telemetry.metrics import Metrics
from gateway.tenancy import Principal, Quotas
from gateway.upstream.affinity import CHARS_PER_TOKEN, affinity_key, prompt_prefix, rank
from gateway.upstream.backends import Backend, BackendPool, Candidate, Endpoint

__all__ = ["Admission", "Placement", "format_reset", "rate_headers"]

log = logging.getLogger("gateway.admission")

_LIMIT_WORDS = {
    "rpm": "requests per minute (rpm)",
    "tpm": "tokens per minute (tpm)",
    "concurrency": "concurrent requests (max_concurrency)",
    "inflight_tokens": "tokens in flight (max_inflight_tokens)",
}
# Which `on_limit` entry of a tenant answers a refusal for each reason.
_POLICY_KEY = {"queue_full": "queue", "queue_timeout": "queue"}
# Owed settlements (Redis unreachable when a request ended): first retry after this, doubling to the max;
# given up (and logged) when Redis has forgotten the reservation (lua/common.lua keeps it an hour).
OWED_RETRY_S = 1.0
OWED_RETRY_MAX_S = 30.0
OWED_GIVE_UP_S = 3000.0
# Retry-after for queue refusals: never shorter than this; a request holds its permit this long (s) until
# a release is observed.
MIN_RETRY_AFTER_S = 0.05
PRIOR_SERVICE_S = 1.0
# How long a grant may take to reach its replica once the queue says it was granted.
GRANT_IN_FLIGHT_S = 5.0
EWMA_ALPHA = 0.2

# price(model, prompt_tokens, completion_tokens) -> the dearest of the model's backends (a budget is
# never overrun by a fallback).
WorstCost = Callable[[str, int, int], float]


def format_reset(seconds: float) -> str:
    """OpenAI's reset format: `20ms`, `1s`, `6m0s`, `1h2m3s`."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    total = math.ceil(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def rate_headers(headers: RateHeaders) -> list[tuple[bytes, bytes]]:
    out: list[tuple[bytes, bytes]] = []
    if headers.limit_requests is not None:
        out += [
            (b"x-ratelimit-limit-requests", str(headers.limit_requests).encode()),
            (b"x-ratelimit-remaining-requests", str(max(0, headers.remaining_requests or 0)).encode()),
            (b"x-ratelimit-reset-requests", format_reset(headers.reset_requests_s or 0).encode()),
        ]
    if headers.limit_tokens is not None:
        out += [
            (b"x-ratelimit-limit-tokens", str(headers.limit_tokens).encode()),
            (b"x-ratelimit-remaining-tokens", str(max(0, headers.remaining_tokens or 0)).encode()),
            (b"x-ratelimit-reset-tokens", format_reset(headers.reset_tokens_s or 0).encode()),
        ]
    return out


def _retry_headers(seconds: float) -> dict[str, str]:
    seconds = max(seconds, 0.001)
    return {"retry-after": str(math.ceil(seconds)), "retry-after-ms": str(math.ceil(seconds * 1000))}


def _limits(quotas: Quotas, budget_amount: float | None = None, period: str = "month") -> QuotaLimits:
    return QuotaLimits(
        rpm=quotas.rpm,
        tpm=quotas.tpm,
        max_concurrency=quotas.max_concurrency,
        max_inflight_tokens=quotas.max_inflight_tokens,
        budget_amount=budget_amount,
        budget_period=period,  # type: ignore[arg-type]
    )


@dataclass(slots=True, eq=False)
class Placement:
    """Where an admitted request runs, and what it holds until `Admission.settle`.

    Public: `model` (the one served, after any downgrade), `backend` and `endpoint`, the estimates it was
    admitted with, the headers its answer carries, and why it is where it is (downgrade, fallback). The
    rest is admission's.
    """

    principal: Principal
    model: ModelConfig
    backend: Backend
    endpoint: Endpoint
    prompt_estimate: int
    output_estimate: int
    rate_headers: list[tuple[bytes, bytes]]
    downgraded_from: str | None = None
    fallback_from: str | None = None
    fallback_reason: str | None = None
    # How long it waited for its permit, and (of that) how long it is expected to wait inside the engine it
    # was sent to: the engine's own queue time when it was sent (see `Admission.engine_wait_changed`).
    queue_wait_s: float = 0.0
    engine_wait_s: float = 0.0
    # Fields written into the request so the engine stops where admission reserved (see admission.demand).
    inject: dict[str, int] | None = None
    _ask: PlaceAsk | None = None
    _reservation: Reservation | None = None
    _permit: Permit | None = None
    _rest: list[Candidate] = field(default_factory=list)
    _scope_salt: str = ""
    _dispatched_at: float = 0.0
    # When its leases were taken or last renewed (loop time).
    _renewed_at: float = 0.0
    # What settlement charges (tokens, cost), set once by `Admission.settle`.
    _charge: tuple[int, float] | None = None

    def headers(self) -> list[tuple[bytes, bytes]]:
        """What the client's answer carries: its rate-limit headers and, in config names only, what moved it."""
        out = list(self.rate_headers)
        if self.downgraded_from is not None:
            out.append((b"x-gateway-downgraded-from", self.downgraded_from.encode()))
        if self.fallback_from is not None:
            out.append((b"x-gateway-fallback-from", self.fallback_from.encode()))
        return out


@dataclass(slots=True)
class _Waiter:
    """A request waiting in a pool's fair queue for a permit: the grant resolves `granted` (its endpoint)."""

    granted: asyncio.Future[tuple[str, str]]
    ask: PlaceAsk
    origin: str = ""
    # Given up (client gone, too long, shutdown): a grant that arrives anyway is given back at once.
    abandoned: bool = False


class _QueueLost(Exception):
    """The queue a request waited in went away (Redis unreachable, or this replica's beat lapsed)."""


class Admission:
    """The one owner of admission, long-lived: a reload hands it new settings and backends (`reconfigure`)
    while placements made before keep what they hold."""

    def __init__(
        self,
        *,
        settings: Settings,
        quotas: QuotaStore,
        metrics: Metrics,
        worst_cost: WorstCost,
        tokens: TokenCounter | None = None,
    ) -> None:
        self._tokens = tokens or ByteCounter()
        self._quotas = quotas
        self._metrics = metrics
        self._lease_ttl = settings.lease_ttl_s
        self._redis_timeout_s = settings.redis_timeout_s
        self._worst_cost = worst_cost
        # Placements holding leases or permits, renewed by one sweep for all (a timer per request would be
        # armed and cancelled on every request, for the few that outlive a third of the TTL).
        self._held: dict[int, Placement] = {}
        self._sweep: asyncio.TimerHandle | None = None
        # Set when the last held placement settles, for a `drain()` waiting on it (made by that drain only:
        # an event cleared on every request costs a call per request).
        self._idle: asyncio.Event | None = None
        # Settlements that could not reach the shared state, retried by one task until they go through.
        self._owed: deque[_Owed] = deque()
        self._retry: asyncio.Future[None] | None = None
        metrics.settlements_owed.set(0)
        # Requests waiting for a permit, by waiter id.
        self._waiting: dict[str, _Waiter] = {}
        # Per pool: an EWMA of how long a request holds its permit (dispatch to release), for retry-after.
        self._service_s: dict[str, float] = {}
        # Per endpoint: how long requests wait inside the engine now (the capacity control's reading).
        self._engine_wait: dict[str, float] = {}
        self._limits: dict[str, int] = {}
        # Quota scopes per key, with the principal they were built for: principals are cached by the
        # authenticator and immutable, so scopes are built once per principal rather than per request. Keyed
        # by key id, not by principal: the authenticator makes a new principal for a key every time its cache
        # entry refreshes, and one entry per principal kept every stale one alive until the map filled up.
        self._scopes: dict[str, tuple[Principal, list[Scope] | None]] = {}
        self._settings = settings
        self._models: dict[str, ModelConfig] = {}
        # Handed over by `reconfigure` (the wiring, once the backends were probed); nothing is placed before.
        self._backends: BackendPool | None = None
        # Told how long each request held its permit and how many tokens it made (the capacity control's
        # latency signal for engines without metrics).
        self.on_release: Callable[[str, str, float, int], None] | None = None

    def reconfigure(self, settings: Settings, backends: BackendPool) -> None:
        """New settings and backends (start-up, SIGHUP); placements made before keep what they hold."""
        self._settings = settings
        self._models = {m.name: m for m in settings.models}
        self._backends = backends

    def queues_lost(self, origin: str = "redis") -> None:
        """The shared queues are out of reach (Redis away, or this replica's beat lapsed): the requests waiting
        there wait again wherever admission places them now (this replica's share, in local mode)."""
        for waiter in self._waiting.values():
            if waiter.origin == origin and not waiter.granted.done():
                waiter.granted.set_exception(_QueueLost())

    def engine_wait_changed(self, endpoint: str, seconds: float) -> None:
        """How long requests wait inside `endpoint`'s engine now: added to the queue wait of each request sent
        there, so the wait a tenant sees includes the engine's (first come, first served, blind to weights)."""
        if seconds > 0:
            self._engine_wait[endpoint] = seconds
        else:
            self._engine_wait.pop(endpoint, None)

    def capacity_changed(self, pool: str, limit: int) -> None:
        """The capacity control's latest total for a pool (for retry-after estimates)."""
        self._limits[pool] = limit

    def grant(self, waiter: str, endpoint: str, origin: str) -> None:
        """A waiting request was granted a permit (by the local fair queue, or through this replica's grant
        list). One nobody waits for any more is given back at once."""
        found = self._waiting.get(waiter)
        if found is not None and not found.abandoned and not found.granted.done():
            found.granted.set_result((endpoint, origin))
            if origin == "redis":
                # A grant through the list is leased briefly (lua/fairshare.lua, FS_CLAIM_S): claim it for the
                # full lease, or it comes back to the pool while the request runs.
                permit = Permit(found.ask.pools[0].pool, endpoint, waiter, origin=origin)
                claim = asyncio.ensure_future(self._quotas.renew(None, permit, ttl_s=self._lease_ttl))
                claim.add_done_callback(_log_failure)
            return
        ask = found.ask if found is not None else None
        self._waiting.pop(waiter, None)
        if ask is None:
            log.warning("a permit was granted to request %s, which this replica does not know", waiter)
            return
        permit = Permit(ask.pools[0].pool, endpoint, waiter, origin=origin)
        task = asyncio.ensure_future(self._give_back(ask, permit))
        task.add_done_callback(_log_failure)

    # --- the three calls ---------------------------------------------------------------------------

    async def place(
        self,
        principal: Principal,
        request: ParsedRequest,
        model: ModelConfig,
        *,
        receive: Receive,
        scope_salt: str = "",
        deadline: float | None = None,
    ) -> Placement:
        """Admit the request and find it an endpoint; a refusal whose limit the tenant's `on_limit` maps to
        `downgrade:<model>` is retried once with that model. `scope_salt` names the request's cache scope
        for prefix affinity; `deadline` (loop time) bounds the wait on the shared state; a client that
        leaves while queued raises `ClientDisconnected`."""
        downgraded_from: str | None = None
        while True:
            try:
                placement = await self._place(principal, request, model, receive, scope_salt, deadline)
            except RateLimitError as exc:
                target = None if downgraded_from else self._downgrade_target(principal, exc.reason)
                if target is None:
                    raise
                label = self._metrics.tenant_label(principal.tenant_id)
                log.info("downgrading %s request from %s to %s (%s)", label, model.name, target.name, exc.reason)
                downgraded_from, model = model.name, target
                continue
            placement.downgraded_from = downgraded_from
            return placement

    async def move(self, placement: Placement, reason: str, *, receive: Receive) -> bool:
        """The placement's backend failed before answering: give its permit back (its fair-queue charge
        refunded: it did no work) and take one of the next candidate backend. False when there is none
        left; a refusal there (queue full or too long) or a client leaving meanwhile raises."""
        ask = placement._ask
        if not placement._rest or ask is None:
            return False
        failed, nxt = placement.backend, placement._rest.pop(0)
        permit, placement._permit = placement._permit, None
        if permit is not None:
            await self._give_back(ask, permit)
        ask = dataclasses.replace(ask, waiter=unique_id(), pools=(self._pool_ask(nxt, placement),), spill=False)
        placement._ask = ask
        decision = await self._quotas.admit(ask.tenant, (), tokens=0, cost=0.0, lease_ttl_s=self._lease_ttl, place=ask)
        await self._placed(placement, decision, ask, [nxt], receive)
        if nxt.backend is failed:
            log.info("backend %s: an endpoint failed (%s), moved to %s", failed.name, reason, placement.endpoint.id)
            return True
        log.info("backend %s failed (%s), falling back to %s", failed.name, reason, nxt.backend.name)
        self._metrics.fallbacks.labels(placement.model.name, failed.name, nxt.backend.name, reason).inc()
        if placement.fallback_from is None:
            placement.fallback_from = failed.name
        placement.fallback_reason = reason
        return True

    async def settle(self, placement: Placement, *, prompt_tokens: int, completion_tokens: int, cost: float) -> None:
        """Give back what the placement holds and charge what the request really used: tpm and budget, its
        permit, its tenant's counter in the fair queue; once, whatever the number of calls, in one call to
        the shared state. A settlement cut short by a second cancellation (a shutdown past its grace) stays
        held with its charge, and `drain()` finishes it before the quota store's client closes."""
        if placement._charge is not None:
            return
        placement._charge = (prompt_tokens + completion_tokens, cost)
        if placement._permit is not None:
            held = self._observe_service(placement)
            if self.on_release is not None:
                self.on_release(placement.backend.name, placement.endpoint.id, held, completion_tokens)
        await self._finish(placement, prompt_tokens + 2 * completion_tokens)

    async def _finish(self, placement: Placement, served: float | None = None) -> None:
        reservation, charge, permit, ask = placement._reservation, placement._charge, placement._permit, placement._ask
        release = None
        if permit is not None and ask is not None:
            actual = ask.cost if served is None else float(served)
            release = Release(permit, ask.tenant, ask.weight, ask.band, ask.cost, actual, ask.load_factor)
        if charge is not None and (reservation is not None or release is not None):
            await self._settle_quotas(reservation, charge[0], charge[1], release)
        self._held.pop(id(placement), None)
        if not self._held and self._idle is not None:
            self._idle.set()

    async def drain(self, timeout_s: float) -> bool:
        """Shutdown, before the quota store closes: wait for the requests still running to settle, finish the
        settlements a cancellation cut short, and try what is owed once more. False if anything is left
        when `timeout_s` runs out (it is logged)."""
        try:
            async with asyncio.timeout(timeout_s):
                while self._held:
                    cut_short = [p for p in self._held.values() if p._charge is not None]
                    for placement in cut_short:
                        await self._finish(placement)
                    if self._held:
                        self._idle = asyncio.Event()
                        await self._idle.wait()
                while self._owed:
                    owed = self._owed[0]
                    await self._quotas.settle(
                        owed.reservation, actual_tokens=owed.tokens, actual_cost=owed.cost, release=owed.release
                    )
                    self._owed.popleft()
        except (TimeoutError, QuotaBackendError):
            pass
        left = len(self._held) + len(self._owed)
        if left:
            log.error("shutdown: %d request(s) could not be settled; their usage is not charged", left)
        if self._retry is not None:
            self._retry.cancel()
        return not left

    # --- placing -----------------------------------------------------------------------------------

    async def _place(
        self,
        principal: Principal,
        request: ParsedRequest,
        model: ModelConfig,
        receive: Receive,
        scope_salt: str,
        deadline: float | None,
    ) -> Placement:
        demand = resolve_demand(request, model, self._settings.limits, self._tokens)
        prompt_estimate, output_estimate = demand.prompt_tokens, demand.output_tokens
        label = self._metrics.tenant_label(principal.tenant_id)
        backends = self._backends
        assert backends is not None, "Admission.reconfigure() wires the backends in before any request"
        candidates = backends.candidates(model, principal.cache_scope() is not None, label)
        tenant = principal.tenant
        placement = Placement(
            principal, model, candidates[0].backend, candidates[0].endpoints[0], prompt_estimate, output_estimate, []
        )
        placement._scope_salt = scope_salt
        placement.inject = demand.inject
        spill = tenant.on_limit.get("queue") == "fallback"
        offered = candidates if spill else candidates[:1]
        first_backend = candidates[0].backend
        ask = PlaceAsk(
            waiter=unique_id(),
            tenant=tenant.id,
            weight=tenant.weight,
            band=tenant.priority,
            cost=float(prompt_estimate + 2 * output_estimate),
            pools=tuple(self._pool_ask(c, placement, request) for c in offered),
            lease_ttl_s=self._lease_ttl,
            spill=spill,
            max_queue_depth=tenant.limits.max_queue_depth,
            load_factor=_load_factor(first_backend, placement._scope_salt),
        )
        placement._ask = ask
        scopes = self._scopes_of(principal)
        worst = self._worst_cost(model.name, prompt_estimate, output_estimate)
        decision = await self._quota_admit(
            tenant.id, scopes or (), prompt_estimate + output_estimate, worst, deadline, ask
        )
        placement.rate_headers = rate_headers(decision.headers)
        if not decision.allowed:
            if decision.limit == "queue_full":
                raise self._queue_refusal(placement, "queue_full", decision.ahead, decision.backlog)
            error = self._refusal(principal, decision, placement.rate_headers)
            error.reason = decision.limit
            raise error
        placement._reservation = decision.reservation
        self._hold(placement)
        try:
            await self._placed(placement, decision, ask, offered, receive)
        except BaseException:
            await self.settle(placement, prompt_tokens=0, completion_tokens=0, cost=0.0)
            raise
        # Where it may go if its endpoint fails before answering: another endpoint of the same pool first (an
        # engine of a pool failing is the pool's business, not a fallback), then the later backends.
        rest: list[Candidate] = []
        for c in candidates:
            if c.backend is not placement.backend:
                rest.append(c)
            elif len(c.endpoints) > 1 or c.endpoints[0] is not placement.endpoint:
                others = tuple(e for e in c.endpoints if e is not placement.endpoint)
                if others:
                    rest.insert(0, Candidate(placement.backend, others))
        placement._rest = rest
        listed_first = model.backends[0]
        if placement.backend is not first_backend:
            placement.fallback_from, placement.fallback_reason = first_backend.name, "saturated"
        elif first_backend.name != listed_first:
            # The first backend is down, ejected or not isolating: still a fallback, and the bill says so.
            placement.fallback_from, placement.fallback_reason = listed_first, "unavailable"
        if placement.fallback_from is not None:
            self._metrics.fallbacks.labels(
                model.name, placement.fallback_from, placement.backend.name, placement.fallback_reason
            ).inc()
        return placement

    def _pool_ask(self, candidate: Candidate, placement: Placement, request: ParsedRequest | None = None) -> PoolAsk:
        """The endpoints of a candidate backend that may serve the request, in its order of preference."""
        endpoints = [e.id for e in candidate.endpoints]
        routing = candidate.backend.config.routing
        if routing.affinity == "scope" and len(endpoints) > 1 and request is not None:
            chars = routing.prefix_tokens * CHARS_PER_TOKEN
            prefix = prompt_prefix(request.endpoint, request.body, chars)
            key = affinity_key(
                placement._scope_salt, placement.model.upstream_name, prefix, routing.block_tokens * CHARS_PER_TOKEN
            )
            if key is not None:
                return PoolAsk(
                    candidate.backend.name, tuple(rank(key, endpoints)), key[:8].hex(), routing.affinity_ttl_s
                )
        return PoolAsk(candidate.backend.name, tuple(endpoints))

    async def _placed(
        self,
        placement: Placement,
        decision: Decision,
        ask: PlaceAsk,
        offered: list[Candidate],
        receive: Receive,
    ) -> None:
        """Take the permit the decision granted, or wait in the queue for one."""
        loop = asyncio.get_running_loop()
        queued_at = loop.time()
        if decision.place == "granted" and decision.permit is not None:
            permit = decision.permit
        elif decision.place == "queued":
            permit = await self._wait(placement, ask, decision, receive)
        else:
            raise QuotaBackendError("the fair queue gave no answer")
        placement._permit = permit
        placement._dispatched_at = loop.time()
        chosen = offered[0]
        if chosen.backend.name != permit.pool:
            chosen = next(c for c in offered if c.backend.name == permit.pool)
        placement.backend = chosen.backend
        endpoint = chosen.endpoints[0]
        if endpoint.id != permit.endpoint:
            endpoint = next(
                (e for e in chosen.endpoints if e.id == permit.endpoint),
                chosen.backend.endpoints.get(permit.endpoint) or endpoint,
            )
        placement.endpoint = endpoint
        waited = placement._dispatched_at - queued_at
        if self._engine_wait or placement.engine_wait_s:
            engine = self._engine_wait.get(endpoint.id, 0.0)
            waited += engine - placement.engine_wait_s  # after a move: in place of the failed engine's
            placement.engine_wait_s = engine
        placement.queue_wait_s += waited
        label = self._metrics.tenant_label(placement.principal.tenant_id)
        self._metrics.observer(self._metrics.queue_wait, label, placement.model.name)(waited)

    async def _wait(self, placement: Placement, ask: PlaceAsk, decision: Decision, receive: Receive) -> Permit:
        """Wait in the queue for a permit; leave the queue at once when the client goes away, and with a 429
        when the tenant's maximum wait runs out. A request whose queue went away waits again where
        admission places it now."""
        label = self._metrics.tenant_label(ask.tenant)
        limits = placement.principal.tenant.limits
        max_wait = None if limits.max_queue_wait_ms is None else limits.max_queue_wait_ms / 1000
        deadline = None if max_wait is None else asyncio.get_running_loop().time() + max_wait
        self._metrics.queued.labels(label).inc()
        try:
            while True:
                try:
                    endpoint, origin = await self._granted(placement, ask, decision, receive, deadline)
                except _QueueLost:
                    ask = dataclasses.replace(ask, waiter=unique_id(), pools=ask.pools[:1], spill=False)
                    placement._ask = ask
                    decision = await self._quota_admit(ask.tenant, (), 0, 0.0, None, ask)
                    if not decision.allowed:
                        raise self._queue_refusal(placement, "queue_full", decision.ahead, decision.backlog) from None
                    if decision.place == "granted" and decision.permit is not None:
                        return decision.permit
                    continue
                return Permit(ask.pools[0].pool, endpoint, ask.waiter, origin=origin)
        finally:
            self._metrics.queued.labels(label).dec()

    async def _granted(
        self, placement: Placement, ask: PlaceAsk, decision: Decision, receive: Receive, deadline: float | None
    ) -> tuple[str, str]:
        waiter = self._waiting.get(ask.waiter)
        if waiter is None:
            raise QuotaBackendError("lost track of a waiting request")
        waiter.origin = decision.origin
        try:
            try:
                async with asyncio.timeout_at(deadline):
                    return await _unless_gone(waiter.granted, receive)
            except TimeoutError:
                if await self._quotas.cancel(ask, decision.origin):
                    raise self._queue_refusal(placement, "queue_timeout", decision.ahead, decision.backlog) from None
                # Granted as the wait ran out: take it (the grant is on its way).
                try:
                    return await asyncio.wait_for(asyncio.shield(waiter.granted), GRANT_IN_FLIGHT_S)
                except TimeoutError:
                    raise self._queue_refusal(placement, "queue_timeout", decision.ahead, decision.backlog) from None
        except _QueueLost:
            self._waiting.pop(ask.waiter, None)
            raise
        except BaseException:
            waiter.abandoned = True
            granted = waiter.granted
            if granted.done() and not granted.cancelled() and granted.exception() is None:
                endpoint, origin = granted.result()
                await self._give_back(ask, Permit(ask.pools[0].pool, endpoint, ask.waiter, origin=origin))
                self._waiting.pop(ask.waiter, None)
            else:
                with contextlib.suppress(Exception):
                    if await self._quotas.cancel(ask, decision.origin):
                        self._waiting.pop(ask.waiter, None)
            raise
        finally:
            if waiter.granted.done() and not waiter.abandoned:
                self._waiting.pop(ask.waiter, None)

    async def _give_back(self, ask: PlaceAsk, permit: Permit) -> None:
        """A permit nobody will use: back to its pool, its charge refunded."""
        release = Release(permit, ask.tenant, ask.weight, ask.band, ask.cost, 0.0, ask.load_factor)
        await self._settle_quotas(None, 0, 0.0, release)

    async def _quota_admit(
        self,
        tenant: str,
        scopes: Sequence[Scope],
        tokens: int,
        cost: float,
        deadline: float | None,
        ask: PlaceAsk,
    ) -> Decision:
        """The quota store's admit, within what is left of the request's allowance for waiting on shared state
        (`redis_timeout_s` for the key lookup and admission together)."""
        timeout_s = None
        if deadline is not None:
            left = deadline - asyncio.get_running_loop().time()
            # Most requests have their whole allowance left: the quota client's own timeout is that bound
            # already, and no timer is armed for them.
            if left < self._redis_timeout_s:
                timeout_s = left
        # Registered before the call: a grant may reach this replica before the call's own answer does.
        self._waiting[ask.waiter] = _Waiter(asyncio.get_running_loop().create_future(), ask)
        try:
            decision = await self._quotas.admit(
                tenant, scopes, tokens=tokens, cost=cost, lease_ttl_s=self._lease_ttl, timeout_s=timeout_s, place=ask
            )
        except BaseException:
            self._waiting.pop(ask.waiter, None)
            raise
        if decision.place != "queued":
            self._waiting.pop(ask.waiter, None)
        return decision

    def _scopes_of(self, principal: Principal) -> list[Scope] | None:
        """The quota scopes of a principal (tenant, and its key if it has limits); None if nothing is limited."""
        found = self._scopes.get(principal.key.id)
        if found is not None and found[0] is principal:
            return found[1]
        tenant = principal.tenant
        budget = tenant.budget
        scopes = [
            Scope(
                "tenant:" + tenant.id,
                _limits(tenant.limits, budget.amount if budget else None, budget.period if budget else "month"),
            )
        ]
        key_limits = principal.key.limits
        if key_limits != Quotas():
            scopes.append(Scope("key:" + principal.key.id, _limits(key_limits)))
        limited = None if len(scopes) == 1 and scopes[0].limits == QuotaLimits() else scopes
        if len(self._scopes) >= 4096 and principal.key.id not in self._scopes:
            self._scopes.clear()  # bounded: more keys than that in use refill it from their principals
        self._scopes[principal.key.id] = (principal, limited)
        return limited

    def _refusal(self, principal: Principal, decision: Decision, headers: list[tuple[bytes, bytes]]) -> RateLimitError:
        limit = decision.limit or "rpm"
        self._metrics.rejections.labels(self._metrics.tenant_label(principal.tenant_id), limit).inc()
        extra = {k.decode(): v.decode() for k, v in headers}
        if limit == "budget":
            budget = principal.tenant.budget
            period = budget.period if budget else "period"
            error: RateLimitError = QuotaExceededError(
                f"Your tenant's {period}ly budget is used up. It resets in {format_reset(decision.retry_after_s)}.",
                headers={**extra, "x-should-retry": "false"},
            )
            return error
        whose = "key" if (decision.scope or "").startswith("key:") else "tenant"
        if decision.exceeds_limit:
            error = RateLimitError(
                f"This request alone exceeds your {whose}'s limit of {_LIMIT_WORDS[limit]}; retrying cannot help. "
                "Lower max_tokens or shorten the prompt.",
                headers={**extra, "x-should-retry": "false"},
            )
        else:
            error = RateLimitError(
                f"Rate limit reached for {_LIMIT_WORDS[limit]} on your {whose}. "
                f"Please try again in {format_reset(decision.retry_after_s)}.",
                headers={**extra, **_retry_headers(decision.retry_after_s)},
            )
        if limit in ("tpm", "inflight_tokens"):
            error.type = "tokens"
        return error

    def _queue_refusal(self, placement: Placement, reason: str, ahead: int, backlog: int) -> RateLimitError:
        """A full queue or a wait that ran out: a 429 whose retry-after is the expected time for the tenant's
        queue to move `ahead + 1` places, from the pool's observed service time and limit."""
        label = self._metrics.tenant_label(placement.principal.tenant_id)
        self._metrics.rejections.labels(label, reason).inc()
        ask = placement._ask
        pool = ask.pools[0].pool if ask is not None else placement.backend.name
        service_s = self._service_s.get(pool, PRIOR_SERVICE_S)
        limit = max(1, self._limits.get(pool, placement.backend.config.capacity))
        retry = max(MIN_RETRY_AFTER_S, (ahead + 1) * max(1, backlog) * service_s / limit)
        what = (
            "Your tenant's queue for this model is full"
            if reason == "queue_full"
            else "Your request waited in your tenant's queue for this model longer than its maximum wait"
        )
        extra = {k.decode(): v.decode() for k, v in placement.rate_headers}
        error = RateLimitError(
            f"{what}. Please try again in {format_reset(retry)}.",
            headers={**extra, **_retry_headers(retry)},
        )
        error.reason = reason
        return error

    def _observe_service(self, placement: Placement) -> float:
        pool = placement.backend.name
        sample = asyncio.get_running_loop().time() - placement._dispatched_at
        previous = self._service_s.get(pool)
        self._service_s[pool] = sample if previous is None else previous + EWMA_ALPHA * (sample - previous)
        return sample

    def _downgrade_target(self, principal: Principal, reason: str | None) -> ModelConfig | None:
        policy = principal.tenant.on_limit.get(_POLICY_KEY.get(reason or "", reason or ""), "reject")
        if not policy.startswith("downgrade:"):
            return None
        target = self._models.get(policy.removeprefix("downgrade:"))
        if target is None or not principal.may_use(target.name):
            log.warning(
                "tenant %s: on_limit names model %r, which is unknown or not allowed", principal.tenant_id, policy
            )
            return None
        return target

    # --- settlement and leases ------------------------------------------------------------------------

    async def _settle_quotas(
        self, reservation: Reservation | None, tokens: int, cost: float, release: Release | None = None
    ) -> None:
        try:
            await self._quotas.settle(reservation, actual_tokens=tokens, actual_cost=cost, release=release)
        except QuotaBackendError:
            # Redis is unreachable: the usage is owed, not forgiven. Settling is idempotent and Redis keeps an
            # unsettled reservation for an hour past its lease, so it is retried until it goes through.
            self._owe(_Owed(reservation, tokens, cost, release, asyncio.get_running_loop().time()))
        except Exception:  # never fail a finished request over this; its leases expire by themselves
            log.warning("could not settle a request", exc_info=True)

    def _owe(self, owed: _Owed) -> None:
        self._owed.append(owed)
        self._metrics.settlements_owed.set(len(self._owed))
        if self._retry is None:
            self._retry = asyncio.ensure_future(self._settle_owed())

    async def _settle_owed(self) -> None:
        """Retry owed settlements, oldest first, backing off while Redis stays away."""
        delay = OWED_RETRY_S
        try:
            while self._owed:
                await asyncio.sleep(delay)
                now = asyncio.get_running_loop().time()
                while self._owed:
                    owed = self._owed[0]
                    if now - owed.since > OWED_GIVE_UP_S:
                        self._owed.popleft()
                        log.error(
                            "gave up settling a request after %.0f s: %d tokens and %.6f spend not charged",
                            now - owed.since,
                            owed.tokens,
                            owed.cost,
                        )
                        continue
                    try:
                        await self._quotas.settle(
                            owed.reservation, actual_tokens=owed.tokens, actual_cost=owed.cost, release=owed.release
                        )
                    except QuotaBackendError:
                        break
                    except Exception:
                        log.warning("could not settle a request", exc_info=True)
                    self._owed.popleft()
                self._metrics.settlements_owed.set(len(self._owed))
                delay = min(OWED_RETRY_MAX_S, delay * 2)
        finally:
            self._retry = None

    def _hold(self, placement: Placement) -> None:
        """Keep the leases of `placement` alive until it settles: long requests (streams) renew them, and a
        crashed replica's leases and permits expire by themselves after `lease_ttl_s`."""
        loop = asyncio.get_running_loop()
        placement._renewed_at = loop.time()
        self._held[id(placement)] = placement
        if self._sweep is None:
            self._sweep = loop.call_later(self._lease_ttl / 6, self._renew_due)

    def _renew_due(self) -> None:
        # Every lease is renewed once it is a third of the TTL old; sweeping every sixth of it, no lease
        # gets older than half the TTL unrenewed.
        self._sweep = None
        if not self._held:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        due = now - self._lease_ttl / 3
        for placement in self._held.values():
            reservation, permit = placement._reservation, placement._permit
            if placement._renewed_at <= due and (reservation is not None or permit is not None):
                placement._renewed_at = now
                task = loop.create_task(self._quotas.renew(reservation, permit, ttl_s=self._lease_ttl))
                task.add_done_callback(_log_failure)
        self._sweep = loop.call_later(self._lease_ttl / 6, self._renew_due)


def _load_factor(backend: Backend, scope_salt: str) -> float:
    routing = backend.config.routing
    return routing.load_factor if routing.affinity == "scope" and len(backend.endpoints) > 1 else 0.0


async def _unless_gone(granted: asyncio.Future[tuple[str, str]], receive: Receive) -> tuple[str, str]:
    """Wait for a permit's grant while watching the client; `ClientDisconnected` if it goes away first. The
    grant's future is never cancelled here: a grant that races the end of the wait is still seen."""
    watcher = asyncio.ensure_future(_wait_disconnect(receive))
    either: set[asyncio.Future[Any]] = {granted, watcher}
    try:
        done, _ = await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if granted in done:
        return granted.result()
    raise ClientDisconnected


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


@dataclass(slots=True, frozen=True)
class _Owed:
    """A settlement that could not reach the shared quota state: what to charge, and since when it is owed."""

    reservation: Reservation | None
    tokens: int
    cost: float
    release: Release | None
    since: float


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("lease renewal failed: %s", type(task.exception()).__name__)
