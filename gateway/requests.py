"""Parsing and checking a client's request body, and rewriting it for the backend.

Only the fields the gateway reads or owns are checked (`model`, `stream`, `stream_options`, token limits,
`cache_salt`, `user` and each endpoint's input); every other field passes through untouched, so clients
can send vLLM extras through `extra_body`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from gateway.errors import BadRequestError

__all__ = ["MAX_DEPTH", "Endpoint", "ParsedRequest", "parse_request"]

Endpoint = str  # "chat" | "completions" | "embeddings" | "responses"

_INPUT_FIELD = {"chat": "messages", "completions": "prompt", "embeddings": "input", "responses": "input"}
_TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
_STREAMING = {"chat", "completions", "responses"}
# orjson reads up to 1024 levels of nesting but writes at most 254, and the body is re-serialised for the
# backend: a request between the two parsed fine, then failed with a 500 after it had been admitted.
MAX_DEPTH = 200


@dataclass(slots=True)
class ParsedRequest:
    endpoint: Endpoint
    body: dict[str, Any]
    model: str
    stream: bool
    client_wants_usage: bool
    max_tokens: int | None
    client_salt: str | None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_request(endpoint: Endpoint, raw: bytes, max_tokens_cap: int) -> ParsedRequest:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequestError(
            "We could not parse the JSON body of your request. The body must be valid UTF-8 JSON "
            "(no NaN or Infinity, nesting under 1024 levels)."
        ) from None
    if not isinstance(body, dict):
        raise BadRequestError("The request body must be a JSON object.")
    # Counting brackets is a C loop over the bytes; only a body with many of them is walked.
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and _deeper_than(body, MAX_DEPTH):
        raise BadRequestError(
            f"The request body is nested too deeply: more than {MAX_DEPTH} levels of arrays and objects."
        )

    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequestError(
            "you must provide a model parameter" if model is None else "'model' must be a non-empty string",
            param="model",
        )

    stream = body.get("stream")
    if stream is None:
        stream = False
    elif not isinstance(stream, bool):
        raise BadRequestError("'stream' must be a boolean", param="stream")
    if stream and endpoint not in _STREAMING:
        raise BadRequestError(f"streaming is not supported for {endpoint}", param="stream")

    options = body.get("stream_options")
    wants_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise BadRequestError("'stream_options' must be an object", param="stream_options")
        include = options.get("include_usage")
        if include is not None and not isinstance(include, bool):
            raise BadRequestError(
                "'stream_options.include_usage' must be a boolean", param="stream_options.include_usage"
            )
        wants_usage = bool(include)

    max_tokens: int | None = None
    for field in _TOKEN_FIELDS:
        value = body.get(field)
        if value is None:
            continue
        if not _is_int(value) or value < 1:
            raise BadRequestError(f"'{field}' must be a positive integer", param=field)
        if value > max_tokens_cap:
            raise BadRequestError(f"'{field}' is {value}, above this gateway's limit of {max_tokens_cap}", param=field)
        max_tokens = value if max_tokens is None else min(max_tokens, value)

    n = body.get("n")
    if n is not None and (not _is_int(n) or not 1 <= n <= 128):
        raise BadRequestError("'n' must be an integer between 1 and 128", param="n")

    _check_input(endpoint, body)

    salt = body.get("cache_salt")
    if salt is not None and not isinstance(salt, str):
        raise BadRequestError("'cache_salt' must be a string", param="cache_salt")

    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise BadRequestError("'user' must be a string", param="user")

    return ParsedRequest(
        endpoint=endpoint,
        body=body,
        model=model,
        stream=stream,
        client_wants_usage=wants_usage,
        max_tokens=max_tokens,
        client_salt=salt or None,
    )


def _deeper_than(body: dict[str, Any], limit: int) -> bool:
    stack: list[tuple[Any, int]] = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return True
        children = value.values() if isinstance(value, dict) else value
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def _check_input(endpoint: Endpoint, body: dict[str, Any]) -> None:
    field = _INPUT_FIELD[endpoint]
    value = body.get(field)
    if endpoint == "chat":
        if not isinstance(value, list) or not value:
            raise BadRequestError("'messages' must be a non-empty array of message objects", param="messages")
        for i, message in enumerate(value):
            if not isinstance(message, dict):
                raise BadRequestError(f"'messages[{i}]' must be an object", param=f"messages[{i}]")
            if not isinstance(message.get("role"), str):
                raise BadRequestError(f"'messages[{i}].role' must be a string", param=f"messages[{i}].role")
        return
    if value is None:
        raise BadRequestError(f"'{field}' is required", param=field)
    if not isinstance(value, str | list):
        raise BadRequestError(f"'{field}' must be a string or an array", param=field)
    if isinstance(value, list) and not value:
        raise BadRequestError(f"'{field}' must not be empty", param=field)
