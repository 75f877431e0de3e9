"""Billing events: one CloudEvents 1.0 record per request that reached a backend (SPEC section 8).

The event id is the request id, so a consumer can dedupe redeliveries. This module builds the event and
hands it to the configured sinks; the JSONL sink appends one line per event and flushes it, so a crash
loses at most the line being written.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import IO, Any, Protocol

import orjson

from gateway.config import ModelConfig, Settings, SinkConfig

__all__ = ["Billing", "JsonlSink", "Sink", "usage_event"]

log = logging.getLogger("gateway.billing")


class Sink(Protocol):
    def emit(self, event: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    def __init__(self, path: str) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[bytes] = open(path, "ab")  # noqa: SIM115 - owned for the app's lifetime

    def emit(self, event: dict[str, Any]) -> None:
        self._file.write(orjson.dumps(event) + b"\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def cost_of(model: ModelConfig | None, prompt_tokens: int, completion_tokens: int) -> tuple[float, str]:
    if model is None or model.price is None:
        return 0.0, "USD"
    price = model.price
    cost = prompt_tokens / 1000 * price.input_per_1k + completion_tokens / 1000 * price.output_per_1k
    return round(cost, 10), price.currency


def usage_event(source: str, request_id: str, tenant_id: str, data: dict[str, Any]) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": request_id,
        "source": source,
        "type": "gateway.usage.v1",
        "subject": tenant_id,
        "time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "datacontenttype": "application/json",
        "data": data,
    }


class Billing:
    def __init__(self, settings: Settings) -> None:
        self._source = settings.billing.source
        self._models = {m.name: m for m in settings.models}
        self._sinks: list[Sink] = [self._open(s) for s in settings.billing.sinks]

    @staticmethod
    def _open(config: SinkConfig) -> Sink:
        if config.kind == "jsonl":
            return JsonlSink(config.path or ".gateway/billing.jsonl")
        # redis_stream and webhook sinks arrive with the telemetry work; refuse to pretend.
        raise NotImplementedError(f"billing sink kind {config.kind!r} is not available yet")

    def cost(self, model: str, prompt_tokens: int, completion_tokens: int) -> tuple[float, str]:
        return cost_of(self._models.get(model), prompt_tokens, completion_tokens)

    def emit(self, request_id: str, tenant_id: str, data: dict[str, Any]) -> None:
        if not self._sinks:
            return
        event = usage_event(self._source, request_id, tenant_id, data)
        for sink in self._sinks:
            try:
                sink.emit(event)
            except OSError:
                log.exception("billing sink failed for request %s", request_id)

    def close(self) -> None:
        for sink in self._sinks:
            sink.close()
