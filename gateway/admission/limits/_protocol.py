"""The quota seam: one call admits a request against all its limits, one settles it on completion."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from gateway.admission.limits._types import Decision, Reservation, Scope

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
    ) -> Decision:
        """Check every limit of every scope and, only if all pass, reserve them all at once.

        `tokens` is the reservation estimate (prompt estimate + max_tokens), `cost` the worst-case spend.
        Put the tenant's scope first: headers and the settle bookkeeping lean on it. `timeout_s` is the
        longest this call may wait on shared state (what is left of the request's allowance): past it, or
        when it is not positive, the store behaves as if the shared state were unreachable. Stores without
        shared state ignore it.
        """
        ...

    async def settle(self, reservation: Reservation, *, actual_tokens: int, actual_cost: float) -> bool:
        """Release the leases and charge actual usage; call it for completed, failed and cancelled requests.

        Idempotent: True if this call settled the reservation, False if it was settled already.
        """
        ...

    async def renew(self, reservation: Reservation) -> bool:
        """Extend the leases by their TTL; False if the lease was already settled or lost (expired)."""
        ...

    async def close(self) -> None: ...
