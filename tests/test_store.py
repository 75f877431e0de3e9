"""One suite over both stores: the embedded SQLite file and the shared Redis (a real redis-server)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from gateway.errors import ConflictError
from gateway.tenancy import AuditEntry, KeyRecord, Quotas, Tenant, UsageRow
from gateway.tenancy.store import RedisStore, SqliteStore, Store
from tests.support.redis_server import RedisServer


@pytest.fixture(params=["sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "sqlite":
        s: Store = SqliteStore(str(tmp_path / "state.db"))
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        client = aioredis.Redis.from_url(server.url)
        await client.flushdb()
        s = RedisStore(client)
    yield s
    await s.close()


def key(key_id: str, tenant: str, secret_hash: str, **fields: object) -> KeyRecord:
    return KeyRecord(
        id=key_id, tenant_id=tenant, secret_hash=secret_hash, prefix="sk-gw-abcd", created_at=1.0, **fields
    )  # type: ignore[arg-type]


async def test_tenants_crud_and_pagination(store: Store) -> None:
    for i in range(5):
        await store.create_tenant(Tenant(id=f"t{i}", weight=i + 1))
    with pytest.raises(ConflictError):
        await store.create_tenant(Tenant(id="t1"))
    t1 = await store.get_tenant("t1")
    assert t1 is not None and t1.weight == 2
    assert await store.get_tenant("nope") is None
    first = await store.list_tenants(limit=2)
    rest = await store.list_tenants(after=first[-1].id, limit=10)
    assert [t.id for t in first + rest] == ["t0", "t1", "t2", "t3", "t4"]
    await store.put_tenant(Tenant(id="t1", weight=9, limits=Quotas(rpm=5)))
    updated = await store.get_tenant("t1")
    assert updated is not None and updated.weight == 9 and updated.limits.rpm == 5


async def test_keys_and_cascading_delete(store: Store) -> None:
    await store.create_tenant(Tenant(id="acme"))
    await store.create_key(key("k1", "acme", "h1"))
    await store.create_key(key("k2", "acme", "h2", models=("a-*",)))
    with pytest.raises(ConflictError):
        await store.create_key(key("k1", "acme", "h3"))
    found = await store.get_key_by_hash("h2")
    assert found is not None and found.id == "k2" and found.models == ("a-*",)
    assert [k.id for k in await store.list_keys("acme")] == ["k1", "k2"]
    k1 = await store.get_key("k1")
    assert k1 is not None
    await store.put_key(k1.model_copy(update={"revoked": True}))
    again = await store.get_key_by_hash("h1")
    assert again is not None and again.revoked
    assert await store.delete_tenant("acme") is True
    assert await store.delete_tenant("acme") is False
    assert await store.get_key("k1") is None and await store.get_key_by_hash("h2") is None
    assert await store.list_keys("acme") == []


async def test_audit_and_meta(store: Store) -> None:
    for i in range(3):
        await store.append_audit(AuditEntry(time=time.time(), actor="admin", action=f"a{i}", target="x"))
    entries = await store.list_audit()
    assert [e.action for e in entries] == ["a0", "a1", "a2"]
    assert [e.seq for e in entries] == [1, 2, 3]
    assert [e.action for e in await store.list_audit(after=1, limit=1)] == ["a1"]
    assert await store.get_or_set_meta("salt", "first") == "first"
    assert await store.get_or_set_meta("salt", "second") == "first"


async def test_redis_keys_share_one_cluster_slot(redis_server: RedisServer) -> None:
    client = aioredis.Redis.from_url(redis_server.url)
    await client.flushdb()
    s = RedisStore(client)
    await s.create_tenant(Tenant(id="acme"))
    await s.create_key(key("k1", "acme", "h1"))
    names = [k.decode() for k in await client.keys("*")]
    assert names and all("{gw}" in n for n in names)
    await s.close()


async def test_usage_adds_up(store: Store) -> None:
    row = UsageRow(
        tenant="acme",
        key_id="k1",
        hour=7200,
        requests=1,
        prompt_tokens=10,
        completion_tokens=5,
        cached_tokens=2,
        spend=0.5,
    )
    await store.add_usage([row, row.model_copy(update={"key_id": "k2"})])
    await store.add_usage([row, row.model_copy(update={"hour": 3600 * 10})])
    rows = await store.usage("acme", 0, 7200)
    totals = {(r.key_id, r.hour): r for r in rows}
    assert totals[("k1", 7200)].requests == 2 and totals[("k1", 7200)].prompt_tokens == 20
    assert totals[("k1", 7200)].spend == pytest.approx(1.0)
    assert ("k1", 36000) not in totals
    assert [r.key_id for r in await store.usage("acme", 0, 7200, "k2")] == ["k2"]
    assert await store.usage("other", 0, 10**9) == []


async def test_live_stats_snapshots_expire(store: Store) -> None:
    await store.put_stats("a", '{"n": 1}', ttl_s=30)
    await store.put_stats("b", '{"n": 2}', ttl_s=30)
    await store.put_stats("a", '{"n": 3}', ttl_s=30)
    assert await store.list_stats() == {"a": '{"n": 3}', "b": '{"n": 2}'}
    # A process that stopped publishing drops out once its TTL has passed (here: at once).
    await store.put_stats("b", '{"n": 4}', ttl_s=0)
    assert await store.list_stats() == {"a": '{"n": 3}'}
    assert await store.list_stats() == {"a": '{"n": 3}'}


async def test_live_stats_are_wanted_for_a_while(store: Store) -> None:
    assert await store.stats_wanted() is False
    await store.want_stats(30)
    assert await store.stats_wanted() is True
    await store.want_stats(0)  # the last reader's wish has run out
    assert await store.stats_wanted() is False
