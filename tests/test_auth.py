"""Keys and authentication against the real embedded store (SQLite on disk)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from gateway.auth import Authenticator
from gateway.auth.keys import generate_key, hash_key, looks_like_key
from gateway.errors import AuthenticationError
from gateway.tenancy import KeyRecord, Tenant
from gateway.tenancy.store import SqliteStore


def test_key_shape() -> None:
    keys = {generate_key() for _ in range(100)}
    assert len(keys) == 100
    for key in keys:
        assert key.startswith("sk-gw-") and looks_like_key(key)
        assert len(key) == 6 + 43  # 256 bits in base64url


async def make(store: SqliteStore, **fields: object) -> str:
    secret = generate_key()
    record = KeyRecord(
        id="key_" + secret[-8:],
        tenant_id="t1",
        secret_hash=hash_key(secret),
        prefix=secret[:10],
        created_at=time.time(),
        **fields,  # type: ignore[arg-type]
    )
    await store.create_key(record)
    return secret


async def test_authenticate_and_cache(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "s.db"))
    await store.create_tenant(Tenant(id="t1"))
    secret = await make(store)
    now = [0.0]
    auth = Authenticator(store, clock=lambda: now[0])
    principal = await auth.authenticate(f"Bearer {secret}".encode())
    assert principal.tenant_id == "t1"
    # Served from the cache: a deleted tenant is still seen until the entry expires or is invalidated.
    await store.delete_tenant("t1")
    assert (await auth.authenticate(f"Bearer {secret}".encode())).tenant_id == "t1"
    now[0] += 10
    with pytest.raises(AuthenticationError):
        await auth.authenticate(f"Bearer {secret}".encode())
    await store.close()


@pytest.mark.parametrize(
    "header",
    [None, b"", b"Bearer", b"Basic abc", b"Bearer sk-gw-short", b"Bearer sk-other-" + b"a" * 43],
)
async def test_rejects_malformed(tmp_path: Path, header: bytes | None) -> None:
    store = SqliteStore(str(tmp_path / "s.db"))
    with pytest.raises(AuthenticationError):
        await Authenticator(store).authenticate(header)
    await store.close()


async def test_revoked_disabled_expired(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "s.db"))
    await store.create_tenant(Tenant(id="t1"))
    auth = Authenticator(store)
    for fields in ({"revoked": True}, {"disabled": True}, {"expires_at": time.time() - 1}):
        secret = await make(store, **fields)
        with pytest.raises(AuthenticationError):
            await auth.authenticate(f"Bearer {secret}".encode())
    await store.close()
