"""Talking to backends: translating their answers and errors, and the SSE relay.

The HTTP client itself is `gateway.wire.httpclient` (one keep-alive pool per backend), chosen by measurement
(docs/ARCHITECTURE.md). Every client failure is translated into the gateway's error tree here and in
`gateway.pipeline`, with messages that never name a backend address.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol

import orjson

from gateway.asgi import Send
from gateway.errors import BadRequestError, GatewayError, ServiceUnavailableError, UpstreamError
from gateway.upstream.backends import Backend
from gateway.wire import httpclient

__all__ = [
    "DirectWriter",
    "Relay",
    "StreamOutcome",
    "UpstreamPool",
    "UpstreamResponse",
    "Usage",
    "error_from_backend",
    "usage_from",
]

log = logging.getLogger("gateway.upstream")

UPSTREAM_FAILED = "The backend failed to answer the request."


class UpstreamResponse(Protocol):
    """What the request path reads from a backend: `httpclient.Response`, or a provider adapter's answer."""

    status: int

    async def read(self) -> bytes: ...

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def __aenter__(self) -> UpstreamResponse: ...

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...

    # Push mode (`Relay.run_direct`): body bytes to `sink` as they arrive; False from it pauses reading.
    def stream_to(self, sink: Callable[[bytes], bool]) -> None: ...

    def resume_reading(self) -> None: ...

    async def wait_end(self) -> None: ...


class UpstreamPool(Protocol):
    """How the request path calls a backend: `httpclient.Pool`, or `gateway.upstream.providers.LitellmPool`.

    Failures to answer raise `httpclient.UpstreamError`; an answer, whatever its status, is a response.
    """

    async def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: httpclient.Headers | None = None,
        *,
        read_timeout_s: float | None = None,
    ) -> UpstreamResponse: ...

    async def close(self) -> None: ...


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass(slots=True)
class StreamOutcome:
    usage: Usage = field(default_factory=Usage)
    usage_seen: bool = False
    content_chunks: int = 0
    finish_reason: str | None = None
    done: bool = False
    failed: bool = False
    first_chunk_at: float | None = None


def usage_from(obj: object) -> Usage | None:
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


def error_from_backend(status: int, data: bytes) -> GatewayError:
    """A backend's error answer as a gateway error (SPEC section 3).

    4xx about the request keep the backend's message. A 5xx becomes a generic 502. A 401 or 403 is about the
    gateway's own credentials for that backend (a provider key), not the client's: a 502 that says nothing
    more (the operator's log does). A 429 is the backend's (or a provider account's) limit, shared by every
    tenant: a 503 `backend_overloaded`, never the 429 that speaks of the caller's own limits.
    """
    if status >= 500 or status < 400:
        return UpstreamError(f"{UPSTREAM_FAILED} (backend status {status})")
    if status in (401, 403):
        log.error("a backend refused the gateway's credentials (status %d): check its api_key_env", status)
        return UpstreamError(f"{UPSTREAM_FAILED} (backend status {status})")
    if status == 429:
        return ServiceUnavailableError(
            "The backend for this model is overloaded right now. Please try again shortly.", code="backend_overloaded"
        )
    message = "The backend rejected the request."
    param: str | None = None
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        obj = None
    if isinstance(obj, dict):
        err = obj.get("error", obj)
        if isinstance(err, dict):
            if isinstance(err.get("message"), str):
                message = err["message"][:2000]
            if isinstance(err.get("param"), str):
                param = err["param"]
    error = BadRequestError(message, param=param)
    if status != 400:
        error.status = status if status in (404, 413, 422) else 400
    return error


class DirectWriter(Protocol):
    """What the gateway's HTTP server offers a stream besides ASGI (`gateway.wire.httpserver._Exchange`)."""

    def write_body(self, data: bytes) -> bool: ...

    def when_writable(self, callback: Callable[[], None]) -> None: ...

    def on_gone(self, callback: Callable[[], None] | None) -> None: ...


class Relay:
    """Relays one backend SSE stream to the client, event by event, metering as it goes.

    Events are forwarded as soon as they are complete (several that arrive in one read go out in one
    write). The usage chunk that the gateway asked for is parsed, and dropped unless the client asked too.
    Under the gateway's own server, events go from the backend connection's callback straight to the
    client's transport (`run_direct`); under any other ASGI server, through `send` (`run`).
    """

    def __init__(
        self, send: Send, *, client_wants_usage: bool, model_from: bytes | None, model_to: bytes | None
    ) -> None:
        self._send = send
        self._wants_usage = client_wants_usage
        self._model_from = model_from
        self._model_to = model_to
        self._buffer = b""
        self.outcome = StreamOutcome()

    async def run(self, resp: UpstreamResponse, clock: float) -> None:
        """Relay through ASGI `send`, one await per batch of events."""
        try:
            async for chunk in resp:
                out = self._events(chunk)
                if out:
                    if self.outcome.first_chunk_at is None:
                        self.outcome.first_chunk_at = time.perf_counter() - clock
                    await self._send({"type": "http.response.body", "body": out, "more_body": True})
        except httpclient.UpstreamError as exc:
            log.warning("backend stream failed mid-way: %s", type(exc).__name__)
            self.outcome.failed = True
        await self._end()

    async def run_direct(self, resp: UpstreamResponse, client: DirectWriter, clock: float) -> None:
        """Relay from the upstream connection's callback straight to the client's transport: no task switch
        per event. Back-pressure holds: a client that does not keep up pauses reading from the backend."""
        outcome = self.outcome

        def sink(chunk: bytes) -> bool:
            out = self._events(chunk)
            if not out:
                return True
            if outcome.first_chunk_at is None:
                outcome.first_chunk_at = time.perf_counter() - clock
            if client.write_body(out):
                return True
            client.when_writable(resp.resume_reading)
            return False

        resp.stream_to(sink)
        try:
            await resp.wait_end()
        except httpclient.UpstreamError as exc:
            log.warning("backend stream failed mid-way: %s", type(exc).__name__)
            outcome.failed = True
        await self._end()

    def _events(self, chunk: bytes) -> bytes:
        """The complete events of what arrived so far, rewritten for the client (usage chunk dropped unless
        asked for); an incomplete event at the end waits for the rest."""
        buffer = self._buffer + chunk
        if b"\n\n" not in buffer:
            self._buffer = buffer
            return b""
        *events, self._buffer = buffer.split(b"\n\n")
        out = []
        for event in events:
            forwarded = self._event(event)
            if forwarded is not None:
                out.append(forwarded)
        return out[0] if len(out) == 1 else b"".join(out)

    async def _end(self) -> None:
        if not self.outcome.done:
            self.outcome.failed = True
            error = UpstreamError("The backend stream ended unexpectedly; the answer is incomplete.")
            await self._send(
                {"type": "http.response.body", "body": b"data: " + error.body() + b"\n\n", "more_body": True}
            )
        await self._send({"type": "http.response.body", "body": b"", "more_body": False})

    def _event(self, event: bytes) -> bytes | None:
        event = event.strip(b"\r\n")
        if not event:
            return None
        if event == b"data: [DONE]":
            self.outcome.done = True
            return b"data: [DONE]\n\n"
        if b'"usage":{' in event or b'"usage": {' in event:
            payload = event[6:] if event.startswith(b"data: ") else event
            try:
                obj = orjson.loads(payload)
            except orjson.JSONDecodeError:
                obj = None
            usage = usage_from(obj)
            if usage is not None:
                self.outcome.usage = usage
                self.outcome.usage_seen = True
                if isinstance(obj, dict) and obj.get("choices") == [] and not self._wants_usage:
                    return None
        else:
            # One token per chunk, as vLLM streams them; the role chunk that opens a chat stream (empty
            # content) is not one.
            if b'"content":""' not in event:
                self.outcome.content_chunks += 1
            if b'"finish_reason":"' in event:
                self.outcome.finish_reason = _finish_reason(event)
        if self._model_from is not None and self._model_to is not None:
            event = event.replace(self._model_from, self._model_to, 1)
        return event + b"\n\n"


def _finish_reason(event: bytes) -> str | None:
    start = event.find(b'"finish_reason":"') + len(b'"finish_reason":"')
    end = event.find(b'"', start)
    return event[start:end].decode(errors="replace")[:40] if end > start else None


def backend_headers(backend: Backend, request_id: str, api_key: str | None) -> dict[str, str]:
    headers = {"content-type": "application/json", "x-request-id": request_id}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    return headers
