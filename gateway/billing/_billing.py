"""`Billing`: the one object the rest of the gateway sees. It prices requests, turns each finished request
into a usage event on the hot path (no I/O, no await), and owns one delivery lane per configured sink.

Lifespan contract: `Billing(settings, metrics)` does no I/O; `await start()` opens the spools (replaying
what a previous run left) and the sinks' clients and starts the lanes; `await close()` delivers or spools
everything within `billing.shutdown_timeout_s` and releases the clients. Events emitted before `start()`
wait in memory and go out once it runs.

Delivery is at least once. Within a run, and across a sink outage, no event is sent twice. The windows
where a consumer can see an id twice: a crash (or the shutdown deadline) while a batch was in flight, and
a webhook that took a batch but timed out answering. The window where events can be lost: a hard crash
(SIGKILL, power) loses those still in memory, that is the ones emitted in the last moments before it
(normally a few milliseconds' worth; up to 0.1 s while a sink is down).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import orjson

from gateway.billing._event import price_cost, usage_event
from gateway.billing._lane import Lane
from gateway.billing._sinks import open_sink
from gateway.billing._spool import Spool
from gateway.config import Price, Settings
from gateway.telemetry.metrics import Metrics

__all__ = ["Backlog", "Billing"]


class Backlog(NamedTuple):
    """Events of one sink not yet delivered: in memory (including a batch in flight) and in the spool."""

    memory: int
    spooled: int


class Billing:
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics | None = None,
        provider_prices: Mapping[str, Price] | None = None,
    ) -> None:
        """`provider_prices`: prices by `provider_model` (litellm's bundled map) for models the config gives
        none; a model's own `price` always wins."""
        config = settings.billing
        self._source = config.source
        self._prices = _price_table(settings, provider_prices or {})
        self._shutdown_timeout_s = config.shutdown_timeout_s
        metrics = metrics if metrics is not None else Metrics()
        spool_dir = Path(config.spool_dir) if config.spool_dir else Path(settings.state_path).parent / "spool"
        self._lanes = [
            Lane(s.label, open_sink(s, settings), Spool(spool_dir / s.label), s, metrics) for s in config.sinks
        ]
        self._pushes = tuple(lane.push for lane in self._lanes)

    def cost(
        self, model: str, prompt_tokens: int, completion_tokens: int, backend: str | None = None
    ) -> tuple[float, str]:
        """The price of a request served by `backend`; with no backend, the dearest of the model's (what a
        budget must reserve before the backend is known)."""
        by_backend = self._prices.get(model)
        if not by_backend:
            return 0.0, "USD"
        if backend is not None:
            return price_cost(by_backend.get(backend), prompt_tokens, completion_tokens)
        return max(price_cost(p, prompt_tokens, completion_tokens) for p in by_backend.values())

    def emit(self, request_id: str, tenant_id: str, data: dict[str, Any]) -> None:
        """Queue the usage event of one request for every sink. Synchronous, no I/O: the hot path."""
        if not self._pushes:
            return
        record = (request_id, orjson.dumps(usage_event(self._source, request_id, tenant_id, data)))
        for push in self._pushes:
            push(record)

    def price(self, model: str, backend: str) -> Price | None:
        return self._prices.get(model, {}).get(backend)

    async def start(self) -> None:
        for lane in self._lanes:
            await lane.start()

    async def close(self) -> None:
        await asyncio.gather(*(lane.close(self._shutdown_timeout_s) for lane in self._lanes))

    def backlog(self) -> dict[str, Backlog]:
        return {lane.name: Backlog(len(lane.buffer) + lane.in_flight, lane.spool.pending) for lane in self._lanes}

    async def drain(self, timeout_s: float) -> bool:
        """Wait until every event emitted so far was delivered (tests, benchmarks); False on timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while any(b.memory or b.spooled for b in self.backlog().values()):
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.005)
        return True


def _price_table(settings: Settings, provider_prices: Mapping[str, Price]) -> dict[str, dict[str, Price]]:
    """model -> backend -> price, for the (model, backend) pairs that have one."""
    backends = {b.name: b for b in settings.backends}
    table: dict[str, dict[str, Price]] = {}
    for model in settings.models:
        prices: dict[str, Price] = {}
        for name in model.backends:
            provider_model = backends[name].provider_model
            price = model.price or (provider_prices.get(provider_model) if provider_model else None)
            if price is not None:
                prices[name] = price
        if prices:
            table[model.name] = prices
    return table
