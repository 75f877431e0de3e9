"""The embedded store: one SQLite file, WAL mode, rows as JSON documents.

Calls are synchronous under an async face: each is a sub-millisecond local query, and the auth hot path
is served from the in-process cache (`gateway.auth`), so the store is only read on a cache miss.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from gateway.errors import ConflictError
from gateway.tenancy import AuditEntry, KeyRecord, Tenant, UsageRow

__all__ = ["SqliteStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tenants (id TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    secret_hash TEXT NOT NULL UNIQUE,
    doc TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS keys_by_tenant ON keys (tenant_id);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS usage (
    tenant TEXT NOT NULL, key_id TEXT NOT NULL, hour INTEGER NOT NULL, currency TEXT NOT NULL,
    requests INTEGER NOT NULL, prompt INTEGER NOT NULL, completion INTEGER NOT NULL, cached INTEGER NOT NULL,
    spend REAL NOT NULL,
    PRIMARY KEY (tenant, key_id, hour, currency)
);
CREATE TABLE IF NOT EXISTS audit (seq INTEGER PRIMARY KEY AUTOINCREMENT, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS stats (replica TEXT PRIMARY KEY, expires REAL NOT NULL, doc TEXT NOT NULL);
"""


class SqliteStore:
    def __init__(self, path: str) -> None:
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)

    async def create_tenant(self, tenant: Tenant) -> None:
        try:
            self._db.execute("INSERT INTO tenants (id, doc) VALUES (?, ?)", (tenant.id, tenant.model_dump_json()))
        except sqlite3.IntegrityError:
            raise ConflictError(f"tenant {tenant.id!r} already exists", param="id") from None

    async def put_tenant(self, tenant: Tenant) -> None:
        self._db.execute(
            "INSERT INTO tenants (id, doc) VALUES (?, ?) ON CONFLICT(id) DO UPDATE SET doc = excluded.doc",
            (tenant.id, tenant.model_dump_json()),
        )

    async def get_tenant(self, tenant_id: str) -> Tenant | None:
        row = self._db.execute("SELECT doc FROM tenants WHERE id = ?", (tenant_id,)).fetchone()
        return None if row is None else Tenant.model_validate_json(row[0])

    async def list_tenants(self, *, after: str | None = None, limit: int = 100) -> list[Tenant]:
        rows = self._db.execute(
            "SELECT doc FROM tenants WHERE id > ? ORDER BY id LIMIT ?", (after or "", limit)
        ).fetchall()
        return [Tenant.model_validate_json(r[0]) for r in rows]

    async def delete_tenant(self, tenant_id: str) -> bool:
        with self._db:
            self._db.execute("BEGIN")
            self._db.execute("DELETE FROM keys WHERE tenant_id = ?", (tenant_id,))
            cur = self._db.execute("DELETE FROM tenants WHERE id = ?", (tenant_id,))
        return cur.rowcount > 0

    async def create_key(self, key: KeyRecord) -> None:
        try:
            self._db.execute(
                "INSERT INTO keys (id, tenant_id, secret_hash, doc) VALUES (?, ?, ?, ?)",
                (key.id, key.tenant_id, key.secret_hash, key.model_dump_json()),
            )
        except sqlite3.IntegrityError:
            raise ConflictError(f"key {key.id!r} already exists", param="id") from None

    async def put_key(self, key: KeyRecord) -> None:
        self._db.execute(
            "INSERT INTO keys (id, tenant_id, secret_hash, doc) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET tenant_id = excluded.tenant_id, "
            "secret_hash = excluded.secret_hash, doc = excluded.doc",
            (key.id, key.tenant_id, key.secret_hash, key.model_dump_json()),
        )

    async def get_key(self, key_id: str) -> KeyRecord | None:
        row = self._db.execute("SELECT doc FROM keys WHERE id = ?", (key_id,)).fetchone()
        return None if row is None else KeyRecord.model_validate_json(row[0])

    async def get_key_by_hash(self, secret_hash: str) -> KeyRecord | None:
        row = self._db.execute("SELECT doc FROM keys WHERE secret_hash = ?", (secret_hash,)).fetchone()
        return None if row is None else KeyRecord.model_validate_json(row[0])

    async def list_keys(self, tenant_id: str) -> list[KeyRecord]:
        rows = self._db.execute("SELECT doc FROM keys WHERE tenant_id = ? ORDER BY id", (tenant_id,)).fetchall()
        return [KeyRecord.model_validate_json(r[0]) for r in rows]

    async def append_audit(self, entry: AuditEntry) -> None:
        self._db.execute("INSERT INTO audit (doc) VALUES (?)", (entry.model_dump_json(exclude={"seq"}),))

    async def list_audit(self, *, after: int = 0, limit: int = 100) -> list[AuditEntry]:
        rows = self._db.execute(
            "SELECT seq, doc FROM audit WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit)
        ).fetchall()
        return [AuditEntry.model_validate_json(doc).model_copy(update={"seq": seq}) for seq, doc in rows]

    async def add_usage(self, rows: list[UsageRow]) -> None:
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT INTO usage VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (tenant, key_id, hour, currency) "
                "DO UPDATE SET requests = requests + excluded.requests, prompt = prompt + excluded.prompt, "
                "completion = completion + excluded.completion, cached = cached + excluded.cached, "
                "spend = spend + excluded.spend",
                [
                    (
                        r.tenant,
                        r.key_id,
                        r.hour,
                        r.currency,
                        r.requests,
                        r.prompt_tokens,
                        r.completion_tokens,
                        r.cached_tokens,
                        r.spend,
                    )
                    for r in rows
                ],
            )

    async def usage(self, tenant_id: str, first_hour: int, last_hour: int, key_id: str | None = None) -> list[UsageRow]:
        query = "SELECT * FROM usage WHERE tenant = ? AND hour BETWEEN ? AND ?"
        args: list[object] = [tenant_id, first_hour, last_hour]
        if key_id is not None:
            query += " AND key_id = ?"
            args.append(key_id)
        return [
            UsageRow(
                tenant=t,
                key_id=k,
                hour=h,
                currency=c,
                requests=n,
                prompt_tokens=p,
                completion_tokens=o,
                cached_tokens=ca,
                spend=sp,
            )
            for t, k, h, c, n, p, o, ca, sp in self._db.execute(query, args).fetchall()
        ]

    async def put_stats(self, replica: str, doc: str, *, ttl_s: float) -> None:
        self._db.execute(
            "INSERT INTO stats (replica, expires, doc) VALUES (?, ?, ?) "
            "ON CONFLICT(replica) DO UPDATE SET expires = excluded.expires, doc = excluded.doc",
            (replica, time.time() + ttl_s, doc),
        )

    async def list_stats(self) -> dict[str, str]:
        now = time.time()
        # Workers that died leave their row behind: whoever reads next clears it.
        self._db.execute("DELETE FROM stats WHERE expires <= ?", (now,))
        return dict(self._db.execute("SELECT replica, doc FROM stats").fetchall())

    async def want_stats(self, for_s: float) -> None:
        self._db.execute(
            "INSERT INTO meta (name, value) VALUES ('stats_wanted_until', ?) "
            "ON CONFLICT(name) DO UPDATE SET value = excluded.value",
            (repr(time.time() + for_s),),
        )

    async def stats_wanted(self) -> bool:
        row = self._db.execute("SELECT value FROM meta WHERE name = 'stats_wanted_until'").fetchone()
        return row is not None and float(row[0]) > time.time()

    async def get_or_set_meta(self, name: str, value: str) -> str:
        self._db.execute("INSERT OR IGNORE INTO meta (name, value) VALUES (?, ?)", (name, value))
        row = self._db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return str(row[0])

    async def close(self) -> None:
        self._db.close()
