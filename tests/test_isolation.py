"""Prefix-cache isolation (a `cache_salt` per cache scope, README "Cache isolation"), demonstrated rather than
assumed.

Exact `cached_tokens` across scopes, two tenants with the same client salt, the four scopes, the salt
probe with fail-closed routing against an old vLLM, and a timing audit in the style of Gu et al. 2025.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import random
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.support.admin import create_key, tenant_with_key
from tests.support.gateway import GatewayProc, start_gateway
from tests.support.sim import SimHandle, start_sim
from tests.support.stats import ks_less

SALT_SECRET = "test-salt-secret-0123456789abcdef"  # what tests.support.gateway passes
WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet"]


def expected_salt(scope: str) -> str:
    mac = hmac.new(SALT_SECRET.encode(), b"v1:" + scope.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def prompt(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) + str(rng.randrange(1000)) for _ in range(n_words))


def config(sim_url: str) -> dict[str, Any]:
    return {
        "backends": [{"name": "sim", "kind": "vllm", "url": sim_url}],
        "models": [{"name": "m", "backends": ["sim"], "upstream_model": "sim-model"}],
    }


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimHandle]:
    handle = start_sim(
        "--ttft-ms",
        "1",
        "--itl-ms",
        "0",
        "--prefill-us-per-token",
        "100",
        log_dir=tmp_path_factory.mktemp("sim-iso"),
    )
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def gw(sim: SimHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProc]:
    proc = start_gateway(config(sim.url), tmp_path_factory.mktemp("gw-iso"))
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def keys(gw: GatewayProc) -> dict[str, str]:
    made = {
        "a": tenant_with_key(gw.url, gw.admin_key, "tenant-a"),
        "b": tenant_with_key(gw.url, gw.admin_key, "tenant-b"),
        "g1": tenant_with_key(gw.url, gw.admin_key, "coop-1", cache_scope="group:research"),
        "g2": tenant_with_key(gw.url, gw.admin_key, "coop-2", cache_scope="group:research"),
        "glob": tenant_with_key(gw.url, gw.admin_key, "trusted", cache_scope="global"),
        "sub": tenant_with_key(gw.url, gw.admin_key, "splitter", allow_client_salt=True),
        "k1": tenant_with_key(gw.url, gw.admin_key, "per-key", cache_scope="key"),
    }
    made["k2"] = create_key(gw.url, gw.admin_key, "per-key", name="second")
    return made


def client(gw: GatewayProc, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)


def cached(gw: GatewayProc, key: str, text: str, **extra: Any) -> int:
    resp = client(gw, key).chat.completions.create(
        model="m", messages=[{"role": "user", "content": text}], max_tokens=1, extra_body=extra or None
    )
    assert resp.usage is not None and resp.usage.prompt_tokens_details is not None
    return resp.usage.prompt_tokens_details.cached_tokens or 0


def forwarded_salt(sim: SimHandle) -> Any:
    return sim.stats()["last_requests"][-1].get("cache_salt")


def test_same_tenant_hits_other_tenant_misses(gw: GatewayProc, keys: dict[str, str], sim: SimHandle) -> None:
    text = prompt(1000, seed=1)
    assert cached(gw, keys["a"], text) == 0
    hit = cached(gw, keys["a"], text)
    # The whole shared prefix, in full 16-token blocks, minus at least the last token (as vLLM counts).
    assert hit > 900 and hit % 16 == 0
    assert forwarded_salt(sim) == expected_salt("tenant:tenant-a")
    assert cached(gw, keys["b"], text) == 0
    assert forwarded_salt(sim) == expected_salt("tenant:tenant-b")


def test_same_client_salt_never_shares_across_tenants(gw: GatewayProc, keys: dict[str, str], sim: SimHandle) -> None:
    text = prompt(300, seed=2)
    assert cached(gw, keys["a"], text, cache_salt="shared-by-both") == 0
    assert forwarded_salt(sim) == expected_salt("tenant:tenant-a")  # dropped, never forwarded raw
    assert cached(gw, keys["b"], text, cache_salt="shared-by-both") == 0
    assert forwarded_salt(sim) == expected_salt("tenant:tenant-b")


def test_client_salt_subscopes_when_allowed(gw: GatewayProc, keys: dict[str, str], sim: SimHandle) -> None:
    text = prompt(300, seed=3)
    assert cached(gw, keys["sub"], text, cache_salt="project-x") == 0
    assert forwarded_salt(sim) == expected_salt("tenant:splitter/project-x")
    assert cached(gw, keys["sub"], text, cache_salt="project-x") > 0
    assert cached(gw, keys["sub"], text, cache_salt="project-y") == 0
    assert cached(gw, keys["sub"], text) == 0  # the tenant's own scope is a different one again


def test_group_scope_shares_on_purpose(gw: GatewayProc, keys: dict[str, str], sim: SimHandle) -> None:
    text = prompt(300, seed=4)
    assert cached(gw, keys["g1"], text) == 0
    assert forwarded_salt(sim) == expected_salt("group:research")
    assert cached(gw, keys["g2"], text) > 0
    assert cached(gw, keys["a"], text) == 0


def test_global_scope_sends_no_salt(gw: GatewayProc, keys: dict[str, str], sim: SimHandle) -> None:
    text = prompt(300, seed=5)
    assert cached(gw, keys["glob"], text, cache_salt="ignored") == 0
    assert "cache_salt" not in sim.stats()["last_requests"][-1]
    assert cached(gw, keys["glob"], text) > 0


def test_key_scope_separates_keys_of_one_tenant(gw: GatewayProc, keys: dict[str, str]) -> None:
    text = prompt(300, seed=6)
    assert cached(gw, keys["k1"], text) == 0
    assert cached(gw, keys["k1"], text) > 0
    assert cached(gw, keys["k2"], text) == 0


def ttft(gw: GatewayProc, key: str, text: str) -> float:
    start = time.perf_counter()
    stream = client(gw, key).chat.completions.create(
        model="m", messages=[{"role": "user", "content": text}], max_tokens=2, stream=True
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            elapsed = time.perf_counter() - start
            stream.close()
            return elapsed
    raise AssertionError("no content chunk")


def audit(gw: GatewayProc, victim: str, prober: str, seed: int, n: int = 25) -> float:
    """Gu et al. 2025: TTFT of prompts the victim just sent vs fresh prompts; one-sided KS p-value."""
    candidates, misses = [], []
    for i in range(n):
        secret = prompt(400, seed=seed * 1000 + i)
        ttft(gw, victim, secret)  # the victim's request puts its prefix in (its own scope of) the cache
        candidates.append(ttft(gw, prober, secret))
        misses.append(ttft(gw, prober, prompt(400, seed=seed * 1000 + 500 + i)))
    _, p = ks_less(candidates, misses)
    return p


@pytest.mark.slow
def test_timing_audit_detects_same_tenant_hits_only(gw: GatewayProc, keys: dict[str, str]) -> None:
    same = audit(gw, keys["a"], keys["a"], seed=10)
    cross = audit(gw, keys["a"], keys["b"], seed=20)
    assert same < 1e-3, f"same-tenant cache hits should be detectable (p={same})"
    assert cross > 0.01, f"cross-tenant cache hits must not be detectable (p={cross})"


# --- fail closed against a vLLM that ignores cache_salt ---------------------------------------------


@pytest.fixture(scope="module")
def old_vllm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimHandle]:
    handle = start_sim(
        "--ttft-ms", "0", "--itl-ms", "0", "--ignore-cache-salt", log_dir=tmp_path_factory.mktemp("sim-old")
    )
    yield handle
    handle.stop()


def test_fail_closed_on_backend_ignoring_salts(old_vllm: SimHandle, tmp_path_factory: pytest.TempPathFactory) -> None:
    gw = start_gateway(config(old_vllm.url), tmp_path_factory.mktemp("gw-old"))
    try:
        isolated = tenant_with_key(gw.url, gw.admin_key, "isolated")
        trusted = tenant_with_key(gw.url, gw.admin_key, "trusted", cache_scope="global")
        with pytest.raises(openai.InternalServerError) as info:
            client(gw, isolated).chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        assert info.value.status_code == 503
        assert info.value.code == "isolation_unavailable"
        assert old_vllm.url not in str(info.value.body)
        # The trusted (global) tier needs no salt and is still served.
        ok = client(gw, trusted).chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        assert ok.choices[0].message.content is not None
        metrics = httpx.get(gw.url + "/metrics").text
        assert 'gateway_backend_salt_unsupported{backend="sim"} 1.0' in metrics
        assert 'gateway_isolation_rejections_total{model="m",tenant="isolated"} 1.0' in metrics
    finally:
        gw.stop()
    assert "ignores salts" in gw.output()
