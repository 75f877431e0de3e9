"""OpenAI's response objects, as plain dicts ready for orjson: completions, chunks, embeddings,
responses, models. Field sets follow what vLLM's OpenAI server returns."""

from __future__ import annotations

import base64
import hashlib
import struct
from functools import lru_cache
from typing import Any

from gateway.sim.engine import Usage

__all__ = [
    "chat_chunk",
    "chat_completion",
    "completion",
    "completion_chunk",
    "embedding_vector",
    "embeddings",
    "finished_response",
    "message_id",
    "model_card",
    "output_text",
    "output_text_part",
    "response",
    "response_message",
    "response_usage",
    "token_text",
    "usage",
    "usage_chunk",
]


def token_text(i: int) -> str:
    return f"tok{i}" if i == 0 else f" tok{i}"


@lru_cache(maxsize=256)
def output_text(n: int) -> str:
    """The deterministic output of n tokens; it splits back into exactly n words."""
    return "".join(token_text(i) for i in range(n))


def usage(u: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    }


def chat_completion(
    rid: str, created: int, model: str, u: Usage, finish_reason: str, choices: int = 1
) -> dict[str, Any]:
    """`choices` choices of equal length share the completion tokens of `u`."""
    text = output_text(u.completion_tokens // choices)
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": text, "tool_calls": []},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
            for i in range(choices)
        ],
        "usage": usage(u),
        "system_fingerprint": None,
    }


def completion(rid: str, created: int, model: str, u: Usage, finish_reason: str, choices: int = 1) -> dict[str, Any]:
    """`choices` choices of equal length share the completion tokens of `u`."""
    text = output_text(u.completion_tokens // choices)
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {"index": i, "text": text, "logprobs": None, "finish_reason": finish_reason} for i in range(choices)
        ],
        "usage": usage(u),
        "system_fingerprint": None,
    }


def chat_chunk(
    rid: str,
    created: int,
    model: str,
    delta: dict[str, Any],
    finish_reason: str | None,
    with_usage: bool,
    index: int = 0,
) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }
    if with_usage:
        # OpenAI sends "usage": null on every chunk but the last when include_usage is set.
        chunk["usage"] = None
    return chunk


def completion_chunk(
    rid: str, created: int, model: str, text: str, finish_reason: str | None, with_usage: bool, index: int = 0
) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}],
    }
    if with_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(rid: str, created: int, model: str, obj: str, u: Usage) -> dict[str, Any]:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": usage(u)}


def embedding_vector(text: str, dim: int) -> list[float]:
    """A unit vector that depends only on the input text."""
    raw = hashlib.shake_256(text.encode()).digest(2 * dim)
    values = [v / 32767.5 - 1.0 for v in struct.unpack(f"<{dim}H", raw)]
    norm = sum(v * v for v in values) ** 0.5 or 1.0
    return [v / norm for v in values]


def embeddings(
    rid: str, created: int, model: str, vectors: list[list[float]], encoding: str, prompt_tokens: int
) -> dict[str, Any]:
    data: list[dict[str, Any]] = []
    for i, vector in enumerate(vectors):
        value: Any = vector
        if encoding == "base64":
            value = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": i, "embedding": value})
    return {
        "id": rid,
        "object": "list",
        "created": created,
        "model": model,
        "data": data,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


def response(
    rid: str,
    created: int,
    model: str,
    body: dict[str, Any],
    *,
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None,
) -> dict[str, Any]:
    """A Responses API object, its fields in vLLM's order (user `metadata` comes before `model`)."""
    return {
        "id": rid,
        "created_at": created,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": body.get("instructions"),
        "metadata": body.get("metadata"),
        "model": model,
        "object": "response",
        "output": output,
        "parallel_tool_calls": True,
        "temperature": body.get("temperature", 1.0),
        "tool_choice": "auto",
        "tools": [],
        "top_p": body.get("top_p", 1.0),
        "background": False,
        "max_output_tokens": body.get("max_output_tokens"),
        "max_tool_calls": None,
        "previous_response_id": None,
        "prompt": None,
        "reasoning": None,
        "service_tier": "auto",
        "status": status,
        "text": None,
        "top_logprobs": None,
        "truncation": "disabled",
        "usage": usage,
        "user": None,
    }


def finished_response(
    rid: str, created: int, model: str, u: Usage, body: dict[str, Any], finish: str
) -> dict[str, Any]:
    """The response at its end: one assistant message, the usage, and, as vLLM reports a generation that hit
    its length limit, status `incomplete` (with `incomplete_details`) rather than `completed`."""
    text = output_text(u.completion_tokens)
    output = [response_message(message_id(rid), text, "completed")]
    status = "incomplete" if finish == "length" else "completed"
    return response(rid, created, model, body, status=status, output=output, usage=response_usage(u))


def message_id(rid: str) -> str:
    return "msg_" + rid.removeprefix("resp_")


def response_message(item_id: str, text: str | None, status: str) -> dict[str, Any]:
    """An assistant message item; `text` None while it has no content part yet."""
    content = [] if text is None else [output_text_part(text)]
    return {"id": item_id, "content": content, "role": "assistant", "status": status, "type": "message"}


def output_text_part(text: str) -> dict[str, Any]:
    return {"annotations": [], "text": text, "type": "output_text", "logprobs": []}


def response_usage(u: Usage) -> dict[str, Any]:
    return {
        "input_tokens": u.prompt_tokens,
        "input_tokens_details": {"cached_tokens": u.cached_tokens},
        "output_tokens": u.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    }


def model_card(model: str, created: int, max_model_len: int) -> dict[str, Any]:
    return {
        "id": model,
        "object": "model",
        "created": created,
        "owned_by": "vllm",
        "root": model,
        "parent": None,
        "max_model_len": max_model_len,
    }
