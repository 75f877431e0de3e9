"""Anthropic's Messages API, as the simulator serves it (`POST /v1/messages`): the request's shape and its
validation, the message object, the streaming events and the error body.

The gateway reaches hosted providers through litellm; this endpoint lets that path be tested for real
and offline. It follows Anthropic's documented wire format (the fields litellm and Anthropic's SDKs
read); it runs on the same engine as the OpenAI endpoints, so timing, the prefix cache (no salt: a
hosted API isolates per account), concurrency and fault injection behave the same.

Differences that matter to a test: `max_tokens` is required (as upstream); the output is the
simulator's deterministic "tok0 tok1 ..." text; a request generates `min(max_tokens,
max_tokens_default)` tokens and reports `stop_reason` "max_tokens" when it stopped at the limit,
"end_turn" otherwise.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.sim.config import SimConfig
from gateway.sim.engine import Usage
from gateway.sim.errors import SimError
from gateway.sim.requests import Job

__all__ = [
    "API_VERSION_HEADER",
    "check_headers",
    "error_body",
    "event",
    "message",
    "message_start",
    "parse_messages",
]

API_VERSION_HEADER = b"anthropic-version"

# Anthropic's error types by status (https://docs.anthropic.com/en/api/errors).
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    529: "overloaded_error",
}
_ROLES = ("user", "assistant")


def error_body(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": _ERROR_TYPES.get(status, "api_error"), "message": message}}


def check_headers(headers: dict[bytes, bytes], api_key: str | None) -> None:
    """`x-api-key` (checked when the simulator was given one) and `anthropic-version` are required."""
    given = headers.get(b"x-api-key")
    if given is None and (auth := headers.get(b"authorization", b"")).startswith(b"Bearer "):
        given = auth[7:]
    if given is None:
        raise SimError(401, "x-api-key header is required")
    if api_key is not None and given.decode(errors="replace") != api_key:
        raise SimError(401, "invalid x-api-key")
    if API_VERSION_HEADER not in headers:
        raise SimError(400, "anthropic-version header is required")


def parse_messages(body: dict[str, Any], config: SimConfig) -> Job:
    """Validate a Messages request and turn it into a job for the engine."""
    max_tokens = body.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
        raise SimError(400, "max_tokens: Field required" if max_tokens is None else "max_tokens: must be an integer")
    if max_tokens < 1:
        raise SimError(400, "max_tokens: must be greater than or equal to 1")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise SimError(400, "model: Field required")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise SimError(400, "messages: at least one message is required")
    parts: list[str] = []
    system = body.get("system")
    if system is not None:
        parts.append(f"<|system|>\n{_text(system, 'system')}\n")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or msg.get("role") not in _ROLES:
            raise SimError(400, f"messages.{i}.role: Input should be 'user' or 'assistant'")
        parts.append(f"<|{msg['role']}|>\n{_text(msg.get('content'), f'messages.{i}.content')}\n")
    parts.append("<|assistant|>\n")
    temperature = body.get("temperature")
    if temperature is not None and (not isinstance(temperature, int | float) or not 0 <= temperature <= 1):
        raise SimError(400, "temperature: must be between 0 and 1")
    stops = body.get("stop_sequences")
    if stops is not None and not (isinstance(stops, list) and all(isinstance(s, str) and s for s in stops)):
        raise SimError(400, "stop_sequences: must be a list of non-empty strings")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise SimError(400, "stream: must be a boolean")
    tokens = "".join(parts).split()
    room = config.max_model_len - len(tokens)
    if room < max_tokens:
        raise SimError(
            400, f"prompt is too long: {len(tokens)} tokens + {max_tokens} max_tokens > {config.max_model_len}"
        )
    generated = min(max_tokens, config.max_tokens_default)
    return Job(
        kind="messages",
        model=model,
        tokens=tokens,
        salt=None,
        max_tokens=generated,
        finish_reason="max_tokens" if generated == max_tokens else "end_turn",
        stream=stream,
        include_usage=True,
    )


def message(rid: str, model: str, text: str, u: Usage, stop_reason: str) -> dict[str, Any]:
    return {
        "id": rid,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": _usage(u.prompt_tokens - u.cached_tokens, u.completion_tokens, u.cached_tokens),
    }


def message_start(rid: str, model: str, u: Usage) -> dict[str, Any]:
    """The first event: the message skeleton with the input usage (output_tokens counts the first token)."""
    return {
        "type": "message_start",
        "message": {
            "id": rid,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": _usage(u.prompt_tokens - u.cached_tokens, 1, u.cached_tokens),
        },
    }


def event(obj: dict[str, Any]) -> bytes:
    """One server-sent event as Anthropic frames it: the `event:` line names the `type` of the data."""
    return b"event: " + str(obj["type"]).encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


def _usage(input_tokens: int, output_tokens: int, cached: int) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
        "output_tokens": output_tokens,
    }


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for block in content:
            if not isinstance(block, dict) or not isinstance(block.get("type"), str):
                raise SimError(400, f"{where}: each content block must be an object with a type")
            if block["type"] == "text":
                if not isinstance(block.get("text"), str):
                    raise SimError(400, f"{where}: a text block needs a string 'text'")
                texts.append(block["text"])
            # Images, documents, tool results: no tokens in the simulator.
        return "\n".join(texts)
    raise SimError(400, f"{where}: must be a string or a list of content blocks")
