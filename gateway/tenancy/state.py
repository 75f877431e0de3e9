"""Start-up work on the state store: the salt secret, and reconciling the tenants and keys declared in config."""

from __future__ import annotations

import logging
import secrets
import time

from gateway.auth.keys import hash_key
from gateway.config import Settings
from gateway.tenancy import KeyRecord, Tenant
from gateway.tenancy.store import Store

__all__ = ["load_salt_secret", "reconcile_config"]

log = logging.getLogger("gateway.tenancy.state")


async def load_salt_secret(settings: Settings, store: Store) -> bytes:
    if settings.salt_secret:
        return settings.salt_secret.encode()
    generated = secrets.token_urlsafe(32)
    stored = await store.get_or_set_meta("salt_secret", generated)
    if stored == generated:
        log.warning(
            "GATEWAY_SALT_SECRET is not set: generated one and kept it in the state store. "
            "Set it explicitly so that every replica derives the same cache salts."
        )
    return stored.encode()


async def reconcile_config(settings: Settings, store: Store) -> list[str]:
    """Write the tenants and keys declared in config into the store, marked config-managed."""
    ids = []
    now = time.time()
    for declared in settings.tenants:
        fields = declared.model_dump(exclude={"keys", "config_managed"})
        tenant = Tenant(**fields, config_managed=True)
        await store.put_tenant(tenant)
        ids.append(tenant.id)
        for key in declared.keys:
            if key.key_env is not None:
                digest = hash_key(settings.env_secrets[key.key_env])
            else:
                assert key.key_hash is not None
                digest = key.key_hash.removeprefix("sha256:")
            key_id = f"cfg_{tenant.id}_{key.name}"
            existing = await store.get_key(key_id)
            await store.put_key(
                KeyRecord(
                    id=key_id,
                    tenant_id=tenant.id,
                    name=key.name,
                    secret_hash=digest,
                    prefix="sk-gw-…",
                    created_at=existing.created_at if existing else now,
                    models=key.models,
                    limits=key.limits,
                    config_managed=True,
                )
            )
    return ids
