"""Virtual key secrets: generation, hashing, and the shape check done before any lookup.

A key is `sk-gw-` + 43 base64url characters (256 random bits). Only its SHA-256 is stored: the secret has
full entropy, so a fast hash is enough (a slow KDF protects low-entropy passwords, not random keys).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets

__all__ = ["KEY_PREFIX", "generate_key", "hash_key", "hashes_equal", "looks_like_key", "new_key_id"]

KEY_PREFIX = "sk-gw-"
_KEY_RE = re.compile(r"^sk-gw-[A-Za-z0-9_-]{43}$")


def generate_key() -> str:
    raw = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
    return KEY_PREFIX + raw


def new_key_id() -> str:
    return "key_" + secrets.token_hex(8)


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def hashes_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def looks_like_key(secret: str) -> bool:
    return _KEY_RE.match(secret) is not None
