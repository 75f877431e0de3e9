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
    "BudgetPatch",
    "ErrorBody",
    "ErrorDetail",
    "KeyCreated",
    "KeyIn",
    "KeyOut",
    "KeyPatch",
    "KeyUsage",
    "OnLimit",
    "OnLimitPatch",
    "RotateIn",
    "TenantIn",
    "TenantPage",
    "TenantPatch",
    "TokenCounts",
    "UsageReport",
    "UsageTotals",
]

_Action = Annotated[str, Field(pattern=r"^(reject|downgrade:.+)$")]
_QueueAction = Annotated[str, Field(pattern=r"^(reject|fallback|downgrade:.+)$")]


class OnLimit(TypedDict, total=False):
    """What a refusal of each limit does: `reject` (429, the default), or `downgrade:<model>` (serve a
    smaller model); a full queue may also `fallback` to a later backend of the model."""

    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]

    rpm: _Action
    tpm: _Action
    concurrency: _Action
    inflight_tokens: _Action
    budget: _Action
    queue: _QueueAction


class OnLimitPatch(TypedDict, total=False):
    """Changes to `on_limit`: a limit left out keeps its action, `null` sets it back to `reject`."""

    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]

    rpm: _Action | None
    tpm: _Action | None
    concurrency: _Action | None
    inflight_tokens: _Action | None
    budget: _Action | None
    queue: _QueueAction | None


_Pattern = Annotated[str, Field(min_length=1, max_length=200)]
_Weight = Annotated[float, Field(gt=0, le=1_000_000)]
_Priority = Annotated[int, Field(ge=-100, le=100)]
_Scope = Annotated[str, Field(pattern=CACHE_SCOPE)]
_UserField = Literal["passthrough", "tenant", "strip"]
_Period = Literal["day", "week", "month"]
# The default of a PATCH field that cannot be null: pydantic never validates a default, and only the
# members a request sent are merged, so it is never used.
_ABSENT: Any = None
# The PATCH bodies are JSON merge patches (see gateway/admin/patch.py): a field left out is unchanged and
# `null` removes it (back to its default), so a field may be null wherever it has a default, and none is
# required. Their
# defaults are never stored: only the members a request sent are merged.


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
    on_limit: OnLimit = Field(default_factory=lambda: OnLimit())


class BudgetPatch(BaseModel):
    """Changes to the budget. `amount` cannot be null: send `"budget": null` to remove the budget."""

    model_config = ConfigDict(extra="forbid")

    amount: float = Field(default=_ABSENT, ge=0)
    period: _Period | None = None


class TenantPatch(BaseModel):
    """A JSON merge patch (RFC 7396) of a tenant: a field left out is unchanged; `null` removes it, back to
    its default (no name, weight 1, priority 0, every model, no limit, no budget, cache scope `tenant`);
    `limits`, `budget` and `on_limit` merge member by member (`{"limits": {"rpm": 60}}` changes rpm
    only, `{"limits": {"tpm": null}}` removes the tpm limit); `models` is replaced whole. A budget change
    without `amount` needs a budget to change (409 otherwise)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, max_length=200)
    weight: _Weight | None = None
    priority: _Priority | None = None
    models: list[_Pattern] | None = None
    limits: Quotas | None = None
    budget: BudgetPatch | None = None
    cache_scope: _Scope | None = None
    allow_client_salt: bool | None = None
    user_field: _UserField | None = None
    on_limit: OnLimitPatch | None = None


class KeyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, max_length=200)
    models: list[_Pattern] | None = None
    limits: Quotas = Quotas()
    expires_at: float | None = Field(default=None, description="Unix time after which the key stops working.")


class KeyPatch(BaseModel):
    """A JSON merge patch (RFC 7396) of a key: a field left out is unchanged; `null` removes it, back to
    its default (no name, the tenant's models, no limit, no expiry, enabled); `limits` merges member by
    member; `models` is replaced whole."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, max_length=200)
    models: list[_Pattern] | None = None
    limits: Quotas | None = None
    expires_at: float | None = Field(default=None, description="Unix time after which the key stops working.")
    disabled: bool | None = None


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
    409: {
        "model": ErrorBody,
        "description": "Conflict: exists already, config-managed, revoked, or a budget change with no budget to change",
    },
    422: {"model": ErrorBody, "description": "Invalid field; `param` names it"},
}
