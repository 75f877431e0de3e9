"""Typed, frozen settings: the YAML file, `GATEWAY_*` overrides, secrets from the environment.

Every field, its default and its meaning: docs/reference/configuration.md.

Settings are read once at the entry point (`load_settings`) and passed down; nothing reads the environment
later. A bad file raises `ConfigError` whose message names the field (`backends[0].kind: ...`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gateway.tenancy import Quotas, Tenant

__all__ = [
    "BackendConfig",
    "ConfigError",
    "ModelConfig",
    "Settings",
    "load_settings",
]

# Environment variables that are not config overrides.
_NOT_OVERRIDES = {"GATEWAY_ADMIN_KEY", "GATEWAY_SALT_SECRET", "GATEWAY_METRICS_TOKEN", "GATEWAY_CONFIG", "GATEWAY_URL"}
_SECRET_FIELDS = {"admin_key", "salt_secret", "metrics_token", "api_key", "password", "env_secrets"}


class ConfigError(Exception):
    """The configuration cannot be used; the message names the offending field."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ListenConfig(_Frozen):
    host: str = "0.0.0.0"
    port: int = Field(default=8080, ge=0, le=65535)


class LimitsConfig(_Frozen):
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    max_tokens_cap: int = Field(default=32768, ge=1)
    # Output tokens per sequence reserved (tpm, budget, fair queue) for a request that sets no limit, on
    # models that set no max_output_tokens of their own.
    default_max_tokens: int = Field(default=1024, ge=1)
    # Upstream timeouts: connecting, and waiting for the first byte / between bytes of a stream.
    connect_timeout_s: float = Field(default=5.0, gt=0)
    read_timeout_s: float = Field(default=300.0, gt=0)
    # Clients: the whole request head within this of its first byte, the whole body within this of the
    # head (408 otherwise), idle keep-alive connections closed after this; heads larger than this get 431.
    client_header_timeout_s: float = Field(default=10.0, gt=0, le=3600)
    client_body_timeout_s: float = Field(default=60.0, gt=0, le=3600)
    keep_alive_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    max_header_bytes: int = Field(default=64 * 1024, ge=1024, le=16 * 1024 * 1024)
    # Prompt token estimates for admission (gateway/admission/tokens.py): `bytes` (UTF-8 bytes / 4), `tiktoken`
    # (cl100k_base as shipped in the `providers` extra), or `auto`: tiktoken iff a litellm backend exists.
    tokenizer: Literal["auto", "bytes", "tiktoken"] = "auto"


_ENDPOINT = r"^https?://[^\s,|]+$"


class DiscoveryConfig(_Frozen):
    """A pool of endpoints found in DNS: every A/AAAA record of `dns` (a Kubernetes headless Service), on
    `port`, re-resolved every `interval_s`; endpoints join and leave without a restart."""

    dns: str = Field(min_length=1, max_length=253, pattern=r"^[A-Za-z0-9_.-]+$")
    port: int = Field(ge=1, le=65535)
    scheme: Literal["http", "https"] = "http"
    interval_s: float = Field(default=5.0, gt=0, le=3600)


class RoutingConfig(_Frozen):
    """How a request picks an endpoint of a pool."""

    # `scope`: requests whose prompts share a prefix within one cache scope go to the same endpoint (where
    # that prefix is cached), each endpoint holding an even share of the pool's prefixes, spilling when it
    # is loaded beyond `load_factor` x the pool's mean; separate scopes never share a prefix's placement.
    # `none`: the least loaded endpoint.
    affinity: Literal["scope", "none"] = "scope"
    # How much of the prompt's beginning identifies its prefix (in tokens of ~4 characters), in blocks of
    # `block_tokens` (the engine's KV block size).
    prefix_tokens: int = Field(default=256, ge=16, le=65536)
    block_tokens: int = Field(default=16, ge=1, le=1024)
    load_factor: float = Field(default=2.0, ge=1.0, le=10.0)
    # A prefix keeps its endpoint while requests use it; after this long without one it is forgotten, and
    # its place counts no more toward its endpoint's share of the pool's prefixes.
    affinity_ttl_s: float = Field(default=300.0, gt=0, le=86400)


class BackendConfig(_Frozen):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    kind: Literal["vllm", "openai", "litellm"] = "vllm"
    # One engine (`url`), a fixed pool (`endpoints`), or a pool found in DNS (`discovery`): exactly one.
    url: str | None = Field(default=None, pattern=_ENDPOINT)
    endpoints: tuple[str, ...] = ()
    discovery: DiscoveryConfig | None = None
    # The most requests all gateway replicas together send one endpoint at once. With `capacity_mode: auto`
    # it is a ceiling, and the engine's own load (vLLM's metrics; else observed latency) sets the limit
    # under it; with `fixed` it is the limit.
    capacity: int = Field(default=64, ge=1, le=100_000)
    capacity_mode: Literal["auto", "fixed"] = "auto"
    routing: RoutingConfig = RoutingConfig()
    # For non-vLLM backends: does the server share one prefix cache across all its callers?
    shares_prefix_cache: bool = False
    # The name of the environment variable holding the backend's API key (never the key itself).
    api_key_env: str | None = None
    # kind: litellm only: litellm's model string, provider first ("anthropic/claude-haiku-4-5"); `url` is
    # then the provider's API base.
    provider_model: str | None = Field(default=None, min_length=3, max_length=200)

    @model_validator(mode="after")
    def _provider_model(self) -> BackendConfig:
        given = [f for f in ("url", "endpoints", "discovery") if getattr(self, f)]
        if len(given) != 1:
            raise ValueError("give exactly one of url, endpoints or discovery")
        for i, endpoint in enumerate(self.endpoints):
            if not re.match(_ENDPOINT, endpoint):
                raise ValueError(f"endpoints[{i}]: not an http(s) URL")
        if len(set(self.endpoints)) != len(self.endpoints):
            raise ValueError("endpoints: listed twice")
        if self.kind == "litellm" and self.url is None:
            raise ValueError("url: a litellm backend has one (the provider's API base)")
        if self.kind == "litellm" and (self.provider_model is None or "/" not in self.provider_model):
            raise ValueError("provider_model: a litellm backend needs one, as 'provider/model'")
        if self.kind != "litellm" and self.provider_model is not None:
            raise ValueError("provider_model: only for kind: litellm")
        return self


class Price(_Frozen):
    input_per_1k: float = Field(default=0.0, ge=0)
    output_per_1k: float = Field(default=0.0, ge=0)
    currency: str = "USD"


class ModelConfig(_Frozen):
    name: str = Field(min_length=1, max_length=200)
    backends: tuple[str, ...] = Field(min_length=1)
    upstream_model: str | None = None
    price: Price | None = None
    # Prompt plus output tokens the model holds (vLLM's --max-model-len). A request that sets no output limit
    # is reserved at most what its prompt leaves of it; one whose limit alone reaches it gets 400.
    context_length: int | None = Field(default=None, ge=2, le=1 << 30)
    # Output tokens per sequence the engine generates when a request sets no limit: what the server is set
    # to stop at (vLLM's generation config), or what the gateway writes into the request when
    # inject_max_tokens is on. Unset: limits.default_max_tokens.
    max_output_tokens: int | None = Field(default=None, ge=1, le=1 << 30)
    # Write the default into requests that set no limit (max_completion_tokens on chat, max_tokens on
    # completions, max_output_tokens on responses), so the engine really stops there.
    inject_max_tokens: bool = False

    @model_validator(mode="after")
    def _output_limits(self) -> ModelConfig:
        if (
            self.context_length is not None
            and self.max_output_tokens is not None
            and self.max_output_tokens >= self.context_length
        ):
            raise ValueError("max_output_tokens: must be below context_length, which the prompt shares")
        if self.inject_max_tokens and self.context_length is None:
            # Without it the gateway cannot tell whether the default still fits after a long prompt, and an
            # engine answers 400 to a prompt plus max_tokens beyond its context.
            raise ValueError("inject_max_tokens: needs context_length")
        return self

    @property
    def upstream_name(self) -> str:
        return self.upstream_model or self.name


class KeyConfig(_Frozen):
    """A key declared in config: its secret comes from the environment, or only its hash is given."""

    name: str
    key_env: str | None = None
    key_hash: str | None = Field(default=None, pattern=r"^(sha256:)?[0-9a-f]{64}$")
    models: tuple[str, ...] | None = None
    limits: Quotas = Quotas()

    @model_validator(mode="after")
    def _one_source(self) -> KeyConfig:
        if (self.key_env is None) == (self.key_hash is None):
            raise ValueError("give exactly one of key_env or key_hash")
        return self


class TenantConfig(Tenant):
    keys: tuple[KeyConfig, ...] = ()


class SinkConfig(_Frozen):
    kind: Literal["jsonl", "redis_stream", "webhook"]
    # Names the sink in metrics and its spool directory; defaults to the kind.
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    # jsonl: the file (default .gateway/billing.jsonl).
    path: str | None = None
    # redis_stream: the Redis URL (default: the gateway's redis_url); webhook: where batches are POSTed.
    url: str | None = None
    # redis_stream: the stream, trimmed to about `maxlen` entries (XADD MAXLEN ~).
    stream: str = Field(default="gateway:billing", min_length=1)
    maxlen: int = Field(default=1_000_000, ge=1)
    # One delivery attempt: the Redis socket timeout, the webhook request timeout.
    timeout_s: float = Field(default=5.0, gt=0, le=300)
    # webhook: further attempts within one delivery (exponential backoff, jitter) on 5xx and connection errors.
    retries: int = Field(default=3, ge=0, le=20)
    # Events per delivery, and events held in memory before the excess goes to the spool.
    batch_max: int = Field(default=500, ge=1, le=100_000)
    # How long a batch may gather before it is delivered (fewer, larger writes under load).
    linger_s: float = Field(default=0.02, ge=0, le=10)
    buffer_max: int = Field(default=10_000, ge=1)
    # While the sink is down, the next try (which replays the spool) waits this long, doubling up to the max.
    backoff_initial_s: float = Field(default=0.5, gt=0, le=600)
    backoff_max_s: float = Field(default=30.0, gt=0, le=3600)

    @property
    def label(self) -> str:
        return self.name or self.kind

    @model_validator(mode="after")
    def _kind_fields(self) -> SinkConfig:
        if self.kind == "webhook" and not (self.url or "").startswith(("http://", "https://")):
            raise ValueError("a webhook sink needs an http(s) url")
        if self.kind == "redis_stream" and self.url is not None and "://" not in self.url:
            raise ValueError("url: not a Redis URL")
        return self


class BillingConfig(_Frozen):
    sinks: tuple[SinkConfig, ...] = ()
    source: str = "gateway"
    # Where undeliverable events wait, one directory per sink (default: `spool` next to the state path).
    spool_dir: str | None = None
    # On shutdown, how long delivery may go on before the rest is spooled for the next start.
    shutdown_timeout_s: float = Field(default=10.0, ge=0, le=600)

    @model_validator(mode="after")
    def _unique_names(self) -> BillingConfig:
        labels = [s.label for s in self.sinks]
        if len(set(labels)) != len(labels):
            raise ValueError("sinks: two sinks share a name; give each a distinct `name`")
        return self


class CapacityConfig(_Frozen):
    """How the limit of each engine endpoint follows its own load (gateway/admission/capacity.py)."""

    # How often the engines' metrics are read and the limits written.
    interval_s: float = Field(default=0.25, ge=0.05, le=60)
    # Metrics older than this count as saturated; after `stale_fallback_s`, latency governs the endpoint.
    stale_s: float = Field(default=1.0, gt=0, le=600)
    stale_fallback_s: float = Field(default=10.0, gt=0, le=3600)
    # A KV cache this full counts as saturated, as waiting requests do.
    kv_high: float = Field(default=0.95, gt=0, le=1)
    # Where an automatic limit starts (under the backend's `capacity`), before the engine has shown its own.
    initial: int = Field(default=8, ge=1, le=100_000)


class Settings(_Frozen):
    listen: ListenConfig = ListenConfig()
    redis_url: str | None = None
    state_path: str = ".gateway/state.db"
    limits: LimitsConfig = LimitsConfig()
    backends: tuple[BackendConfig, ...] = ()
    capacity: CapacityConfig = CapacityConfig()
    models: tuple[ModelConfig, ...] = ()
    tenants: tuple[TenantConfig, ...] = ()
    billing: BillingConfig = BillingConfig()
    health_interval_s: float = Field(default=10.0, gt=0)
    # No request waits on Redis longer than this (connect and each command).
    redis_timeout_s: float = Field(default=0.25, gt=0, le=30)
    # When Redis is down: `local` (each replica enforces limit / replicas in-process), `open`, `closed` (503).
    redis_failure_mode: Literal["local", "open", "closed"] = "local"
    # How many replicas share the limits (for the `local` failure mode's share).
    replicas: int = Field(default=1, ge=1, le=10_000)
    # Worker processes of this replica (`gateway serve --workers N`). With Redis they share every fair queue
    # as replicas do; without it each runs its own, with 1 / workers of every engine's limit.
    workers: int = Field(default=1, ge=1, le=256)
    # Concurrency leases expire after this unless renewed, so a crashed replica's slots come back.
    lease_ttl_s: float = Field(default=30.0, gt=1, le=3600)
    # Graceful shutdown: readyz is 503 for drain_s before the listener closes; in-flight requests then get
    # up to grace_s to finish.
    shutdown_drain_s: float = Field(default=2.0, ge=0, le=600)
    shutdown_grace_s: float = Field(default=60.0, ge=0, le=3600)
    # How long a replica trusts a cached key without asking the store (changes are also pushed).
    auth_cache_ttl_s: float = Field(default=5.0, gt=0, le=300)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # How often each process publishes its live-stats snapshot to the store when others may read it (Redis,
    # or several workers); `GET /admin/stats` sums the live ones.
    stats_interval_s: float = Field(default=1.0, gt=0, le=60)
    # Secrets: only ever from the environment (see load_settings); excluded from repr.
    admin_key: str | None = Field(default=None, repr=False)
    salt_secret: str | None = Field(default=None, repr=False)
    # When set (GATEWAY_METRICS_TOKEN), /metrics answers only `Authorization: Bearer <token>`: its series
    # name tenants, which other tenants must not read.
    metrics_token: str | None = Field(default=None, repr=False)
    # Values of the environment variables named by `key_env` / `api_key_env`, read once at load time.
    env_secrets: dict[str, str] = Field(default_factory=dict, repr=False)

    @model_validator(mode="after")
    def _references(self) -> Settings:
        names = [b.name for b in self.backends]
        if len(set(names)) != len(names):
            raise ValueError("backends: names must be unique")
        models = [m.name for m in self.models]
        if len(set(models)) != len(models):
            raise ValueError("models: names must be unique")
        for i, model in enumerate(self.models):
            for backend in model.backends:
                if backend not in names:
                    raise ValueError(f"models[{i}].backends: unknown backend {backend!r}")
            if model.max_output_tokens is not None and model.max_output_tokens > self.limits.max_tokens_cap:
                # An injected limit above the cap would be one the gateway refuses from its own clients.
                raise ValueError(f"models[{i}].max_output_tokens: above limits.max_tokens_cap")
        tenants = [t.id for t in self.tenants]
        if len(set(tenants)) != len(tenants):
            raise ValueError("tenants: ids must be unique")
        return self

    def model(self, name: str) -> ModelConfig | None:
        for m in self.models:
            if m.name == name:
                return m
        return None


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _apply_override(data: dict[str, Any], path: list[str], raw: str) -> None:
    node: Any = data
    for part in path[:-1]:
        nxt = node.get(part) if isinstance(node, dict) else None
        if not isinstance(nxt, dict):
            nxt = {}
            node[part] = nxt
        node = nxt
    node[path[-1]] = yaml.safe_load(raw) if raw != "" else None


def load_settings(path: str | os.PathLike[str] | None, env: Mapping[str, str] | None = None) -> Settings:
    """Read the YAML file (if any), apply `GATEWAY_*` overrides, take secrets from the environment."""
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        data = loaded
    for field in _SECRET_FIELDS & set(data):
        raise ConfigError(f"{field}: secrets are not read from the config file; set GATEWAY_{field.upper()}")
    for name, raw in env.items():
        if not name.startswith("GATEWAY_") or name in _NOT_OVERRIDES:
            continue
        parts = [p.lower() for p in name[len("GATEWAY_") :].split("__") if p]
        if parts:
            try:
                _apply_override(data, parts, raw)
            except yaml.YAMLError:
                raise ConfigError(f"{name}: not a valid value") from None
    data["admin_key"] = env.get("GATEWAY_ADMIN_KEY") or None
    data["salt_secret"] = env.get("GATEWAY_SALT_SECRET") or None
    data["metrics_token"] = env.get("GATEWAY_METRICS_TOKEN") or None
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = _loc(tuple(err["loc"]))
            msg = err["msg"].removeprefix("Value error, ")
            # Cross-field checks already name their field in the message.
            problems.append(f"{where}: {msg}" if where else msg)
        raise ConfigError("; ".join(problems)) from None
    return settings.model_copy(update={"env_secrets": _env_secrets(settings, env)})


def _env_secrets(settings: Settings, env: Mapping[str, str]) -> dict[str, str]:
    found: dict[str, str] = {}
    wanted: list[tuple[str, str]] = []
    for i, tenant in enumerate(settings.tenants):
        for j, key in enumerate(tenant.keys):
            if key.key_env is not None:
                wanted.append((f"tenants[{i}].keys[{j}].key_env", key.key_env))
    for i, backend in enumerate(settings.backends):
        if backend.api_key_env is not None:
            wanted.append((f"backends[{i}].api_key_env", backend.api_key_env))
    for where, name in wanted:
        value = env.get(name)
        if not value:
            raise ConfigError(f"{where}: environment variable {name} is not set")
        found[name] = value
    return found
