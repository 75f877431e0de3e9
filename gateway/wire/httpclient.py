"""A small HTTP/1.1 client for talking to backends: one keep-alive connection pool per backend.

Why not aiohttp
---------------
Measured alone, with no server in front (docs/bench/clients.md), aiohttp's client spends 90-170 µs of CPU
per request, the largest single cost on the gateway's hot path and most of a 250 µs budget (the gateway's target
of 4,000 req/s per worker). Most of that pays for generality the gateway never uses: URL objects, cookie jars,
redirects, tracing hooks, multidict headers, a StreamReader and a timer context per response. The gateway's
needs are narrow: send a bytes body to a backend it knows, read the status and the body (whole, or chunk by
chunk for SSE), and cut the connection when its own client goes away so that the backend stops generating.
docs/bench/httpclient.md has the figures for this module against aiohttp.

Design
------
- One `asyncio.Protocol` per connection feeding llhttp (`httptools.HttpResponseParser`, C). The parser's
  callbacks write straight into the current `Response`: no StreamReader, no queue, no task per request.
- A request is serialised into one bytes object and written with one `transport.write` (one syscall, and
  for ordinary requests one packet).
- A connection goes back to its pool the moment the last byte of its response is parsed (the `Response`
  owns its body from then on), so a small request costs one future and one write, and the
  connection is ready for the next request before the caller has even looked at this one.
- The idle list is LIFO: the most recently used connection is the one least likely to have been closed
  by the server, and the ones at the bottom age out (`idle_timeout_s`, swept by one timer per pool).
- A connection whose response was not received to the end is closed, never reused: there is no way to
  know where the next response would start. The same goes for `Connection: close` answers and for any
  byte a server sends while the connection is idle.
- A server may close an idle keep-alive connection just as a request is written on it. When a *reused*
  connection ends (EOF or reset) before a single byte of the response arrived, the request is sent once
  more on a new connection: the server closed it before reading the request (or at least before starting
  to answer it). A failure on a new connection is never retried. See the gateway note at `Pool.request`.
- Flow control: when a consumer iterates slower than the backend sends, the transport stops reading
  once more than `HIGH_WATER` bytes are buffered and resumes when the consumer has taken them, so a slow
  client of the gateway holds TCP back-pressure against the backend instead of the gateway's memory.
- Timeouts: connecting is bounded by `asyncio.timeout`; reading by an inactivity deadline per connection
  (`deadline.Deadline`) that arriving data and new requests move later, with no timer armed or cancelled
  per chunk or per request. While the transport is paused for a slow consumer the backend is not idle,
  so that time does not count.
- Cancellation: a task cancelled while it waits for the head or the body closes the connection, so the
  backend sees its client go away.
- Push mode (`Response.stream_to`): body bytes go straight from the connection's `data_received` to a
  callback, with no future and no task switch per chunk: what relaying a stream costs per event is then the
  callback's own work and the two syscalls. The callback pauses reading by returning False (its consumer
  is full) and `Response.resume_reading()` resumes it; `wait_end()` waits for the end of the body.

Errors
------
    UpstreamError            anything that went wrong talking to the backend
     ├── ConnectError        refused, unreachable, DNS failure, connect timeout, pool closed
     ├── ReadTimeout         no byte for `read_timeout_s` (before the head or between body bytes)
     └── ProtocolError       malformed response, connection closed before the response ended
                             (also mid-stream: the chunks received before it are yielded first)

Messages may name the backend's address (they are meant for logs); translate them before they reach a
client. `ValueError` means a request that cannot be serialised safely (CR or LF in a header, a space in
the path, HEAD/CONNECT, which this client does not support).
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Final
from urllib.parse import urlsplit

import httptools

from gateway.wire.deadline import Deadline

__all__ = ["HIGH_WATER", "ConnectError", "Pool", "ProtocolError", "ReadTimeout", "Response", "UpstreamError"]

#: Body bytes a `Response` may hold for its consumer before the connection stops reading from the socket.
HIGH_WATER: Final = 256 * 1024
# Bodies up to this size are copied behind the head for a single write; larger ones go in a second write
# (copying a megabyte to save one syscall is a poor trade).
_COALESCE_MAX: Final = 64 * 1024
# Framing and hop-by-hop headers are the client's to write; a caller's copy would contradict them.
_OWN_HEADERS: Final = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "te", "trailer", "upgrade"}
)
_NO_BODY_METHODS: Final = frozenset({"GET", "DELETE", "OPTIONS"})

Headers = Mapping[str, str] | Sequence[tuple[bytes, bytes]]


class UpstreamError(Exception):
    """Talking to the backend failed; the subclass says how."""


class ConnectError(UpstreamError):
    """No connection: refused, unreachable, name not resolved, connect timeout, or the pool is closed."""


class ReadTimeout(UpstreamError):
    """The backend sent nothing for `read_timeout_s`, before the head or between two body bytes."""


class ProtocolError(UpstreamError):
    """A malformed response, or the connection ended before the response did."""


class _StaleConnection(ProtocolError):
    """A reused connection ended before any byte of the response: the caller may send the request again."""


class Response:
    """One response: its status and head as soon as they arrive, and its body as it arrives.

    Use it as an async context manager (or call `release()`/`close()`): leaving it before the body has
    fully arrived closes the connection, which a backend reads as its client going away.
    """

    __slots__ = ("_buffered", "_chunks", "_complete", "_conn", "_exc", "_sink", "_waiter", "headers", "status")

    def __init__(self, conn: _Connection) -> None:
        self.status = 0
        #: The response head, names lower-cased, values as sent, in order (repeated names repeat).
        self.headers: list[tuple[bytes, bytes]] = []
        self._conn: _Connection | None = conn  # set while the body is still arriving
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._complete = False
        self._exc: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._sink: Callable[[bytes], bool] | None = None

    @property
    def complete(self) -> bool:
        """Has every byte of the body arrived (whether or not the caller has read it yet)?"""
        return self._complete

    def header(self, name: bytes) -> bytes | None:
        """The first value of header `name` (lower-case), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    async def read(self) -> bytes:
        """The whole body (what iteration has already taken excepted)."""
        if self._complete:  # the common case for small answers: it all came with the head
            return self._take()
        parts: list[bytes] = []
        while True:
            if self._chunks:
                # Taking the chunks as they come keeps the transport reading: read() wants it all anyway.
                parts.append(self._take())
            if self._exc is not None:
                raise self._exc
            if self._complete:
                return b"".join(parts)
            await self._wait()

    def __aiter__(self) -> Response:
        return self

    async def __anext__(self) -> bytes:
        """All the body bytes that arrived since the last call, once there is at least one."""
        while not self._chunks:
            if self._exc is not None:
                raise self._exc
            if self._complete:
                raise StopAsyncIteration
            await self._wait()
        return self._take()

    def stream_to(self, sink: Callable[[bytes], bool]) -> None:
        """From now on, hand every body byte to `sink` as it arrives, from the connection's callback (what was
        buffered already goes first, now). `sink` must not raise; it returns False when its consumer cannot
        take more, which pauses reading until `resume_reading()`. Then `await wait_end()`."""
        self._sink = sink
        if self._chunks:
            data = self._take()
            if not sink(data):
                self._pause()

    def resume_reading(self) -> None:
        """Undo a pause asked for by the sink (its consumer can take more)."""
        conn = self._conn
        if conn is not None and conn.paused:
            conn.resume()

    async def wait_end(self) -> None:
        """Wait until the body has arrived in full (push mode); raises what ended it otherwise."""
        try:
            while True:
                if self._exc is not None:
                    raise self._exc
                if self._complete:
                    return
                await self._wait()
        finally:
            # The sink is usually a closure over this response: dropping it leaves no cycle behind.
            self._sink = None

    def _pause(self) -> None:
        conn = self._conn
        if conn is not None and not conn.paused and conn._transport is not None:
            conn.paused = True
            conn._transport.pause_reading()

    def release(self) -> None:
        """Done with the response. Its connection already went back to the pool if the body arrived in
        full; otherwise the connection is closed."""
        if not self._complete:
            self.close()

    def close(self) -> None:
        """Drop the response; its connection is closed unless the body had already arrived in full."""
        conn = self._conn
        if conn is not None:
            self._conn = None
            conn.abandon(self)
        if not self._complete and self._exc is None:
            self._exc = ProtocolError("the response was closed before its end")

    async def __aenter__(self) -> Response:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._complete:
            self.close()

    # -- used by the connection and by the waits above -------------------------------------------------

    def _take(self) -> bytes:
        chunks = self._chunks
        if not chunks:
            return b""
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        conn = self._conn
        if conn is not None and conn.paused:
            conn.resume()
        return data

    async def _wait(self) -> None:
        conn = self._conn
        if conn is None:  # cannot happen: callers wait only while the body is arriving
            raise ProtocolError("the response has no connection")
        waiter = conn.loop.create_future()
        self._waiter = waiter
        try:
            await waiter
        except asyncio.CancelledError:
            # The caller went away (its client disconnected): the backend must see it too.
            self.close()
            raise

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():  # a cancelled waiter is done
                waiter.set_result(None)

    def _fail(self, exc: UpstreamError) -> None:
        self._conn = None
        self._exc = exc
        self._wake()


class _Connection(asyncio.Protocol):
    """One keep-alive connection to a backend: writes requests, parses responses into `Response`s."""

    __slots__ = (
        "_deadline",
        "_done",
        "_headers",
        "_informational",
        "_keep_alive",
        "_parser",
        "_pool",
        "_received",
        "_resp",
        "_timeout",
        "_transport",
        "idle",
        "idle_since",
        "loop",
        "lost",
        "paused",
        "reused",
    )

    def __init__(self, pool: Pool, loop: asyncio.AbstractEventLoop) -> None:
        self._pool = pool
        self.loop = loop
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._resp: Response | None = None  # the response being received, if any
        self._headers: list[tuple[bytes, bytes]] = []
        self._informational = False
        self._done = False
        self._keep_alive = False
        self._received = False  # any byte of the current response yet?
        # No byte from the backend for `_timeout` while a response is due: ReadTimeout.
        self._timeout = 0.0
        self._deadline = Deadline(loop, self._on_deadline)
        self.paused = False
        self.lost = False
        self.reused = False
        self.idle = False
        self.idle_since = 0.0

    # -- requests ----------------------------------------------------------------------------------------

    async def send(self, head: bytes, body: bytes, read_timeout_s: float) -> Response:
        """Write one request and wait for the head of its response."""
        transport = self._transport
        if transport is None or self.lost:  # not reachable through the pool; kept as a guard
            raise _StaleConnection("the connection is closed")
        resp = Response(self)
        self._resp = resp
        self._received = False
        self._timeout = read_timeout_s
        if len(body) <= _COALESCE_MAX:
            transport.write(head + body)
        else:
            transport.write(head)
            transport.write(body)
        loop = self.loop
        self._deadline.at(loop.time() + read_timeout_s)
        waiter = loop.create_future()
        resp._waiter = waiter
        try:
            await waiter
        except asyncio.CancelledError:
            resp.close()
            raise
        if resp.status == 0:  # woken by a failure, not by the head
            raise resp._exc or ProtocolError("no response")
        return resp

    def abandon(self, resp: Response) -> None:
        """The caller gave up on `resp` before its end: close, so the backend sees it."""
        if self._resp is resp:  # else the response had finished and the connection may serve another one
            self._resp = None
            self._close()

    def resume(self) -> None:
        self.paused = False
        if self._transport is not None and not self.lost:
            self._transport.resume_reading()

    def _on_deadline(self) -> None:
        if self._resp is None:
            return  # idle (not reachable: the deadline is cleared when a response ends)
        if self.paused:
            self._deadline.at(self.loop.time() + self._timeout)  # the consumer is behind, not the backend
            return
        self._fail(ReadTimeout(f"the backend sent nothing for {self._timeout:g} s"))

    def _finish(self) -> None:
        """The response has arrived in full: back to the pool, or closed if the server wants that."""
        self._deadline.clear()
        if self.paused:
            self.resume()
        if self._keep_alive and not self.lost:
            self._pool._release(self)
        else:
            self._close()

    def close_idle(self) -> None:
        """Close a connection the pool has already taken off its idle list."""
        self.idle = False
        self._close()

    def _fail(self, exc: UpstreamError) -> None:
        resp = self._resp
        self._resp = None
        self._done = False
        self._close()
        if resp is not None:
            resp._fail(exc)

    def _close(self) -> None:
        if self.lost:
            return
        self.lost = True
        self._deadline.close()
        self._pool._forget(self)
        if self._transport is not None:
            # abort, not close: nothing queued for this backend is worth sending any more, and the
            # backend should see the disconnect now.
            self._transport.abort()

    # -- asyncio.Protocol --------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # a stream transport: create_connection's

    def data_received(self, data: bytes) -> None:
        if self._resp is None:
            # Nothing may arrive between responses (a server's parting "408", or garbage): never reuse it.
            self._close()
            return
        self._received = True
        self._deadline.at(self.loop.time() + self._timeout)
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._fail(ProtocolError(f"invalid response from the backend: {exc}"))
            return
        if self._done:  # released here rather than in the callback, once the parser is done with `data`
            self._done = False
            self._finish()

    def eof_received(self) -> bool | None:
        return None  # close our side too; connection_lost decides what that means for a response

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._deadline.close()
        self._pool._forget(self)
        self._parser = None  # type: ignore[assignment]  # it holds this connection: no cycle left behind
        resp = self._resp
        if resp is None:
            return
        self._resp = None
        if resp.status == 0:
            if self.reused and not self._received:
                resp._fail(_StaleConnection("the backend closed a kept-alive connection before answering"))
            else:
                resp._fail(ProtocolError("the backend closed the connection before answering"))
        elif _ends_at_close(resp.headers):
            # No Content-Length and not chunked: the body is whatever came before the close (RFC 9112 6.3).
            resp._conn = None
            resp._complete = True
            resp._wake()
        else:
            resp._fail(ProtocolError("the backend closed the connection in the middle of the response"))

    # -- httptools callbacks -----------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._resp is None:
            raise ProtocolError("the backend sent a response nobody asked for")
        self._headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        status: int = self._parser.get_status_code()
        if status < 200:
            # 1xx (100 Continue, 103 Early Hints): the real head follows. A 101 would switch protocols,
            # which the parser reports as an upgrade and data_received as a protocol error.
            self._informational = True
            return
        resp = self._resp
        if resp is None:
            raise ProtocolError("no response is expected")
        resp.status = status
        resp.headers = self._headers
        resp._wake()

    def on_body(self, body: bytes) -> None:
        resp = self._resp
        if resp is None:
            raise ProtocolError("no response is expected")
        sink = resp._sink
        if sink is not None:
            if not sink(body) and not self.paused and self._transport is not None:
                self.paused = True
                self._transport.pause_reading()
            return
        resp._chunks.append(body)
        resp._buffered += len(body)
        if resp._waiter is not None:
            resp._wake()
        if resp._buffered > HIGH_WATER and not self.paused and self._transport is not None:
            self.paused = True
            self._transport.pause_reading()

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        resp = self._resp
        if resp is None:
            raise ProtocolError("no response is expected")
        self._keep_alive = bool(self._parser.should_keep_alive())
        self._resp = None
        self._done = True
        resp._conn = None
        resp._complete = True
        resp._wake()


def _ends_at_close(headers: list[tuple[bytes, bytes]]) -> bool:
    return not any(name in (b"content-length", b"transfer-encoding") for name, _ in headers)


class Pool:
    """Keep-alive HTTP/1.1 connections to one backend (`http://` or `https://`, with an optional base path).

    There is no cap on connections: a request that finds no idle connection opens one (as aiohttp's
    `TCPConnector(limit=0)` did); the gateway's admission control bounds concurrency. At most `max_idle`
    connections are kept between requests, each for at most `idle_timeout_s`.
    """

    def __init__(
        self,
        base_url: str,
        *,
        max_idle: int = 256,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 300.0,
        idle_timeout_s: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"expected an http:// or https:// URL with a host, got {base_url!r}")
        self._host = url.hostname
        self._port = url.port or (443 if url.scheme == "https" else 80)
        self._ssl: ssl.SSLContext | None = None
        if url.scheme == "https":
            self._ssl = ssl_context or ssl.create_default_context()
        host = f"[{self._host}]" if ":" in self._host else self._host
        if url.port is not None:
            host += f":{url.port}"
        self._prefix = url.path.rstrip("/")
        # Everything of the head that is the same for every request, in both forms (str and bytes headers).
        self._fixed = f" HTTP/1.1\r\nHost: {host}\r\nConnection: keep-alive\r\n"
        self._fixed_bytes = self._fixed.encode("ascii")
        self._max_idle = max_idle
        self._connect_timeout = connect_timeout_s
        self._read_timeout = read_timeout_s
        self._idle_timeout = idle_timeout_s
        self._idle: deque[_Connection] = deque()  # LIFO: append and pop on the right, age out on the left
        self._conns: set[_Connection] = set()  # every open connection, idle or busy, for close()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    @property
    def connections(self) -> int:
        """Open connections, idle or busy."""
        return len(self._conns)

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    async def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: Headers | None = None,
        *,
        read_timeout_s: float | None = None,
    ) -> Response:
        """Send one request (`path` is appended to the base URL's path) and return once its head arrived.

        A reused connection that the server had closed before answering is retried once on a new
        connection. The gateway must know: a backend that reads a request and then closes the connection
        without a byte of answer (a crash, or the simulator's `close_connection` fault) gets that request a
        second time; for inference that costs a duplicate generation, never a wrong answer.

        Raises ConnectError, ReadTimeout, ProtocolError (UpstreamError), or ValueError for a request that
        cannot be written safely.
        """
        if self._closed:
            raise ConnectError("the connection pool is closed")
        head = self._head(method, path, len(body), headers)
        timeout = self._read_timeout if read_timeout_s is None else read_timeout_s
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        conn = self._take_idle(loop)
        if conn is not None:
            try:
                return await conn.send(head, body, timeout)
            except _StaleConnection:
                pass  # the backend closed it before answering: once more, on a new connection
        conn = await self._connect(loop)
        return await conn.send(head, body, timeout)

    async def close(self) -> None:
        """Close every connection, idle or busy (responses still arriving fail with ProtocolError)."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self._conns):
            conn._fail(ProtocolError("the connection pool was closed"))
        self._idle.clear()
        # One turn of the loop lets the transports finish closing (no "unclosed transport" warnings).
        await asyncio.sleep(0)

    # -- connections -------------------------------------------------------------------------------------

    def _take_idle(self, loop: asyncio.AbstractEventLoop) -> _Connection | None:
        idle = self._idle
        if not idle:
            return None
        conn = idle.pop()
        conn.idle = False
        if loop.time() - conn.idle_since >= self._idle_timeout:
            # The freshest idle connection is too old, so are all the others (the sweeper is late).
            conn.close_idle()
            while idle:
                idle.pop().close_idle()
            return None
        return conn

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> _Connection:
        conn = _Connection(self, loop)
        try:
            async with asyncio.timeout(self._connect_timeout):
                transport, _ = await loop.create_connection(
                    lambda: conn,
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl is not None else None,
                )
        except TimeoutError:
            raise ConnectError(
                f"timed out after {self._connect_timeout:g} s connecting to {self._host}:{self._port}"
            ) from None
        except OSError as exc:  # refused, unreachable, DNS (gaierror), TLS (SSLError)
            raise ConnectError(f"cannot connect to {self._host}:{self._port}: {exc}") from None
        # uvloop may return before it has called connection_made.
        conn.connection_made(transport)
        if self._closed:
            conn._close()
            raise ConnectError("the connection pool is closed")
        self._conns.add(conn)
        return conn

    def _release(self, conn: _Connection) -> None:
        """`conn` finished a response and may serve another."""
        idle = self._idle
        if self._closed or self._max_idle <= 0:
            conn._close()
            return
        if len(idle) >= self._max_idle:
            idle.popleft().close_idle()
        loop = conn.loop
        conn.reused = True
        conn.idle = True
        conn.idle_since = now = loop.time()
        idle.append(conn)
        if self._sweeper is None:
            self._sweeper = loop.call_at(now + self._idle_timeout, self._sweep)

    def _forget(self, conn: _Connection) -> None:
        """`conn` is closed or closing."""
        self._conns.discard(conn)
        if conn.idle:
            conn.idle = False
            self._idle.remove(conn)

    def _sweep(self) -> None:
        """Close connections idle for longer than idle_timeout_s (the oldest are on the left)."""
        self._sweeper = None
        idle = self._idle
        if not idle or self._loop is None:
            return
        limit = self._loop.time() - self._idle_timeout
        while idle and idle[0].idle_since <= limit:
            idle.popleft().close_idle()
        if idle:
            self._sweeper = self._loop.call_at(idle[0].idle_since + self._idle_timeout, self._sweep)

    # -- serialising -------------------------------------------------------------------------------------

    def _head(self, method: str, path: str, length: int, headers: Headers | None) -> bytes:
        """The request line and headers, in one bytes object, checked against header injection."""
        if method in ("HEAD", "CONNECT"):
            # A HEAD answer carries a Content-Length but no body; the parser cannot be told, so refuse.
            raise ValueError(f"{method} is not supported by this client")
        target = self._prefix + path
        if " " in target or not method.isalpha():
            raise ValueError("the method must be a token and the path must not contain spaces")
        with_length = length > 0 or method not in _NO_BODY_METHODS
        lines = 5 if with_length else 4  # CRLFs: request line, Host, Connection, [Content-Length,] blank
        if headers is None or isinstance(headers, Mapping):
            parts = [method, " ", target, self._fixed]
            if with_length:
                parts += ("Content-Length: ", str(length), "\r\n")
            if headers:
                for name, value in headers.items():
                    if name.lower() in _OWN_HEADERS:
                        continue
                    parts += (name, ": ", value, "\r\n")
                    lines += 1
            parts.append("\r\n")
            head = "".join(parts).encode("latin-1")
        else:
            bparts = [method.encode("ascii"), b" ", target.encode("latin-1"), self._fixed_bytes]
            if with_length:
                bparts += (b"Content-Length: ", b"%d" % length, b"\r\n")
            for bname, bvalue in headers:
                if bname.lower().decode("latin-1") in _OWN_HEADERS:
                    continue
                bparts += (bname, b": ", bvalue, b"\r\n")
                lines += 1
            bparts.append(b"\r\n")
            head = b"".join(bparts)
        # Two scans of a few hundred bytes, in C, instead of checking every name and value: any CR or LF
        # beyond the ones written here means a caller's value would have split the head (header injection).
        if head.count(b"\n") != lines or head.count(b"\r") != lines:
            raise ValueError("a header name, value or the path contains CR or LF")
        return head
