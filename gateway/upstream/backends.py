"""Backends at run time: health, the cache_salt enforcement probe, a circuit breaker, and which backends may
serve a request, in the order the model lists them.

Fail closed (SPEC section 5): a tenant whose cache scope is not `global` is only routed to a backend that
provably keeps prefix caches apart: a vLLM that rejects an invalid `cache_salt` (so it honours valid ones),
or a non-vLLM backend that does not share a prefix cache across callers. Until a vLLM backend has been
probed, it is not trusted with such tenants.

Health: vLLM and OpenAI-compatible backends are probed every `health_interval_s`. Hosted providers
(`kind: litellm`) are not: a probe would cost a call on the operator's account and would only say what
requests say anyway. They start healthy and are judged by their answers, like every backend, through the
circuit breaker: after `EJECT_AFTER` consecutive failures to answer (refused or dropped connections,
timeouts; an HTTP error answer means the backend is up), a backend is ejected for `EJECT_S`, doubling
while it keeps failing up to `EJECT_MAX_S`. Once the time is up, the next request tries it (half open); a
success, or a passing health check, closes the breaker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
import orjson

from gateway.config import BackendConfig, ModelConfig, Settings
from gateway.errors import ServiceUnavailableError
from gateway.telemetry.metrics import Metrics

__all__ = ["EJECT_AFTER", "EJECT_MAX_S", "EJECT_S", "Backend", "BackendPool"]

log = logging.getLogger("gateway.upstream.backends")

EJECT_AFTER = 3
EJECT_S = 5.0
EJECT_MAX_S = 60.0


@dataclass(eq=False)
class Backend:
    config: BackendConfig
    # None: not probed yet; True: rejects an invalid salt; False: ignores salts.
    salt_enforced: bool | None = None
    healthy: bool = False
    probe_model: str = "probe"
    base_url: str = field(init=False)
    # The circuit breaker: consecutive failures to answer, and until when the backend is left out.
    failures: int = 0
    ejected_until: float = 0.0

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
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        previous: BackendPool | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._metrics = metrics
        self._clock = clock
        self.backends: dict[str, Backend] = {b.name: Backend(b) for b in settings.backends}
        for backend in self.backends.values():
            # Not probed (see the module's docstring): up until its answers say otherwise.
            backend.healthy = backend.config.kind == "litellm"
            metrics.ejections.labels(backend.name)  # a zero to start from, so rate() and alerts see the first
        if previous is not None:
            # A reload keeps what is known about unchanged backends (health, salt enforcement).
            for name, backend in self.backends.items():
                old = previous.backends.get(name)
                if old is not None and old.config == backend.config:
                    backend.healthy, backend.salt_enforced = old.healthy, old.salt_enforced
                    backend.failures, backend.ejected_until = old.failures, old.ejected_until
        for model in settings.models:
            for name in model.backends:
                backend = self.backends[name]
                if backend.probe_model == "probe":
                    backend.probe_model = model.upstream_name

    def candidates(self, model: ModelConfig, needs_isolation: bool, tenant_label: str) -> list[Backend]:
        """The model's backends that may serve this tenant now, in the model's order; a 503 if none.

        Healthy, not ejected by the breaker, and keeping prefix caches apart if the tenant needs that.
        """
        found: list[Backend] = []
        not_isolating = 0
        now = self._clock()
        for name in model.backends:
            backend = self.backends[name]
            if not backend.healthy or backend.ejected_until > now:
                continue
            if needs_isolation and not backend.isolates():
                not_isolating += 1
                continue
            found.append(backend)
        if found:
            return found
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

    def failed(self, backend: Backend) -> None:
        """The backend did not answer (connection refused or dropped, timeout): count it, maybe eject it."""
        backend.failures += 1
        if backend.failures < EJECT_AFTER:
            return
        cooldown = min(EJECT_MAX_S, EJECT_S * 2 ** (backend.failures - EJECT_AFTER))
        backend.ejected_until = self._clock() + cooldown
        self._metrics.ejections.labels(backend.name).inc()
        log.warning(
            "backend %s ejected for %.0f s after %d consecutive failures", backend.name, cooldown, backend.failures
        )

    def succeeded(self, backend: Backend) -> None:
        """The backend answered (whatever the status): the breaker closes."""
        if backend.failures:
            if backend.failures >= EJECT_AFTER:
                log.info("backend %s answers again", backend.name)
            backend.failures = 0
            backend.ejected_until = 0.0

    async def check_all(self, session: aiohttp.ClientSession) -> None:
        await asyncio.gather(*(self.check(session, b) for b in self.backends.values() if b.config.kind != "litellm"))
        for backend in self.backends.values():
            if backend.config.kind == "litellm":
                self._metrics.backend_up.labels(backend.name).set(1 if backend.ejected_until <= self._clock() else 0)

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
        if healthy:
            self.succeeded(backend)  # probed back
        self._metrics.backend_up.labels(backend.name).set(1 if healthy else 0)
        if backend.config.kind == "vllm":
            self._metrics.salt_unsupported.labels(backend.name).set(1 if enforced is False else 0)
