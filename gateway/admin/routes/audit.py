"""`/admin/audit`: the log of admin changes (who, what, when; never a secret), oldest first, paginated."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from gateway.admin.context import Ctx
from gateway.admin.schemas import AuditPage

__all__ = ["router"]

router = APIRouter(tags=["audit"])

# Offsets the store's integer columns can hold.
_MAX_INT64 = 2**63 - 1


@router.get("/audit", response_model=AuditPage)
async def list_audit(
    ctx: Ctx,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    after: Annotated[int, Query(ge=0, le=_MAX_INT64)] = 0,
) -> AuditPage:
    rows = await ctx.store.list_audit(after=after, limit=limit + 1)
    more = len(rows) > limit
    rows = rows[:limit]
    return AuditPage(data=rows, has_more=more, next_after=rows[-1].seq if more else None)
