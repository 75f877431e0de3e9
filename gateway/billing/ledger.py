"""Usage totals for the admin API: what billing records, summed per tenant, key and hour.

The request path adds each billed request to an in-process table (a dict update, no I/O); a task flushes
the table to the store every second as increments, which add up correctly across replicas and workers.
Reads sum the store's hours in the range plus what this process has not flushed yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict

from gateway.tenancy import UsageRow
from gateway.tenancy.store import Store

__all__ = ["UsageLedger"]

log = logging.getLogger("gateway.billing.ledger")

_HOUR = 3600


class UsageLedger:
    def __init__(self, store: Store, *, flush_interval_s: float = 1.0) -> None:
        self._store = store
        self._interval = flush_interval_s
        self._pending: dict[tuple[str, str, int, str], list[float]] = defaultdict(lambda: [0, 0, 0, 0, 0.0])
        self._task: asyncio.Task[None] | None = None

    def record(
        self, tenant: str, key_id: str, at: float, prompt: int, completion: int, cached: int, cost: float, currency: str
    ) -> None:
        row = self._pending[(tenant, key_id, int(at // _HOUR) * _HOUR, currency)]
        row[0] += 1
        row[1] += prompt
        row[2] += completion
        row[3] += cached
        row[4] += cost

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.flush()
            except Exception:  # the store may be down: keep the totals and try again
                log.warning("could not flush usage totals; will retry", exc_info=True)

    def _rows(self, pending: dict[tuple[str, str, int, str], list[float]]) -> list[UsageRow]:
        return [
            UsageRow(
                tenant=t,
                key_id=k,
                hour=h,
                currency=c,
                requests=int(v[0]),
                prompt_tokens=int(v[1]),
                completion_tokens=int(v[2]),
                cached_tokens=int(v[3]),
                spend=v[4],
            )
            for (t, k, h, c), v in pending.items()
        ]

    async def flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, defaultdict(lambda: [0, 0, 0, 0, 0.0])
        try:
            await self._store.add_usage(self._rows(pending))
        except Exception:
            # Put them back (merged with anything recorded meanwhile) so nothing is lost.
            for key, values in pending.items():
                row = self._pending[key]
                for i, value in enumerate(values):
                    row[i] += value
            raise

    async def query(self, tenant: str, since: float, until: float, key_id: str | None = None) -> list[UsageRow]:
        first, last = int(since // _HOUR) * _HOUR, int(until // _HOUR) * _HOUR
        rows = await self._store.usage(tenant, first, last, key_id)
        local = [
            r
            for r in self._rows(self._pending)
            if r.tenant == tenant and first <= r.hour <= last and (key_id is None or r.key_id == key_id)
        ]
        return rows + local
