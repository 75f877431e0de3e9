"""`/admin/tenants`: create, list, read, update and delete tenants."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import Response
from pydantic import ValidationError

from gateway.admin import patch
from gateway.admin.context import Ctx, audit, tenant_or_404, unmanaged
from gateway.admin.errors import as_422
from gateway.admin.schemas import TenantIn, TenantPage, TenantPatch
from gateway.errors import ConflictError
from gateway.tenancy import Tenant

__all__ = ["router"]

router = APIRouter(tags=["tenants"])


@router.post("/tenants", status_code=201, response_model=Tenant)
async def create_tenant(body: TenantIn, ctx: Ctx) -> Tenant:
    try:
        tenant = Tenant(**body.model_dump())
    except ValidationError as exc:
        raise as_422(exc) from None
    await ctx.store.create_tenant(tenant)
    ctx.metrics.know_tenant(tenant.id, tenant.weight)
    await audit(ctx.store, "tenant.create", f"tenant:{tenant.id}", fields=body.model_dump(exclude={"id"}))
    return tenant


@router.get("/tenants", response_model=TenantPage)
async def list_tenants(
    ctx: Ctx,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    after: Annotated[str | None, Query(max_length=64)] = None,
) -> TenantPage:
    rows = await ctx.store.list_tenants(after=after, limit=limit + 1)
    more = len(rows) > limit
    rows = rows[:limit]
    return TenantPage(data=rows, has_more=more, next_after=rows[-1].id if more else None)


@router.get("/tenants/{tenant_id}", response_model=Tenant)
async def get_tenant(tenant_id: str, ctx: Ctx) -> Tenant:
    return await tenant_or_404(ctx.store, tenant_id)


@router.patch("/tenants/{tenant_id}", response_model=Tenant)
async def update_tenant(tenant_id: str, body: TenantPatch, ctx: Ctx) -> Tenant:
    """A JSON merge patch (RFC 7396): only the fields sent change, `null` removes one (back to its
    default), and `limits`, `budget` and `on_limit` merge member by member."""
    tenant = unmanaged(await tenant_or_404(ctx.store, tenant_id), f"tenant {tenant_id!r}")
    changes = patch.changes(body)
    new_budget = changes.get("budget")
    if tenant.budget is None and new_budget is not None and "amount" not in new_budget:
        # `{"budget": {"period": "week"}}` is right for a tenant with a budget (the document allows it):
        # the conflict is with this tenant's state, hence 409, not 422.
        raise ConflictError(
            f"tenant {tenant_id!r} has no budget to change; give budget.amount to set one",
            param="budget.amount",
            code="no_budget",
        )
    updated = patch.apply(tenant, changes)
    await ctx.store.put_tenant(updated)
    ctx.metrics.know_tenant(updated.id, updated.weight)
    ctx.authenticator.invalidate()  # cached principals carry the old policy
    await audit(ctx.store, "tenant.update", f"tenant:{tenant_id}", changes=changes)
    return updated


@router.delete("/tenants/{tenant_id}", status_code=204)
async def delete_tenant(tenant_id: str, ctx: Ctx) -> Response:
    unmanaged(await tenant_or_404(ctx.store, tenant_id), f"tenant {tenant_id!r}")
    await ctx.store.delete_tenant(tenant_id)
    ctx.authenticator.invalidate()
    await audit(ctx.store, "tenant.delete", f"tenant:{tenant_id}")
    return Response(status_code=204)
