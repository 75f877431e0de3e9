"""Admission's shared state: rate buckets, in-flight leases and budgets per scope, and each backend pool's
fair queue (permits per endpoint, weighted virtual token counters, waiting requests).

QuotaStore (protocol)       admit -> Decision (+ Reservation, + Permit or a place in a queue), settle (with
                            the permit's release), renew, cancel, set_capacity, close
├── RedisQuotaStore         shared by every replica: one Lua script per call, keys hash-tagged by tenant
│                           (over PipelinedRedis: one pipelined connection, hiredis in C)
├── LocalQuotaStore         the same semantics in one process (embedded mode, fallback), its fair
│                           queues in LocalFairShare (the twin of lua/fairshare.lua)
└── FailoverQuotaStore      Redis first; while it is down: local shares, fail open, or fail closed

QuotaBackendError           Redis unreachable or failing (a ServiceUnavailableError: 503)
"""

from gateway.admission.limits._failover import FailoverQuotaStore, FailureMode
from gateway.admission.limits._local import LocalQuotaStore
from gateway.admission.limits._period import period_window
from gateway.admission.limits._protocol import QuotaStore
from gateway.admission.limits._redis import RedisQuotaStore, ScriptClient, fast_fail_client
from gateway.admission.limits._replica import ReplicaLink
from gateway.admission.limits._types import (
    Decision,
    LimitName,
    Period,
    Permit,
    PlaceAsk,
    PoolAsk,
    PoolStatus,
    QuotaBackendError,
    QuotaLimits,
    RateHeaders,
    Release,
    Reservation,
    Scope,
)
from gateway.wire.resp import PipelinedRedis

__all__ = [
    "Decision",
    "FailoverQuotaStore",
    "FailureMode",
    "LimitName",
    "LocalQuotaStore",
    "Period",
    "Permit",
    "PipelinedRedis",
    "PlaceAsk",
    "PoolAsk",
    "PoolStatus",
    "QuotaBackendError",
    "QuotaLimits",
    "QuotaStore",
    "RateHeaders",
    "RedisQuotaStore",
    "Release",
    "ReplicaLink",
    "Reservation",
    "Scope",
    "ScriptClient",
    "fast_fail_client",
    "period_window",
]
