"""Backends at run time: each is a pool of one or more engine endpoints (a URL, a fixed list, or every
address a DNS name resolves to), with per-endpoint health, `cache_salt` enforcement and a circuit breaker,
and which backends may serve a request, in the order the model lists them.

Fail closed: a tenant whose cache scope is not `global` is only routed to an endpoint that provably keeps
prefix caches apart: a vLLM that rejects an invalid `cache_salt` (so it honours valid ones), or a non-vLLM
backend that does not share a prefix cache across callers. Until a vLLM endpoint has been probed, it is not
trusted with such tenants.

Health: vLLM and OpenAI-compatible endpoints are probed every `health_interval_s`. Hosted providers
(`kind: litellm`) are not: a probe would cost a call on the operator's account and would only say what
requests say anyway. They start healthy and are judged by their answers, like every endpoint, through the
circuit breaker: after `EJECT_AFTER` consecutive failures to answer (refused or dropped connections,
timeouts; an HTTP error answer means the endpoint is up), an endpoint is ejected for `EJECT_S`, doubling
while it keeps failing up to `EJECT_MAX_S`. Once the time is up, the next request tries it (half open); a
success, or a passing health check, closes the breaker.

Discovery: a backend with `discovery` re-resolves its DNS name every `interval_s`. A new address joins
unprobed (so not yet usable) and is probed at once; an address that is gone leaves the pool, and requests
already placed there finish where they are.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import aiohttp
import orjson

from gateway.config import BackendConfig, ModelConfig, Settings
from gateway.errors import ServiceUnavailableError
from gateway.telemetry.metrics import Metrics

__all__ = ["EJECT_AFTER", "EJECT_MAX_S", "EJECT_S", "Backend", "BackendPool", "Candidate", "Endpoint"]

log = logging.getLogger("gateway.backends")

EJECT_AFTER = 3
EJECT_S = 5.0
EJECT_MAX_S = 60.0

Resolver = Callable[[str, int], Iterable[str]]


@dataclass(eq=False)
class Endpoint:
    """One engine of a backend pool: its address and what is known about it."""

    id: str
    # None: not probed yet; True: rejects an invalid salt; False: ignores salts.
    salt_enforced: bool | None = None
    healthy: bool = False
    # The circuit breaker: consecutive failures to answer, and until when the endpoint is left out.
    failures: int = 0
    ejected_until: float = 0.0

    @property
    def base_url(self) -> str:
        return self.id


@dataclass(eq=False)
class Backend:
    config: BackendConfig
    endpoints: dict[str, Endpoint] = field(default_factory=dict)
    probe_model: str = "probe"

    @property
    def name(self) -> str:
        return self.config.name

    def isolates(self, endpoint: Endpoint) -> bool:
        """May a tenant that needs its own prefix-cache scope be routed to this endpoint?"""
        if self.config.kind == "vllm":
            return endpoint.salt_enforced is True
        return not self.config.shares_prefix_cache

    def usable(self, now: float, needs_isolation: bool) -> list[Endpoint]:
        return [
            e
            for e in self.endpoints.values()
            if e.healthy and e.ejected_until <= now and (not needs_isolation or self.isolates(e))
        ]


@dataclass(slots=True)
class Candidate:
    """A backend that may serve a request now, with the endpoints of it that may (made per request, and
    read only: not frozen, which would make it several times dearer to create)."""

    backend: Backend
    endpoints: tuple[Endpoint, ...]


def _static_endpoints(config: BackendConfig) -> list[str]:
    if config.url is not None:
        return [config.url.rstrip("/")]
    return [e.rstrip("/") for e in config.endpoints]


def _resolve(name: str, port: int) -> list[str]:
    """Every address of `name` (A and AAAA records), as the resolver answers them."""
    infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


class BackendPool:
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        previous: BackendPool | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        resolver: Resolver = _resolve,
    ) -> None:
        self._metrics = metrics
        self._clock = clock
        self._resolver = resolver
        self.backends: dict[str, Backend] = {}
        for config in settings.backends:
            backend = Backend(config)
            old = previous.backends.get(config.name) if previous is not None else None
            if old is not None and old.config == config:
                # A reload keeps what is known about unchanged backends (endpoints, health, salts, breakers).
                backend.endpoints = old.endpoints
            elif config.discovery is None:
                for endpoint_id in _static_endpoints(config):
                    # Not probed (see the module's docstring): up until its answers say otherwise.
                    backend.endpoints[endpoint_id] = Endpoint(endpoint_id, healthy=config.kind == "litellm")
            self.backends[config.name] = backend
            metrics.ejections.labels(config.name)  # a zero to start from, so rate() and alerts see the first
        for model in settings.models:
            for name in model.backends:
                backend = self.backends[name]
                if backend.probe_model == "probe":
                    backend.probe_model = model.upstream_name

    def candidates(self, model: ModelConfig, needs_isolation: bool, tenant_label: str) -> list[Candidate]:
        """The model's backends that may serve this tenant now, in the model's order, each with its endpoints
        that may; a 503 if none.

        Healthy, not ejected by the breaker, and keeping prefix caches apart if the tenant needs that.
        """
        found: list[Candidate] = []
        not_isolating = 0
        now = self._clock()
        for name in model.backends:
            backend = self.backends[name]
            usable = backend.usable(now, needs_isolation)
            if usable:
                found.append(Candidate(backend, tuple(usable)))
            elif needs_isolation and backend.usable(now, False):
                not_isolating += 1
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

    def failed(self, backend: Backend, endpoint: Endpoint) -> None:
        """The endpoint did not answer (connection refused or dropped, timeout): count it, maybe eject it."""
        endpoint.failures += 1
        if endpoint.failures < EJECT_AFTER:
            return
        cooldown = min(EJECT_MAX_S, EJECT_S * 2 ** (endpoint.failures - EJECT_AFTER))
        endpoint.ejected_until = self._clock() + cooldown
        self._metrics.ejections.labels(backend.name).inc()
        log.warning(
            "backend %s: endpoint %s ejected for %.0f s after %d consecutive failures",
            backend.name,
            endpoint.id,
            cooldown,
            endpoint.failures,
        )

    def succeeded(self, backend: Backend, endpoint: Endpoint) -> None:
        """The endpoint answered (whatever the status): the breaker closes."""
        if endpoint.failures:
            if endpoint.failures >= EJECT_AFTER:
                log.info("backend %s: endpoint %s answers again", backend.name, endpoint.id)
            endpoint.failures = 0
            endpoint.ejected_until = 0.0

    async def discover(self) -> bool:
        """Re-resolve the pools found in DNS; True if an endpoint joined or left."""
        changed = False
        loop = asyncio.get_running_loop()
        for backend in self.backends.values():
            discovery = backend.config.discovery
            if discovery is None:
                continue
            try:
                addresses = await loop.run_in_executor(None, self._resolver, discovery.dns, discovery.port)
            except OSError as exc:
                # Keep the endpoints known: a resolver hiccup must not empty the pool.
                log.warning("backend %s: cannot resolve %s (%s)", backend.name, discovery.dns, exc)
                continue
            found = {_address_url(discovery.scheme, a, discovery.port) for a in addresses}
            for endpoint_id in found - backend.endpoints.keys():
                log.info("backend %s: endpoint %s joins", backend.name, endpoint_id)
                backend.endpoints[endpoint_id] = Endpoint(endpoint_id)
                changed = True
            for endpoint_id in backend.endpoints.keys() - found:
                log.info("backend %s: endpoint %s leaves", backend.name, endpoint_id)
                del backend.endpoints[endpoint_id]
                changed = True
        return changed

    async def check_all(self, session: aiohttp.ClientSession) -> None:
        await asyncio.gather(
            *(
                self.check(session, b, e)
                for b in self.backends.values()
                if b.config.kind != "litellm"
                for e in list(b.endpoints.values())
            )
        )
        now = self._clock()
        for backend in self.backends.values():
            up = any(e.healthy and e.ejected_until <= now for e in backend.endpoints.values())
            self._metrics.backend_up.labels(backend.name).set(1 if up else 0)
            if backend.config.kind == "vllm":
                ignores = any(e.salt_enforced is False for e in backend.endpoints.values())
                self._metrics.salt_unsupported.labels(backend.name).set(1 if ignores else 0)

    async def check(self, session: aiohttp.ClientSession, backend: Backend, endpoint: Endpoint) -> None:
        """Health check; for vLLM, also the salt probe: an empty `cache_salt` must be rejected with 400."""
        timeout = aiohttp.ClientTimeout(total=5)
        try:
            if backend.config.kind == "vllm":
                payload = orjson.dumps(
                    {"model": backend.probe_model, "prompt": "ping", "max_tokens": 1, "cache_salt": ""}
                )
                async with session.post(
                    endpoint.base_url + "/v1/completions",
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
                        enforced = endpoint.salt_enforced
            else:
                async with session.get(endpoint.base_url + "/v1/models", timeout=timeout) as resp:
                    await resp.read()
                    healthy = resp.status < 500
                    enforced = None
        except (aiohttp.ClientError, TimeoutError, OSError):
            healthy, enforced = False, endpoint.salt_enforced
        if healthy != endpoint.healthy:
            log.log(
                logging.INFO if healthy else logging.WARNING,
                "backend %s: endpoint %s is %s",
                backend.name,
                endpoint.id,
                "up" if healthy else "down",
            )
        if enforced is False and endpoint.salt_enforced is not False:
            log.warning(
                "backend %s: endpoint %s accepted an invalid cache_salt: it ignores salts (vLLM < 0.9?). "
                "Tenants whose cache scope is not global will not be routed to it.",
                backend.name,
                endpoint.id,
            )
        endpoint.healthy = healthy
        endpoint.salt_enforced = enforced
        if healthy:
            self.succeeded(backend, endpoint)  # probed back


def _address_url(scheme: str, address: str, port: int) -> str:
    host = f"[{address}]" if ":" in address else address
    return f"{scheme}://{host}:{port}"
