"""Quota state for admission (SPEC 4 and 6): rate buckets, in-flight leases and budgets, per scope.

QuotaStore (protocol)       admit -> Decision (+ Reservation), settle, renew, close
├── RedisQuotaStore         shared by every replica: one Lua script per call, keys hash-tagged by tenant
│                           (over PipelinedRedis: one pipelined connection, hiredis in C)
├── LocalQuotaStore         the same semantics in one process (embedded mode, fallback)
└── FailoverQuotaStore      Redis first; while it is down: local shares, fail open, or fail closed

QuotaBackendError           Redis unreachable or failing (a ServiceUnavailableError: 503)
"""

from gateway.admission.limits._failover import FailoverQuotaStore, FailureMode
from gateway.admission.limits._local import LocalQuotaStore
from gateway.admission.limits._period import period_window
from gateway.admission.limits._protocol import QuotaStore
from gateway.admission.limits._redis import RedisQuotaStore, ScriptClient, fast_fail_client
from gateway.admission.limits._types import (
    Decision,
    LimitName,
    Period,
    QuotaBackendError,
    QuotaLimits,
    RateHeaders,
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
    "PipelinedRedis",
    "QuotaBackendError",
    "QuotaLimits",
    "QuotaStore",
    "RateHeaders",
    "RedisQuotaStore",
    "Reservation",
    "Scope",
    "ScriptClient",
    "fast_fail_client",
    "period_window",
]
