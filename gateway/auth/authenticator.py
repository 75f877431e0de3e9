"""Authentication: `Authorization: Bearer sk-gw-...` -> `Principal`, served from an in-process cache.

A key seen recently costs one SHA-256 and one dict lookup; the store is read only on a miss. Misses are
cached briefly too, so a flood of wrong keys cannot turn into a flood of store reads. Concurrent misses of
one key share one read (a thousand clients starting at once with a key the process has not seen yet make
one store lookup, not a thousand connections to Redis). Any change made through this process (a new key, a
revocation) invalidates the cache entry at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable

from gateway.auth.keys import hash_key, hashes_equal, looks_like_key
from gateway.errors import AuthenticationError, BadRequestError, ServiceUnavailableError
from gateway.tenancy import Principal
from gateway.tenancy.store import Store

__all__ = ["Authenticator", "authorization_header", "bearer_token", "secret_matches"]

_MISSING = "You didn't provide an API key. Send it in the Authorization header: 'Authorization: Bearer sk-gw-...'."
_INVALID = "Incorrect API key provided."


def authorization_header(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The request's one `Authorization` header (ASGI headers: lower-case names).

    Two of them are refused (400) rather than one picked: proxies, frameworks and the backends behind
    them disagree on which one wins (first, last, or joined with a comma), so a request carrying two
    credentials could be authenticated as one caller and logged or forwarded as another.
    """
    found: bytes | None = None
    for name, value in headers:
        if name == b"authorization":
            if found is not None:
                raise BadRequestError(
                    "The request has more than one Authorization header; send exactly one.",
                    code="duplicate_authorization",
                )
            found = value
    return found


def secret_matches(token: str, secret: str) -> bool:
    """Whether `token` is `secret` (the admin key, the metrics token), in time that does not depend on how
    much of it matches: both are hashed first, so the bytes compared bear no relation to a guess's prefix,
    and the digests are compared with `hmac.compare_digest`."""
    return hashes_equal(hash_key(token), hash_key(secret))


def bearer_token(header: bytes | None) -> str | None:
    if not header:
        return None
    try:
        value = header.decode("latin-1").strip()
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        return None
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


class Authenticator:
    def __init__(
        self,
        store: Store,
        *,
        ttl_s: float = 5.0,
        negative_ttl_s: float = 1.0,
        max_entries: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self.ttl_s = ttl_s
        self._negative_ttl = negative_ttl_s
        self._max = max_entries
        self._clock = clock
        self._wall = wall_clock
        self._cache: dict[str, tuple[Principal | None, float]] = {}
        # Store reads in progress, by key hash: concurrent misses of one key wait for the same read.
        self._loading: dict[str, asyncio.Future[Principal | None]] = {}
        # Bumped by every invalidation: a read that started before one is used but not cached (it may be stale).
        self._generation = 0
        # When a store read last failed (loop time): the request that met it goes on without waiting again.
        self.store_failed_at = float("-inf")

    async def authenticate(self, header: bytes | None) -> Principal:
        """The principal of a bearer key, from the cache or the store. While the store does not answer (its
        client's timeout), a key seen before keeps working from its stale entry and a key never seen gets a
        503; `store_failed_at` then says when (loop time), so admission need not wait on it again."""
        token = bearer_token(header)
        if token is None:
            raise AuthenticationError(_MISSING)
        if not looks_like_key(token):
            raise AuthenticationError(_INVALID)
        digest = hash_key(token)
        now = self._clock()
        hit = self._cache.get(digest)
        if hit is not None and hit[1] > now:
            principal = hit[0]
        else:
            generation = self._generation
            try:
                principal = await self._load_once(digest)
            except ServiceUnavailableError:
                self.store_failed_at = asyncio.get_running_loop().time()
                if hit is None or hit[0] is None:
                    raise
                # The store is down: a key seen before keeps working (revocations cannot propagate while
                # it is down anyway). Ask the store again in a second, not on every request.
                self._cache[digest] = (hit[0], now + 1.0)
                return self._check(hit[0], digest)
            if generation == self._generation:
                if len(self._cache) >= self._max:
                    self._cache.clear()  # crude but bounded; a full cache refills from the store
                ttl = self.ttl_s if principal is not None else self._negative_ttl
                self._cache[digest] = (principal, now + ttl)
        if principal is None:
            raise AuthenticationError(_INVALID)
        return self._check(principal, digest)

    def _check(self, principal: Principal, digest: str) -> Principal:
        if not hashes_equal(principal.key.secret_hash, digest):
            raise AuthenticationError(_INVALID)
        key = principal.key
        if key.revoked or key.disabled:
            raise AuthenticationError("This API key has been revoked or disabled.")
        if key.expires_at is not None and key.expires_at <= self._wall():
            raise AuthenticationError("This API key has expired.")
        return principal

    async def _load_once(self, digest: str) -> Principal | None:
        loading = self._loading.get(digest)
        if loading is None:
            loading = asyncio.ensure_future(self._load(digest))
            self._loading[digest] = loading
            loading.add_done_callback(lambda _: self._loading.pop(digest, None))
        # shield: a caller that gives up (its client left) does not cancel the read for the others.
        return await asyncio.shield(loading)

    async def _load(self, digest: str) -> Principal | None:
        key = await self._store.get_key_by_hash(digest)
        if key is None:
            return None
        tenant = await self._store.get_tenant(key.tenant_id)
        if tenant is None:
            return None
        return Principal(tenant=tenant, key=key)

    def invalidate(self, digest: str | None = None) -> None:
        self._generation += 1
        if digest is None:
            self._cache.clear()
            self._loading.clear()
        else:
            self._cache.pop(digest, None)
            self._loading.pop(digest, None)
