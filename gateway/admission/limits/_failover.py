"""`FailoverQuotaStore`: what admission does while Redis is down (`redis_failure_mode`).

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

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Literal

from gateway.admission.limits._local import LocalQuotaStore
from gateway.admission.limits._redis import RedisQuotaStore
from gateway.admission.limits._types import (
    Decision,
    Permit,
    PlaceAsk,
    PoolStatus,
    QuotaBackendError,
    RateHeaders,
    Release,
    Reservation,
    Scope,
)

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

    @property
    def primary(self) -> RedisQuotaStore:
        return self._primary

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
        if not self._degraded or self._clock() >= self._retry_at:
            if self._degraded:
                # One probe per interval: concurrent callers keep using the fallback meanwhile.
                self._retry_at = self._clock() + self._retry_interval_s
            try:
                decision = await self._primary.admit(
                    tenant,
                    scopes,
                    tokens=tokens,
                    cost=cost,
                    lease_ttl_s=lease_ttl_s,
                    timeout_s=timeout_s,
                    place=place,
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
            if place is None:
                return Decision(allowed=True, reservation=reservation, headers=RateHeaders())
            # No limits, but the engines' capacity still holds: this replica's share of it, in process.
            placed = await self._fallback.admit(tenant, (), tokens=tokens, cost=cost, place=place)
            return dataclasses.replace(placed, reservation=reservation if placed.allowed else None)
        shares = [Scope(s.name, s.limits.divided(self._replicas)) for s in scopes]
        return await self._fallback.admit(
            tenant, shares, tokens=tokens, cost=cost, lease_ttl_s=lease_ttl_s, place=place
        )

    async def settle(
        self,
        reservation: Reservation | None,
        *,
        actual_tokens: int,
        actual_cost: float,
        release: Release | None = None,
    ) -> bool:
        if reservation is not None and reservation.backend == "open":
            reservation = None
        where = reservation.backend if reservation is not None else None
        permit_where = release.permit.origin if release is not None else None
        if where is not None and permit_where is not None and where != permit_where:
            # Admitted by one store, placed by the other (Redis went away or came back in between).
            settled = await self.settle(reservation, actual_tokens=actual_tokens, actual_cost=actual_cost)
            await self.settle(None, actual_tokens=actual_tokens, actual_cost=actual_cost, release=release)
            return settled
        store = where or permit_where
        if store is None:
            return True
        if store == "local":
            return await self._fallback.settle(
                reservation, actual_tokens=actual_tokens, actual_cost=actual_cost, release=release
            )
        try:
            return await self._primary.settle(
                reservation, actual_tokens=actual_tokens, actual_cost=actual_cost, release=release
            )
        except QuotaBackendError as exc:
            self._set_degraded(True, exc)
            raise

    async def renew(self, reservation: Reservation | None, permit: Permit | None = None, *, ttl_s: float = 0.0) -> bool:
        if reservation is not None and reservation.backend == "open":
            reservation = None
        renewed = True
        for store, lease, held in (
            (reservation.backend if reservation is not None else None, reservation, None),
            (permit.origin if permit is not None else None, None, permit),
        ):
            if store is None:
                continue
            ttl = reservation.lease_ttl_s if reservation is not None else ttl_s
            try:
                target = self._fallback if store == "local" else self._primary
                renewed = await target.renew(lease, held, ttl_s=ttl) and renewed
            except QuotaBackendError as exc:
                self._set_degraded(True, exc)
                renewed = False
        return renewed

    async def cancel(self, place: PlaceAsk, origin: str = "") -> bool:
        if origin == "local":
            return await self._fallback.cancel(place)
        try:
            return await self._primary.cancel(place)
        except QuotaBackendError as exc:
            # Redis is gone with its queue: the request no longer waits there.
            self._set_degraded(True, exc)
            return True

    async def lead(self, pool: str, ttl_s: float) -> bool:
        """Whether this replica runs the pool's capacity control; never while Redis is away."""
        if self._degraded:
            return False
        try:
            return await self._primary.lead(pool, ttl_s)
        except QuotaBackendError as exc:
            self._set_degraded(True, exc)
            return False

    async def set_capacity(
        self, pool: str, limits: dict[str, int], *, load_factor: float = 1.25, shared: bool = True
    ) -> PoolStatus:
        """This replica's share of the pool (used while Redis is down), and, when `shared` (this replica runs
        the pool's capacity control), the pool's limits in Redis for every replica."""
        share = {endpoint: max(1, limit // self._replicas) if limit else 0 for endpoint, limit in limits.items()}
        status = await self._fallback.set_capacity(pool, share, load_factor=load_factor)
        if self._degraded:
            return status
        try:
            # A replica that does not run the pool's control still reports the shared queue, not its idle share.
            return await self._primary.set_capacity(pool, limits, load_factor=load_factor, write=shared)
        except QuotaBackendError as exc:
            self._set_degraded(True, exc)
            return status

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
