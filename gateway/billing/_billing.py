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
from pathlib import Path
from typing import Any, NamedTuple

import orjson

from gateway.billing._event import cost_of, usage_event
from gateway.billing._lane import Lane
from gateway.billing._sinks import open_sink
from gateway.billing._spool import Spool
from gateway.config import Settings
from gateway.metrics import Metrics

__all__ = ["Backlog", "Billing"]


class Backlog(NamedTuple):
    """Events of one sink not yet delivered: in memory (including a batch in flight) and in the spool."""

    memory: int
    spooled: int


class Billing:
    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        config = settings.billing
        self._source = config.source
        self._models = {m.name: m for m in settings.models}
        self._shutdown_timeout_s = config.shutdown_timeout_s
        metrics = metrics if metrics is not None else Metrics()
        spool_dir = Path(config.spool_dir) if config.spool_dir else Path(settings.state_path).parent / "spool"
        self._lanes = [
            Lane(s.label, open_sink(s, settings), Spool(spool_dir / s.label), s, metrics) for s in config.sinks
        ]
        self._pushes = tuple(lane.push for lane in self._lanes)

    def cost(self, model: str, prompt_tokens: int, completion_tokens: int) -> tuple[float, str]:
        return cost_of(self._models.get(model), prompt_tokens, completion_tokens)

    def emit(self, request_id: str, tenant_id: str, data: dict[str, Any]) -> None:
        """Queue the usage event of one request for every sink. Synchronous, no I/O: the hot path."""
        if not self._pushes:
            return
        record = (request_id, orjson.dumps(usage_event(self._source, request_id, tenant_id, data)))
        for push in self._pushes:
            push(record)

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
