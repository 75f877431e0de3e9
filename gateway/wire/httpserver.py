"""The gateway's HTTP/1.1 server protocol: uvicorn runs the processes, sockets, signals and lifespan; this
class speaks HTTP on each connection and calls the ASGI app.

Why not uvicorn's own protocol
------------------------------
Measured under load (docs/ARCHITECTURE.md), uvicorn's httptools protocol cost a sixth of the gateway's
CPU per request: the head and the body of every answer in two writes (two syscalls), an `asyncio.Event`
per request for the body, a `bytearray` copy of every body. And it has no deadline for a client that sends
its head or body slowly (a slowloris holds a connection and its buffers for as long as it likes), which
the gateway must not allow. This protocol keeps uvicorn's contract with its server (`ServerState`'s
connections and tasks, `shutdown()` for a graceful stop, the date header it refreshes every second) and
does the HTTP part in the fewest steps:

- requests are parsed by llhttp (`httptools`), in C; the ASGI scope is built once, at the end of the head;
- an answer with a `content-length` goes out in one write, head and body together; a streamed answer
  (no length) uses chunked encoding, its head written at once so clients see the status without waiting
  for the first event, and one write per event;
- flow control both ways: a body that arrives faster than the app reads it pauses the socket (64 KiB),
  and a client that reads its answer slower than the app writes it makes the app's `send` wait (the
  transport's high-water mark), which holds back-pressure up to the backend;
- deadlines, one at a time per connection (`deadline.Deadline`: moving it arms no timer): the whole
  request head within `header_timeout_s` of its first byte, the whole body within `body_timeout_s` of the
  head (408 otherwise), and an idle keep-alive connection closed after `keep_alive_s`;
- bounds: a head larger than `max_header_bytes` or with more than `max_headers` fields gets 431, a request
  the parser rejects gets 400, both with `connection: close`;
- a direct path for streams, outside ASGI: `scope["gateway.exchange"].write_body(data)` writes an event at
  once from the caller's own callback (the gateway's relay calls it from its upstream connection's
  `data_received`), saving a future and a task switch per event;
- HTTP/1.1 keep-alive and pipelining (below), HTTP/1.0, `Expect: 100-continue`, HEAD.

Pipelining: one exchange at a time, and its deadlines only
-----------------------------------------------------------
Requests on a connection are answered one at a time, in the order they came. A request that arrives while
an answer is still being written waits its turn: it is parsed as far as the end of its head, then the
socket is paused until its turn. The deadlines of the connection are those of the exchange being
answered; a waiting request's own deadlines do not run while it waits (the server is not reading it):
its head deadline, if its head is unfinished, or its body deadline, if its body is, starts counting when
the answer before it is complete. And the protocol's own refusal of a waiting request (400 malformed,
431 too large) is written after the answers before it. So a client's next request can never cut the
answer in progress: whatever is wrong with it is answered in its turn, then the connection closes.

Answers before the body
-----------------------
The app may answer before the request's body has arrived in full (a 401 for a wrong key while a large
body is still coming). The connection then stays open only if the rest of the body is known to be small
(at most `_DRAIN_MAX` bytes left by its content-length) and the client is sending it (not waiting for a
`100 Continue`): after the answer, the server reads the rest and drops it, within the request's body
deadline (or closes), and the next request follows on the same connection. Otherwise the answer says
`connection: close`, and the server closes gracefully: it shuts its side after the answer, and reads and
drops what the client still sends for up to `_LINGER_S` (until the client closes its side, if sooner).
Closing at once with unread bytes would make the kernel answer them with a reset, which can destroy the
answer before the client has read it.

Errors this module writes itself (a malformed head, a head too large, a timeout before the body was
read, an app that failed before answering) happen before the app can answer, so the protocol writes them
itself, in the same OpenAI shape as every other error the gateway writes: `{"error": {"message", "type",
"param", "code"}}`, and closes the connection.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import httptools

from gateway.wire.deadline import Deadline

__all__ = ["HttpLimits", "HttpProtocol"]

log = logging.getLogger("gateway.wire.httpserver")

# Request body bytes buffered for the app before the socket stops reading.
_READ_HIGH_WATER = 64 * 1024
# The most a request's body may still have to come, when the app has answered, for the connection to stay
# open: the server reads that much and drops it (see the module docstring).
_DRAIN_MAX = 64 * 1024
# How long a connection that closes after an answer given before the body still reads (and drops) what the
# client sends, so that the client reads the answer rather than a reset.
_LINGER_S = 2.0
_CLOSE = (b"connection", b"close")


def _status_line(status: int) -> bytes:
    from http import HTTPStatus

    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    return f"HTTP/1.1 {status} {phrase}\r\n".encode("latin-1")


# The response headers that frame the answer (the server writes its own `connection` header).
_FRAMING = frozenset((b"content-length", b"connection"))
_STATUS = {status: _status_line(status) for status in range(100, 600)}


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """Deadlines and sizes for clients, given to every connection's protocol (the defaults are production's)."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    keep_alive_s: float = 30.0
    max_header_bytes: int = 64 * 1024
    max_headers: int = 100

    def __post_init__(self) -> None:
        if min(self.header_timeout_s, self.body_timeout_s, self.keep_alive_s) <= 0:
            raise ValueError("HTTP deadlines must be positive")
        if self.max_header_bytes < 1 or self.max_headers < 1:
            raise ValueError("HTTP head bounds must be positive")


_DEFAULT_LIMITS = HttpLimits()


class _Exchange:
    """One request and its answer: the ASGI `receive` and `send` of that request."""

    __slots__ = (
        "_chunked",
        "_conn",
        "_head_only",
        "_length_left",
        "_waiter",
        "body",
        "body_size",
        "complete",
        "continue_wanted",
        "gone_callback",
        "handed_over",
        "keep_alive",
        "more_body",
        "pending_start",
        "received",
        "rejected",
        "response_complete",
        "response_started",
        "scope",
    )

    def __init__(self, conn: HttpProtocol, scope: dict[str, Any], keep_alive: bool, continue_wanted: bool) -> None:
        self._conn = conn
        self.scope = scope
        self.keep_alive = keep_alive
        self.continue_wanted = continue_wanted
        self.body: list[bytes] = []
        self.body_size = 0  # of `body`, the part not yet handed to the app
        self.received = 0  # body bytes received in all
        self.more_body = True  # until the parser says the request is complete
        self.complete = False  # the request (head and body) has been parsed in full
        self.handed_over = False  # the app has received the whole body
        self.rejected = False  # the protocol answered for the app (408, 500): the app's sends are dropped
        self.gone_callback: Callable[[], None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        # (status, headers, content-length or None, the app asked to close): the head not written yet.
        self.pending_start: tuple[int, list[tuple[bytes, bytes]], int | None, bool] | None = None
        self.response_started = False
        self.response_complete = False
        self._chunked = False
        self._length_left: int | None = None
        self._head_only = scope["method"] == "HEAD"

    # -- what the protocol calls ----------------------------------------------------------------------------

    def rest_is_small(self) -> bool:
        """Is what is left of the body known to be at most `_DRAIN_MAX` bytes (by its content-length)?"""
        for name, value in self.scope["headers"]:
            if name == b"content-length":
                return int(value) - self.received <= _DRAIN_MAX  # the parser checked it is a number
        return False  # chunked: no telling

    def wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # -- ASGI -----------------------------------------------------------------------------------------------

    async def receive(self) -> dict[str, Any]:
        conn = self._conn
        if self.continue_wanted and not conn.lost:
            # The client waits for this before it sends a body it announced with `Expect: 100-continue`.
            self.continue_wanted = False
            conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        while True:
            if conn.lost or self.response_complete:
                return {"type": "http.disconnect"}
            if self.handed_over:
                await self._wait()  # nothing more to read: wait for the client to go away
                continue
            if self.body or not self.more_body:
                chunks = self.body
                data = chunks[0] if len(chunks) == 1 else (b"".join(chunks) if chunks else b"")
                self.body = []
                self.body_size = 0
                more = self.more_body
                self.handed_over = not more
                conn.resume_reading()
                return {"type": "http.request", "body": data, "more_body": more}
            conn.resume_reading()
            await self._wait()

    async def _wait(self) -> None:
        waiter = self._waiter = self._conn.loop.create_future()
        await waiter

    # -- the direct path for streams (not ASGI) --------------------------------------------------------------

    def write_body(self, data: bytes) -> bool:
        """Write one piece of a started response body now, synchronously (the relay of a stream calls this
        from its upstream connection's callback, skipping a task switch per event). Returns False when the
        client is not keeping up (the transport's buffer is above its high-water mark): the caller should
        stop feeding until `when_writable` calls back. A client that is gone is not an error here: the app
        learns it from `receive()`."""
        conn = self._conn
        if conn.lost or self.rejected or self.response_complete or not data:
            return True
        if not self.response_started:
            raise RuntimeError("write_body before the response head was written")
        if self._chunked:
            conn.write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            conn.write(data)
        return not conn.write_paused

    def on_gone(self, callback: Callable[[], None] | None) -> None:
        """Call `callback` (once) if the client goes away; None stops it. Saves a task watching `receive()`."""
        self.gone_callback = callback

    def when_writable(self, callback: Callable[[], None]) -> None:
        """Call `callback` once the client's transport can take more (or the client is gone)."""
        conn = self._conn
        if conn.lost or not conn.write_paused:
            callback()
        else:
            conn.on_writable.append(callback)

    async def send(self, message: dict[str, Any]) -> None:
        conn = self._conn
        kind = message["type"]
        if conn.write_paused and not conn.lost:
            await conn.drain()
        if conn.lost or self.rejected:
            return  # the client went away (the app learns it from receive()), or was already answered
        if kind == "http.response.start":
            if self.response_started or self.pending_start is not None:
                raise RuntimeError("the response has already started")
            status: int = message["status"]
            headers = list(message.get("headers", ()))
            # The two headers that say how the answer is framed, found in one pass.
            length: int | None = None
            close = False
            for name, value in headers:
                lname = name.lower()
                if lname in _FRAMING:
                    if lname == b"content-length":
                        length = int(value)
                    elif b"close" in value.lower():
                        close = True
            self.pending_start = (status, headers, length, close)
            if self.continue_wanted and not self.complete:
                # The client waits for a `100 Continue` that will not come: it may never send that body.
                self.keep_alive = False
            self.continue_wanted = False
            if length is None:
                # A stream: the head goes out now, so the client sees the status before the first event.
                self._write_head(status, headers, length, close, None)
            return
        if kind != "http.response.body":
            raise RuntimeError(f"unexpected ASGI message {kind!r}")
        if self.response_complete:
            raise RuntimeError("the response has already completed")
        body: bytes = message.get("body", b"")
        more: bool = message.get("more_body", False)
        if not self.response_started:
            if self.pending_start is None:
                raise RuntimeError("http.response.body before http.response.start")
            status, headers, length, close = self.pending_start
            self._write_head(status, headers, length, close, body if not self._chunked else None)
            if not self._chunked:
                body = b""  # written with the head
        if body and not self._head_only:
            if self._chunked:
                conn.write(b"%x\r\n%b\r\n" % (len(body), body) + (b"" if more else b"0\r\n\r\n"))
                body = b""
            else:
                if self._length_left is not None:
                    self._length_left -= len(body)
                    if self._length_left < 0:
                        raise RuntimeError("the response body is longer than its content-length")
                conn.write(body)
        elif self._chunked and not more and not self._head_only:
            conn.write(b"0\r\n\r\n")
        if not more:
            self.response_complete = True
            if self._length_left:
                conn.close()  # shorter than announced: the connection cannot be reused
                return
            conn.response_done(self)

    def _write_head(
        self, status: int, headers: list[tuple[bytes, bytes]], length: int | None, close: bool, body: bytes | None
    ) -> None:
        conn = self._conn
        self.response_started = True
        self.pending_start = None
        if close:
            self.keep_alive = False
            # Written below, once.
            headers = [h for h in headers if h[0].lower() != b"connection" or b"close" not in h[1].lower()]
        defaults = conn.default_headers()
        parts = [_STATUS.get(status) or _status_line(status)]
        parts += [b"%b: %b\r\n" % (name, value) for name, value in defaults]
        parts += [b"%b: %b\r\n" % (name, value) for name, value in headers]  # ASGI allows [name, value] lists
        lines = 1 + len(defaults) + len(headers)
        if length is None and status >= 200 and status not in (204, 304):
            self._chunked = True
            parts.append(b"transfer-encoding: chunked\r\n")
            lines += 1
        if not self.complete and not self.rest_is_small():
            self.keep_alive = False  # an answer before a body with much left (see the module docstring)
        if not self.keep_alive or conn.closing:
            self.keep_alive = False
            parts.append(b"connection: close\r\n")
            lines += 1
        parts.append(b"\r\n")
        lines += 1
        head = b"".join(parts)
        # Any CR or LF beyond the ones written here would split the head (header injection).
        if head.count(b"\n") != lines or head.count(b"\r") != lines:
            raise RuntimeError("a response header name or value contains CR or LF")
        if length is not None and not self._head_only:
            self._length_left = length
        if body and not self._head_only:
            if self._length_left is not None:
                self._length_left -= len(body)
                if self._length_left < 0:
                    raise RuntimeError("the response body is longer than its content-length")
            conn.write(head + body)
        else:
            conn.write(head)


class HttpProtocol(asyncio.Protocol):
    """One client connection. Constructed by uvicorn's server: `uvicorn.Config(http=HttpProtocol)` for the
    default limits, `uvicorn.Config(http=HttpProtocol.with_limits(limits))` for others."""

    @classmethod
    def with_limits(cls, limits: HttpLimits) -> Callable[..., HttpProtocol]:
        """The protocol with `limits` bound, for `uvicorn.Config(http=...)`: uvicorn calls it as it would call
        the class. (A partial of the class, so it can be pickled to `--workers` processes.)"""
        return functools.partial(cls, limits=limits)

    def __init__(
        self,
        config: Any,
        server_state: Any,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        limits: HttpLimits = _DEFAULT_LIMITS,
    ) -> None:
        if not config.loaded:
            config.load()
        self.limits = limits
        # Read for every header line: kept at hand.
        self._max_head = limits.max_header_bytes
        self._max_headers = limits.max_headers
        self.app = config.loaded_app
        self.loop = _loop or asyncio.get_event_loop()
        self._state = server_state
        self._app_state = app_state
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._scheme = "http"
        self._server: tuple[str, int] | None = None
        self._client: tuple[str, int] | None = None
        # The exchange being parsed, the one being answered, and parsed ones waiting their turn (pipelining).
        self._parsing: _Exchange | None = None
        self._active: _Exchange | None = None
        self._queue: deque[_Exchange] = deque()
        # Per-request parse state.
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0  # of the head being parsed, counted from what the parser hands over
        # Bytes received for a head still unfinished, after the read it began in (which is at most one read).
        self._partial_head = 0
        self._read_size = 0  # of the read being parsed
        self._in_head = False
        self._continue = False
        # The protocol's own answer to a request waiting its turn (status, message), written in that turn.
        self._refusal: tuple[int, str] | None = None
        self._lingering = False  # closing: what arrives is dropped
        # One deadline at a time, of the kind named (see the module docstring). Every deadline is at least
        # the shortest limit away, so with that as the timer's longest sleep, moving one never arms a timer.
        shortest = min(limits.header_timeout_s, limits.body_timeout_s, limits.keep_alive_s)
        self._deadline = Deadline(self.loop, self._on_deadline, max_sleep=shortest)
        self._deadline_kind = "idle"
        self.lost = False
        self.closing = False
        self.write_paused = False
        self._read_paused = False
        self._drain: asyncio.Future[None] | None = None
        # Called once when writing may go on (the direct path of streams, `_Exchange.when_writable`).
        self.on_writable: list[Callable[[], None]] = []

    # -- asyncio.Protocol ---------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # a stream transport
        self._state.connections.add(self)
        if transport.get_extra_info("sslcontext") is not None:
            self._scheme = "https"
        self._server = _address(transport.get_extra_info("sockname"))
        self._client = _address(transport.get_extra_info("peername"))
        self._set_deadline("idle", self.limits.keep_alive_s)

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return
        self._read_size = len(data)
        try:
            self._parser.feed_data(data)
            if self._in_head:
                # A head is still unfinished: bound what the parser buffers of it (a header value sent
                # forever would otherwise grow without limit).
                self._partial_head += len(data)
                if self._partial_head > self.limits.max_header_bytes:
                    raise _HeadTooLarge
        except httptools.HttpParserUpgrade:
            self._refuse(400, "Protocol upgrades are not supported.")
        except _HeadTooLarge:
            self._refuse(431, "Request header fields too large.")
        except httptools.HttpParserError as exc:
            # An exception raised in a parser callback arrives wrapped (HttpParserCallbackError).
            cause = exc.__context__
            if isinstance(cause, _HeadTooLarge):
                self._refuse(431, "Request header fields too large.")
            elif isinstance(cause, _BadRequest):
                self._refuse(400, str(cause))
            else:
                self._refuse(400, "Invalid HTTP request.")

    def eof_received(self) -> bool | None:
        return None  # half-closed by the client: close; connection_lost tells the app

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._state.connections.discard(self)
        self._parser = None  # type: ignore[assignment]  # it holds this protocol: no cycle left behind
        self._deadline.close()
        for exchange in (self._active, self._parsing, *self._queue):
            if exchange is not None:
                exchange.wake()
                callback, exchange.gone_callback = exchange.gone_callback, None
                if callback is not None:
                    callback()
        # The exchanges point back at this protocol; their tasks keep what they still need.
        self._active = self._parsing = None
        self._queue.clear()
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)
        self._writable()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        drain = self._drain
        if drain is not None:
            self._drain = None
            if not drain.done():
                drain.set_result(None)
        self._writable()

    def _writable(self) -> None:
        callbacks, self.on_writable = self.on_writable, []
        for callback in callbacks:
            callback()

    # -- httptools callbacks --------------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._continue = False
        self._in_head = True
        self._head_bytes = 0
        self._partial_head = -self._read_size  # this read is counted once the head is seen unfinished
        if self._active is None:
            # Its head must be complete within header_timeout_s of its first byte. A request pipelined
            # behind an answer gets that deadline in its turn (`_next`).
            self._set_deadline("head", self.limits.header_timeout_s)

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_bytes += len(url)
        if self._head_bytes > self.limits.max_header_bytes:
            raise _HeadTooLarge

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self._headers
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > self._max_head or len(headers) >= self._max_headers:
            raise _HeadTooLarge
        name = name.lower()
        if name == b"expect" and value.lower() == b"100-continue":
            self._continue = True
        headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self._head_bytes > self.limits.max_header_bytes:
            raise _HeadTooLarge
        self._in_head = False
        parser = self._parser
        version = parser.get_http_version()
        try:
            method = parser.get_method().decode("ascii")
            url = httptools.parse_url(self._url)
            raw_path: bytes = url.path
            path = raw_path.decode("ascii")
        except (UnicodeDecodeError, httptools.HttpParserInvalidURLError):
            raise _BadRequest("Invalid request target.") from None
        if "%" in path:
            path = unquote(path)
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": version,
            "server": self._server,
            "client": self._client,
            "scheme": self._scheme,
            "method": method,
            "root_path": "",
            "path": path,
            "raw_path": raw_path,
            "query_string": url.query or b"",
            "headers": self._headers,
            "state": dict(self._app_state) if self._app_state else {},
        }
        keep_alive = version != "1.0" and bool(parser.should_keep_alive())
        exchange = _Exchange(self, scope, keep_alive, self._continue)
        # Not ASGI: lets the stream relay write without a task switch per event (`_Exchange.write_body`).
        scope["gateway.exchange"] = exchange
        self._parsing = exchange
        if self._active is None:
            self._start(exchange)
        else:
            self._queue.append(exchange)
            self._pause_reading()

    def on_body(self, body: bytes) -> None:
        exchange = self._parsing
        if exchange is None or exchange.response_complete:
            return  # answered already: the rest of its body is dropped
        exchange.body.append(body)
        exchange.body_size += len(body)
        exchange.received += len(body)
        if exchange.body_size > _READ_HIGH_WATER:
            self._pause_reading()
        exchange.wake()

    def on_message_complete(self) -> None:
        exchange = self._parsing
        self._parsing = None
        if exchange is None:
            return
        exchange.more_body = False
        exchange.complete = True
        exchange.wake()
        if exchange is self._active:
            if exchange.response_complete:
                # The rest of a body answered early has been dropped: the next request's turn.
                self._active = None
                self._next()
            else:
                # The app is answering: no deadline of ours applies until the answer is complete.
                self._deadline.clear()

    # -- exchanges -----------------------------------------------------------------------------------------

    def _start(self, exchange: _Exchange) -> None:
        """`exchange`'s turn: the app is called for it."""
        self._active = exchange
        if exchange.complete:
            self._deadline.clear()
        else:
            # The body must arrive within body_timeout_s of the request's turn (a trickled body would hold
            # the connection forever).
            self._set_deadline("body", self.limits.body_timeout_s)
        task = self.loop.create_task(self._run(exchange))
        tasks = self._state.tasks
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def _run(self, exchange: _Exchange) -> None:
        try:
            await self._call_app(exchange)
        finally:
            # The scope points at the exchange, which points at the scope: without this, every request
            # would leave a reference cycle for the garbage collector.
            exchange.scope.pop("gateway.exchange", None)

    async def _call_app(self, exchange: _Exchange) -> None:
        try:
            await self.app(exchange.scope, exchange.receive, exchange.send)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                log.warning("request cancelled (shutdown deadline) on %s", exchange.scope["path"][:200])
            else:
                log.error("exception in the ASGI app on %s", exchange.scope["path"][:200], exc_info=exc)
            if not exchange.response_started and not self.lost:
                self._reject(500, "Internal Server Error")
            else:
                self.close()
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        if not exchange.response_complete and not self.lost:
            if not exchange.response_started:
                log.error("the ASGI app returned without answering %s", exchange.scope["path"][:200])
                self._reject(500, "Internal Server Error")
            else:
                self.close()  # an answer cut short: the client must not wait for the rest

    def response_done(self, exchange: _Exchange) -> None:
        """The answer to `exchange` has been written in full."""
        if self._active is not exchange:
            return
        self._state.total_requests += 1
        if not exchange.keep_alive or self.closing:
            self._active = None
            if exchange.complete:
                self.close()
            else:
                self._linger()
            return
        if not exchange.complete:
            # Answered before its body arrived, with little of it left: the rest is read and dropped
            # (within its body deadline, still running), then comes the next request's turn.
            exchange.body.clear()
            exchange.body_size = 0
            self._resume_reading()
            return
        self._active = None
        self._next()

    def _next(self) -> None:
        """The answer before is complete: the next request's turn, or the refusal of it, or idle time."""
        if self._refusal is not None and not self._queue:
            self._reject(*self._refusal)
            return
        self._resume_reading()
        if self._queue:
            self._start(self._queue.popleft())
        elif self._in_head:
            # A head that began while the answer before was written: timed from its turn, now.
            self._set_deadline("head", self.limits.header_timeout_s)
        else:
            self._set_deadline("idle", self.limits.keep_alive_s)

    # -- writing, flow control, closing -----------------------------------------------------------------------

    def default_headers(self) -> list[tuple[bytes, bytes]]:
        headers: list[tuple[bytes, bytes]] = self._state.default_headers
        return headers

    def write(self, data: bytes) -> None:
        transport = self._transport
        if transport is not None and not self.lost:
            transport.write(data)

    async def drain(self) -> None:
        if not self.write_paused or self.lost:
            return
        drain = self._drain
        if drain is None:
            drain = self._drain = self.loop.create_future()
        await drain

    def close(self) -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.close()

    def shutdown(self) -> None:
        """Graceful stop (uvicorn calls it): close when idle, else after the current answer."""
        self.closing = True
        active = self._active
        if active is None or active.response_complete:  # idle, or dropping the rest of an answered body
            self.close()
        else:
            active.keep_alive = False

    def resume_reading(self) -> None:
        """The app took the buffered body: read more (unless a pipelined request is waiting its turn)."""
        if not self._queue:
            self._resume_reading()

    def _pause_reading(self) -> None:
        if not self._read_paused and self._transport is not None:
            self._read_paused = True
            self._transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._read_paused and self._transport is not None and not self.lost and self._refusal is None:
            self._read_paused = False
            self._transport.resume_reading()

    def _linger(self) -> None:
        """Close after an answer written before the request's body arrived (see the module docstring)."""
        transport = self._transport
        if transport is None or self.lost or transport.is_closing():
            return
        if not transport.can_write_eof():  # TLS: no half-close
            self.close()
            return
        self._lingering = True
        self._parsing = None
        transport.write_eof()  # after what is buffered: the client reads the answer, then the end
        self._resume_reading()
        self._set_deadline("linger", _LINGER_S)

    def _refuse(self, status: int, message: str) -> None:
        """The request being parsed is refused by the protocol itself: now if it is the one being answered or
        none is; otherwise in its turn, after the answers before it (see the module docstring)."""
        active = self._active
        parsing = self._parsing
        if active is None or parsing is active:
            self._reject(status, message)
            return
        # A request waiting its turn (or the head of one): the app never sees it; reading stops here.
        if parsing is not None and self._queue and self._queue[-1] is parsing:
            self._queue.pop()
        self._parsing = None
        self._in_head = False
        self._refusal = (status, message)
        self._pause_reading()

    def _reject(self, status: int, message: str) -> None:
        """Answer with an error and close (the request cannot be handed to the app)."""
        self._parsing = None
        active = self._active
        if active is not None and active.response_started:
            self.close()
            return
        body = _error_body(status, message)
        head = [_STATUS.get(status) or _status_line(status)]
        for name, value in self.default_headers():
            head += (name, b": ", value, b"\r\n")
        head += (
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
            body,
        )
        if active is not None:
            active.rejected = True
        self.write(b"".join(head))
        self.close()

    # -- deadlines -----------------------------------------------------------------------------------------

    def _set_deadline(self, kind: str, seconds: float) -> None:
        self._deadline_kind = kind
        self._deadline.at(self.loop.time() + seconds)

    def _on_deadline(self) -> None:
        if self.lost:
            return
        kind = self._deadline_kind
        if kind in ("idle", "linger"):
            self.close()
            return
        active = self._active
        self._reject(
            408, "Request head not received in time." if kind == "head" else "Request body not received in time."
        )
        if active is not None:
            active.wake()


# The OpenAI error code of each answer the protocol writes itself.
_CODES = {400: "invalid_http_request", 408: "request_timeout", 431: "request_header_fields_too_large"}


def _error_body(status: int, message: str) -> bytes:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    code = _CODES.get(status, "internal_error" if status >= 500 else None)
    error = {"message": message, "type": kind, "param": None, "code": code}
    return json.dumps({"error": error}, ensure_ascii=True).encode()


class _HeadTooLarge(Exception):
    pass


class _BadRequest(Exception):
    pass


def _address(info: object) -> tuple[str, int] | None:
    if isinstance(info, tuple) and len(info) >= 2:
        return str(info[0]), int(info[1])
    return None
