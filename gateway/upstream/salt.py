"""Prefix-cache salts: one per cache scope (a tenant, a group or a key), never the client's own value.

    salt = base64url_nopad(HMAC-SHA256(salt_secret, "v1:" + scope))          43 characters, 256 bits

base64url because vLLM rejects '/', '@' and '\\' in a salt. A client's `cache_salt` can only split its own
scope (`scope + "/" + client_salt`), never name another one: whatever it sends, the HMAC key is ours.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

__all__ = ["SaltDeriver"]


class SaltDeriver:
    """Derives salts for scopes, memoising the per-scope ones (one HMAC per scope, not per request)."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret
        self._memo: dict[str, str] = {}

    def derive(self, scope: str) -> str:
        salt = self._memo.get(scope)
        if salt is None:
            salt = self._compute(scope)
            if len(self._memo) < 100_000:
                self._memo[scope] = salt
        return salt

    def derive_sub(self, scope: str, client_salt: str) -> str:
        # Not memoised: client salts are unbounded in number.
        return self._compute(scope + "/" + client_salt)

    def _compute(self, scope: str) -> str:
        mac = hmac.new(self._secret, b"v1:" + scope.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
