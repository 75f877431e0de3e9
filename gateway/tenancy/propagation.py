"""Admin changes reach every replica: a Redis pub/sub listener that drops what this replica cached.

The auth cache is the only copy of tenant and key state a replica keeps. A change published by any
replica's store (`gateway.tenancy.store.RedisStore`) clears the matching entries here within milliseconds. If the
subscription is lost, the cache's TTL is shortened until the listener is back (and the cache is cleared when
it is), so a missed message costs at most `degraded_ttl_s` of staleness while the store answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.auth import Authenticator
from gateway.tenancy.store import CHANGES_CHANNEL

__all__ = ["ChangeListener"]

log = logging.getLogger("gateway.tenancy.propagation")


class ChangeListener:
    def __init__(self, client: aioredis.Redis, authenticator: Authenticator, *, degraded_ttl_s: float = 0.5) -> None:
        self._client = client
        self._auth = authenticator
        self._normal_ttl = authenticator.ttl_s
        self._degraded_ttl = degraded_ttl_s
        self.connected = asyncio.Event()

    async def run(self) -> None:
        backoff = 0.1
        while True:
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(CHANGES_CHANNEL)
                # Anything may have changed while we were not listening.
                self._auth.invalidate()
                self._auth.ttl_s = self._normal_ttl
                self.connected.set()
                backoff = 0.1
                while True:
                    message = await pubsub.get_message(timeout=5.0)
                    if message is not None:
                        self._apply(message.get("data"))
            except (RedisError, OSError) as exc:
                if self.connected.is_set():
                    log.warning(
                        "lost the change feed (%s): auth cache TTL is %.1fs until it is back",
                        type(exc).__name__,
                        self._degraded_ttl,
                    )
                self.connected.clear()
                # Keep the cache (it serves keys while the store is down) but re-check entries often.
                self._auth.ttl_s = self._degraded_ttl
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _apply(self, data: object) -> None:
        text = data.decode() if isinstance(data, bytes) else str(data)
        kind, _, value = text.partition(":")
        if kind == "key" and value:
            self._auth.invalidate(value)
        else:
            # Tenant changes affect every principal of that tenant: clear all (cheap, refills on demand).
            self._auth.invalidate()
