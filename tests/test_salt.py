"""Cache salts: base64url(HMAC-SHA256(secret, "v1:" + scope)), vLLM-safe characters, and scopes that cannot
be forged."""

from __future__ import annotations

import base64
import hashlib
import hmac

from gateway.upstream.salt import SaltDeriver


def reference(secret: bytes, scope: str) -> str:
    mac = hmac.new(secret, b"v1:" + scope.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def test_formula_and_shape() -> None:
    salts = SaltDeriver(b"secret")
    salt = salts.derive("tenant:acme")
    assert salt == reference(b"secret", "tenant:acme")
    assert len(salt) == 43
    assert not set(salt) & set("/@\\=+\0")


def test_scopes_differ_and_secret_rotation_changes_salts() -> None:
    a, b = SaltDeriver(b"s1"), SaltDeriver(b"s2")
    assert a.derive("tenant:x") != a.derive("tenant:y")
    assert a.derive("tenant:x") != b.derive("tenant:x")


def test_client_subscope_cannot_reach_another_scope() -> None:
    salts = SaltDeriver(b"secret")
    # A client of tenant x choosing a salt can never produce tenant y's salt: the scope is inside the MAC.
    assert salts.derive_sub("tenant:x", "tenant:y") != salts.derive("tenant:y")
    assert salts.derive_sub("tenant:x", "a") == reference(b"secret", "tenant:x/a")
    assert salts.derive_sub("tenant:x", "a") != salts.derive_sub("tenant:y", "a")
