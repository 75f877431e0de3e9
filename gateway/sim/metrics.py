"""/metrics in Prometheus text format, with vLLM's metric names and its `model_name` label.

Written by hand rather than with prometheus_client: five series and the queue-time histogram, rendered
on demand from the live counters, cost nothing on the request path.
"""

from __future__ import annotations

import math

from gateway.sim.engine import Engine
from gateway.sim.slots import QUEUE_TIME_BOUNDS

__all__ = ["CONTENT_TYPE", "render_metrics"]

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

_SERIES = (
    ("vllm:num_requests_running", "gauge", "Number of requests in model execution batches."),
    ("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed."),
    ("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage."),
    (
        "vllm:prefix_cache_queries_total",
        "counter",
        "Prefix cache queries, in terms of number of queried tokens.",
    ),
    ("vllm:prefix_cache_hits_total", "counter", "Prefix cache hits, in terms of number of cached tokens."),
)


def render_metrics(engine: Engine, model_name: str) -> bytes:
    values = (
        engine.slots.running,
        engine.slots.waiting,
        engine.kv_usage,
        engine.cache.queries,
        engine.cache.hits,
    )
    label = model_name.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    lines: list[str] = []
    for (name, kind, help_text), value in zip(_SERIES, values, strict=True):
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        lines.append(f'{name}{{model_name="{label}"}} {float(value)}')
    slots = engine.slots
    name = "vllm:request_queue_time_seconds"
    lines.append(f"# HELP {name} Histogram of time spent in WAITING phase for request.")
    lines.append(f"# TYPE {name} histogram")
    below = 0
    for bound, count in zip((*QUEUE_TIME_BOUNDS, math.inf), slots.queue_time_buckets, strict=True):
        below += count
        le = "+Inf" if math.isinf(bound) else repr(bound)
        lines.append(f'{name}_bucket{{le="{le}",model_name="{label}"}} {float(below)}')
    lines.append(f'{name}_sum{{model_name="{label}"}} {slots.queue_time_sum}')
    lines.append(f'{name}_count{{model_name="{label}"}} {float(slots.queue_time_count)}')
    return ("\n".join(lines) + "\n").encode()
