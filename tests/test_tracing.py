"""Traces: a server span per request and a client span per upstream call, GenAI attributes, the tenant,
and never the prompt or the completion. The gateway runs in-process here (uvicorn on loopback, in a thread)
so the spans land in the SDK's in-memory exporter."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import uvicorn
import yaml
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from gateway.app import create_app
from gateway.config import load_settings
from gateway.telemetry.tracing import Tracing
from tests.support.admin import tenant_with_key
from tests.support.procs import free_port
from tests.support.sim import SimHandle, start_sim

ADMIN = "sk-admin-tracing-0123456789"
SECRET_PROMPT = "the launch code is swordfish"


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, InMemorySpanExporter, SimHandle]]:
    workdir = tmp_path_factory.mktemp("traced")
    sim = start_sim("--ttft-ms", "1", "--itl-ms", "1", log_dir=workdir)
    port = free_port()
    config = {
        "listen": {"host": "127.0.0.1", "port": port},
        "state_path": str(workdir / "state.db"),
        "backends": [{"name": "sim", "kind": "vllm", "url": sim.url}],
        "models": [{"name": "m", "backends": ["sim"], "upstream_model": "sim-model"}],
    }
    (workdir / "gw.yaml").write_text(yaml.safe_dump(config))
    settings = load_settings(workdir / "gw.yaml", env={"GATEWAY_ADMIN_KEY": ADMIN, "GATEWAY_SALT_SECRET": "s" * 32})
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = create_app(settings, Tracing(provider))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="on", log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert time.monotonic() < deadline, "in-process gateway did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", exporter, sim
    server.should_exit = True
    thread.join(15)
    sim.stop()


def test_spans_for_unary_and_stream(traced: tuple[str, InMemorySpanExporter, SimHandle], tmp_path: Path) -> None:
    url, exporter, _ = traced
    key = tenant_with_key(url, ADMIN, "traced-tenant")
    client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
    exporter.clear()
    client.chat.completions.create(model="m", messages=[{"role": "user", "content": SECRET_PROMPT}], max_tokens=3)
    list(
        client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": SECRET_PROMPT}], max_tokens=4, stream=True
        )
    )
    # The stream's server span ends just after its last chunk went out, which the client may read first.
    deadline = time.monotonic() + 5
    while True:
        spans = exporter.get_finished_spans()
        servers = [s for s in spans if s.kind == SpanKind.SERVER]
        clients = [s for s in spans if s.kind == SpanKind.CLIENT]
        if (len(servers), len(clients)) == (2, 2) or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert len(servers) == 2 and len(clients) == 2
    for server_span, tokens in zip(servers, (3, 4), strict=True):
        attrs = dict(server_span.attributes or {})
        assert server_span.name == "chat m"
        assert attrs["gen_ai.operation.name"] == "chat"
        assert attrs["gen_ai.request.model"] == "m"
        assert attrs["gateway.tenant.id"] == "traced-tenant"
        assert attrs["gen_ai.usage.output_tokens"] == tokens
        assert int(attrs["gen_ai.usage.input_tokens"]) > 0  # type: ignore[call-overload]
        assert attrs["http.response.status_code"] == 200
    for client_span, server_span in zip(clients, servers, strict=True):
        assert client_span.name == "chat sim-model"
        assert client_span.parent is not None and client_span.parent.span_id == server_span.context.span_id
        assert dict(client_span.attributes or {})["gateway.backend"] == "sim"
    # Never the prompt or the completion, and never the key.
    for span in spans:
        text = repr(dict(span.attributes or {})) + span.name
        assert "swordfish" not in text and "tok0" not in text and key not in text


def test_error_span(traced: tuple[str, InMemorySpanExporter, SimHandle]) -> None:
    url, exporter, sim = traced
    key = tenant_with_key(url, ADMIN, "traced-errors")
    client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
    exporter.clear()
    sim.set_faults("error_500", count=1)
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    sim.reset()
    (server_span,) = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert dict(server_span.attributes or {})["http.response.status_code"] == 502
    assert server_span.status.status_code == StatusCode.ERROR


def test_off_unless_configured() -> None:
    assert Tracing.from_environment({}).enabled is False
    assert (
        Tracing.from_environment(
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1", "OTEL_SDK_DISABLED": "true"}
        ).enabled
        is False
    )
    on = Tracing.from_environment({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1"})
    assert on.enabled is True
    on.shutdown()
