"""The usage event (CloudEvents 1.0 JSON, docs/reference/billing-event.md) and the price of a request.

An event travels as a `Record`: its id and its compact JSON, serialised once on the hot path and shared by
every sink and the spool. The data never holds secrets (keys, salts): only ids, counts, cost and timings.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import orjson

from gateway.config import ModelConfig, Price

__all__ = ["Record", "cost_of", "encode", "price_cost", "usage_event"]

# (event id, the event as one line of compact JSON without a trailing newline)
Record = tuple[str, bytes]


def cost_of(model: ModelConfig | None, prompt_tokens: int, completion_tokens: int) -> tuple[float, str]:
    return price_cost(None if model is None else model.price, prompt_tokens, completion_tokens)


def price_cost(price: Price | None, prompt_tokens: int, completion_tokens: int) -> tuple[float, str]:
    if price is None:
        return 0.0, "USD"
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


def encode(event: dict[str, Any]) -> Record:
    # orjson never emits a raw newline inside compact JSON, so one event is always one line.
    return event["id"], orjson.dumps(event)
