"""The shared store for scale-out: tenants, keys, audit and metadata in Redis, plus change notifications.

Every key shares the hash tag `{gw}`, so a multi-key transaction (a tenant deleted with its keys) names one
slot. That alone does not make Redis Cluster work: the quota and fair-queue scripts do not (see
gateway/admission/limits/_redis.py), so Redis must be one standalone primary.

Each change is published on one channel; every replica listens (`gateway.tenancy.propagation`) and drops
what it cached, so a revocation is seen everywhere within milliseconds.
"""

from __future__ import annotations

import time

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.errors import ConflictError, ServiceUnavailableError
from gateway.tenancy import AuditEntry, KeyRecord, Tenant, UsageRow

__all__ = ["CHANGES_CHANNEL", "RedisStore"]

_P = "gw:{gw}:"
CHANGES_CHANNEL = _P + "changes"
_TENANTS = _P + "tenants"  # hash id -> doc
_TENANT_IDS = _P + "tenant_ids"  # sorted set (score 0) for ordered pagination
_KEYS = _P + "keys"  # hash key id -> doc
_BY_HASH = _P + "key_by_hash"  # hash secret hash -> key id
_AUDIT = _P + "audit"  # list of docs; position + 1 = sequence number
_META = _P + "meta"
_STATS = _P + "stats"  # hash replica id -> live-stats snapshot
_STATS_EXPIRY = _P + "stats_expiry"  # sorted set replica id scored by when its snapshot expires
_STATS_WANTED = _P + "stats_wanted"  # exists while a reader wants snapshots published


_USAGE_TTL_S = 400 * 86400


def _usage_key(tenant_id: str, hour: int) -> str:
    # Hash-tagged by tenant (not {gw}): usage is written on every flush and spreads over the cluster.
    return f"gw:{{{tenant_id}}}:usage:{hour}"


def _tenant_keys(tenant_id: str) -> str:
    return _P + "tenant_keys:" + tenant_id


class RedisStore:
    def __init__(self, client: aioredis.Redis) -> None:
        self._r = client

    async def _publish(self, message: str) -> None:
        await self._r.publish(CHANGES_CHANNEL, message)

    async def create_tenant(self, tenant: Tenant) -> None:
        async with _seam():
            created = await self._r.hsetnx(_TENANTS, tenant.id, tenant.model_dump_json())
            if not created:
                raise ConflictError(f"tenant {tenant.id!r} already exists", param="id")
            await self._r.zadd(_TENANT_IDS, {tenant.id: 0})

    async def put_tenant(self, tenant: Tenant) -> None:
        async with _seam():
            pipe = self._r.pipeline(transaction=True)
            pipe.hset(_TENANTS, tenant.id, tenant.model_dump_json())
            pipe.zadd(_TENANT_IDS, {tenant.id: 0})
            await pipe.execute()
            await self._publish("tenant:" + tenant.id)

    async def get_tenant(self, tenant_id: str) -> Tenant | None:
        async with _seam():
            doc = await self._r.hget(_TENANTS, tenant_id)
        return None if doc is None else Tenant.model_validate_json(doc)

    async def list_tenants(self, *, after: str | None = None, limit: int = 100) -> list[Tenant]:
        async with _seam():
            start = "(" + after if after else "-"
            ids = await self._r.zrangebylex(_TENANT_IDS, start, "+", start=0, num=limit)
            if not ids:
                return []
            docs = await self._r.hmget(_TENANTS, ids)
        return [Tenant.model_validate_json(d) for d in docs if d is not None]

    async def delete_tenant(self, tenant_id: str) -> bool:
        async with _seam():
            key_ids = await self._r.smembers(_tenant_keys(tenant_id))
            hashes = []
            if key_ids:
                docs = await self._r.hmget(_KEYS, list(key_ids))
                hashes = [KeyRecord.model_validate_json(d).secret_hash for d in docs if d is not None]
            pipe = self._r.pipeline(transaction=True)
            pipe.hdel(_TENANTS, tenant_id)
            pipe.zrem(_TENANT_IDS, tenant_id)
            if key_ids:
                pipe.hdel(_KEYS, *key_ids)
            if hashes:
                pipe.hdel(_BY_HASH, *hashes)
            pipe.delete(_tenant_keys(tenant_id))
            removed = (await pipe.execute())[0]
            await self._publish("tenant:" + tenant_id)
        return bool(removed)

    async def create_key(self, key: KeyRecord) -> None:
        async with _seam():
            if not await self._r.hsetnx(_KEYS, key.id, key.model_dump_json()):
                raise ConflictError(f"key {key.id!r} already exists", param="id")
            pipe = self._r.pipeline(transaction=True)
            pipe.hset(_BY_HASH, key.secret_hash, key.id)
            pipe.sadd(_tenant_keys(key.tenant_id), key.id)
            await pipe.execute()
            await self._publish("key:" + key.secret_hash)

    async def put_key(self, key: KeyRecord) -> None:
        async with _seam():
            pipe = self._r.pipeline(transaction=True)
            pipe.hset(_KEYS, key.id, key.model_dump_json())
            pipe.hset(_BY_HASH, key.secret_hash, key.id)
            pipe.sadd(_tenant_keys(key.tenant_id), key.id)
            await pipe.execute()
            await self._publish("key:" + key.secret_hash)

    async def get_key(self, key_id: str) -> KeyRecord | None:
        async with _seam():
            doc = await self._r.hget(_KEYS, key_id)
        return None if doc is None else KeyRecord.model_validate_json(doc)

    async def get_key_by_hash(self, secret_hash: str) -> KeyRecord | None:
        async with _seam():
            key_id = await self._r.hget(_BY_HASH, secret_hash)
            if key_id is None:
                return None
            doc = await self._r.hget(_KEYS, key_id)
        return None if doc is None else KeyRecord.model_validate_json(doc)

    async def list_keys(self, tenant_id: str) -> list[KeyRecord]:
        async with _seam():
            ids = sorted(await self._r.smembers(_tenant_keys(tenant_id)))
            if not ids:
                return []
            docs = await self._r.hmget(_KEYS, ids)
        return [KeyRecord.model_validate_json(d) for d in docs if d is not None]

    async def append_audit(self, entry: AuditEntry) -> None:
        async with _seam():
            await self._r.rpush(_AUDIT, entry.model_dump_json(exclude={"seq"}))

    async def list_audit(self, *, after: int = 0, limit: int = 100) -> list[AuditEntry]:
        async with _seam():
            docs = await self._r.lrange(_AUDIT, after, after + limit - 1)
        return [AuditEntry.model_validate_json(d).model_copy(update={"seq": after + i + 1}) for i, d in enumerate(docs)]

    async def add_usage(self, rows: list[UsageRow]) -> None:
        async with _seam():
            pipe = self._r.pipeline(transaction=False)
            for r in rows:
                key = _usage_key(r.tenant, r.hour)
                prefix = f"{r.key_id}|{r.currency}|"
                for name, value in (
                    ("requests", r.requests),
                    ("prompt", r.prompt_tokens),
                    ("completion", r.completion_tokens),
                    ("cached", r.cached_tokens),
                ):
                    pipe.hincrby(key, prefix + name, value)
                pipe.hincrbyfloat(key, prefix + "spend", r.spend)
                pipe.expire(key, _USAGE_TTL_S)
            await pipe.execute()

    async def usage(self, tenant_id: str, first_hour: int, last_hour: int, key_id: str | None = None) -> list[UsageRow]:
        hours = list(range(first_hour, last_hour + 1, 3600))[-24 * 400 :]
        async with _seam():
            pipe = self._r.pipeline(transaction=False)
            for hour in hours:
                pipe.hgetall(_usage_key(tenant_id, hour))
            results = await pipe.execute()
        rows = []
        for hour, fields in zip(hours, results, strict=True):
            grouped: dict[tuple[str, str], dict[str, str]] = {}
            for raw_name, raw_value in fields.items():
                k, currency, name = raw_name.decode().split("|")
                if key_id is None or k == key_id:
                    grouped.setdefault((k, currency), {})[name] = raw_value.decode()
            for (k, currency), v in grouped.items():
                rows.append(
                    UsageRow(
                        tenant=tenant_id,
                        key_id=k,
                        hour=hour,
                        currency=currency,
                        requests=int(v.get("requests", 0)),
                        prompt_tokens=int(v.get("prompt", 0)),
                        completion_tokens=int(v.get("completion", 0)),
                        cached_tokens=int(v.get("cached", 0)),
                        spend=float(v.get("spend", 0.0)),
                    )
                )
        return rows

    async def put_stats(self, replica: str, doc: str, *, ttl_s: float) -> None:
        async with _seam():
            pipe = self._r.pipeline(transaction=True)
            pipe.hset(_STATS, replica, doc)
            pipe.zadd(_STATS_EXPIRY, {replica: time.time() + ttl_s})
            # If every replica goes away, the keys go too.
            pipe.expire(_STATS, max(1, round(ttl_s)))
            pipe.expire(_STATS_EXPIRY, max(1, round(ttl_s)))
            await pipe.execute()

    async def list_stats(self) -> dict[str, str]:
        now = time.time()
        async with _seam():
            stale = await self._r.zrangebyscore(_STATS_EXPIRY, "-inf", now)
            if stale:
                pipe = self._r.pipeline(transaction=True)
                pipe.zrem(_STATS_EXPIRY, *stale)
                pipe.hdel(_STATS, *stale)
                await pipe.execute()
            docs = await self._r.hgetall(_STATS)
        return {_text(k): _text(v) for k, v in docs.items() if k not in stale}

    async def want_stats(self, for_s: float) -> None:
        async with _seam():
            if for_s <= 0:
                await self._r.delete(_STATS_WANTED)
            else:
                await self._r.set(_STATS_WANTED, b"1", px=max(1, round(for_s * 1000)))

    async def stats_wanted(self) -> bool:
        async with _seam():
            return bool(await self._r.exists(_STATS_WANTED))

    async def get_or_set_meta(self, name: str, value: str) -> str:
        async with _seam():
            await self._r.hsetnx(_META, name, value)
            stored = await self._r.hget(_META, name)
        return stored.decode() if isinstance(stored, bytes) else str(stored)

    async def close(self) -> None:
        await self._r.aclose()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class _seam:
    """Translate Redis failures into the gateway's error tree (503), at the one place they can occur."""

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, RedisError | OSError):
            raise ServiceUnavailableError(
                "The gateway's state store is unavailable.", code="state_store_unavailable"
            ) from exc
