"""Two gateway processes sharing one real redis-server: state made on one is seen by the other."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.gateway import GatewayProc, start_gateway
from tests.support.redis_server import RedisServer


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis-replicas"))
    server.start(appendonly=True)
    yield server
    server.kill()


@pytest.fixture(scope="module")
def pair(redis: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProc, GatewayProc]]:
    config = {"redis_url": redis.url}
    a = start_gateway(config, tmp_path_factory.mktemp("replica-a"))
    b = start_gateway(config, tmp_path_factory.mktemp("replica-b"))
    yield a, b
    a.stop()
    b.stop()


def admin(gw: GatewayProc) -> dict[str, str]:
    return {"Authorization": f"Bearer {gw.admin_key}"}


def status(gw: GatewayProc, secret: str) -> int:
    return httpx.get(gw.url + "/v1/models", headers={"Authorization": f"Bearer {secret}"}).status_code


def test_key_made_on_one_works_on_the_other(pair: tuple[GatewayProc, GatewayProc]) -> None:
    a, b = pair
    assert httpx.post(a.url + "/admin/tenants", json={"id": "shared"}, headers=admin(a)).status_code == 201
    secret = httpx.post(a.url + "/admin/tenants/shared/keys", json={"name": "x"}, headers=admin(a)).json()["key"]
    assert status(b, secret) == 200
    assert httpx.get(b.url + "/admin/tenants/shared", headers=admin(b)).status_code == 200


def test_revocation_reaches_the_other_replica_within_a_second(
    pair: tuple[GatewayProc, GatewayProc], record_property: pytest.RecordProperty
) -> None:
    a, b = pair
    httpx.post(a.url + "/admin/tenants", json={"id": "revoker"}, headers=admin(a))
    created = httpx.post(a.url + "/admin/tenants/revoker/keys", json={}, headers=admin(a)).json()
    for _ in range(3):
        assert status(b, created["key"]) == 200  # B now serves this key from its cache
    revoked_at = time.monotonic()
    assert httpx.post(a.url + f"/admin/keys/{created['id']}/revoke", headers=admin(a)).status_code == 200
    while status(b, created["key"]) != 401:
        assert time.monotonic() - revoked_at < 1.0, "revocation not seen on the other replica within 1 s"
        time.sleep(0.005)
    delay_ms = (time.monotonic() - revoked_at) * 1000
    record_property("propagation_ms", round(delay_ms, 1))
    print(f"revocation propagated in {delay_ms:.1f} ms")


def test_tenant_change_reaches_the_other_replica(pair: tuple[GatewayProc, GatewayProc]) -> None:
    a, b = pair
    httpx.post(a.url + "/admin/tenants", json={"id": "narrowed", "models": ["*"]}, headers=admin(a))
    secret = httpx.post(a.url + "/admin/tenants/narrowed/keys", json={}, headers=admin(a)).json()["key"]
    assert status(b, secret) == 200
    assert httpx.delete(a.url + "/admin/tenants/narrowed", headers=admin(a)).status_code == 204
    deadline = time.monotonic() + 1.0
    while status(b, secret) != 401:
        assert time.monotonic() < deadline
        time.sleep(0.005)


def test_redis_restart_with_persistence_loses_nothing(
    pair: tuple[GatewayProc, GatewayProc], redis: RedisServer, tmp_path: Path
) -> None:
    a, b = pair
    httpx.post(a.url + "/admin/tenants", json={"id": "durable", "weight": 3}, headers=admin(a))
    secret = httpx.post(a.url + "/admin/tenants/durable/keys", json={}, headers=admin(a)).json()["key"]
    redis.stop()
    redis.start(appendonly=True)
    # Both replicas reconnect by themselves; the tenant and the key are still there.
    deadline = time.monotonic() + 5
    while True:
        try:
            if status(b, secret) == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, b.output()[-2000:]
        time.sleep(0.05)
    resp = httpx.get(a.url + "/admin/tenants/durable", headers=admin(a))
    tenant = resp.json()
    assert tenant["weight"] == 3
    assert status(a, secret) == 200
