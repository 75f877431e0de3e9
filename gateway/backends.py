"""Backends at run time: health, the cache_salt enforcement probe, and which backend may serve a request.

Fail closed (SPEC section 5): a tenant whose cache scope is not `global` is only routed to a backend that
provably keeps prefix caches apart: a vLLM that rejects an invalid `cache_salt` (so it honours valid ones),
or a non-vLLM backend that does not share a prefix cache across callers. Until a vLLM backend has been
probed, it is not trusted with such tenants.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import aiohttp
import orjson

from gateway.config import BackendConfig, ModelConfig, Settings
from gateway.errors import ServiceUnavailableError
from gateway.metrics import Metrics

__all__ = ["Backend", "BackendPool"]

log = logging.getLogger("gateway.backends")


@dataclass(eq=False)
class Backend:
    config: BackendConfig
    # None: not probed yet; True: rejects an invalid salt; False: ignores salts.
    salt_enforced: bool | None = None
    healthy: bool = False
    probe_model: str = "probe"
    base_url: str = field(init=False)

    def __post_init__(self) -> None:
        self.base_url = self.config.url.rstrip("/")

    @property
    def name(self) -> str:
        return self.config.name

    def isolates(self) -> bool:
        """May a tenant that needs its own prefix-cache scope be routed here?"""
        if self.config.kind == "vllm":
            return self.salt_enforced is True
        return not self.config.shares_prefix_cache


class BackendPool:
    def __init__(self, settings: Settings, metrics: Metrics, previous: BackendPool | None = None) -> None:
        self._metrics = metrics
        self.backends: dict[str, Backend] = {b.name: Backend(b) for b in settings.backends}
        if previous is not None:
            # A reload keeps what is known about unchanged backends (health, salt enforcement).
            for name, backend in self.backends.items():
                old = previous.backends.get(name)
                if old is not None and old.config == backend.config:
                    backend.healthy, backend.salt_enforced = old.healthy, old.salt_enforced
        for model in settings.models:
            for name in model.backends:
                backend = self.backends[name]
                if backend.probe_model == "probe":
                    backend.probe_model = model.upstream_name

    def choose(self, model: ModelConfig, needs_isolation: bool, tenant_label: str) -> Backend:
        """The first healthy backend of the model that may serve this tenant, or a 503."""
        unhealthy = 0
        not_isolating = 0
        for name in model.backends:
            backend = self.backends[name]
            if not backend.healthy:
                unhealthy += 1
                continue
            if needs_isolation and not backend.isolates():
                not_isolating += 1
                continue
            return backend
        if not_isolating:
            self._metrics.isolation_rejections.labels(tenant_label, model.name).inc()
            log.warning(
                "refused %s request for model %s: no healthy backend enforces cache_salt isolation "
                "(tenant cache scope is not global; fail closed)",
                tenant_label,
                model.name,
            )
            raise ServiceUnavailableError(
                f"No backend for model '{model.name}' can serve this request with prefix-cache isolation "
                "right now. The request was refused rather than risk sharing a cache across tenants.",
                code="isolation_unavailable",
            )
        raise ServiceUnavailableError(f"No healthy backend is available for model '{model.name}'.")

    async def check_all(self, session: aiohttp.ClientSession) -> None:
        await asyncio.gather(*(self.check(session, b) for b in self.backends.values()))

    async def check(self, session: aiohttp.ClientSession, backend: Backend) -> None:
        """Health check; for vLLM, also the salt probe: an empty `cache_salt` must be rejected with 400."""
        timeout = aiohttp.ClientTimeout(total=5)
        try:
            if backend.config.kind == "vllm":
                payload = orjson.dumps(
                    {"model": backend.probe_model, "prompt": "ping", "max_tokens": 1, "cache_salt": ""}
                )
                async with session.post(
                    backend.base_url + "/v1/completions",
                    data=payload,
                    headers={"content-type": "application/json"},
                    timeout=timeout,
                ) as resp:
                    text = await resp.read()
                    healthy = resp.status < 500
                    enforced: bool | None
                    if resp.status == 400 and b"cache_salt" in text:
                        enforced = True
                    elif 200 <= resp.status < 300:
                        enforced = False
                    else:
                        enforced = backend.salt_enforced
            else:
                async with session.get(backend.base_url + "/v1/models", timeout=timeout) as resp:
                    await resp.read()
                    healthy = resp.status < 500
                    enforced = None
        except (aiohttp.ClientError, TimeoutError, OSError):
            healthy, enforced = False, backend.salt_enforced
        if healthy != backend.healthy:
            log.log(
                logging.INFO if healthy else logging.WARNING,
                "backend %s is %s",
                backend.name,
                "up" if healthy else "down",
            )
        if enforced is False and backend.salt_enforced is not False:
            log.warning(
                "backend %s accepted an invalid cache_salt: it ignores salts (vLLM < 0.9?). "
                "Tenants whose cache scope is not global will not be routed to it.",
                backend.name,
            )
        backend.healthy = healthy
        backend.salt_enforced = enforced
        self._metrics.backend_up.labels(backend.name).set(1 if healthy else 0)
        if backend.config.kind == "vllm":
            self._metrics.salt_unsupported.labels(backend.name).set(1 if enforced is False else 0)
