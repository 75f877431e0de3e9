"""Settings: YAML shape, GATEWAY_* overrides, secrets only from the environment, errors that name the field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import ConfigError, load_settings

GOOD = """
listen: {host: 0.0.0.0, port: 8080}
redis_url: null
state_path: .gateway/state.db
limits: {max_body_bytes: 4194304, max_tokens_cap: 32768}
backends:
  - {name: vllm-a, kind: vllm, url: "http://127.0.0.1:8000", capacity: 64}
models:
  - name: llama-8b
    backends: [vllm-a]
    upstream_model: meta-llama/Llama-3.1-8B-Instruct
    price: {input_per_1k: 0.0002, output_per_1k: 0.0006, currency: USD}
tenants:
  - id: acme
    weight: 2
    models: ["llama-*"]
    limits: {rpm: 600, tpm: 100000, max_concurrency: 8, max_queue_wait_ms: 30000}
    budget: {amount: 100, period: month}
    cache_scope: tenant
    keys: [{name: ci, key_env: ACME_CI_KEY}]
billing:
  sinks: [{kind: jsonl, path: .gateway/billing.jsonl}]
"""


def model_with(*lines: str) -> str:
    """GOOD with these lines added to its model."""
    return GOOD.replace("backends: [vllm-a]", "backends: [vllm-a]" + "".join(f"\n    {line}" for line in lines))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return path


def test_a_complete_configuration_loads(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, GOOD), env={"ACME_CI_KEY": "sk-gw-x", "GATEWAY_ADMIN_KEY": "adm"})
    assert settings.listen.port == 8080
    assert settings.models[0].upstream_name == "meta-llama/Llama-3.1-8B-Instruct"
    assert settings.tenants[0].limits.rpm == 600
    assert settings.admin_key == "adm"
    assert settings.env_secrets == {"ACME_CI_KEY": "sk-gw-x"}
    assert "adm" not in repr(settings) and "sk-gw-x" not in repr(settings)


def test_env_overrides_nested_values(tmp_path: Path) -> None:
    env = {
        "ACME_CI_KEY": "k",
        "GATEWAY_LISTEN__PORT": "9999",
        "GATEWAY_REDIS_URL": "redis://127.0.0.1:6390/0",
        "GATEWAY_LIMITS__MAX_TOKENS_CAP": "128",
    }
    settings = load_settings(write(tmp_path, GOOD), env=env)
    assert settings.listen.port == 9999
    assert settings.redis_url == "redis://127.0.0.1:6390/0"
    assert settings.limits.max_tokens_cap == 128


@pytest.mark.parametrize(
    ("text", "field"),
    [
        (GOOD.replace("kind: vllm", "kind: vlm"), "backends[0].kind"),
        (GOOD.replace("port: 8080", "port: eighty"), "listen.port"),
        (GOOD.replace("backends: [vllm-a]", "backends: [nope]"), "models[0].backends"),
        (GOOD.replace("weight: 2", "weight: -1"), "tenants[0].weight"),
        (GOOD.replace("cache_scope: tenant", "cache_scope: everyone"), "tenants[0].cache_scope"),
        (GOOD.replace("max_tokens_cap: 32768", "max_tokens_cap: 32768, typo: 1"), "limits.typo"),
        (GOOD + "admin_key: hunter2\n", "admin_key"),
        (GOOD.replace("kind: vllm,", "kind: litellm,"), "backends[0]: provider_model"),
        (GOOD.replace("kind: vllm,", "kind: litellm, provider_model: claude,"), "backends[0]: provider_model"),
        (GOOD.replace("capacity: 64", "capacity: 64, provider_model: a/b"), "backends[0]: provider_model"),
        (GOOD.replace("cache_scope: tenant", "on_limit: {budget: fallback}"), "tenants[0].on_limit"),
        (GOOD.replace("max_tokens_cap: 32768", "max_tokens_cap: 32768, tokenizer: bpe"), "limits.tokenizer"),
        (model_with("context_length: 1"), "models[0].context_length"),
        (model_with("context_length: 4096", "max_output_tokens: 4096"), "models[0]: max_output_tokens"),
        (model_with("inject_max_tokens: true"), "models[0]: inject_max_tokens"),
        (model_with("max_output_tokens: 40000"), "models[0].max_output_tokens"),
        (model_with("inject_max_tokens: sure"), "models[0].inject_max_tokens"),
    ],
)
def test_errors_name_the_field(tmp_path: Path, text: str, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text), env={"ACME_CI_KEY": "k"})
    assert str(info.value).startswith(field), str(info.value)
    assert "hunter2" not in str(info.value)


def test_model_output_limits(tmp_path: Path) -> None:
    text = model_with("context_length: 131072", "max_output_tokens: 2048", "inject_max_tokens: true")
    model = load_settings(write(tmp_path, text), env={"ACME_CI_KEY": "k"}).models[0]
    assert (model.context_length, model.max_output_tokens, model.inject_max_tokens) == (131072, 2048, True)
    plain = load_settings(write(tmp_path, GOOD), env={"ACME_CI_KEY": "k"}).models[0]
    assert (plain.context_length, plain.max_output_tokens, plain.inject_max_tokens) == (None, None, False)


def test_provider_backends_and_fallback_policy(tmp_path: Path) -> None:
    text = GOOD.replace(
        "capacity: 64}",
        'capacity: 64}\n  - {name: claude, kind: litellm, url: "https://api.anthropic.com", '
        "provider_model: anthropic/claude-haiku-4-5, api_key_env: ANTHROPIC_API_KEY}",
    ).replace("backends: [vllm-a]", "backends: [vllm-a, claude]")
    text = text.replace("cache_scope: tenant", "cache_scope: tenant\n    on_limit: {queue: fallback}")
    settings = load_settings(write(tmp_path, text), env={"ACME_CI_KEY": "k", "ANTHROPIC_API_KEY": "sk-ant-x"})
    assert settings.backends[1].provider_model == "anthropic/claude-haiku-4-5"
    assert settings.models[0].backends == ("vllm-a", "claude")
    assert settings.tenants[0].on_limit == {"queue": "fallback"}
    assert settings.env_secrets["ANTHROPIC_API_KEY"] == "sk-ant-x"
    assert "sk-ant-x" not in repr(settings)


EXAMPLE = Path(__file__).parents[1] / "config" / "gateway.yaml"


def test_the_example_config_loads() -> None:
    settings = load_settings(EXAMPLE, env={"ACME_CI_KEY": "k"})
    assert settings.limits.tokenizer == "auto"


def commented_backends(text: str) -> list[str]:
    """The backends the example shows commented out (`  # - name: ...` and its `  #   ...` lines), uncommented."""
    blocks: list[list[str]] = []
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("  # - "):
            current = ["  - " + line.removeprefix("  # - ")]
            blocks.append(current)
        elif current is not None and line.startswith("  #   "):
            current.append("    " + line.removeprefix("  #   "))
        else:
            current = None
    return ["\n".join(block) for block in blocks]


def test_the_example_config_s_commented_backends_load(tmp_path: Path) -> None:
    """What the example shows commented out is valid too: the pool by `endpoints`, the same pool by
    `discovery` (its alternative line), and the hosted provider."""
    text = EXAMPLE.read_text()
    blocks = commented_backends(text)
    (pool,) = [b for b in blocks if "endpoints:" in b]
    by_dns = "\n".join(
        line.replace("# discovery:", "discovery:") for line in pool.splitlines() if "endpoints:" not in line
    )
    assert "discovery:" in by_dns and len(blocks) >= 2
    env = {"ACME_CI_KEY": "k", "ANTHROPIC_API_KEY": "sk-ant-x"}
    loaded = []
    for block in [*blocks, by_dns]:
        path = tmp_path / "gateway.yaml"
        path.write_text(text.replace("\nmodels:", "\n" + block + "\nmodels:", 1))
        loaded.append(load_settings(path, env=env).backends[-1])
    pools = [b for b in loaded if b.kind == "vllm"]
    assert [len(b.endpoints) for b in pools] == [2, 0] and pools[1].discovery is not None
    assert all(b.routing.affinity == "scope" for b in pools)


def test_missing_key_env_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"tenants\[0\]\.keys\[0\]\.key_env: environment variable ACME_CI_KEY"):
        load_settings(write(tmp_path, GOOD), env={})


def test_serve_exits_nonzero_naming_the_field(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("kind: vllm", "kind: vlm"))
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        env={"ACME_CI_KEY": "k", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2
    assert "backends[0].kind" in result.stderr
