"""The seam of admission's shared state: one call admits a request against all its limits and finds it a
place in a backend pool's fair queue; one settles it on completion."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from gateway.admission.limits._types import Decision, Permit, PlaceAsk, PoolStatus, Release, Reservation, Scope

__all__ = ["QuotaStore"]


class QuotaStore(Protocol):
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
        """Check every limit of every scope and, only if all pass, reserve them all at once; with `place`,
        in the same call, take a permit in a backend pool or a place in its fair queue.

        `tokens` is the reservation estimate (prompt estimate + max_tokens), `cost` the worst-case spend.
        Put the tenant's scope first: headers and the settle bookkeeping lean on it. Without scopes (a
        tenant with no quotas) only `place` is decided. `timeout_s` is the longest this call may wait on
        shared state (what is left of the request's allowance): past it, or when it is not positive, the
        store behaves as if the shared state were unreachable. Stores without shared state ignore it.
        """
        ...

    async def settle(
        self,
        reservation: Reservation | None,
        *,
        actual_tokens: int,
        actual_cost: float,
        release: Release | None = None,
    ) -> bool:
        """Release the leases and charge actual usage, and give back the request's permit (`release`); call
        it for completed, failed and cancelled requests.

        Idempotent: True if this call settled the reservation (or, without one, released the permit),
        False if that was done already.
        """
        ...

    async def renew(self, reservation: Reservation | None, permit: Permit | None = None, *, ttl_s: float = 0.0) -> bool:
        """Extend the leases by their TTL (a permit without a reservation by `ttl_s`); False if the lease was
        already settled or lost (expired)."""
        ...

    async def cancel(self, place: PlaceAsk, origin: str = "") -> bool:
        """Take a waiting request out of its queue: True if it was still waiting; False if a permit was
        granted meanwhile (it is delivered to the waiter's grant callback, which must give it back)."""
        ...

    async def set_capacity(self, pool: str, limits: dict[str, int], *, load_factor: float = 1.25) -> PoolStatus:
        """A pool's endpoints and how many requests each may have at once; waiting requests take what frees."""
        ...

    async def close(self) -> None: ...
