"""Connections to a backend's engines: one keep-alive pool per endpoint, made when the endpoint is first
used, so endpoints found in DNS need no set-up; hosted providers (`kind: litellm`) have one pool for all."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from gateway.config import BackendConfig
from gateway.upstream.relay import UpstreamPool

__all__ = ["Connections"]


class Connections:
    def __init__(self, config: BackendConfig, make: Callable[[str], UpstreamPool], *, shared: bool = False) -> None:
        """`make(base_url)` opens a pool to one endpoint; with `shared`, one pool serves every endpoint."""
        self.config = config
        self._make = make
        self._shared = shared
        self._pools: dict[str, UpstreamPool] = {}

    def to(self, endpoint: str) -> UpstreamPool:
        key = "" if self._shared else endpoint
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = self._make(endpoint)
        return pool

    async def retire(self, keep: set[str]) -> None:
        """Close the pools of endpoints that left (requests still using them keep their connections)."""
        if self._shared:
            return
        for endpoint in [e for e in self._pools if e not in keep]:
            await self._pools.pop(endpoint).close()

    async def close(self) -> None:
        pools, self._pools = list(self._pools.values()), {}
        await asyncio.gather(*(pool.close() for pool in pools))
