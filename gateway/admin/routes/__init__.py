"""The admin API's routes, one module per resource; `gateway.admin.api.create_admin_app` mounts them under
`/admin` behind the admin-key check."""

from gateway.admin.routes import audit, keys, stats, tenants, usage

__all__ = ["audit", "keys", "stats", "tenants", "usage"]
