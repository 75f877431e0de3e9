"""OpenTelemetry traces: one server span per inference request, one client span per upstream call.

Off unless configured, at zero cost on the hot path: with no `OTEL_EXPORTER_OTLP_ENDPOINT` (or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) in the environment and no provider passed in, `Tracing.enabled` is
False and the request path never touches OpenTelemetry. When on, spans follow the GenAI semantic
conventions (`gen_ai.operation.name`, `gen_ai.request.model`, `gen_ai.usage.input_tokens`, ...) plus
`gateway.tenant.id`; prompt and completion text are never recorded. The OTLP exporter reads the standard
`OTEL_*` variables itself (endpoint, headers, protocol, service name).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from typing import Any

from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer, TracerProvider

__all__ = ["OPERATIONS", "Tracing"]

# gen_ai.operation.name per endpoint (OpenTelemetry GenAI semantic conventions).
OPERATIONS = {"chat": "chat", "completions": "text_completion", "embeddings": "embeddings", "responses": "chat"}


class Tracing:
    def __init__(self, provider: TracerProvider | None) -> None:
        self._provider = provider
        self.enabled = provider is not None
        self.tracer: Tracer | None = provider.get_tracer("gateway") if provider is not None else None

    @classmethod
    def from_environment(cls, env: Mapping[str, str] | None = None) -> Tracing:
        env = os.environ if env is None else env
        if not (env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
            return cls(None)
        if env.get("OTEL_TRACES_EXPORTER", "otlp") == "none" or env.get("OTEL_SDK_DISABLED") == "true":
            return cls(None)
        # Imported only when tracing is on: the exporter pulls in protobuf.
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider = SdkTracerProvider(
            resource=Resource.create({"service.name": env.get("OTEL_SERVICE_NAME", "gateway")})
        )
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        return cls(provider)

    def server_span(self, endpoint: str, request_id: str) -> Any:
        """The request's span; `identify` names it once the model and tenant are known."""
        if self.tracer is None:
            return contextlib.nullcontext()
        operation = OPERATIONS.get(endpoint, endpoint)
        return self.tracer.start_as_current_span(
            operation,
            kind=SpanKind.SERVER,
            attributes={"gen_ai.operation.name": operation, "gateway.request.id": request_id},
        )

    @staticmethod
    def identify(span: Any, endpoint: str, model: str, tenant: str) -> None:
        span.update_name(f"{OPERATIONS.get(endpoint, endpoint)} {model}")
        span.set_attribute("gen_ai.request.model", model)
        span.set_attribute("gateway.tenant.id", tenant)

    def client_span(self, endpoint: str, upstream_model: str, backend: str, kind: str) -> Any:
        if self.tracer is None:
            return contextlib.nullcontext()
        operation = OPERATIONS.get(endpoint, endpoint)
        return self.tracer.start_as_current_span(
            f"{operation} {upstream_model}",
            kind=SpanKind.CLIENT,
            attributes={
                "gen_ai.operation.name": operation,
                "gen_ai.request.model": upstream_model,
                "gen_ai.system": kind,
                "gateway.backend": backend,
            },
        )

    @staticmethod
    def finish(span: Any, status: int, usage: Any | None, finish_reason: str | None = None) -> None:
        span.set_attribute("http.response.status_code", status)
        if usage is not None:
            span.set_attribute("gen_ai.usage.input_tokens", usage.prompt_tokens)
            span.set_attribute("gen_ai.usage.output_tokens", usage.completion_tokens)
        if finish_reason:
            span.set_attribute("gen_ai.response.finish_reasons", [finish_reason])
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR))

    def shutdown(self) -> None:
        shutdown = getattr(self._provider, "shutdown", None)
        if shutdown is not None:
            shutdown()
