"""/metrics in Prometheus text format, with vLLM's metric names and its `model_name` label.

Written by hand rather than with prometheus_client: five series, rendered on demand from the live
counters, cost nothing on the request path.
"""

from __future__ import annotations

from gateway.sim.engine import Engine

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
    return ("\n".join(lines) + "\n").encode()
