"""Where tenants, keys and small shared settings live.

`Store` is the seam; SQLite is the embedded default, Redis the shared one for several replicas.
"""

from gateway.tenancy.store._protocol import Store
from gateway.tenancy.store._redis import CHANGES_CHANNEL, RedisStore
from gateway.tenancy.store._sqlite import SqliteStore

__all__ = ["CHANGES_CHANNEL", "RedisStore", "SqliteStore", "Store"]
