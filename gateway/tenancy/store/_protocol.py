"""The store seam: everything the gateway persists about tenants and keys goes through this protocol."""

from __future__ import annotations

from typing import Protocol

from gateway.tenancy import AuditEntry, KeyRecord, Tenant, UsageRow

__all__ = ["Store"]


class Store(Protocol):
    async def create_tenant(self, tenant: Tenant) -> None:
        """Insert; raise `ConflictError` if the id exists."""

    async def put_tenant(self, tenant: Tenant) -> None:
        """Insert or replace (used by config reconciliation and updates)."""

    async def get_tenant(self, tenant_id: str) -> Tenant | None: ...

    async def list_tenants(self, *, after: str | None = None, limit: int = 100) -> list[Tenant]: ...

    async def delete_tenant(self, tenant_id: str) -> bool:
        """Delete the tenant and all its keys; False if it did not exist."""

    async def create_key(self, key: KeyRecord) -> None: ...

    async def put_key(self, key: KeyRecord) -> None: ...

    async def get_key(self, key_id: str) -> KeyRecord | None: ...

    async def get_key_by_hash(self, secret_hash: str) -> KeyRecord | None: ...

    async def list_keys(self, tenant_id: str) -> list[KeyRecord]: ...

    async def append_audit(self, entry: AuditEntry) -> None: ...

    async def list_audit(self, *, after: int = 0, limit: int = 100) -> list[AuditEntry]:
        """Entries with a sequence number above `after`, oldest first."""

    async def add_usage(self, rows: list[UsageRow]) -> None:
        """Add (not set) each row's counts to the stored totals of its tenant, key, hour and currency."""

    async def usage(self, tenant_id: str, first_hour: int, last_hour: int, key_id: str | None = None) -> list[UsageRow]:
        """The stored rows of a tenant (or one of its keys) for hours in [first_hour, last_hour]."""

    async def put_stats(self, replica: str, doc: str, *, ttl_s: float) -> None:
        """Publish one process's live-stats snapshot (JSON), replacing its last one; gone after `ttl_s`."""

    async def list_stats(self) -> dict[str, str]:
        """The snapshots published within their TTL, by process (replica or worker) id."""

    async def want_stats(self, for_s: float) -> None:
        """Ask every process to publish its snapshot for the next `for_s` seconds (someone is reading)."""

    async def stats_wanted(self) -> bool:
        """Whether a reader asked for snapshots less than its `for_s` ago."""

    async def get_or_set_meta(self, name: str, value: str) -> str:
        """Return the stored value of `name`, storing `value` first if there is none (atomically)."""

    async def close(self) -> None: ...
