"""The admin API's request and response bodies, as pydantic models: what its OpenAPI document says.

What the document says of a field is what the API accepts, so a client (or a fuzzer) built from the document
is never refused for input the document allows. Tenants, keys and quotas themselves are `gateway.tenancy`'s
models (shared with the config file and the store); the models here are the API's own views of them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from typing_extensions import TypedDict

from gateway.tenancy import CACHE_SCOPE, TENANT_ID, AuditEntry, Budget, Quotas, Tenant

__all__ = [
    "ERROR_RESPONSES",
    "AuditPage",
    "ErrorBody",
    "ErrorDetail",
    "KeyCreated",
    "KeyIn",
    "KeyOut",
    "KeyPatch",
    "KeyUsage",
    "RotateIn",
    "TenantIn",
    "TenantPage",
    "TenantPatch",
    "TokenCounts",
    "UsageReport",
    "UsageTotals",
]

_Action = Annotated[str, Field(pattern=r"^(reject|downgrade:.+)$")]


class _OnLimit(TypedDict, total=False):
    """What a refusal of each limit does (tenancy.Tenant checks the same): reject, or serve a smaller
    model; a full queue may also fall back to a later backend of the model."""

    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]

    rpm: _Action
    tpm: _Action
    concurrency: _Action
    inflight_tokens: _Action
    budget: _Action
    queue: Annotated[str, Field(pattern=r"^(reject|fallback|downgrade:.+)$")]


_Pattern = Annotated[str, Field(min_length=1, max_length=200)]
# The default of a PATCH field that cannot be null: absent means unchanged; pydantic never validates a
# default, while a `null` sent in the body is refused (422) like any other wrong type.
_UNSET: Any = None
_Weight = Annotated[float, Field(gt=0, le=1_000_000)]
_Priority = Annotated[int, Field(ge=-100, le=100)]
_Scope = Annotated[str, Field(pattern=CACHE_SCOPE)]
_UserField = Literal["passthrough", "tenant", "strip"]


class TenantIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=TENANT_ID)
    name: str | None = Field(default=None, max_length=200)
    weight: _Weight = 1.0
    priority: _Priority = 0
    models: list[_Pattern] = Field(default_factory=lambda: ["*"])
    limits: Quotas = Quotas()
    budget: Budget | None = None
    cache_scope: _Scope = "tenant"
    allow_client_salt: bool = False
    user_field: _UserField = "passthrough"
    on_limit: _OnLimit = Field(default_factory=lambda: _OnLimit())


class TenantPatch(BaseModel):
    """Partial update: only the fields present change. `null` is accepted (and documented) only where it
    means something: no name, no budget."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, max_length=200)
    weight: _Weight = _UNSET
    priority: _Priority = _UNSET
    models: list[_Pattern] = _UNSET
    limits: Quotas = _UNSET
    budget: Budget | None = None
    cache_scope: _Scope = _UNSET
    allow_client_salt: bool = _UNSET
    user_field: _UserField = _UNSET
    on_limit: _OnLimit = _UNSET


class KeyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, max_length=200)
    models: list[_Pattern] | None = None
    limits: Quotas = Quotas()
    expires_at: float | None = Field(default=None, description="Unix time after which the key stops working.")


class KeyPatch(BaseModel):
    """Partial update. `null` means: no name, the tenant's models, no expiry; `limits` and `disabled`
    cannot be null."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, max_length=200)
    models: list[_Pattern] | None = None
    limits: Quotas = _UNSET
    expires_at: float | None = None
    disabled: bool = _UNSET


class RotateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grace_period_s: float = Field(default=3600, ge=0, le=30 * 86400, description="How long the old key keeps working.")


class KeyOut(BaseModel):
    id: str
    tenant_id: str
    name: str | None
    prefix: str
    created_at: float
    expires_at: float | None
    disabled: bool
    revoked: bool
    models: list[str] | None
    limits: Quotas
    config_managed: bool


class KeyCreated(KeyOut):
    key: str = Field(description="The secret. Shown only in this answer; store it now.")


class TenantPage(BaseModel):
    object: str = "list"
    data: list[Tenant]
    has_more: bool
    next_after: str | None


class TokenCounts(BaseModel):
    prompt: int = 0
    completion: int = 0
    cached: int = 0


class UsageTotals(BaseModel):
    requests: int = 0
    tokens: TokenCounts = TokenCounts()
    spend: dict[str, float] = Field(default_factory=dict, description="Spend per currency.")


class KeyUsage(UsageTotals):
    key_id: str


class UsageReport(UsageTotals):
    tenant: str
    since: float
    until: float
    by_key: list[KeyUsage] = Field(default_factory=list)


class AuditPage(BaseModel):
    object: str = "list"
    data: list[AuditEntry]
    has_more: bool
    next_after: int | None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """Every error of the admin API, in OpenAI's shape (the same as the client API's)."""

    error: ErrorDetail


# Documented on every operation, so the OpenAPI document says what the API really answers.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "Malformed request (unparsable JSON body, two Authorization headers)"},
    401: {"model": ErrorBody, "description": "Missing or wrong admin key"},
    403: {"model": ErrorBody, "description": "A tenant's virtual key"},
    404: {"model": ErrorBody, "description": "No such tenant or key"},
    409: {"model": ErrorBody, "description": "Conflict: exists already, config-managed, or revoked"},
    422: {"model": ErrorBody, "description": "Invalid field; `param` names it"},
}
