"""The engine: admit a job into a running slot, consult and fill the prefix cache, and pace prefill and
decode the way vLLM's timing looks from outside (time to first token grows with uncached prompt tokens;
one token every inter-token interval after that).

The engine knows nothing of HTTP: the app gives it a job and, for streams, a callback per token.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from gateway.sim.cache import PrefixCache
from gateway.sim.config import SimConfig
from gateway.sim.requests import Job
from gateway.sim.slots import Slots

__all__ = ["Admission", "Engine", "Usage"]

Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class Admission:
    """A job that holds a running slot; the holder must hand it back with `Engine.release`."""

    usage: Usage
    hashes: list[bytes]
    ttft_s: float
    decode_s: float
    blocks: int


class Engine:
    def __init__(self, config: SimConfig, *, sleep: Sleep = asyncio.sleep) -> None:
        self.config = config
        self.cache = PrefixCache(config.block_size, config.cache_blocks)
        self.slots = Slots(config.max_concurrency)
        self.blocks_in_use = 0
        self._sleep = sleep
        self._itl_s = config.itl_ms / 1000

    @property
    def kv_usage(self) -> float:
        """Share of the KV cache held by running requests (what vLLM's kv_cache_usage_perc reports)."""
        if self.config.cache_blocks == 0:
            return 0.0
        return min(1.0, self.blocks_in_use / self.config.cache_blocks)

    def try_admit(self, job: Job) -> Admission | None:
        """Admit at once if a slot is free and nobody is queued, else None."""
        return self._prefill(job) if self.slots.try_acquire() else None

    async def admit(self, job: Job) -> Admission:
        await self.slots.acquire()
        return self._prefill(job)

    def release(self, admission: Admission) -> None:
        self.blocks_in_use -= admission.blocks
        self.slots.release()

    async def complete(self, job: Job, admission: Admission | None = None) -> Usage:
        """Run a non-streaming job to the end: queue (unless already admitted), prefill, decode.

        With zero latencies this never suspends, so it costs no more than a function call.
        """
        if admission is None:
            admission = await self.admit(job)
        try:
            if admission.ttft_s > 0:
                await self._sleep(admission.ttft_s)
            self.cache.insert(admission.hashes)
            if admission.decode_s > 0:
                await self._sleep(admission.decode_s)
            return admission.usage
        finally:
            self.release(admission)

    async def stream(
        self, job: Job, on_token: Callable[[int], Awaitable[None]], admission: Admission | None = None
    ) -> Usage:
        """Run a streaming job, calling `on_token(i)` as token i is produced."""
        if admission is None:
            admission = await self.admit(job)
        try:
            if admission.ttft_s > 0:
                await self._sleep(admission.ttft_s)
            self.cache.insert(admission.hashes)
            itl = self._itl_s
            for i in range(job.max_tokens):
                if i and itl > 0:
                    await self._sleep(itl)
                elif i % 256 == 255:
                    # With no inter-token latency, still let the event loop run now and then: a long stream
                    # must not starve the health checks and the other requests.
                    await self._sleep(0)
                await on_token(i)
            return admission.usage
        finally:
            self.release(admission)

    def _prefill(self, job: Job) -> Admission:
        config = self.config
        cache = self.cache
        hashes: list[bytes] = []
        prompt = cached = 0
        for tokens in job.prompts:
            prompt_hashes = cache.block_hashes(tokens, job.salt)
            cached += cache.lookup(prompt_hashes, len(tokens))
            prompt += len(tokens)
            hashes += prompt_hashes
        ttft_ms = config.ttft_ms + config.prefill_us_per_token * (prompt - cached) / 1000
        # Every choice decodes in parallel with the others: the same time, its own KV blocks.
        completion = job.choices * job.max_tokens
        blocks = -(-(prompt + completion) // config.block_size)
        self.blocks_in_use += blocks
        return Admission(
            usage=Usage(prompt, cached, completion),
            hashes=hashes,
            ttft_s=ttft_ms / 1000,
            decode_s=self._itl_s * (job.max_tokens - 1),
            blocks=blocks,
        )
