"""The engine's capacity: a fixed number of running slots and a FIFO queue of cancellable waiters.

asyncio.Semaphore does not promise FIFO order once waiters are cancelled, and it cannot say how many
are waiting; vLLM's scheduler is first come, first served, and its waiting count is a metric the gateway
reads, so the simulator keeps its own queue.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

__all__ = ["Slots"]


class Slots:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._free = capacity
        self._waiters: deque[asyncio.Future[None]] = deque()

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
            return True
        return False

    async def acquire(self) -> None:
        if self.try_acquire():
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
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
