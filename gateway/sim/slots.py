"""The engine's capacity: a fixed number of running slots and a FIFO queue of cancellable waiters.

asyncio.Semaphore does not promise FIFO order once waiters are cancelled, and it cannot say how many
are waiting; vLLM's scheduler is first come, first served, and its waiting count is a metric the gateway
reads, so the simulator keeps its own queue.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
from collections import deque

__all__ = ["QUEUE_TIME_BOUNDS", "Slots"]


#: The upper bounds (seconds) of vLLM's `vllm:request_queue_time_seconds` histogram buckets, up to a minute.
QUEUE_TIME_BOUNDS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0)


class Slots:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._free = capacity
        self._waiters: deque[asyncio.Future[None]] = deque()
        # How long each request that got a slot waited for it (0 for one that found a slot free), as vLLM's
        # queue-time histogram counts it: per bucket of QUEUE_TIME_BOUNDS (the last one: above them all).
        self.queue_time_buckets = [0] * (len(QUEUE_TIME_BOUNDS) + 1)
        self.queue_time_sum = 0.0
        self.queue_time_count = 0

    def _queued(self, seconds: float) -> None:
        self.queue_time_sum += seconds
        self.queue_time_count += 1
        self.queue_time_buckets[bisect.bisect_left(QUEUE_TIME_BOUNDS, seconds)] += 1

    @property
    def running(self) -> int:
        return self.capacity - self._free

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def try_acquire(self) -> bool:
        # A free slot goes to the head of the queue first, so newcomers never overtake waiters.
        if self._free > 0 and not self._waiters:
            self._free -= 1
            self._queued(0.0)
            return True
        return False

    async def acquire(self) -> None:
        if self.try_acquire():
            return
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)
        queued_at = loop.time()
        try:
            await waiter
            self._queued(loop.time() - queued_at)
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                # The slot was handed over just as the waiter gave up: pass it on.
                self.release()
            else:
                # release() may already have dropped it while skipping cancelled waiters.
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        # Hand the slot straight to the next waiter, so the running count never dips in between.
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1
