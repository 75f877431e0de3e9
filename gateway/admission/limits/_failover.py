"""`FailoverQuotaStore`: what admission does while Redis is down (SPEC 6, `redis_failure_mode`).

    local   each replica enforces its share of every limit (limit / replicas) in process
    open    every request is admitted and nothing is counted
    closed  admission raises `QuotaBackendError` (503)

The first failure flips the store to degraded; after `retry_interval_s` (on the injected clock) one call
probes Redis again, and the first success flips it back. Reservations are settled by the store that
issued them, so requests admitted locally during an outage settle locally after recovery. A settlement
that cannot reach Redis raises `QuotaBackendError`: the caller keeps it and tries again later, so the usage
of a request that ended during an outage is still charged once Redis is back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Literal

from gateway.admission.limits._local import LocalQuotaStore
from gateway.admission.limits._redis import RedisQuotaStore
from gateway.admission.limits._types import Decision, QuotaBackendError, RateHeaders, Reservation, Scope

__all__ = ["FailoverQuotaStore", "FailureMode"]

FailureMode = Literal["local", "open", "closed"]

log = logging.getLogger("gateway.admission.limits")


class FailoverQuotaStore:
    def __init__(
        self,
        primary: RedisQuotaStore,
        fallback: LocalQuotaStore,
        *,
        mode: FailureMode = "local",
        replicas: int = 1,
        retry_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        """`on_change(degraded)` is called on every transition (for a metric); `replicas` >= 1."""
        if replicas < 1:
            raise ValueError("replicas must be at least 1")
        self._primary = primary
        self._fallback = fallback
        self._mode = mode
        self._replicas = replicas
        self._retry_interval_s = retry_interval_s
        self._clock = clock
        self._on_change = on_change
        self._degraded = False
        self._retry_at = 0.0

    @property
    def degraded(self) -> bool:
        return self._degraded

    async def admit(
        self,
        tenant: str,
        scopes: Sequence[Scope],
        *,
        tokens: int,
        cost: float,
        lease_ttl_s: float = 60.0,
        timeout_s: float | None = None,
    ) -> Decision:
        if not self._degraded or self._clock() >= self._retry_at:
            if self._degraded:
                # One probe per interval: concurrent callers keep using the fallback meanwhile.
                self._retry_at = self._clock() + self._retry_interval_s
            try:
                decision = await self._primary.admit(
                    tenant, scopes, tokens=tokens, cost=cost, lease_ttl_s=lease_ttl_s, timeout_s=timeout_s
                )
            except QuotaBackendError as exc:
                self._set_degraded(True, exc)
            else:
                self._set_degraded(False)
                return decision
        if self._mode == "closed":
            raise QuotaBackendError("quota backend unavailable")
        if self._mode == "open":
            reservation = Reservation("open", tenant, tuple(scopes), tokens, cost, lease_ttl_s, backend="open")
            return Decision(allowed=True, reservation=reservation, headers=RateHeaders())
        shares = [Scope(s.name, s.limits.divided(self._replicas)) for s in scopes]
        return await self._fallback.admit(tenant, shares, tokens=tokens, cost=cost, lease_ttl_s=lease_ttl_s)

    async def settle(self, reservation: Reservation, *, actual_tokens: int, actual_cost: float) -> bool:
        if reservation.backend == "open":
            return True
        if reservation.backend == "local":
            return await self._fallback.settle(reservation, actual_tokens=actual_tokens, actual_cost=actual_cost)
        try:
            return await self._primary.settle(reservation, actual_tokens=actual_tokens, actual_cost=actual_cost)
        except QuotaBackendError as exc:
            # The caller keeps it and tries again: a settlement is idempotent, and Redis keeps an unsettled
            # reservation (or its expired lease) long enough to be settled late.
            self._set_degraded(True, exc)
            raise

    async def renew(self, reservation: Reservation) -> bool:
        if reservation.backend == "open":
            return True
        if reservation.backend == "local":
            return await self._fallback.renew(reservation)
        try:
            return await self._primary.renew(reservation)
        except QuotaBackendError as exc:
            self._set_degraded(True, exc)
            return False

    async def close(self) -> None:
        await self._primary.close()
        await self._fallback.close()

    def _set_degraded(self, degraded: bool, exc: BaseException | None = None) -> None:
        if degraded:
            self._retry_at = self._clock() + self._retry_interval_s
        if degraded == self._degraded:
            return
        self._degraded = degraded
        if degraded:
            log.warning(
                "quota backend unavailable (%s); admission runs in %r mode (limits / %d replicas in local mode)",
                exc,
                self._mode,
                self._replicas,
            )
        else:
            log.info("quota backend recovered; admission uses shared limits again")
        if self._on_change is not None:
            self._on_change(degraded)
