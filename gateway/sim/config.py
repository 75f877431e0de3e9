"""The simulator's settings: one frozen dataclass, built once by the CLI (or a test) and passed down."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SimConfig"]


@dataclass(frozen=True, slots=True)
class SimConfig:
    """How the simulated vLLM behaves. Times are per request; sizes are in tokens or KV blocks."""

    ttft_ms: float = 20.0
    """Base time to first token, before the per-token prefill cost."""
    itl_ms: float = 10.0
    """Inter-token latency during decode."""
    prefill_us_per_token: float = 20.0
    """Extra time to first token per prompt token that missed the prefix cache."""
    max_concurrency: int = 256
    """Requests running at once; later ones wait in a FIFO queue."""
    ignore_cache_salt: bool = False
    """Behave like vLLM < 0.9.0: `cache_salt` is neither validated nor mixed into the block hashes."""
    block_size: int = 16
    """Tokens per KV-cache block (the prefix cache's unit)."""
    cache_blocks: int = 20000
    """Prefix-cache capacity in blocks; least recently used blocks are evicted beyond it."""
    max_tokens_default: int = 16
    """Output tokens when the request sets no limit."""
    max_model_len: int = 32768
    """Prompt plus output tokens a request may ask for (vLLM answers 400 beyond it)."""
    embedding_dim: int = 16
    models: tuple[str, ...] = ("sim-model",)
    """Model ids listed by /v1/models; requests for any model name are still served."""
    max_body_bytes: int = 32 * 1024 * 1024
    stamp_chunks: bool = False
    """Benchmarks: put the send time (`time.monotonic_ns()`) in every streamed chunk as `x_sim_sent_ns`, so a
    client on the same machine can measure each chunk's one-way delay (through a gateway or not)."""
    api_key: str | None = None
    """When set, `/v1/messages` answers 401 unless `x-api-key` is this value (any key is accepted otherwise)."""

    def __post_init__(self) -> None:
        for name in ("ttft_ms", "itl_ms", "prefill_us_per_token"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        for name in ("max_concurrency", "block_size", "max_tokens_default", "max_model_len", "embedding_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.cache_blocks < 0:
            raise ValueError("cache_blocks must be >= 0")
        if not self.models:
            raise ValueError("at least one model id is required")
