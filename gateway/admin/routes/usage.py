"""`/admin/tenants/{id}/usage` and `/admin/keys/{id}/usage`: requests, tokens by kind and spend over a
time range, from the billing data (hourly totals per key)."""

from __future__ import annotations

import datetime as dt
import time
from typing import Annotated

from fastapi import APIRouter, Query

from gateway.admin.context import Ctx, key_or_404, tenant_or_404
from gateway.admin.schemas import KeyUsage, UsageReport
from gateway.tenancy import UsageRow

__all__ = ["router"]

router = APIRouter(tags=["usage"])

_SINCE = "Unix time or ISO 8601 date-time (UTC unless it says otherwise); default 30 days before until"
_UNTIL = "Unix time or ISO 8601 date-time (UTC unless it says otherwise); default now"


@router.get("/tenants/{tenant_id}/usage", response_model=UsageReport)
async def tenant_usage(
    tenant_id: str,
    ctx: Ctx,
    since: Annotated[dt.datetime | None, Query(description=_SINCE)] = None,
    until: Annotated[dt.datetime | None, Query(description=_UNTIL)] = None,
    key_id: Annotated[str | None, Query(max_length=64)] = None,
) -> UsageReport:
    await tenant_or_404(ctx.store, tenant_id)
    start, end = _time_range(since, until)
    return _report(tenant_id, start, end, await ctx.ledger.query(tenant_id, start, end, key_id))


@router.get("/keys/{key_id}/usage", response_model=UsageReport)
async def key_usage(
    key_id: str,
    ctx: Ctx,
    since: Annotated[dt.datetime | None, Query(description=_SINCE)] = None,
    until: Annotated[dt.datetime | None, Query(description=_UNTIL)] = None,
) -> UsageReport:
    record = await key_or_404(ctx.store, key_id)
    start, end = _time_range(since, until)
    return _report(record.tenant_id, start, end, await ctx.ledger.query(record.tenant_id, start, end, key_id))


def _timestamp(value: dt.datetime) -> float:
    return (value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)).timestamp()


def _time_range(since: dt.datetime | None, until: dt.datetime | None) -> tuple[float, float]:
    """The query's range as Unix times. The parameters are parsed as datetimes (pydantic also takes a Unix
    time), so only instants between the years 1 and 9999 get here: `1e308` or `inf` is refused with 422
    instead of overflowing the store's query. A range whose until is before its since selects nothing."""
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
