"""The admin REST API (SPEC section 7), a FastAPI app mounted under `/admin`.

Authenticated with the admin key; a tenant's virtual key gets 403, anything else 401. Errors use the same
OpenAI-shaped body as the client API; validation errors are 422 and `param` names the field. Every change
is written to the audit log. Objects declared in the config file are config-managed: the API shows them
(`config_managed: true`) and refuses to change them with 409 `config_managed`, so the file stays the one
source of truth for them (GitOps); reads, key creation under them and usage still work.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from typing_extensions import TypedDict

from gateway.admin.stats import LiveStats, StatsReport
from gateway.auth import Authenticator, authorization_header, bearer_token, secret_matches
from gateway.auth.keys import generate_key, hash_key, new_key_id
from gateway.billing.ledger import UsageLedger
from gateway.config import Settings
from gateway.errors import (
    AuthenticationError,
    ConflictError,
    GatewayError,
    NotFoundError,
    PermissionDeniedError,
    UnprocessableError,
)
from gateway.telemetry.metrics import Metrics
from gateway.tenancy import CACHE_SCOPE, TENANT_ID, AuditEntry, Budget, KeyRecord, Quotas, Tenant, UsageRow
from gateway.tenancy.store import Store

__all__ = ["AdminContext", "create_admin_app"]

_Managed = TypeVar("_Managed", Tenant, KeyRecord)
# Documentation only (auto_error=False: it never refuses anything itself); `require_admin` decides.
_BEARER = HTTPBearer(auto_error=False, description="The admin key: `Authorization: Bearer <GATEWAY_ADMIN_KEY>`")


@dataclass(frozen=True)
class AdminContext:
    settings: Settings
    store: Store
    authenticator: Authenticator
    metrics: Metrics
    ledger: UsageLedger
    stats: LiveStats


# What the OpenAPI document says of these fields is what the API accepts, so a client (or a fuzzer) built
# from the document is never refused for input the document allows. In the PATCH bodies, a field that
# cannot be null has no null in its type (absent means unchanged; the default is never validated).
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
# Offsets and times the store's integer columns can hold.
_MAX_INT64 = 2**63 - 1


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


_SINCE = "Unix time or ISO 8601 date-time (UTC unless it says otherwise); default 30 days before until"
_UNTIL = "Unix time or ISO 8601 date-time (UTC unless it says otherwise); default now"


def _timestamp(value: dt.datetime) -> float:
    return (value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)).timestamp()


def _time_range(since: dt.datetime | None, until: dt.datetime | None) -> tuple[float, float]:
    """The usage query's range as Unix times. The parameters are parsed as datetimes (pydantic also takes
    a Unix time), so only instants between the years 1 and 9999 get here: `1e308` or `inf` is refused with
    422 instead of overflowing the store's query. A range whose until is before its since selects nothing."""
    end = time.time() if until is None else _timestamp(until)
    start = end - 30 * 86400 if since is None else _timestamp(since)
    return start, end


def _report(tenant: str, since: float, until: float, rows: list[UsageRow]) -> UsageReport:
    report = UsageReport(tenant=tenant, since=since, until=until)
    keys: dict[str, KeyUsage] = {}
    for row in rows:
        for totals in (report, keys.setdefault(row.key_id, KeyUsage(key_id=row.key_id))):
            totals.requests += row.requests
            totals.tokens.prompt += row.prompt_tokens
            totals.tokens.completion += row.completion_tokens
            totals.tokens.cached += row.cached_tokens
            totals.spend[row.currency] = round(totals.spend.get(row.currency, 0.0) + row.spend, 10)
    report.by_key = sorted(keys.values(), key=lambda k: k.key_id)
    return report


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """Every error of the admin API, in OpenAI's shape (the same as the client API's)."""

    error: ErrorDetail


# Documented on every operation, so the OpenAPI document says what the API really answers.
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "Malformed request (unparsable JSON body, two Authorization headers)"},
    401: {"model": ErrorBody, "description": "Missing or wrong admin key"},
    403: {"model": ErrorBody, "description": "A tenant's virtual key"},
    404: {"model": ErrorBody, "description": "No such tenant or key"},
    409: {"model": ErrorBody, "description": "Conflict: exists already, config-managed, or revoked"},
    422: {"model": ErrorBody, "description": "Invalid field; `param` names it"},
}
_HTTP_CODES = {400: "invalid_body", 404: "not_found", 405: "method_not_allowed"}


class AuditPage(BaseModel):
    object: str = "list"
    data: list[AuditEntry]
    has_more: bool
    next_after: int | None


def _key_out(record: KeyRecord) -> dict[str, Any]:
    out = record.model_dump(exclude={"secret_hash"})
    out["models"] = list(record.models) if record.models is not None else None
    return out


def _loc(loc: tuple[Any, ...]) -> str:
    parts = [p for p in loc if p not in ("body", "query", "path")]
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def _as_422(exc: ValidationError) -> GatewayError:
    first = exc.errors()[0]
    where = _loc(tuple(first["loc"]))
    return UnprocessableError(f"{where}: {first['msg'].removeprefix('Value error, ')}", param=where)


def create_admin_app(ctx: AdminContext) -> FastAPI:
    app = FastAPI(
        title="Gateway admin API",
        version="1",
        description="Tenants, virtual keys, usage and audit. Authenticate with `Authorization: Bearer <admin key>`.",
    )
    store = ctx.store

    @app.exception_handler(GatewayError)
    async def _gateway_error(_: Request, exc: GatewayError) -> Response:
        return Response(exc.body(), status_code=exc.status, media_type="application/json", headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        # The framework's own refusals (a body it cannot parse, an unknown path, a wrong method) in the same
        # shape as every other error, not Starlette's `{"detail": ...}`.
        kind = "server_error" if exc.status_code >= 500 else "invalid_request_error"
        detail = exc.detail if isinstance(exc.detail, str) else "Request refused."
        error = {"message": detail, "type": kind, "param": None, "code": _HTTP_CODES.get(exc.status_code)}
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Starlette names only the methods of the first route that matched the path; a path served by
            # several routes (GET and POST /admin/tenants) must list them all.
            headers = {"allow": ", ".join(_allowed_methods(router, request.scope))}
        return JSONResponse({"error": error}, status_code=exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> Response:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        param = _loc(tuple(first.get("loc", ())))
        message = "; ".join(f"{_loc(tuple(e.get('loc', ())))}: {e.get('msg')}" for e in errors[:10])
        error = {"message": message, "type": "invalid_request_error", "param": param, "code": "validation_error"}
        return JSONResponse({"error": error}, status_code=422)

    async def require_admin(
        request: Request,
        # Declares the bearer scheme in the OpenAPI document; the check itself is below (one header only,
        # constant-time comparison, a tenant key told apart from a wrong key).
        _: Annotated[HTTPAuthorizationCredentials | None, Security(_BEARER)] = None,
    ) -> str:
        token = bearer_token(authorization_header(request.scope["headers"]))
        admin_key = ctx.settings.admin_key
        if token is None:
            raise AuthenticationError("The admin API needs 'Authorization: Bearer <admin key>'.")
        if admin_key is not None and secret_matches(token, admin_key):
            return "admin"
        try:
            await ctx.authenticator.authenticate(b"Bearer " + token.encode("latin-1", "replace"))
        except AuthenticationError:
            if admin_key is None:
                raise AuthenticationError("The admin API is disabled: set GATEWAY_ADMIN_KEY.") from None
            raise AuthenticationError("Incorrect admin key provided.") from None
        raise PermissionDeniedError("A tenant's virtual key cannot use the admin API.", code="admin_only")

    router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)], responses=_ERRORS)

    async def audit(action: str, target: str, **details: object) -> None:
        await store.append_audit(
            AuditEntry(time=time.time(), actor="admin", action=action, target=target, details=details)
        )

    # --- tenants ----------------------------------------------------------------------------------

    @router.post("/tenants", status_code=201, response_model=Tenant, tags=["tenants"])
    async def create_tenant(body: TenantIn) -> Tenant:
        try:
            tenant = Tenant(**body.model_dump())
        except ValidationError as exc:
            raise _as_422(exc) from None
        await store.create_tenant(tenant)
        ctx.metrics.know_tenant(tenant.id, tenant.weight)
        await audit("tenant.create", f"tenant:{tenant.id}", fields=body.model_dump(exclude={"id"}))
        return tenant

    @router.get("/tenants", response_model=TenantPage, tags=["tenants"])
    async def list_tenants(
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        after: Annotated[str | None, Query(max_length=64)] = None,
    ) -> TenantPage:
        rows = await store.list_tenants(after=after, limit=limit + 1)
        more = len(rows) > limit
        rows = rows[:limit]
        return TenantPage(data=rows, has_more=more, next_after=rows[-1].id if more else None)

    @router.get("/tenants/{tenant_id}", response_model=Tenant, tags=["tenants"])
    async def get_tenant(tenant_id: str) -> Tenant:
        return await _tenant(store, tenant_id)

    @router.patch("/tenants/{tenant_id}", response_model=Tenant, tags=["tenants"])
    async def update_tenant(tenant_id: str, body: TenantPatch) -> Tenant:
        tenant = _unmanaged(await _tenant(store, tenant_id), f"tenant {tenant_id!r}")
        changes = body.model_dump(exclude_unset=True)
        try:
            updated = Tenant(**{**tenant.model_dump(), **changes})
        except ValidationError as exc:
            raise _as_422(exc) from None
        await store.put_tenant(updated)
        ctx.metrics.know_tenant(updated.id, updated.weight)
        ctx.authenticator.invalidate()  # cached principals carry the old policy
        await audit("tenant.update", f"tenant:{tenant_id}", changes=changes)
        return updated

    @router.delete("/tenants/{tenant_id}", status_code=204, tags=["tenants"])
    async def delete_tenant(tenant_id: str) -> Response:
        _unmanaged(await _tenant(store, tenant_id), f"tenant {tenant_id!r}")
        await store.delete_tenant(tenant_id)
        ctx.authenticator.invalidate()
        await audit("tenant.delete", f"tenant:{tenant_id}")
        return Response(status_code=204)

    # --- keys -------------------------------------------------------------------------------------

    async def issue_key(
        tenant_id: str,
        name: str | None,
        models: list[str] | tuple[str, ...] | None,
        limits: Quotas,
        expires_at: float | None,
    ) -> tuple[KeyRecord, str]:
        secret = generate_key()
        record = KeyRecord(
            id=new_key_id(),
            tenant_id=tenant_id,
            name=name,
            secret_hash=hash_key(secret),
            prefix=secret[:10],
            created_at=time.time(),
            expires_at=expires_at,
            models=tuple(models) if models is not None else None,
            limits=limits,
        )
        await store.create_key(record)
        ctx.authenticator.invalidate(record.secret_hash)
        return record, secret

    @router.post("/tenants/{tenant_id}/keys", status_code=201, response_model=KeyCreated, tags=["keys"])
    async def create_key(tenant_id: str, body: KeyIn) -> dict[str, Any]:
        await _tenant(store, tenant_id)
        record, secret = await issue_key(tenant_id, body.name, body.models, body.limits, body.expires_at)
        await audit("key.create", f"key:{record.id}", tenant=tenant_id, prefix=record.prefix, name=body.name)
        return {**_key_out(record), "key": secret}

    @router.get("/tenants/{tenant_id}/keys", response_model=list[KeyOut], tags=["keys"])
    async def list_keys(tenant_id: str) -> list[dict[str, Any]]:
        await _tenant(store, tenant_id)
        return [_key_out(k) for k in await store.list_keys(tenant_id)]

    @router.get("/keys/{key_id}", response_model=KeyOut, tags=["keys"])
    async def get_key(key_id: str) -> dict[str, Any]:
        return _key_out(await _key(store, key_id))

    @router.patch("/keys/{key_id}", response_model=KeyOut, tags=["keys"])
    async def update_key(key_id: str, body: KeyPatch) -> dict[str, Any]:
        record = _unmanaged(await _key(store, key_id), f"key {key_id!r}")
        changes = body.model_dump(exclude_unset=True)
        try:
            # Validated as a whole (model_copy would not): `{"disabled": null}` or `{"limits": null}` stored
            # as is made every later read of the key fail, and its requests with it.
            updated = KeyRecord(**{**record.model_dump(), **changes})
        except ValidationError as exc:
            raise _as_422(exc) from None
        await store.put_key(updated)
        ctx.authenticator.invalidate(record.secret_hash)
        await audit("key.update", f"key:{key_id}", changes=body.model_dump(exclude_unset=True))
        return _key_out(updated)

    @router.post("/keys/{key_id}/revoke", response_model=KeyOut, tags=["keys"])
    async def revoke_key(key_id: str) -> dict[str, Any]:
        record = _unmanaged(await _key(store, key_id), f"key {key_id!r}")
        updated = record.model_copy(update={"revoked": True})
        await store.put_key(updated)
        ctx.authenticator.invalidate(record.secret_hash)
        await audit("key.revoke", f"key:{key_id}", tenant=record.tenant_id)
        return _key_out(updated)

    @router.post("/keys/{key_id}/rotate", status_code=201, response_model=KeyCreated, tags=["keys"])
    async def rotate_key(key_id: str, body: RotateIn | None = None) -> dict[str, Any]:
        old = _unmanaged(await _key(store, key_id), f"key {key_id!r}")
        if old.revoked:
            raise ConflictError(f"key {key_id!r} is revoked; create a new key instead", code="revoked")
        grace = (body or RotateIn()).grace_period_s
        new, secret = await issue_key(old.tenant_id, old.name, old.models, old.limits, old.expires_at)
        ends = time.time() + grace
        if old.expires_at is None or old.expires_at > ends:
            await store.put_key(old.model_copy(update={"expires_at": ends}))
        ctx.authenticator.invalidate(old.secret_hash)
        await audit("key.rotate", f"key:{key_id}", new_key=new.id, prefix=new.prefix, grace_period_s=grace)
        return {**_key_out(new), "key": secret}

    # --- usage ------------------------------------------------------------------------------------

    @router.get("/tenants/{tenant_id}/usage", response_model=UsageReport, tags=["usage"])
    async def tenant_usage(
        tenant_id: str,
        since: Annotated[dt.datetime | None, Query(description=_SINCE)] = None,
        until: Annotated[dt.datetime | None, Query(description=_UNTIL)] = None,
        key_id: Annotated[str | None, Query(max_length=64)] = None,
    ) -> UsageReport:
        await _tenant(store, tenant_id)
        start, end = _time_range(since, until)
        return _report(tenant_id, start, end, await ctx.ledger.query(tenant_id, start, end, key_id))

    @router.get("/keys/{key_id}/usage", response_model=UsageReport, tags=["usage"])
    async def key_usage(
        key_id: str,
        since: Annotated[dt.datetime | None, Query(description=_SINCE)] = None,
        until: Annotated[dt.datetime | None, Query(description=_UNTIL)] = None,
    ) -> UsageReport:
        record = await _key(store, key_id)
        start, end = _time_range(since, until)
        return _report(record.tenant_id, start, end, await ctx.ledger.query(record.tenant_id, start, end, key_id))

    # --- live stats -------------------------------------------------------------------------------

    @router.get("/stats", response_model=StatsReport, tags=["stats"])
    async def live_stats() -> StatsReport:
        """Cumulative counters per tenant, summed over the live processes, with the time they were read.

        Difference two answers for rates. When `replicas` differs between them, a process started or died
        and the sums jumped: skip that interval, as with a Prometheus counter reset.
        """
        tenants: list[Tenant] = []
        after: str | None = None
        while True:
            page = await store.list_tenants(after=after, limit=1000)
            tenants += page
            if len(page) < 1000:
                break
            after = page[-1].id
        return await ctx.stats.report(tenants)

    # --- audit ------------------------------------------------------------------------------------

    @router.get("/audit", response_model=AuditPage, tags=["audit"])
    async def list_audit(
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        after: Annotated[int, Query(ge=0, le=_MAX_INT64)] = 0,
    ) -> AuditPage:
        rows = await store.list_audit(after=after, limit=limit + 1)
        more = len(rows) > limit
        rows = rows[:limit]
        return AuditPage(data=rows, has_more=more, next_after=rows[-1].seq if more else None)

    app.include_router(router)
    return app


async def _tenant(store: Store, tenant_id: str) -> Tenant:
    tenant = await store.get_tenant(tenant_id)
    if tenant is None:
        raise NotFoundError(f"No tenant {tenant_id!r}.", code="not_found")
    return tenant


async def _key(store: Store, key_id: str) -> KeyRecord:
    record = await store.get_key(key_id)
    if record is None:
        raise NotFoundError(f"No key {key_id!r}.", code="not_found")
    return record


def _allowed_methods(router: APIRouter, scope: Any) -> list[str]:
    methods: set[str] = set()
    for route in router.routes:
        if isinstance(route, APIRoute) and route.matches(scope)[0] != Match.NONE:
            methods |= route.methods or set()
    return sorted(methods)


def _unmanaged(obj: _Managed, what: str) -> _Managed:
    if obj.config_managed:
        raise ConflictError(
            f"{what} is declared in the config file (config-managed); change it there and reload.",
            code="config_managed",
        )
    return obj
