"""Tenants and keys: the validated values (`model`), where they are kept (`store/`), what start-up
reconciles into the store (`state`), and how a change reaches every replica (`propagation`)."""

from gateway.tenancy.model import (
    CACHE_SCOPE,
    TENANT_ID,
    AuditEntry,
    Budget,
    KeyRecord,
    Principal,
    Quotas,
    Tenant,
    UsageRow,
    model_allowed,
)

__all__ = [
    "CACHE_SCOPE",
    "TENANT_ID",
    "AuditEntry",
    "Budget",
    "KeyRecord",
    "Principal",
    "Quotas",
    "Tenant",
    "UsageRow",
    "model_allowed",
]
