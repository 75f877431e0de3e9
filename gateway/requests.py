"""Parsing and checking a client's request body, and rewriting it for the backend.

Only the fields the gateway reads or owns are checked (`model`, `stream`, `stream_options`, the output
limits and what multiplies them, `cache_salt`, `user` and each endpoint's input); every other field passes
through untouched, so clients can send vLLM extras through `extra_body`.

The output limit is read the way vLLM reads it, not as the smallest of the fields: on chat,
`max_completion_tokens` wins over `max_tokens` whatever their values; completions read `max_tokens` (16
when the field is left out, as OpenAI and vLLM do; `null` is no limit); responses read
`max_output_tokens`. What the engine will then generate is `gateway.admission.demand`'s business.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from gateway.errors import BadRequestError

__all__ = [
    "COMPLETIONS_DEFAULT_MAX_TOKENS",
    "INPUT_FIELD",
    "MAX_DEPTH",
    "MAX_N",
    "OUTPUT_CAP_FACTOR",
    "Endpoint",
    "ParsedRequest",
    "check_output_total",
    "parse_request",
]

Endpoint = str  # "chat" | "completions" | "embeddings" | "responses"

INPUT_FIELD = {"chat": "messages", "completions": "prompt", "embeddings": "input", "responses": "input"}
_TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
# The output limit fields each endpoint reads, the first one set winning (vLLM's get_max_tokens).
_LIMIT_FIELDS: dict[Endpoint, tuple[str, ...]] = {
    "chat": ("max_completion_tokens", "max_tokens"),
    "completions": ("max_tokens",),
    "responses": ("max_output_tokens",),
    "embeddings": (),
}
_STREAMING = {"chat", "completions", "responses"}
_SAMPLING = {"chat", "completions"}
# orjson reads up to 1024 levels of nesting but writes at most 254, and the body is re-serialised for the
# backend: a request between the two parsed fine, then failed with a 500 after it had been admitted.
MAX_DEPTH = 200
#: `max_tokens` of a completions request that leaves the field out (OpenAI's and vLLM's default).
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
#: The largest `n` and `best_of`.
MAX_N = 128
#: A request may ask for at most `max_tokens_cap` times this many output tokens, every sequence of every
#: prompt together; more gets 400.
OUTPUT_CAP_FACTOR = 128


@dataclass(slots=True)
class ParsedRequest:
    endpoint: Endpoint
    body: dict[str, Any]
    model: str
    stream: bool
    client_wants_usage: bool
    max_tokens: int | None
    """The output limit per sequence the request sets, read as vLLM reads it (see the module docstring);
    None when it sets none, and 0 only on completions with `echo` (the prompt back, one token generated)."""
    max_tokens_param: str | None
    """The field `max_tokens` came from; None when the request sets no limit or left completions' out."""
    n: int
    best_of: int | None
    beam_search: bool
    echo: bool
    prompts: int
    """Prompts the engine reads: a completions batch's, an embeddings request's inputs; 1 otherwise."""
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

    prompts = _check_input(endpoint, body)
    n = _count(body, "n")
    sampling = endpoint in _SAMPLING
    echo = sampling and _flag(body, "echo")
    beam_search = sampling and _flag(body, "use_beam_search")
    best_of = _count(body, "best_of") if sampling and body.get("best_of") is not None else None

    for field in _TOKEN_FIELDS:
        value = body.get(field)
        if value is None:
            continue
        # vLLM answers max_tokens 0 on completions with echo with the prompt alone.
        least = 0 if endpoint == "completions" and field == "max_tokens" and echo else 1
        if not _is_int(value) or value < least:
            kind = "a non-negative" if least == 0 else "a positive"
            raise BadRequestError(f"'{field}' must be {kind} integer", param=field)
        if value > max_tokens_cap:
            raise BadRequestError(f"'{field}' is {value}, above this gateway's limit of {max_tokens_cap}", param=field)
    max_tokens, limit_param = _output_limit(endpoint, body)
    if max_tokens and sampling:
        sequences = max(n, best_of or 1)
        check_output_total(
            max_tokens,
            limit_param or "max_tokens",
            sequences,
            "n" if sequences == n else "best_of",
            prompts,
            INPUT_FIELD[endpoint],
            max_tokens_cap,
        )

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
        max_tokens_param=limit_param,
        n=n,
        best_of=best_of,
        beam_search=beam_search,
        echo=echo,
        prompts=prompts,
        client_salt=salt or None,
    )


def _flag(body: dict[str, Any], field: str) -> bool:
    value = body.get(field)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadRequestError(f"'{field}' must be a boolean", param=field)
    return value


def _count(body: dict[str, Any], field: str) -> int:
    """`n` or `best_of`: 1 when absent or null."""
    value = body.get(field)
    if value is None:
        return 1
    if not _is_int(value) or not 1 <= value <= MAX_N:
        raise BadRequestError(f"'{field}' must be an integer between 1 and {MAX_N}", param=field)
    result: int = value
    return result


def _output_limit(endpoint: Endpoint, body: dict[str, Any]) -> tuple[int | None, str | None]:
    """The limit per sequence and the field it came from, the first one set winning; never the smallest."""
    for field in _LIMIT_FIELDS[endpoint]:
        value = body.get(field)
        if value is not None:
            return value, field
    if endpoint == "completions" and "max_tokens" not in body:
        return COMPLETIONS_DEFAULT_MAX_TOKENS, None
    return None, None


def check_output_total(
    max_tokens: int, limit: str, sequences: int, sequences_param: str, prompts: int, input_field: str, cap: int
) -> None:
    """Refuse a request whose every sequence of every prompt, each at `max_tokens`, adds up to more than
    `cap` x OUTPUT_CAP_FACTOR output tokens; the 400 names the field that multiplies."""
    total = prompts * sequences * max_tokens
    bound = cap * OUTPUT_CAP_FACTOR
    if total <= bound:
        return
    parts = [f"{max_tokens} ({limit})"]
    if sequences > 1:
        parts.append(f"{sequences} sequences ({sequences_param})")
    if prompts > 1:
        parts.append(f"{prompts} prompts ({input_field})")
    raise BadRequestError(
        f"The request asks for up to {total} output tokens ({' x '.join(parts)}), above this gateway's limit of "
        f"{bound} per request.",
        param=sequences_param if sequences > 1 else input_field,
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


def _check_input(endpoint: Endpoint, body: dict[str, Any]) -> int:
    """Check the endpoint's input; return how many prompts it holds."""
    field = INPUT_FIELD[endpoint]
    value = body.get(field)
    if endpoint == "chat":
        if not isinstance(value, list) or not value:
            raise BadRequestError("'messages' must be a non-empty array of message objects", param="messages")
        for i, message in enumerate(value):
            if not isinstance(message, dict):
                raise BadRequestError(f"'messages[{i}]' must be an object", param=f"messages[{i}]")
            if not isinstance(message.get("role"), str):
                raise BadRequestError(f"'messages[{i}].role' must be a string", param=f"messages[{i}].role")
        return 1
    if value is None:
        raise BadRequestError(f"'{field}' is required", param=field)
    if not isinstance(value, str | list):
        raise BadRequestError(f"'{field}' must be a string or an array", param=field)
    if isinstance(value, list) and not value:
        raise BadRequestError(f"'{field}' must not be empty", param=field)
    if endpoint == "responses" or isinstance(value, str):
        return 1
    return _batch_size(field, value)


def _batch_size(field: str, value: list[Any]) -> int:
    """A prompt or an embeddings input given as a list: token ids (one prompt), or a batch of strings or of
    token-id lists, each its own prompt. Any other shape is refused before the request is reserved as a
    batch it is not; the token ids themselves are the engine's to check (walking them costs about 40 ns
    each, and a wrong one is refused by the engine, whose answer releases the reservation)."""
    first = value[0]
    if type(first) is int:  # not a boolean
        return 1
    if all(type(p) is str for p in value) or all(type(p) is list and p for p in value):
        return len(value)
    raise BadRequestError(
        f"'{field}' must be a string, an array of token ids, or an array of strings or of token-id arrays",
        param=field,
    )
