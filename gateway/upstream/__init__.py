"""Everything on the backend side of the request path.

backends.py     backend health, the cache_salt probe, the circuit breaker, which backends may serve
relay.py        backends' answers and errors translated, the stream relay, the pool protocol
formats.py      what an answer says: its usage; per stream format, its events, its end and its error event
salt.py         per-scope cache salts
providers/      hosted providers through litellm behind the same pool protocol
"""

from gateway.upstream.formats import StreamOutcome, Usage, usage_from
from gateway.upstream.relay import (
    UPSTREAM_FAILED,
    DirectWriter,
    Relay,
    UpstreamPool,
    UpstreamResponse,
    backend_headers,
    error_from_backend,
)

__all__ = [
    "UPSTREAM_FAILED",
    "DirectWriter",
    "Relay",
    "StreamOutcome",
    "UpstreamPool",
    "UpstreamResponse",
    "Usage",
    "backend_headers",
    "error_from_backend",
    "usage_from",
]
