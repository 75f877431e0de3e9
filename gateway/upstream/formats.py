"""What a backend's answer says about itself: its usage, and, for a stream, where it ends and how it fails.

The relay knows two stream formats, each read by one small parser:

    ChatEvents        chat/completions and completions: `data: {json}` events; the usage in a last chunk
                      with no choices (the gateway always asks for it with stream_options.include_usage);
                      `data: [DONE]` ends the stream; a backend tells a failure with `data: {"error": ...}`.
    ResponsesEvents   the Responses API: each event is an `event: <type>` line and a `data: {json}` line,
                      numbered by `sequence_number`; `response.completed`, `response.incomplete` or
                      `response.failed` ends the stream and carries the whole response, usage included
                      (input_tokens, output_tokens, input_tokens_details.cached_tokens); an `error` event
                      tells a failure. There is no [DONE].

The relay hands a parser one complete event at a time (without the blank line that ends it). The parser
meters it into the stream's `StreamOutcome` and answers the bytes to forward, or None to drop the event;
`error_event` is how that format tells the client the stream failed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from gateway.errors import GatewayError

__all__ = ["ChatEvents", "ResponsesEvents", "StreamFormat", "StreamOutcome", "Usage", "stream_format", "usage_from"]


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass(slots=True)
class StreamOutcome:
    usage: Usage = field(default_factory=Usage)
    usage_seen: bool = False
    # Output events relayed, one token each: what a stream cut before its usage event is charged. Chat:
    # every chunk but the role chunk and the usage chunk. Responses: every `*.delta` event (text,
    # reasoning, tool arguments).
    content_chunks: int = 0
    finish_reason: str | None = None
    # The stream reached its format's own end ([DONE]; a terminal or error event): nothing to add to it.
    done: bool = False
    # The answer is incomplete: the backend said it failed, or the stream broke before its end.
    failed: bool = False
    first_chunk_at: float | None = None


def usage_from(obj: object) -> Usage | None:
    """The `usage` of an answer, a chunk or a Responses `response`, in either API's names."""
    if not isinstance(obj, dict):
        return None
    usage = obj.get("usage")
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens", 0))
    completion = usage.get("completion_tokens", usage.get("output_tokens", 0))
    details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details") or {}
    cached = details.get("cached_tokens", 0) if isinstance(details, dict) else 0
    return Usage(
        prompt_tokens=prompt if isinstance(prompt, int) else 0,
        completion_tokens=completion if isinstance(completion, int) else 0,
        cached_tokens=cached if isinstance(cached, int) else 0,
    )


class StreamFormat(Protocol):
    def event(self, event: bytes) -> bytes | None:
        """One complete event, metered; the bytes to forward (blank line included), or None to drop it."""
        ...

    def error_event(self, error: GatewayError) -> bytes:
        """The event that ends the client's stream when it failed."""
        ...


def stream_format(
    endpoint: str,
    outcome: StreamOutcome,
    *,
    client_wants_usage: bool,
    model_from: bytes | None,
    model_to: bytes | None,
) -> StreamFormat:
    """The parser for a stream of `endpoint` ("chat", "completions" or "responses").

    `model_from` / `model_to` are the upstream and public model names as they appear in a chunk,
    `"model":<JSON string>`; None when the names are the same."""
    if endpoint == "responses":
        swap = None
        if model_from is not None and model_to is not None:
            swap = (_name(model_from), _name(model_to))
        return ResponsesEvents(outcome, model_swap=swap)
    return ChatEvents(outcome, client_wants_usage=client_wants_usage, model_from=model_from, model_to=model_to)


class ChatEvents:
    """chat/completions SSE. The hot path of every stream: byte checks only, JSON parsed for the usage chunk."""

    __slots__ = ("_model_from", "_model_to", "_outcome", "_wants_usage")

    def __init__(
        self, outcome: StreamOutcome, *, client_wants_usage: bool, model_from: bytes | None, model_to: bytes | None
    ) -> None:
        self._outcome = outcome
        self._wants_usage = client_wants_usage
        self._model_from = model_from
        self._model_to = model_to

    def event(self, event: bytes) -> bytes | None:
        event = event.strip(b"\r\n")
        if not event:
            return None
        outcome = self._outcome
        if event == b"data: [DONE]":
            outcome.done = True
            return b"data: [DONE]\n\n"
        # One scan for the usage key, then a look at its value: every chunk passes here.
        at = event.find(b'"usage":')
        if at >= 0 and b"{" in event[at + 8 : at + 10]:
            payload = event[6:] if event.startswith(b"data: ") else event
            try:
                obj = orjson.loads(payload)
            except orjson.JSONDecodeError:
                obj = None
            usage = usage_from(obj)
            if usage is not None:
                outcome.usage = usage
                outcome.usage_seen = True
                if isinstance(obj, dict) and obj.get("choices") == [] and not self._wants_usage:
                    return None
        elif at < 0 and event.startswith(b'data: {"error"'):
            # How vLLM tells a generation that failed mid-way; its [DONE] follows. (Looked for only in chunks
            # without a usage key: vLLM's content chunks carry `"usage":null` on a stream that asked for it.)
            outcome.failed = True
        else:
            # One token per chunk, as vLLM streams them; the role chunk that opens a chat stream (empty
            # content) is not one.
            if b'"content":""' not in event:
                outcome.content_chunks += 1
            if b'"finish_reason":"' in event:
                outcome.finish_reason = _finish_reason(event)
        if self._model_from is not None and self._model_to is not None:
            event = event.replace(self._model_from, self._model_to, 1)
        return event + b"\n\n"

    def error_event(self, error: GatewayError) -> bytes:
        return b"data: " + error.body() + b"\n\n"


# The events that carry the whole response object (and so its model); the last three end the stream.
_WHOLE_RESPONSE = frozenset(
    {
        b"response.created",
        b"response.queued",
        b"response.in_progress",
        b"response.completed",
        b"response.incomplete",
        b"response.failed",
    }
)
_ENDS = frozenset({b"response.completed", b"response.incomplete", b"response.failed"})


class ResponsesEvents:
    """Responses API events. A delta costs a look at its event line; only the few events that carry the
    whole response are parsed (for the usage, the finish, and the model name)."""

    __slots__ = ("_last", "_outcome", "_swap")

    def __init__(self, outcome: StreamOutcome, *, model_swap: tuple[str, str] | None) -> None:
        self._outcome = outcome
        self._swap = model_swap
        self._last = b""

    def event(self, event: bytes) -> bytes | None:
        event = event.strip(b"\r\n")
        if not event:
            return None
        kind = _event_type(event)
        if kind:
            self._last = event
        if kind.endswith(b".delta"):
            self._outcome.content_chunks += 1
        elif kind in _WHOLE_RESPONSE:
            return self._whole_response(kind, event)
        elif kind == b"error":
            self._outcome.done = self._outcome.failed = True
        return event + b"\n\n"

    def error_event(self, error: GatewayError) -> bytes:
        # As OpenAI sends it: the error's fields at the top level, numbered after the last event relayed.
        data = {
            "type": "error",
            "code": error.code,
            "message": error.message,
            "param": error.param,
            "sequence_number": _sequence_number(self._last) + 1,
        }
        return b"event: error\ndata: " + orjson.dumps(data) + b"\n\n"

    def _whole_response(self, kind: bytes, event: bytes) -> bytes:
        outcome = self._outcome
        obj = _json(_data(event))
        response = obj.get("response") if isinstance(obj, dict) else None
        if kind in _ENDS:
            outcome.done = True
            if kind == b"response.failed":
                outcome.failed = True
            usage = usage_from(response)
            if usage is not None:
                outcome.usage = usage
                outcome.usage_seen = True
            outcome.finish_reason = _response_finish(response)
        if self._swap is not None and isinstance(response, dict) and response.get("model") == self._swap[0]:
            # Parsed, not matched as bytes: user metadata comes before the model in a response object.
            response["model"] = self._swap[1]
            return event[: event.find(b"data:")] + b"data: " + orjson.dumps(obj) + b"\n\n"
        return event + b"\n\n"


def _event_type(event: bytes) -> bytes:
    if event.startswith(b"event:"):
        end = event.find(b"\n")
        return (event[6:] if end < 0 else event[6:end]).strip()
    start = event.find(b"\nevent:")
    if start >= 0:
        end = event.find(b"\n", start + 1)
        return (event[start + 7 :] if end < 0 else event[start + 7 : end]).strip()
    # No event line: the type is the data's own `type` field.
    obj = _json(_data(event))
    kind = obj.get("type") if isinstance(obj, dict) else None
    return kind.encode() if isinstance(kind, str) else b""


def _data(event: bytes) -> bytes:
    """The event's data, as the SSE spec reads it: its data lines, one leading space dropped, joined."""
    lines = [line[5:].removeprefix(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(line.rstrip(b"\r") for line in lines)


def _json(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


def _sequence_number(event: bytes) -> int:
    obj = _json(_data(event)) if event else None
    number = obj.get("sequence_number") if isinstance(obj, dict) else None
    return number if isinstance(number, int) else -1


def _response_finish(response: object) -> str | None:
    """Why the response ended: the reason it is incomplete if it is (`max_output_tokens`, ...), else its
    status (`completed`, `failed`, ...)."""
    if not isinstance(response, dict):
        return None
    details = response.get("incomplete_details")
    reason = details.get("reason") if isinstance(details, dict) else None
    if not isinstance(reason, str):
        reason = response.get("status")
    return reason[:40] if isinstance(reason, str) else None


def _finish_reason(event: bytes) -> str | None:
    start = event.find(b'"finish_reason":"') + len(b'"finish_reason":"')
    end = event.find(b'"', start)
    return event[start:end].decode(errors="replace")[:40] if end > start else None


def _name(pattern: bytes) -> str:
    name = orjson.loads(pattern.partition(b":")[2])
    return name if isinstance(name, str) else ""
