"""How the request path is assembled from its parts: one function, `wire()`, for start-up and every reload.

The lifespan builds the long-lived services once (`Services`: store, key cache, billing, usage ledger,
salts, metrics, tracing, the quota store, the admission controller). `wire()` builds what a configuration
decides (the backends and their health, one connection pool per backend, the inference handler) and hands
admission the new backends. A reload calls it again with the previous wiring: unchanged backends keep
their health and their pools, admission keeps its fair queues and every request in flight, and requests
that started on the previous handler finish on it.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import ModuleType

from gateway.admission import Admission
from gateway.auth import Authenticator
from gateway.billing import Billing
from gateway.billing.ledger import UsageLedger
from gateway.config import BackendConfig, LimitsConfig, Settings
from gateway.pipeline import InferenceHandler
from gateway.telemetry.metrics import Metrics
from gateway.telemetry.tracing import Tracing
from gateway.upstream import UpstreamPool
from gateway.upstream.backends import BackendPool
from gateway.upstream.connections import Connections
from gateway.upstream.providers import LitellmPool
from gateway.upstream.salt import SaltDeriver
from gateway.wire import httpclient

__all__ = ["Pools", "Services", "Wired", "backend_keys", "wire"]

Pools = dict[str, Connections]


@dataclass(frozen=True, kw_only=True)
class Services:
    """What lives as long as the process, whatever the configuration says about backends and models."""

    authenticator: Authenticator
    admission: Admission
    billing: Billing
    ledger: UsageLedger
    salts: SaltDeriver
    metrics: Metrics
    tracing: Tracing


@dataclass(frozen=True, kw_only=True)
class Wired:
    """One configuration's request path."""

    settings: Settings
    backends: BackendPool
    pools: Pools
    handler: InferenceHandler


async def wire(
    settings: Settings,
    services: Services,
    *,
    check: Callable[[BackendPool], Awaitable[None]],
    previous: Wired | None = None,
    litellm: ModuleType | None = None,
) -> Wired:
    """Build the request path for `settings`. `check` probes the new backends (health, cache_salt) before
    admission is handed them, so no request meets a backend that was never checked."""
    backends = BackendPool(settings, services.metrics, previous=previous.backends if previous else None)
    await check(backends)
    pools = _pools(settings, previous.pools if previous else {}, litellm)
    services.admission.reconfigure(settings, backends)
    handler = InferenceHandler(
        limits=settings.limits,
        models={m.name: m for m in settings.models},
        authenticator=services.authenticator,
        admission=services.admission,
        backends=backends,
        connections=pools,
        backend_keys=backend_keys(settings),
        salts=services.salts,
        billing=services.billing,
        ledger=services.ledger,
        metrics=services.metrics,
        tracing=services.tracing,
    )
    return Wired(settings=settings, backends=backends, pools=pools, handler=handler)


def _pools(settings: Settings, previous: Pools, litellm: ModuleType | None) -> Pools:
    """Connections to each backend's endpoints; a reload keeps those of backends that did not change. A
    `kind: litellm` backend gets litellm behind the same interface."""
    pools: Pools = {}
    for backend in settings.backends:
        old = previous.get(backend.name)
        if old is not None and old.config == backend:
            pools[backend.name] = old
        elif backend.kind == "litellm":
            if litellm is None:
                raise RuntimeError("litellm backends need litellm imported first (gateway.upstream.providers)")
            key = settings.env_secrets.get(backend.api_key_env) if backend.api_key_env else None
            make = functools.partial(_open_provider, backend, key, litellm, settings.limits)
            pools[backend.name] = Connections(backend, make, shared=True)
        else:
            pools[backend.name] = Connections(backend, functools.partial(_open_http, backend, settings.limits))
    return pools


def _open_http(backend: BackendConfig, limits: LimitsConfig, url: str) -> UpstreamPool:
    return httpclient.Pool(
        url,
        # As many idle connections as this process may have requests at one engine: a burst of streams that
        # ends leaves its connections for the next one instead of closing most of them.
        max_idle=max(16, backend.capacity),
        connect_timeout_s=limits.connect_timeout_s,
        read_timeout_s=limits.read_timeout_s,
        # vLLM, uvicorn and the simulator drop idle connections after 5 s: retire ours first.
        idle_timeout_s=4.0,
    )


def _open_provider(
    backend: BackendConfig, key: str | None, litellm: ModuleType, limits: LimitsConfig, _: str
) -> UpstreamPool:
    return LitellmPool(backend, key, litellm, read_timeout_s=limits.read_timeout_s)


def backend_keys(settings: Settings) -> dict[str, str]:
    """Keys sent as `Authorization: Bearer` by the HTTP client (litellm backends hold their own)."""
    return {
        b.name: settings.env_secrets[b.api_key_env] for b in settings.backends if b.api_key_env and b.kind != "litellm"
    }
