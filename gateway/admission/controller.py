"""Admission: may this request go to a backend now, and what does it hold while it runs.

Checks run cheapest first (SPEC section 6): budget, rate buckets (rpm, tpm) and concurrency caps in one
atomic call to the quota store (`gateway.admission.limits`), then the fair queue for the chosen backend's capacity
(`gateway.admission.fairqueue`). The answer is a plain value, `Admitted`, that the request path hands back to
`finish` whatever happens (completion, error, cancellation), so leases, reserved tokens, budget and the
queue slot are always settled.

Token estimates: the prompt from the text the model reads (`gateway.admission.tokens`: bytes / 4, or cl100k_base),
the completion from `max_tokens` or `limits.default_max_tokens`; both are corrected with the backend's
real usage on completion.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass, field
from typing import Any

from gateway.admission.fairqueue import Job, QueueFull, QueueTimeout, Scheduler, Ticket
from gateway.admission.limits import Decision, QuotaLimits, QuotaStore, RateHeaders, Reservation, Scope
from gateway.admission.tokens import ByteCounter, TokenCounter, prompt_tokens
from gateway.config import ModelConfig, Settings
from gateway.errors import QuotaExceededError, RateLimitError
from gateway.telemetry.metrics import Metrics
from gateway.tenancy import Principal, Quotas

__all__ = ["Admission", "Admitted", "format_reset", "rate_headers"]

log = logging.getLogger("gateway.admission")

_LIMIT_WORDS = {
    "rpm": "requests per minute (rpm)",
    "tpm": "tokens per minute (tpm)",
    "concurrency": "concurrent requests (max_concurrency)",
    "inflight_tokens": "tokens in flight (max_inflight_tokens)",
}


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


@dataclass(slots=True)
class Admitted:
    """What one admitted request holds until `Admission.finish`."""

    reservation: Reservation | None
    headers: list[tuple[bytes, bytes]]
    prompt_estimate: int
    output_estimate: int
    ticket: Ticket | None = None
    scheduler: Scheduler | None = None
    # When its leases were taken or last renewed (loop time).
    renewed_at: float = 0.0
    finished: bool = field(default=False)


class Admission:
    def __init__(
        self,
        settings: Settings,
        quotas: QuotaStore,
        metrics: Metrics,
        workers: int = 1,
        tokens: TokenCounter | None = None,
    ) -> None:
        self._settings = settings
        self._tokens = tokens or ByteCounter()
        self._quotas = quotas
        self._metrics = metrics
        self._lease_ttl = settings.lease_ttl_s
        # Admitted requests holding leases, renewed by one sweep for all (a timer per request would cost
        # about 2.5 us to arm and cancel, on every request, for the few that outlive a third of the TTL).
        self._held: dict[int, Admitted] = {}
        self._sweep: asyncio.TimerHandle | None = None
        # Quota scopes per key, with the principal they were built for: principals are cached by the
        # authenticator and immutable, so scopes are built once per principal rather than per request. Keyed
        # by key id, not by principal: the authenticator makes a new principal for a key every time its cache
        # entry refreshes (every auth_cache_ttl_s), and one entry per principal kept every stale one alive
        # (about 6 KB each, 0.17 MB/min with two busy keys in the soak run) until the map filled up.
        self._scopes: dict[str, tuple[Principal, list[Scope] | None]] = {}
        # The fair queue is per replica (per worker process): each gets its share of every backend.
        self.schedulers = {b.name: Scheduler(max(1, b.capacity // max(1, workers))) for b in settings.backends}

    def update_backends(self, settings: Settings, workers: int = 1) -> None:
        """On reload: keep the queues of known backends (their in-flight requests), resize, add new ones."""
        schedulers = {}
        for b in settings.backends:
            capacity = max(1, b.capacity // max(1, workers))
            scheduler = self.schedulers.get(b.name) or Scheduler(capacity)
            if scheduler.capacity != capacity:
                scheduler.set_capacity(capacity)
            schedulers[b.name] = scheduler
        self.schedulers = schedulers
        self._settings = settings

    def estimate(self, endpoint: str, body: dict[str, Any], max_tokens: int | None) -> tuple[int, int]:
        prompt = prompt_tokens(endpoint, body, self._tokens)
        output = max_tokens if max_tokens is not None else self._settings.limits.default_max_tokens
        return prompt, output

    async def admit(
        self, principal: Principal, model: ModelConfig, prompt_estimate: int, output_estimate: int, worst_cost: float
    ) -> Admitted:
        """Budget, rpm, tpm and concurrency, atomically; raises a 429 error on refusal."""
        scopes = self._scopes_of(principal)
        if scopes is None:
            return Admitted(None, [], prompt_estimate, output_estimate)
        tenant = principal.tenant
        decision = await self._quotas.admit(
            tenant.id, scopes, tokens=prompt_estimate + output_estimate, cost=worst_cost, lease_ttl_s=self._lease_ttl
        )
        headers = rate_headers(decision.headers)
        if not decision.allowed:
            error = self._refusal(principal, decision, headers)
            error.reason = decision.limit
            raise error
        admitted = Admitted(decision.reservation, headers, prompt_estimate, output_estimate)
        self._hold(admitted)
        return admitted

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

    def has_free_slot(self, backend: str) -> bool:
        scheduler = self.schedulers[backend]
        return scheduler.total_in_flight < scheduler.capacity

    async def queue(self, admitted: Admitted, principal: Principal, backend: str, model: str) -> None:
        """Wait for a slot of the backend's capacity in the fair queue (returns at once when one is free)."""
        scheduler = self.schedulers[backend]
        tenant = principal.tenant
        job = Job(tenant.id, tenant.weight, tenant.priority, admitted.prompt_estimate, admitted.output_estimate)
        limits = tenant.limits
        label = self._metrics.tenant_label(tenant.id)
        waiting = scheduler.total_in_flight >= scheduler.capacity
        if waiting:
            self._metrics.queued.labels(label).inc()
        try:
            admitted.ticket = await scheduler.acquire(
                job,
                max_wait_s=None if limits.max_queue_wait_ms is None else limits.max_queue_wait_ms / 1000,
                max_queue_depth=limits.max_queue_depth,
            )
        except (QueueFull, QueueTimeout) as exc:
            reason = "queue_full" if isinstance(exc, QueueFull) else "queue_timeout"
            self._metrics.rejections.labels(label, reason).inc()
            what = (
                "Your tenant's queue for this model is full"
                if isinstance(exc, QueueFull)
                else "Your request waited in your tenant's queue for this model longer than its maximum wait"
            )
            error = RateLimitError(
                f"{what}. Please try again in {format_reset(exc.retry_after_s)}.",
                headers={**{k.decode(): v.decode() for k, v in admitted.headers}, **_retry_headers(exc.retry_after_s)},
            )
            error.reason = reason
            raise error from None
        finally:
            if waiting:
                self._metrics.queued.labels(label).dec()
        admitted.scheduler = scheduler
        self._metrics.child(self._metrics.queue_wait, label, model).observe(admitted.ticket.queue_wait_s)

    def release_slot(self, admitted: Admitted) -> None:
        """Give back the backend slot alone (the request moves to another backend; its quotas stay held).

        The fair queue's charge is refunded: the backend did no work for it.
        """
        if admitted.ticket is not None and admitted.scheduler is not None:
            admitted.scheduler.release(admitted.ticket, input_tokens=0, output_tokens=0)
        admitted.ticket = None
        admitted.scheduler = None

    async def finish(self, admitted: Admitted, prompt_tokens: int, completion_tokens: int, cost: float) -> None:
        """Release everything the request held and charge what it really used. Safe to call twice."""
        if admitted.finished:
            return
        admitted.finished = True
        self._held.pop(id(admitted), None)
        if admitted.ticket is not None and admitted.scheduler is not None:
            admitted.scheduler.release(admitted.ticket, input_tokens=prompt_tokens, output_tokens=completion_tokens)
        if admitted.reservation is not None:
            try:
                await self._quotas.settle(
                    admitted.reservation, actual_tokens=prompt_tokens + completion_tokens, actual_cost=cost
                )
            except Exception:  # the leases expire by themselves; never fail a finished request over this
                log.warning("could not settle reservation %s", admitted.reservation.id, exc_info=True)

    def _hold(self, admitted: Admitted) -> None:
        """Keep the leases of `admitted` alive until it finishes: long requests (streams) renew them, and a
        crashed replica's leases expire by themselves after `lease_ttl_s`."""
        if admitted.reservation is None:
            return
        loop = asyncio.get_running_loop()
        admitted.renewed_at = loop.time()
        self._held[id(admitted)] = admitted
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
        for admitted in self._held.values():
            if admitted.renewed_at <= due and admitted.reservation is not None:
                admitted.renewed_at = now
                task = loop.create_task(self._quotas.renew(admitted.reservation))
                task.add_done_callback(_ignore_result)
        self._sweep = loop.call_later(self._lease_ttl / 6, self._renew_due)


def _ignore_result(task: asyncio.Task[bool]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("lease renewal failed: %s", type(task.exception()).__name__)
