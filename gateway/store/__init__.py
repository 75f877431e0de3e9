"""Where tenants, keys and small shared settings live.

`Store` is the seam; SQLite is the embedded default, Redis the shared one for several replicas.
"""

from gateway.store._protocol import Store
from gateway.store._redis import CHANGES_CHANNEL, RedisStore
from gateway.store._sqlite import SqliteStore

__all__ = ["CHANGES_CHANNEL", "RedisStore", "SqliteStore", "Store"]
