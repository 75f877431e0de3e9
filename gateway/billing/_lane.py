"""One sink's delivery lane: its memory buffer, its spool, and the one task that moves events between them.

Every path an event can take keeps the order it was emitted in:

    sink up, spool empty   buffer --batch--> sink            (if the batch fails: its undelivered rest
                                                              goes to the spool, at the seq reserved for it)
    spool not empty        spool head --batch--> sink         (replay: oldest first; newer events wait in
                                                              memory, or overflow to the spool's tail)
    sink down (backoff)    buffer --> spool tail              (every 0.1 s; the next try is the probe)
    buffer over its bound  buffer --> spool tail              (even while a batch is in flight)

A delivered batch is never re-sent in the same run: delivery is tracked per batch, and a sink that reports
partial success (`SinkError.delivered`) has only the rest spooled. One task per lane does all of this, so
the reasoning is sequential; the only concurrency is the overflow spooling done while a batch is in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from collections.abc import Coroutine, Sequence
from typing import Any

from gateway.billing._event import Record
from gateway.billing._sinks import Sink, SinkError
from gateway.billing._spool import Spool
from gateway.config import SinkConfig
from gateway.telemetry.metrics import Metrics

__all__ = ["Lane"]

log = logging.getLogger("gateway.billing")

# While a sink is down, buffered events reach the durable spool at least this often.
_DOWN_FLUSH_S = 0.1


class Lane:
    def __init__(self, name: str, sink: Sink, spool: Spool, config: SinkConfig, metrics: Metrics) -> None:
        self.name = name
        self.sink = sink
        self.spool = spool
        self.buffer: deque[Record] = deque()
        self.in_flight = 0
        self._batch_max = config.batch_max
        self._linger_s = config.linger_s
        self._buffer_max = config.buffer_max
        self._backoff_initial = config.backoff_initial_s
        self._backoff_max = config.backoff_max_s
        self._wake = asyncio.Event()  # work arrived (or close)
        self._nudge = asyncio.Event()  # the buffer is over its bound (or close)
        self._closing = False
        self._closed = False
        self._failures = 0
        self._down_until = 0.0
        self._task: asyncio.Task[None] | None = None
        outcome = metrics.billing_events
        self._emitted = outcome.labels(name, "emitted")
        self._spooled = outcome.labels(name, "spooled")
        self._replayed = outcome.labels(name, "replayed")
        self._failed = outcome.labels(name, "failed")
        self._gauge = metrics.billing_spool.labels(name)

    # --- the hot path ---------------------------------------------------------------------------

    def push(self, record: Record) -> None:
        if self._closed:
            # Nothing may emit after the lifespan closed billing; if something does, say so loudly.
            log.error("billing event %s for sink %s arrived after close and is lost", record[0], self.name)
            self._failed.inc()
            return
        buffer = self.buffer
        buffer.append(record)
        n = len(buffer)
        if n == 1:
            self._wake.set()
        elif n >= self._buffer_max:
            self._nudge.set()

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(self.spool.open)
        self._gauge.set(self.spool.pending)
        if self.spool.pending:
            log.info("billing sink %s: %d spooled events to replay", self.name, self.spool.pending)
        await self.sink.open()
        self._task = asyncio.create_task(self._run(), name=f"billing-{self.name}")

    async def close(self, timeout_s: float) -> None:
        """Deliver what can be delivered within `timeout_s`, spool the rest, release everything."""
        self._closing = True
        # One last try even if the sink is in backoff: it may be back, and the next start is far away.
        self._failures = 0
        self._down_until = 0.0
        self._wake.set()
        self._nudge.set()
        task = self._task
        if task is not None:
            done, _ = await asyncio.wait({task}, timeout=timeout_s)
            if not done:
                log.warning("billing sink %s: shutdown deadline reached; spooling the rest", self.name)
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._closed = True
        if self.buffer:
            records = list(self.buffer)
            self.buffer.clear()
            try:
                self.spool.append(records)
                self._spooled.inc(len(records))
            except OSError:
                log.critical("billing sink %s: %d events could not be spooled at exit", self.name, len(records))
                self._failed.inc(len(records))
        self._gauge.set(self.spool.pending)
        await self.sink.close()
        self.spool.close()

    # --- the lane's task ------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                if not self.buffer and not self.spool.pending:
                    if self._closing:
                        return
                    self._wake.clear()
                    await self._wake.wait()
                elif self._closing and self._failures:
                    # Shutting down and the sink failed its last chance: keep the rest for the next start.
                    await self._spool_buffer()
                    return
                elif self._is_down():
                    await self._spool_buffer()
                    await self._pause()
                elif self.spool.pending:
                    await self._replay()
                else:
                    if self._linger_s and len(self.buffer) < self._batch_max and not self._closing:
                        # Let a batch gather: under load, one delivery per linger rather than one per event.
                        await asyncio.sleep(self._linger_s)
                    await self._deliver()
            except Exception:  # a bug here must not end billing: log it, back off, carry on
                log.exception("billing sink %s: unexpected error in the delivery loop", self.name)
                self._mark_down("unexpected error")
                await asyncio.sleep(_DOWN_FLUSH_S)

    async def _deliver(self) -> None:
        batch = [self.buffer.popleft() for _ in range(min(self._batch_max, len(self.buffer)))]
        seq = self.spool.reserve()
        self.in_flight = len(batch)
        try:
            await self._attempt(self.sink.deliver(batch))
        except SinkError as exc:
            rest = batch[exc.delivered :]
            self._emitted.inc(exc.delivered)
            self._failed.inc(len(rest))
            self._mark_down(str(exc))
            await self._to_spool(rest, seq)
        except asyncio.CancelledError:
            # The shutdown deadline cut a delivery short: whether it arrived is unknown, so keep it (a
            # possible duplicate is the at-least-once side of that window).
            with contextlib.suppress(OSError):
                self.spool.append(batch, seq)
                self._spooled.inc(len(batch))
            raise
        else:
            self._emitted.inc(len(batch))
            self._mark_up()
        finally:
            self.in_flight = 0

    async def _replay(self) -> None:
        batch = await asyncio.to_thread(self.spool.peek, self._batch_max)
        if batch:
            try:
                await self._attempt(self.sink.deliver(batch))
            except SinkError as exc:
                self._replayed.inc(exc.delivered)
                self._failed.inc(len(batch) - exc.delivered)
                self._mark_down(str(exc))
                await asyncio.to_thread(self.spool.commit, exc.delivered)
            else:
                await asyncio.to_thread(self.spool.commit, len(batch))
                self._replayed.inc(len(batch))
                self._mark_up()
        self._gauge.set(self.spool.pending)

    async def _attempt(self, delivery: Coroutine[Any, Any, None]) -> None:
        """Await one delivery; meanwhile, move the buffer to the spool whenever it outgrows its bound."""
        task = asyncio.ensure_future(delivery)
        try:
            while not task.done():
                if len(self.buffer) >= self._buffer_max:
                    await self._spool_buffer()
                    continue
                self._nudge.clear()
                nudged = asyncio.ensure_future(self._nudge.wait())
                try:
                    await asyncio.wait({task, nudged}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    nudged.cancel()
        except asyncio.CancelledError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({task}, timeout=1.0)
            raise
        task.result()

    async def _pause(self) -> None:
        if self._closing:
            return
        self._nudge.clear()
        delay = min(self._down_until - asyncio.get_running_loop().time(), _DOWN_FLUSH_S)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._nudge.wait(), max(delay, 0.0))

    async def _spool_buffer(self) -> None:
        if self.buffer:
            records = list(self.buffer)
            self.buffer.clear()
            await self._to_spool(records)

    async def _to_spool(self, records: Sequence[Record], seq: int | None = None) -> None:
        if not records:
            return
        try:
            await asyncio.to_thread(self.spool.append, records, seq)
        except OSError:
            # Nothing is dropped: the events go back to the front of the buffer and the disk is tried again.
            log.exception("billing sink %s: cannot spool %d events; keeping them in memory", self.name, len(records))
            self.buffer.extendleft(reversed(records))
            self._mark_down("spool write failed")
        else:
            self._spooled.inc(len(records))
        self._gauge.set(self.spool.pending)

    # --- sink health ----------------------------------------------------------------------------

    def _is_down(self) -> bool:
        return not self._closing and asyncio.get_running_loop().time() < self._down_until

    def _mark_down(self, reason: str) -> None:
        self._failures += 1
        delay = min(self._backoff_max, self._backoff_initial * 2 ** min(self._failures - 1, 30))
        delay *= random.uniform(0.5, 1.0)  # jitter: replicas that failed together do not retry together
        self._down_until = asyncio.get_running_loop().time() + delay
        if self._failures == 1:
            log.warning("billing sink %s failed (%s); spooling, next try in %.2fs", self.name, reason, delay)

    def _mark_up(self) -> None:
        if self._failures:
            log.info("billing sink %s is back after %d failed tries", self.name, self._failures)
        self._failures = 0
        self._down_until = 0.0
