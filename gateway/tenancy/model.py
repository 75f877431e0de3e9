"""Tenants and virtual keys as values: what a tenant may do, and the principal a request runs as.

These models are shared by the config file, the admin API and the store, so a tenant declared in YAML and
one created over HTTP are validated by the same rules.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "AuditEntry",
    "Budget",
    "KeyRecord",
    "Principal",
    "Quotas",
    "Tenant",
    "UsageRow",
    "model_allowed",
]

CACHE_SCOPE = r"^(tenant|global|key|group:[A-Za-z0-9][A-Za-z0-9_.-]{0,63})$"
_SCOPE = re.compile(CACHE_SCOPE)
TENANT_ID = r"^[a-z0-9][a-z0-9_-]{0,62}$"
_LIMITS = {"rpm", "tpm", "concurrency", "inflight_tokens", "budget", "queue"}


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Quotas(_Frozen):
    """Limits of a tenant or of one key (a key's limits can only narrow its tenant's)."""

    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    max_concurrency: int | None = Field(default=None, ge=1)
    max_inflight_tokens: int | None = Field(default=None, ge=1)
    max_queue_wait_ms: int | None = Field(default=None, ge=0)
    max_queue_depth: int | None = Field(default=None, ge=0)


class Budget(_Frozen):
    amount: float = Field(ge=0)
    period: Literal["day", "week", "month"] = "month"


class Tenant(_Frozen):
    id: str = Field(pattern=TENANT_ID)
    name: str | None = Field(default=None, max_length=200)
    weight: float = Field(default=1.0, gt=0, le=1_000_000)
    priority: int = Field(default=0, ge=-100, le=100)
    models: tuple[str, ...] = ("*",)
    limits: Quotas = Quotas()
    budget: Budget | None = None
    # Who shares a prefix cache: tenant (alone) | group:<name> | global (everyone, no salt) | key (each key alone)
    cache_scope: str = "tenant"
    # A client's own cache_salt splits the tenant's scope instead of being dropped.
    allow_client_salt: bool = False
    # What happens to the OpenAI `user` field: forwarded, replaced by the tenant id, or removed.
    user_field: Literal["passthrough", "tenant", "strip"] = "passthrough"
    # Per limit, what a refusal does: "reject" (429, the default) or "downgrade:<model>" (serve a smaller
    # model instead). Keys: rpm, tpm, concurrency, inflight_tokens, budget, queue. `queue` may also be
    # "fallback": rather than wait for the model's first backend, go to a later one with a free slot.
    on_limit: dict[str, str] = Field(default_factory=dict)
    config_managed: bool = False

    @field_validator("on_limit")
    @classmethod
    def _on_limit(cls, value: dict[str, str]) -> dict[str, str]:
        for limit, action in value.items():
            if limit not in _LIMITS:
                raise ValueError(f"unknown limit {limit!r}; one of {', '.join(sorted(_LIMITS))}")
            if limit == "queue" and action == "fallback":
                continue
            if action != "reject" and not (action.startswith("downgrade:") and len(action) > len("downgrade:")):
                also = ", 'fallback'" if limit == "queue" else ""
                raise ValueError(f"{limit}: must be 'reject'{also} or 'downgrade:<model>'")
        return value

    @field_validator("cache_scope")
    @classmethod
    def _scope(cls, value: str) -> str:
        if not _SCOPE.match(value):
            raise ValueError("must be 'tenant', 'global', 'key' or 'group:<name>'")
        return value

    @field_validator("models")
    @classmethod
    def _models(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in value:
            if not pattern or len(pattern) > 200:
                raise ValueError("model patterns must be 1-200 characters")
        return value


class KeyRecord(_Frozen):
    """A virtual key as stored: only the SHA-256 of the secret, never the secret."""

    id: str
    tenant_id: str
    name: str | None = None
    secret_hash: str
    prefix: str
    created_at: float
    expires_at: float | None = None
    disabled: bool = False
    revoked: bool = False
    models: tuple[str, ...] | None = None
    limits: Quotas = Quotas()
    config_managed: bool = False


class AuditEntry(_Frozen):
    """One admin change: who, what, when. `details` never holds a secret (key prefixes and ids only)."""

    seq: int = 0
    time: float
    actor: str
    action: str
    target: str
    details: dict[str, object] = Field(default_factory=dict)


class UsageRow(_Frozen):
    """Totals of one tenant's key for one hour (UTC, as a Unix time) in one currency."""

    tenant: str
    key_id: str
    hour: int
    currency: str = "USD"
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    spend: float = 0.0


def model_allowed(patterns: tuple[str, ...], model: str) -> bool:
    return any(p == "*" or p == model or fnmatch.fnmatchcase(model, p) for p in patterns)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request runs as, resolved once from its key and cached."""

    tenant: Tenant
    key: KeyRecord
    _allowed: dict[str, bool] = field(default_factory=dict, compare=False, repr=False)

    @property
    def tenant_id(self) -> str:
        return self.tenant.id

    def may_use(self, model: str) -> bool:
        allowed = self._allowed.get(model)
        if allowed is None:
            allowed = model_allowed(self.tenant.models, model) and (
                self.key.models is None or model_allowed(self.key.models, model)
            )
            if len(self._allowed) < 256:  # a memo (principals are cached and immutable), bounded
                self._allowed[model] = allowed
        return allowed

    def cache_scope(self) -> str | None:
        """The prefix-cache scope string, or None for the trusted global tier (no salt)."""
        scope = self.tenant.cache_scope
        if scope == "global":
            return None
        if scope == "tenant":
            return f"tenant:{self.tenant.id}"
        if scope == "key":
            return f"key:{self.key.id}"
        return scope  # group:<name>
