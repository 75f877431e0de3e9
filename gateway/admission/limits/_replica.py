"""`ReplicaLink`: this replica's end of the shared fair queues in Redis.

It beats (a replica that stops beating has its waiting requests dropped from the queues, so a crashed
replica leaves nothing behind but permits, which expire with their leases), and it pops the permits that
other replicas' releases granted to this replica's waiting requests (`gw:grants:<replica>`, filled by
lua/fairshare.lua) and hands each to `on_grant(waiter, endpoint, "redis")`.

A replica counts as dead once it has missed a few beats (`ttl_s`, three beats by default): its waiting
requests would otherwise keep being granted permits that nobody picks up (each such grant is leased only
briefly until its replica claims it, see lua/fairshare.lua, but the queue keeps granting them).

The list is popped with BLPOP on a connection of its own (it blocks), so a grant reaches its waiter one
network hop after the release that made it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from redis.exceptions import RedisError

from gateway.admission.limits._redis import RedisQuotaStore
from gateway.admission.limits._types import QuotaBackendError

__all__ = ["ReplicaLink"]

log = logging.getLogger("gateway.admission.limits")

OnGrant = Callable[[str, str, str], None]


class ReplicaLink:
    def __init__(
        self,
        store: RedisQuotaStore,
        blocking: Any,
        on_grant: OnGrant,
        *,
        on_lapse: Callable[[], None] | None = None,
        beat_s: float = 1.0,
        ttl_s: float = 3.0,
    ) -> None:
        """`blocking` is a redis-py asyncio client without a read timeout (BLPOP waits); `on_lapse` is called
        when this replica's beat had lapsed (its waiting requests may have been dropped)."""
        self._store = store
        self._blocking = blocking
        self._on_grant = on_grant
        self._on_lapse = on_lapse
        self._beat_s = beat_s
        self._ttl_s = ttl_s

    async def beat(self) -> None:
        try:
            if not await self._store.beat(self._ttl_s) and self._on_lapse is not None:
                self._on_lapse()
        except QuotaBackendError:
            pass  # Redis is away: admission's failure mode is in force; the next beat rejoins

    async def run(self) -> None:
        await asyncio.gather(self._beats(), self._listen())

    async def _beats(self) -> None:
        while True:
            await asyncio.sleep(self._beat_s)
            await self.beat()

    async def _listen(self) -> None:
        key = self._store.grants_key
        while True:
            try:
                item = await self._blocking.blpop([key], timeout=1)
            except (RedisError, OSError) as exc:
                log.debug("grant list unreachable: %s", type(exc).__name__)
                await asyncio.sleep(0.5)
                continue
            if item is None:
                continue
            raw = item[1]
            text = raw.decode() if isinstance(raw, bytes) else str(raw)
            waiter, _, endpoint = text.rpartition("|")
            try:
                self._on_grant(waiter, endpoint, "redis")
            except Exception:  # a bad grant must not stop the listener
                log.exception("could not hand over a grant")
