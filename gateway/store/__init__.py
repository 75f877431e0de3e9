"""Where tenants, keys and small shared settings live. `Store` is the seam; SQLite is the embedded default."""

from gateway.store._protocol import Store
from gateway.store._sqlite import SqliteStore

__all__ = ["SqliteStore", "Store"]
