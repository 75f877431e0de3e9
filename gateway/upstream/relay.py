"""Talking to backends: translating their answers and errors, and the stream relay.

The HTTP client itself is `gateway.wire.httpclient` (one keep-alive pool per backend), chosen by measurement
(docs/ARCHITECTURE.md). Every client failure is translated into the gateway's error tree here and in
`gateway.pipeline`, with messages that never name a backend address.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import Protocol

import orjson

from gateway.asgi import Send
from gateway.errors import BadRequestError, GatewayError, ServiceUnavailableError, UpstreamError
from gateway.upstream.backends import Backend
from gateway.upstream.formats import StreamOutcome, stream_format
from gateway.wire import httpclient

__all__ = [
    "DirectWriter",
    "Relay",
    "UpstreamPool",
    "UpstreamResponse",
    "backend_headers",
    "error_from_backend",
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


def error_from_backend(status: int, data: bytes) -> GatewayError:
    """A backend's error answer as a gateway error, in OpenAI's error shape like every other error.

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
    """Relays one backend stream to the client, event by event, metering as it goes.

    Events are forwarded as soon as they are complete (several that arrive in one read go out in one
    write; only an incomplete event at the end of a read waits for the rest). What an event means (usage,
    output, the end, a failure) is read by the parser of the stream's format (`gateway.upstream.formats`):
    the usage chunk that the gateway asked for on a chat stream is dropped unless the client asked too,
    and a stream that breaks before its format's end gets that format's error event. Under the gateway's
    own server, events go from the backend connection's callback straight to the client's transport
    (`run_direct`); under any other ASGI server, through `send` (`run`).
    """

    def __init__(
        self,
        send: Send,
        *,
        endpoint: str,
        client_wants_usage: bool,
        model_from: bytes | None,
        model_to: bytes | None,
    ) -> None:
        self._send = send
        self._buffer = b""
        self.outcome = StreamOutcome()
        self._format = stream_format(
            endpoint, self.outcome, client_wants_usage=client_wants_usage, model_from=model_from, model_to=model_to
        )
        self._event = self._format.event

    def error_event(self, error: GatewayError) -> bytes:
        """`error` as the last event of this stream, in its format."""
        return self._format.error_event(error)

    async def run(self, resp: UpstreamResponse, clock: float) -> None:
        """Relay through ASGI `send`, one await per batch of events."""
        outcome = self.outcome
        try:
            async for chunk in resp:
                out = self._events(chunk)
                if out:
                    if outcome.first_chunk_at is None and outcome.content_chunks:
                        outcome.first_chunk_at = time.perf_counter() - clock
                    await self._send({"type": "http.response.body", "body": out, "more_body": True})
        except httpclient.UpstreamError as exc:
            log.warning("backend stream failed mid-way: %s", type(exc).__name__)
            outcome.failed = True
        await self._end()

    async def run_direct(self, resp: UpstreamResponse, client: DirectWriter, clock: float) -> None:
        """Relay from the upstream connection's callback straight to the client's transport: no task switch
        per event. Back-pressure holds: a client that does not keep up pauses reading from the backend."""
        outcome = self.outcome

        def sink(chunk: bytes) -> bool:
            out = self._events(chunk)
            if not out:
                return True
            if outcome.first_chunk_at is None and outcome.content_chunks:
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
        """The complete events of what arrived so far, as the format forwards them; an incomplete event at
        the end waits for the rest."""
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
            await self._send({"type": "http.response.body", "body": self.error_event(error), "more_body": True})
        await self._send({"type": "http.response.body", "body": b"", "more_body": False})


def backend_headers(backend: Backend, request_id: str, api_key: str | None) -> dict[str, str]:
    headers = {"content-type": "application/json", "x-request-id": request_id}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    return headers
