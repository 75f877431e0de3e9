"""`/admin/stats`: every tenant's live counters, summed over the gateway's processes, and each backend
pool's fair queue and engines (see `gateway.admin.stats`), which the console differences into rates."""

from __future__ import annotations

from fastapi import APIRouter

from gateway.admin.context import Ctx
from gateway.admin.stats import StatsReport
from gateway.tenancy import Tenant

__all__ = ["router"]

router = APIRouter(tags=["stats"])


@router.get("/stats", response_model=StatsReport)
async def live_stats(ctx: Ctx) -> StatsReport:
    """Cumulative counters per tenant, summed over the live processes, with the time they were read; and
    per backend, its fair queue's limit and tenants waiting, and per engine endpoint its limit, the permits
    held there, the engine's own load and the requests and prompt tokens it served.

    Difference two answers for rates. When `replicas` differs between them, a process started or died
    and the sums jumped: skip that interval, as with a Prometheus counter reset. The backends' gauges
    describe shared state and are not summed over the processes (see `backends`).
    """
    tenants: list[Tenant] = []
    after: str | None = None
    while True:
        page = await ctx.store.list_tenants(after=after, limit=1000)
        tenants += page
        if len(page) < 1000:
            break
        after = page[-1].id
    return await ctx.stats.report(tenants)
