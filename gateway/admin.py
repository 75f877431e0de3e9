"""The admin REST API (SPEC section 7), a FastAPI app mounted under `/admin`.

Authenticated with the admin key; a tenant's virtual key gets 403, anything else 401. Errors use the same
OpenAI-shaped body as the client API; validation errors are 422 and `param` names the field.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from gateway.auth import Authenticator, bearer_token
from gateway.config import Settings
from gateway.errors import AuthenticationError, GatewayError, NotFoundError, PermissionDeniedError
from gateway.keys import generate_key, hash_key, hashes_equal, new_key_id
from gateway.metrics import Metrics
from gateway.store import Store
from gateway.tenancy import TENANT_ID, Budget, KeyRecord, Quotas, Tenant

__all__ = ["AdminContext", "create_admin_app"]


@dataclass(frozen=True)
class AdminContext:
    settings: Settings
    store: Store
    authenticator: Authenticator
    metrics: Metrics


class TenantIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=TENANT_ID)
    name: str | None = Field(default=None, max_length=200)
    weight: float = Field(default=1.0, gt=0, le=1_000_000)
    priority: int = Field(default=0, ge=-100, le=100)
    models: list[str] = Field(default_factory=lambda: ["*"])
    limits: Quotas = Quotas()
    budget: Budget | None = None
    cache_scope: str = "tenant"
    allow_client_salt: bool = False
    user_field: str = "passthrough"


class KeyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, max_length=200)
    models: list[str] | None = None
    limits: Quotas = Quotas()
    expires_at: float | None = Field(default=None, description="Unix time after which the key stops working.")


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


def create_admin_app(ctx: AdminContext) -> FastAPI:
    app = FastAPI(
        title="Gateway admin API",
        version="1",
        description="Tenants, virtual keys, usage and audit. Authenticate with `Authorization: Bearer <admin key>`.",
    )

    @app.exception_handler(GatewayError)
    async def _gateway_error(_: Request, exc: GatewayError) -> Response:
        return Response(exc.body(), status_code=exc.status, media_type="application/json", headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> Response:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        param = _loc(tuple(first.get("loc", ())))
        message = "; ".join(f"{_loc(tuple(e.get('loc', ())))}: {e.get('msg')}" for e in errors[:10])
        body = {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "param": param,
                "code": "validation_error",
            }
        }
        return JSONResponse(body, status_code=422)

    async def require_admin(request: Request) -> str:
        token = bearer_token(request.headers.get("authorization", "").encode("latin-1", "replace"))
        admin_key = ctx.settings.admin_key
        if token is None:
            raise AuthenticationError("The admin API needs 'Authorization: Bearer <admin key>'.")
        if admin_key is not None and hashes_equal(hash_key(token), hash_key(admin_key)):
            return "admin"
        try:
            await ctx.authenticator.authenticate(b"Bearer " + token.encode("latin-1", "replace"))
        except AuthenticationError:
            if admin_key is None:
                raise AuthenticationError("The admin API is disabled: set GATEWAY_ADMIN_KEY.") from None
            raise AuthenticationError("Incorrect admin key provided.") from None
        raise PermissionDeniedError("A tenant's virtual key cannot use the admin API.", code="admin_only")

    router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])

    @router.post("/tenants", status_code=201, response_model=Tenant, tags=["tenants"])
    async def create_tenant(body: TenantIn) -> Tenant:
        try:
            tenant = Tenant(**body.model_dump())
        except ValueError as exc:  # cross-field rules of Tenant (cache_scope, user_field)
            raise _as_422(exc) from None
        await ctx.store.create_tenant(tenant)
        ctx.metrics.know_tenant(tenant.id)
        return tenant

    @router.get("/tenants", response_model=TenantPage, tags=["tenants"])
    async def list_tenants(
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        after: Annotated[str | None, Query(max_length=64)] = None,
    ) -> TenantPage:
        rows = await ctx.store.list_tenants(after=after, limit=limit + 1)
        more = len(rows) > limit
        rows = rows[:limit]
        return TenantPage(data=rows, has_more=more, next_after=rows[-1].id if more else None)

    @router.get("/tenants/{tenant_id}", response_model=Tenant, tags=["tenants"])
    async def get_tenant(tenant_id: str) -> Tenant:
        return await _tenant(ctx, tenant_id)

    @router.post("/tenants/{tenant_id}/keys", status_code=201, response_model=KeyCreated, tags=["keys"])
    async def create_key(tenant_id: str, body: KeyIn) -> dict[str, Any]:
        await _tenant(ctx, tenant_id)
        secret = generate_key()
        record = KeyRecord(
            id=new_key_id(),
            tenant_id=tenant_id,
            name=body.name,
            secret_hash=hash_key(secret),
            prefix=secret[:10],
            created_at=time.time(),
            expires_at=body.expires_at,
            models=tuple(body.models) if body.models is not None else None,
            limits=body.limits,
        )
        await ctx.store.create_key(record)
        ctx.authenticator.invalidate(record.secret_hash)
        return {**_key_out(record), "key": secret}

    @router.get("/tenants/{tenant_id}/keys", response_model=list[KeyOut], tags=["keys"])
    async def list_keys(tenant_id: str) -> list[dict[str, Any]]:
        await _tenant(ctx, tenant_id)
        return [_key_out(k) for k in await ctx.store.list_keys(tenant_id)]

    @router.get("/keys/{key_id}", response_model=KeyOut, tags=["keys"])
    async def get_key(key_id: str) -> dict[str, Any]:
        record = await ctx.store.get_key(key_id)
        if record is None:
            raise NotFoundError(f"No key {key_id!r}.", code="not_found")
        return _key_out(record)

    app.include_router(router)
    return app


async def _tenant(ctx: AdminContext, tenant_id: str) -> Tenant:
    tenant = await ctx.store.get_tenant(tenant_id)
    if tenant is None:
        raise NotFoundError(f"No tenant {tenant_id!r}.", code="not_found")
    return tenant


def _as_422(exc: ValueError) -> GatewayError:
    from pydantic import ValidationError

    from gateway.errors import UnprocessableError

    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        return UnprocessableError(f"{_loc(tuple(first['loc']))}: {first['msg']}", param=_loc(tuple(first["loc"])))
    return UnprocessableError(str(exc))
