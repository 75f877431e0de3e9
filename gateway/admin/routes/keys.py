"""`/admin/tenants/{id}/keys` and `/admin/keys/{id}`: issue, list, read, update, revoke and rotate virtual
keys. A key's secret appears in the answer that creates it and nowhere else; the store keeps its SHA-256."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter

from gateway.admin import patch
from gateway.admin.context import AdminContext, Ctx, audit, key_or_404, tenant_or_404, unmanaged
from gateway.admin.schemas import KeyCreated, KeyIn, KeyOut, KeyPatch, RotateIn
from gateway.auth.keys import generate_key, hash_key, new_key_id
from gateway.errors import ConflictError
from gateway.tenancy import KeyRecord, Quotas

__all__ = ["router"]

router = APIRouter(tags=["keys"])


@router.post("/tenants/{tenant_id}/keys", status_code=201, response_model=KeyCreated)
async def create_key(tenant_id: str, body: KeyIn, ctx: Ctx) -> dict[str, Any]:
    await tenant_or_404(ctx.store, tenant_id)
    record, secret = await _issue(ctx, tenant_id, body.name, body.models, body.limits, body.expires_at)
    await audit(ctx.store, "key.create", f"key:{record.id}", tenant=tenant_id, prefix=record.prefix, name=body.name)
    return {**_key_out(record), "key": secret}


@router.get("/tenants/{tenant_id}/keys", response_model=list[KeyOut])
async def list_keys(tenant_id: str, ctx: Ctx) -> list[dict[str, Any]]:
    await tenant_or_404(ctx.store, tenant_id)
    return [_key_out(k) for k in await ctx.store.list_keys(tenant_id)]


@router.get("/keys/{key_id}", response_model=KeyOut)
async def get_key(key_id: str, ctx: Ctx) -> dict[str, Any]:
    return _key_out(await key_or_404(ctx.store, key_id))


@router.patch("/keys/{key_id}", response_model=KeyOut)
async def update_key(key_id: str, body: KeyPatch, ctx: Ctx) -> dict[str, Any]:
    """A JSON merge patch (RFC 7396): only the fields sent change, `null` removes one (back to its
    default), and `limits` merges member by member."""
    record = unmanaged(await key_or_404(ctx.store, key_id), f"key {key_id!r}")
    changes = patch.changes(body)
    updated = patch.apply(record, changes)
    await ctx.store.put_key(updated)
    ctx.authenticator.invalidate(record.secret_hash)
    await audit(ctx.store, "key.update", f"key:{key_id}", changes=changes)
    return _key_out(updated)


@router.post("/keys/{key_id}/revoke", response_model=KeyOut)
async def revoke_key(key_id: str, ctx: Ctx) -> dict[str, Any]:
    record = unmanaged(await key_or_404(ctx.store, key_id), f"key {key_id!r}")
    updated = record.model_copy(update={"revoked": True})
    await ctx.store.put_key(updated)
    ctx.authenticator.invalidate(record.secret_hash)
    await audit(ctx.store, "key.revoke", f"key:{key_id}", tenant=record.tenant_id)
    return _key_out(updated)


@router.post("/keys/{key_id}/rotate", status_code=201, response_model=KeyCreated)
async def rotate_key(key_id: str, ctx: Ctx, body: RotateIn | None = None) -> dict[str, Any]:
    old = unmanaged(await key_or_404(ctx.store, key_id), f"key {key_id!r}")
    if old.revoked:
        raise ConflictError(f"key {key_id!r} is revoked; create a new key instead", code="revoked")
    grace = (body or RotateIn()).grace_period_s
    new, secret = await _issue(ctx, old.tenant_id, old.name, old.models, old.limits, old.expires_at)
    ends = time.time() + grace
    if old.expires_at is None or old.expires_at > ends:
        await ctx.store.put_key(old.model_copy(update={"expires_at": ends}))
    ctx.authenticator.invalidate(old.secret_hash)
    await audit(ctx.store, "key.rotate", f"key:{key_id}", new_key=new.id, prefix=new.prefix, grace_period_s=grace)
    return {**_key_out(new), "key": secret}


async def _issue(
    ctx: AdminContext,
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
    await ctx.store.create_key(record)
    ctx.authenticator.invalidate(record.secret_hash)
    return record, secret


def _key_out(record: KeyRecord) -> dict[str, Any]:
    out = record.model_dump(exclude={"secret_hash"})
    out["models"] = list(record.models) if record.models is not None else None
    return out
