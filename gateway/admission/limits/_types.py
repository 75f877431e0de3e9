"""The values that cross the quota seam: limits in, a decision and a reservation out.

The values made for every request (a reservation, a decision, a place in the fair queue, a permit and its
release) are plain slotted dataclasses, treated as immutable by convention: a frozen dataclass sets each
field through `object.__setattr__`, which makes it about 7 times dearer to create (1.0 against 0.15 us for
ten fields on Python 3.11), and the request path makes seven of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from gateway.errors import ServiceUnavailableError

__all__ = [
    "Decision",
    "LimitName",
    "Period",
    "Permit",
    "PlaceAsk",
    "PoolAsk",
    "PoolStatus",
    "QuotaBackendError",
    "QuotaLimits",
    "RateHeaders",
    "Release",
    "Reservation",
    "Scope",
]

Period = Literal["day", "week", "month"]
LimitName = Literal["rpm", "tpm", "concurrency", "inflight_tokens", "budget", "queue_full"]
Place = Literal["", "granted", "queued", "full"]


class QuotaBackendError(ServiceUnavailableError):
    """The shared quota state (Redis) could not be reached or answered with an error.

    Raised fast (no retries here); `FailoverQuotaStore` turns it into the configured failure mode.
    """

    code = "quota_backend_unavailable"


@dataclass(frozen=True, slots=True)
class QuotaLimits:
    """The limits of one scope; None means unlimited."""

    rpm: int | None = None
    tpm: int | None = None
    max_concurrency: int | None = None
    max_inflight_tokens: int | None = None
    budget_amount: float | None = None
    budget_period: Period = "month"

    def __post_init__(self) -> None:
        for name in ("rpm", "tpm", "max_concurrency", "max_inflight_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 (None means unlimited)")
        if self.budget_amount is not None and not (math.isfinite(self.budget_amount) and self.budget_amount >= 0):
            raise ValueError("budget_amount must be a non-negative number")
        if self.budget_period not in ("day", "week", "month"):
            raise ValueError("budget_period must be day, week or month")

    def divided(self, replicas: int) -> QuotaLimits:
        """This replica's share when each of `replicas` enforces limits on its own (Redis down)."""
        if replicas <= 1:
            return self

        def share(value: int | None) -> int | None:
            return None if value is None else max(1, value // replicas)

        return QuotaLimits(
            rpm=share(self.rpm),
            tpm=share(self.tpm),
            max_concurrency=share(self.max_concurrency),
            max_inflight_tokens=share(self.max_inflight_tokens),
            budget_amount=None if self.budget_amount is None else self.budget_amount / replicas,
            budget_period=self.budget_period,
        )


@dataclass(frozen=True, slots=True)
class Scope:
    """One set of limits a request counts against, e.g. `Scope("tenant:acme", ...)`, `Scope("key:k_1", ...)`.

    The name is unique within the tenant; the tenant id (the Redis hash tag) is passed separately.
    """

    name: str
    limits: QuotaLimits


@dataclass(slots=True)
class Reservation:
    """What an admitted request holds until it is settled: its leases, reserved tokens and cost."""

    id: str
    tenant: str
    scopes: tuple[Scope, ...]
    tokens: int
    cost: float
    lease_ttl_s: float
    # Which store issued it ("redis", "local", or "open" for fail-open admissions that hold nothing),
    # so `FailoverQuotaStore` settles it where it was made.
    backend: str

    @property
    def member(self) -> str:
        """The lease's name in every scope: it carries its own weights (see lua/admit.lua)."""
        return f"{self.id}|{self.tokens}|{self.cost!r}"


@dataclass(slots=True)
class RateHeaders:
    """What the `x-ratelimit-*` headers need; per dimension, from the most constraining scope.

    Remaining counts whole units left after this admission; reset is seconds until the bucket is full.
    None where no scope limits that dimension.
    """

    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests_s: float | None = None
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens_s: float | None = None


@dataclass(slots=True)
class PoolAsk:
    """A backend pool a request may run in, with the endpoints that may serve it there, in its order of
    preference (with no preference, the least loaded of them serves).

    `key` names the request's prefix within its cache scope (a short hex string; empty when the prompt is
    too short to have one): the pool keeps each key on one endpoint while it is used, and forgets it after
    `key_ttl_s` without a request.
    """

    pool: str
    ranking: tuple[str, ...] = ()
    key: str = ""
    key_ttl_s: float = 300.0

    def routing(self) -> str:
        """The ranking as the fair-queue script reads it: led by "#<key>@<key TTL>" when there is a key."""
        endpoints = ",".join(self.ranking)
        if not self.key:
            return endpoints
        return f"#{self.key}@{float(self.key_ttl_s)!r},{endpoints}"


@dataclass(slots=True)
class PlaceAsk:
    """What a request asks of the backends' fair queues, in the same call as its quotas.

    `waiter` is unique per request and names its place in a queue and its permit. `cost` is the VTC charge
    estimated at dispatch (input + 2 x output tokens, before the weight). The request takes a permit of the
    first pool if one is free and nobody waits there, or (with `spill`) of a later pool; otherwise it waits
    in the first pool's queue, unless the tenant already has `max_queue_depth` requests waiting there.
    """

    waiter: str
    tenant: str
    weight: float
    band: int
    cost: float
    pools: tuple[PoolAsk, ...]
    lease_ttl_s: float
    spill: bool = False
    max_queue_depth: int | None = None
    # Bounded load: an endpoint of the ranking is passed over once it holds more than this times the
    # pool's mean; 0 means no preference (each pool's `ranking` is then just the endpoints that may serve).
    load_factor: float = 1.25

    def entry(self, replica: str) -> str:
        """The request's entry in its first pool's queue, as the fair-queue script stores it."""
        first = self.pools[0]
        return "|".join(
            (
                self.waiter,
                replica,
                self.tenant,
                repr(float(self.weight)),
                str(self.band),
                repr(float(self.cost)),
                repr(float(self.lease_ttl_s)),
                repr(float(self.load_factor)),
                first.routing(),
            )
        )


@dataclass(slots=True)
class Permit:
    """A request's place at one endpoint of a backend pool, held until released (or its lease expires)."""

    pool: str
    endpoint: str
    waiter: str
    # Which store granted it ("redis" or "local"), so it is given back there.
    origin: str = "local"

    @property
    def member(self) -> str:
        return f"{self.waiter}|{self.endpoint}"


@dataclass(slots=True)
class Release:
    """A permit given back: its tenant's counter is corrected from `estimate` to `actual` (VTC units)."""

    permit: Permit
    tenant: str
    weight: float
    band: int
    estimate: float
    actual: float
    load_factor: float = 1.25


@dataclass(frozen=True, slots=True)
class PoolStatus:
    """A pool's fair queue as the capacity control sees it."""

    limit: int
    held: int
    waiting_tenants: int
    held_by_endpoint: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class Decision:
    """The answer to one admission.

    On refusal, `limit` and `scope` name the limit that refused (see lua/admit.lua for which one is
    reported when several do) and `retry_after_s` is the longest wait among all that refused:
    exact for buckets, the end of the period for a spent budget, and for in-flight limits a hint of
    at most 1 s (the earliest lease expiry when sooner), since slots free when requests finish.
    `exceeds_limit` means the request alone is larger than a limit: retrying cannot help.
    """

    allowed: bool
    reservation: Reservation | None
    headers: RateHeaders
    limit: LimitName | None = None
    scope: str | None = None
    retry_after_s: float = 0.0
    exceeds_limit: bool = False
    # The fair queue's answer when a place was asked: "granted" (`permit`), "queued" (in the first pool:
    # `ahead` of it from its own tenant, `backlog` tenants waiting in its band), "full" (refused).
    place: Place = ""
    permit: Permit | None = None
    ahead: int = 0
    backlog: int = 0
    # Which store decided ("redis" or "local"): a queued request is cancelled there.
    origin: str = "local"


def check_request(
    tenant: str,
    scopes: tuple[Scope, ...],
    tokens: int,
    cost: float,
    lease_ttl_s: float,
    *,
    allow_no_scopes: bool = False,
) -> None:
    """Reject programming errors before they reach shared state."""
    if not tenant or "{" in tenant or "}" in tenant:
        raise ValueError(f"tenant id {tenant!r} cannot be a Redis hash tag")
    if not scopes and not allow_no_scopes:
        raise ValueError("at least one scope is required")
    if len({s.name for s in scopes}) != len(scopes):
        raise ValueError("scope names must be unique")
    if tokens < 0 or not (math.isfinite(cost) and cost >= 0):
        raise ValueError("tokens and cost must be non-negative")
    if not (math.isfinite(lease_ttl_s) and lease_ttl_s > 0):
        raise ValueError("lease_ttl_s must be positive")


def check_usage(actual_tokens: int, actual_cost: float) -> None:
    if actual_tokens < 0 or not (math.isfinite(actual_cost) and actual_cost >= 0):
        raise ValueError("actual usage must be non-negative")
