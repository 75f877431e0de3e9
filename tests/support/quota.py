"""Reading a tenant's quota state straight out of Redis, to check it against what billing says.

The keys are the ones gateway/admission/limits/_redis.py documents: for tenant `t`, the hash
`gw:{t}:state:tenant:t` (`k` is the tokens bucket's theoretical arrival time, in Redis server seconds; `t`
and `c` the tokens and cost in flight), the lease set `gw:{t}:leases:tenant:t` and the budget hash
`gw:{t}:budget:tenant:t` (`s` is the spend in the current period).

How the tokens charged are read exactly: `prime()` puts the tokens bucket 30 s into debt. While it stays in
debt, every admission adds its reservation to `k` and every settlement corrects `k` by (actual - reserved),
with no clamping at "now", so `(k_after - k_before) * tpm / 60` is exactly the tokens charged in between,
whatever the time it took. (tpm must be large enough for the debt to be admissible: 10**6 is.)
"""

from __future__ import annotations

import time

import redis


class QuotaProbe:
    def __init__(self, url: str, tenant: str, *, tpm: int) -> None:
        self.client = redis.Redis.from_url(url)
        self.tenant = tenant
        self.tpm = tpm
        base = f"gw:{{{tenant}}}"
        self.state = f"{base}:state:tenant:{tenant}"
        self.leases = f"{base}:leases:tenant:{tenant}"
        self.budget = f"{base}:budget:tenant:{tenant}"
        self._k0 = 0.0

    def now(self) -> float:
        seconds, micros = self.client.time()
        return float(seconds) + float(micros) / 1e6

    def prime(self, debt_s: float = 30.0) -> None:
        self._k0 = self.now() + debt_s
        self.client.hset(self.state, "k", repr(self._k0))
        self.client.expire(self.state, 600)

    def tokens_charged(self) -> float:
        raw = self.client.hget(self.state, "k")
        assert raw is not None, "the tokens bucket is gone"
        return (float(raw) - self._k0) * self.tpm / 60

    def spent(self) -> float:
        raw = self.client.hget(self.budget, "s")
        return 0.0 if raw is None else float(raw)

    def held(self) -> int:
        """Leases still held (requests admitted and not settled)."""
        return int(self.client.zcard(self.leases))

    def wait_settled(self, within_s: float = 15.0) -> None:
        deadline = time.monotonic() + within_s
        while self.held():
            assert time.monotonic() < deadline, f"{self.held()} lease(s) of {self.tenant} never came back"
            time.sleep(0.02)

    def close(self) -> None:
        self.client.close()
