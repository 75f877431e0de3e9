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
import logging
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.admission.fairqueue import Job, QueueFull, QueueTimeout, Scheduler, Ticket
from gateway.admission.limits import (
    Decision,
    QuotaBackendError,
    QuotaLimits,
    QuotaStore,
    RateHeaders,
    Reservation,
    Scope,
)
from gateway.admission.tokens import ByteCounter, TokenCounter, prompt_tokens
from gateway.asgi import ClientDisconnected, Receive
from gateway.config import ModelConfig, Settings
from gateway.errors import QuotaExceededError, RateLimitError
from gateway.requests import ParsedRequest
from gateway.telemetry.metrics import Metrics
from gateway.tenancy import Principal, Quotas
from gateway.upstream.backends import Backend, BackendPool

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

    Public: `model` (the one served, after any downgrade), `backend`, the estimates it was admitted with,
    the headers its answer carries, and why it is where it is (downgrade, fallback). The rest is admission's.
    """

    principal: Principal
    model: ModelConfig
    backend: Backend
    prompt_estimate: int
    output_estimate: int
    rate_headers: list[tuple[bytes, bytes]]
    downgraded_from: str | None = None
    fallback_from: str | None = None
    fallback_reason: str | None = None
    queue_wait_s: float = 0.0
    _reservation: Reservation | None = None
    _ticket: Ticket | None = None
    _scheduler: Scheduler | None = None
    _rest: list[Backend] = field(default_factory=list)
    # When its leases were taken or last renewed (loop time).
    _renewed_at: float = 0.0
    _settled: bool = False

    def headers(self) -> list[tuple[bytes, bytes]]:
        """What the client's answer carries: its rate-limit headers and, in config names only, what moved it."""
        out = list(self.rate_headers)
        if self.downgraded_from is not None:
            out.append((b"x-gateway-downgraded-from", self.downgraded_from.encode()))
        if self.fallback_from is not None:
            out.append((b"x-gateway-fallback-from", self.fallback_from.encode()))
        return out


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
        # Placements holding leases, renewed by one sweep for all (a timer per request would be armed and
        # cancelled on every request, for the few that outlive a third of the TTL).
        self._held: dict[int, Placement] = {}
        self._sweep: asyncio.TimerHandle | None = None
        # Settlements in flight: shutdown waits for them before the quota store's client closes.
        self._settling: set[asyncio.Task[None]] = set()
        # Settlements that could not reach the shared state, retried by one task until they go through.
        self._owed: deque[_Owed] = deque()
        self._retry: asyncio.Future[None] | None = None
        metrics.settlements_owed.set(0)
        self._idle = asyncio.Event()
        self._idle.set()
        # Quota scopes per key, with the principal they were built for: principals are cached by the
        # authenticator and immutable, so scopes are built once per principal rather than per request. Keyed
        # by key id, not by principal: the authenticator makes a new principal for a key every time its cache
        # entry refreshes, and one entry per principal kept every stale one alive until the map filled up.
        self._scopes: dict[str, tuple[Principal, list[Scope] | None]] = {}
        self.schedulers: dict[str, Scheduler] = {}
        self._settings = settings
        self._models: dict[str, ModelConfig] = {}
        # Handed over by `reconfigure` (the wiring, once the backends were probed); nothing is placed before.
        self._backends: BackendPool | None = None

    def reconfigure(self, settings: Settings, backends: BackendPool) -> None:
        """New settings and backends (start-up, SIGHUP): the fair queues of known backends stay (with their
        requests in flight and queued), resized to this worker's share; new backends get theirs."""
        workers = max(1, settings.workers)
        schedulers = {}
        for b in settings.backends:
            capacity = max(1, b.capacity // workers)
            scheduler = self.schedulers.get(b.name) or Scheduler(capacity)
            if scheduler.capacity != capacity:
                scheduler.set_capacity(capacity)
            schedulers[b.name] = scheduler
        self.schedulers = schedulers
        self._settings = settings
        self._models = {m.name: m for m in settings.models}
        self._backends = backends

    # --- the three calls ---------------------------------------------------------------------------

    async def place(
        self,
        principal: Principal,
        request: ParsedRequest,
        model: ModelConfig,
        *,
        receive: Receive,
        deadline: float | None = None,
    ) -> Placement:
        """Admit the request and find it a backend slot; a refusal whose limit the tenant's `on_limit` maps to
        `downgrade:<model>` is retried once with that model. `deadline` (loop time) bounds the wait on the
        shared quota state; a client that leaves while queued raises `ClientDisconnected`."""
        downgraded_from: str | None = None
        while True:
            try:
                placement = await self._place(principal, request, model, receive, deadline)
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
        """The placement's backend failed before answering: give its slot back (its fair-queue charge
        refunded: it did no work) and take a slot of the next candidate backend. False when there is none
        left; a refusal there (queue full or too long) or a client leaving meanwhile raises."""
        if not placement._rest:
            return False
        failed, nxt = placement.backend, placement._rest.pop(0)
        self._release_slot(placement, prompt_tokens=0, completion_tokens=0)
        await self._take_slot(placement, nxt, receive)
        log.info("backend %s failed (%s), falling back to %s", failed.name, reason, nxt.name)
        self._metrics.fallbacks.labels(placement.model.name, failed.name, nxt.name, reason).inc()
        if placement.fallback_from is None:
            placement.fallback_from = failed.name
        placement.backend, placement.fallback_reason = nxt, reason
        return True

    async def settle(self, placement: Placement, *, prompt_tokens: int, completion_tokens: int, cost: float) -> None:
        """Give back what the placement holds and charge what the request really used; once, whatever the
        number of calls. The work runs in a task of its own, so a second cancellation of the request (a
        shutdown past its grace) cannot cut it short, and `drain()` waits for it."""
        if placement._settled:
            return
        placement._settled = True
        self._held.pop(id(placement), None)
        self._release_slot(placement, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
        reservation = placement._reservation
        if reservation is None:
            self._note_idle()
            return
        task = asyncio.ensure_future(self._settle_quotas(reservation, prompt_tokens + completion_tokens, cost))
        self._settling.add(task)
        self._idle.clear()
        task.add_done_callback(self._settled_one)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(task)

    async def drain(self, timeout_s: float) -> bool:
        """Shutdown, before the quota store closes: wait until every placement has settled, and try what is
        owed once more. False if anything is left when `timeout_s` runs out (it is logged)."""
        try:
            async with asyncio.timeout(timeout_s):
                while self._held or self._settling:
                    self._idle.clear()
                    await self._idle.wait()
                while self._owed:
                    owed = self._owed[0]
                    await self._quotas.settle(owed.reservation, actual_tokens=owed.tokens, actual_cost=owed.cost)
                    self._owed.popleft()
        except (TimeoutError, QuotaBackendError):
            pass
        left = len(self._held) + len(self._settling) + len(self._owed)
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
        deadline: float | None,
    ) -> Placement:
        prompt_estimate, output_estimate = self.estimate(request)
        reservation, headers = await self._admit(principal, model, prompt_estimate, output_estimate, deadline)
        label = self._metrics.tenant_label(principal.tenant_id)
        backends = self._backends
        assert backends is not None, "Admission.reconfigure() wires the backends in before any request"
        try:
            candidates = backends.candidates(model, principal.cache_scope() is not None, label)
        except BaseException:
            if reservation is not None:
                await self._settle_quotas(reservation, 0, 0.0)
            raise
        first = backend = candidates[0]
        placement = Placement(principal, model, first, prompt_estimate, output_estimate, headers)
        placement._reservation = reservation
        self._hold(placement)
        try:
            if not self._has_free_slot(first) and principal.tenant.on_limit.get("queue") == "fallback":
                spill = next((b for b in candidates[1:] if self._has_free_slot(b)), None)
                if spill is not None:
                    backend = spill
                    placement.fallback_from, placement.fallback_reason = first.name, "saturated"
            placement._rest = [b for b in candidates if b is not backend]
            await self._take_slot(placement, backend, receive)
        except BaseException:
            await self.settle(placement, prompt_tokens=0, completion_tokens=0, cost=0.0)
            raise
        placement.backend = backend
        listed_first = model.backends[0]
        if placement.fallback_from is None and backend.name != listed_first:
            # The first backend is down, ejected or not isolating: still a fallback, and the bill says so.
            placement.fallback_from, placement.fallback_reason = listed_first, "unavailable"
        if placement.fallback_from is not None:
            self._metrics.fallbacks.labels(
                model.name, placement.fallback_from, backend.name, placement.fallback_reason
            ).inc()
        return placement

    def estimate(self, request: ParsedRequest) -> tuple[int, int]:
        prompt = prompt_tokens(request.endpoint, request.body, self._tokens)
        output = request.max_tokens if request.max_tokens is not None else self._settings.limits.default_max_tokens
        return prompt, output

    async def _admit(
        self,
        principal: Principal,
        model: ModelConfig,
        prompt_estimate: int,
        output_estimate: int,
        deadline: float | None,
    ) -> tuple[Reservation | None, list[tuple[bytes, bytes]]]:
        """Budget, rpm, tpm and concurrency, atomically; raises a 429 error on refusal."""
        scopes = self._scopes_of(principal)
        if scopes is None:
            return None, []
        worst = self._worst_cost(model.name, prompt_estimate, output_estimate)
        tenant = principal.tenant
        decision = await self._quota_admit(tenant.id, scopes, prompt_estimate + output_estimate, worst, deadline)
        headers = rate_headers(decision.headers)
        if not decision.allowed:
            error = self._refusal(principal, decision, headers)
            error.reason = decision.limit
            raise error
        return decision.reservation, headers

    async def _quota_admit(
        self, tenant: str, scopes: list[Scope], tokens: int, cost: float, deadline: float | None
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
        return await self._quotas.admit(
            tenant, scopes, tokens=tokens, cost=cost, lease_ttl_s=self._lease_ttl, timeout_s=timeout_s
        )

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

    # --- backend slots (the fair queue) -------------------------------------------------------------

    def _has_free_slot(self, backend: Backend) -> bool:
        scheduler = self.schedulers[backend.name]
        return scheduler.total_in_flight < scheduler.capacity

    async def _take_slot(self, placement: Placement, backend: Backend, receive: Receive) -> None:
        """A slot of the backend's capacity: at once if one is free, else in its fair queue, left at once if
        the client goes away."""
        scheduler = self.schedulers[backend.name]
        tenant = placement.principal.tenant
        job = Job(tenant.id, tenant.weight, tenant.priority, placement.prompt_estimate, placement.output_estimate)
        limits = tenant.limits
        max_wait = None if limits.max_queue_wait_ms is None else limits.max_queue_wait_ms / 1000
        label = self._metrics.tenant_label(tenant.id)
        waiting = scheduler.total_in_flight >= scheduler.capacity
        try:
            if not waiting:
                ticket = await scheduler.acquire(job, max_wait_s=max_wait, max_queue_depth=limits.max_queue_depth)
            else:
                self._metrics.queued.labels(label).inc()
                try:
                    ticket = await _unless_gone(
                        scheduler.acquire(job, max_wait_s=max_wait, max_queue_depth=limits.max_queue_depth), receive
                    )
                finally:
                    self._metrics.queued.labels(label).dec()
        except (QueueFull, QueueTimeout) as exc:
            reason = "queue_full" if isinstance(exc, QueueFull) else "queue_timeout"
            self._metrics.rejections.labels(label, reason).inc()
            what = (
                "Your tenant's queue for this model is full"
                if isinstance(exc, QueueFull)
                else "Your request waited in your tenant's queue for this model longer than its maximum wait"
            )
            extra = {k.decode(): v.decode() for k, v in placement.rate_headers}
            error = RateLimitError(
                f"{what}. Please try again in {format_reset(exc.retry_after_s)}.",
                headers={**extra, **_retry_headers(exc.retry_after_s)},
            )
            error.reason = reason
            raise error from None
        placement._ticket, placement._scheduler = ticket, scheduler
        placement.queue_wait_s += ticket.queue_wait_s
        self._metrics.child(self._metrics.queue_wait, label, placement.model.name).observe(ticket.queue_wait_s)

    @staticmethod
    def _release_slot(placement: Placement, *, prompt_tokens: int, completion_tokens: int) -> None:
        if placement._ticket is not None and placement._scheduler is not None:
            placement._scheduler.release(placement._ticket, input_tokens=prompt_tokens, output_tokens=completion_tokens)
        placement._ticket = None
        placement._scheduler = None

    # --- settlement and leases ------------------------------------------------------------------------

    async def _settle_quotas(self, reservation: Reservation, tokens: int, cost: float) -> None:
        try:
            await self._quotas.settle(reservation, actual_tokens=tokens, actual_cost=cost)
        except QuotaBackendError:
            # Redis is unreachable: the usage is owed, not forgiven. Settling is idempotent and Redis keeps an
            # unsettled reservation for an hour past its lease, so it is retried until it goes through.
            self._owe(_Owed(reservation, tokens, cost, asyncio.get_running_loop().time()))
        except Exception:  # never fail a finished request over this; its leases expire by themselves
            log.warning("could not settle reservation %s", reservation.id, exc_info=True)

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
                            "gave up settling reservation %s after %.0f s: %d tokens and %.6f spend not charged",
                            owed.reservation.id,
                            now - owed.since,
                            owed.tokens,
                            owed.cost,
                        )
                        continue
                    try:
                        await self._quotas.settle(owed.reservation, actual_tokens=owed.tokens, actual_cost=owed.cost)
                    except QuotaBackendError:
                        break
                    except Exception:
                        log.warning("could not settle reservation %s", owed.reservation.id, exc_info=True)
                    self._owed.popleft()
                self._metrics.settlements_owed.set(len(self._owed))
                delay = (
                    OWED_RETRY_S if not self._owed or delay >= OWED_RETRY_MAX_S else min(OWED_RETRY_MAX_S, delay * 2)
                )
        finally:
            self._retry = None
            self._note_idle()

    def _settled_one(self, task: asyncio.Task[None]) -> None:
        self._settling.discard(task)
        self._note_idle()

    def _note_idle(self) -> None:
        if not self._held and not self._settling:
            self._idle.set()

    def _hold(self, placement: Placement) -> None:
        """Keep the leases of `placement` alive until it settles: long requests (streams) renew them, and a
        crashed replica's leases expire by themselves after `lease_ttl_s`."""
        loop = asyncio.get_running_loop()
        placement._renewed_at = loop.time()
        self._held[id(placement)] = placement
        self._idle.clear()
        if placement._reservation is not None and self._sweep is None:
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
            reservation = placement._reservation
            if placement._renewed_at <= due and reservation is not None:
                placement._renewed_at = now
                task = loop.create_task(self._quotas.renew(reservation))
                task.add_done_callback(_log_failure)
        self._sweep = loop.call_later(self._lease_ttl / 6, self._renew_due)

    def snapshot(self) -> dict[str, Any]:
        return {name: s.snapshot() for name, s in self.schedulers.items()}


async def _unless_gone(waiting: Any, receive: Receive) -> Ticket:
    """Wait for a fair-queue slot while watching the client; leave the queue at once if it goes away."""
    task: asyncio.Task[Ticket] = asyncio.ensure_future(waiting)
    watcher = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise
    if task not in done:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise ClientDisconnected
    watcher.cancel()
    return task.result()


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


@dataclass(slots=True, frozen=True)
class _Owed:
    """A settlement that could not reach the shared quota state: what to charge, and since when it is owed."""

    reservation: Reservation
    tokens: int
    cost: float
    since: float


def _log_failure(task: asyncio.Task[bool]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("lease renewal failed: %s", type(task.exception()).__name__)
