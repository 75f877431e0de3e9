"""What every admin route shares: the context the app is built with, the admin-key check, the lookups
that answer 404 or 409, and the audit write.

Routes receive the context as a dependency (`ctx: Ctx`), read from the app's state, so a route module holds
no client of its own and imports nothing of another route module.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated, TypeVar

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from gateway.admin.stats import LiveStats
from gateway.auth import Authenticator, authorization_header, bearer_token, secret_matches
from gateway.billing.ledger import UsageLedger
from gateway.config import Settings
from gateway.errors import AuthenticationError, ConflictError, NotFoundError, PermissionDeniedError
from gateway.telemetry.metrics import Metrics
from gateway.tenancy import AuditEntry, KeyRecord, Tenant
from gateway.tenancy.store import Store

__all__ = ["AdminContext", "Ctx", "audit", "key_or_404", "require_admin", "tenant_or_404", "unmanaged"]

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


def _context(request: Request) -> AdminContext:
    ctx: AdminContext = request.app.state.admin
    return ctx


Ctx = Annotated[AdminContext, Depends(_context)]


async def require_admin(
    request: Request,
    ctx: Ctx,
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


async def audit(store: Store, action: str, target: str, **details: object) -> None:
    await store.append_audit(AuditEntry(time=time.time(), actor="admin", action=action, target=target, details=details))


async def tenant_or_404(store: Store, tenant_id: str) -> Tenant:
    tenant = await store.get_tenant(tenant_id)
    if tenant is None:
        raise NotFoundError(f"No tenant {tenant_id!r}.", code="not_found")
    return tenant


async def key_or_404(store: Store, key_id: str) -> KeyRecord:
    record = await store.get_key(key_id)
    if record is None:
        raise NotFoundError(f"No key {key_id!r}.", code="not_found")
    return record


def unmanaged(obj: _Managed, what: str) -> _Managed:
    """`obj`, unless the config file declares it: then 409, so the file stays its one source of truth."""
    if obj.config_managed:
        raise ConflictError(
            f"{what} is declared in the config file (config-managed); change it there and reload.",
            code="config_managed",
        )
    return obj
