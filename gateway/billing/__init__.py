"""Billing: one CloudEvents 1.0 usage event (docs/reference/billing-event.md) per request that reached a
backend, delivered at least once to every configured sink, with the request id as the event id so consumers
can dedupe.

    pipeline._close --emit()--> Billing --(id, json)--> Lane per sink: memory buffer --> Sink (jsonl | redis | webhook)
                                                                         |   ^
                                                       sink down/behind  v   |  replayed in order, then deleted
                                                                        Spool (fsync'd segment files)

`emit()` is synchronous and does no I/O; each lane's task delivers in batches, spools what a sink cannot
take, and replays the spool (oldest first) once the sink answers again. The lifespan calls
`await billing.start()` after construction and `await billing.close()` at shutdown.
"""

from gateway.billing._billing import Backlog, Billing
from gateway.billing._event import Record, cost_of, usage_event
from gateway.billing._sinks import JsonlSink, RedisStreamSink, Sink, SinkError, WebhookSink, open_sink
from gateway.billing._spool import Spool

__all__ = [
    "Backlog",
    "Billing",
    "JsonlSink",
    "Record",
    "RedisStreamSink",
    "Sink",
    "SinkError",
    "Spool",
    "WebhookSink",
    "cost_of",
    "open_sink",
    "usage_event",
]
