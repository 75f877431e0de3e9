"""Which backends may serve a request, in order, and the circuit breaker, on an injected clock (no sleeps)."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.config import Settings
from gateway.errors import ServiceUnavailableError
from gateway.telemetry.metrics import Metrics
from gateway.upstream.backends import EJECT_AFTER, EJECT_MAX_S, EJECT_S, BackendPool, Endpoint


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(clock: Clock) -> tuple[BackendPool, Metrics, Settings]:
    settings = Settings.model_validate(
        {
            "backends": [
                {"name": "vllm", "kind": "vllm", "url": "http://127.0.0.1:1"},
                {"name": "shared", "kind": "openai", "url": "http://127.0.0.1:2", "shares_prefix_cache": True},
                {"name": "hosted", "kind": "litellm", "url": "http://127.0.0.1:3", "provider_model": "anthropic/x"},
            ],
            "models": [{"name": "m", "backends": ["vllm", "shared", "hosted"]}],
        }
    )
    metrics = Metrics()
    pool = BackendPool(settings, metrics, clock=clock)
    only(pool, "vllm").healthy = only(pool, "vllm").salt_enforced = True
    only(pool, "shared").healthy = True
    return pool, metrics, settings


def only(pool: BackendPool, name: str) -> Endpoint:
    """The one endpoint of a single-URL backend."""
    (endpoint,) = pool.backends[name].endpoints.values()
    return endpoint


def names(pool: BackendPool, settings: Settings, isolated: bool = False) -> list[str]:
    return [c.backend.name for c in pool.candidates(settings.models[0], isolated, "t")]


def ejections(metrics: Metrics, backend: str) -> Any:
    return metrics.registry.get_sample_value("gateway_backend_ejections_total", {"backend": backend})


def test_candidates_keep_the_models_order_and_isolation() -> None:
    pool, _, settings = make(Clock())
    assert names(pool, settings) == ["vllm", "shared", "hosted"]
    # A tenant with its own cache scope never goes to a backend that shares a cache without salts.
    assert names(pool, settings, isolated=True) == ["vllm", "hosted"]
    only(pool, "vllm").salt_enforced = False
    assert names(pool, settings, isolated=True) == ["hosted"]


def test_hosted_backends_start_healthy_without_a_probe() -> None:
    pool, metrics, _ = make(Clock())
    assert only(pool, "hosted").healthy
    assert ejections(metrics, "hosted") == 0  # every backend's series exists from the start


def test_breaker_ejects_after_consecutive_failures_and_doubles() -> None:
    clock = Clock()
    pool, metrics, settings = make(clock)
    backend, vllm = pool.backends["vllm"], only(pool, "vllm")
    for _ in range(EJECT_AFTER - 1):
        pool.failed(backend, vllm)
    assert "vllm" in names(pool, settings)
    pool.failed(backend, vllm)
    assert names(pool, settings) == ["shared", "hosted"] and ejections(metrics, "vllm") == 1
    clock.now += EJECT_S
    assert names(pool, settings)[0] == "vllm"  # half open: the next request tries it
    pool.failed(backend, vllm)  # and it fails again: twice as long
    clock.now += EJECT_S
    assert "vllm" not in names(pool, settings)
    clock.now += EJECT_S
    assert "vllm" in names(pool, settings)
    for _ in range(10):
        pool.failed(backend, vllm)
    assert vllm.ejected_until - clock.now == EJECT_MAX_S
    pool.succeeded(backend, vllm)  # an answer closes the breaker
    assert names(pool, settings)[0] == "vllm" and vllm.failures == 0


def test_success_between_failures_resets_the_count() -> None:
    pool, _, settings = make(Clock())
    backend, hosted = pool.backends["hosted"], only(pool, "hosted")
    for _ in range(5):
        pool.failed(backend, hosted)
        pool.succeeded(backend, hosted)
    assert "hosted" in names(pool, settings)


def test_no_candidate_is_a_503() -> None:
    pool, _, settings = make(Clock())
    for backend in pool.backends.values():
        for endpoint in backend.endpoints.values():
            endpoint.healthy = False
    with pytest.raises(ServiceUnavailableError):
        pool.candidates(settings.models[0], False, "t")
