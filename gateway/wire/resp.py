"""`PipelinedRedis`: the small Redis client of the admission path (EVALSHA and SCRIPT LOAD, pipelined).

Why not redis-py here
---------------------
Every inference request runs two quota scripts (admit, settle). Measured under load with py-spy, redis-py's
asyncio client took about 40% of the gateway's Python time for them (docs/ARCHITECTURE.md): a connection
checked out of a pool and back per command, an `asyncio.timeout` context per read, argument filtering,
encoding in Python. The admission path needs none of its generality: a handful of fixed commands against
one server, fast failure, no retries.

Design
------
- One connection per client, shared by every request: commands are pipelined (Redis answers in order),
  so there is no pool and no checkout. Commands issued in one turn of the event loop go out in one write.
- Encoding and parsing are hiredis's (`pack_command`, `Reader`), in C.
- Timeouts: no caller waits longer than `timeout_s`. One deadline (`deadline.Deadline`) watches the
  oldest outstanding command (replies arrive in order, so it is the first to be late); when it is late,
  the connection is failed, every waiting command gets `TimeoutError`, and the next command reconnects.
  A reply moves the deadline to the next command's with an assignment: a timer armed and cancelled per
  command would cost more than the rest of the command.
- Failure: a refused or lost connection fails the waiting commands with `ConnectionError` at once; the next
  command tries to connect again (each attempt bounded by `timeout_s`). Nothing is retried here: the quota
  store's failure mode decides what a failure means.
- A caller that is cancelled leaves its reply to be read and dropped: the pipeline stays in step.

Errors are redis-py's classes (`redis.exceptions`), so callers handle both clients alike: `ConnectionError`,
`TimeoutError`, `ResponseError`, and `NoScriptError` for a script the server does not know.

Supported URLs: `redis://[[user]:password@]host[:port][/db]`, `rediss://...` (TLS), `unix:///path[?db=N]`.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Awaitable
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis
from redis import exceptions as rx

from gateway.wire.deadline import Deadline

__all__ = ["Packed", "PipelinedRedis", "pack_parts"]


def _pack(args: tuple[Any, ...]) -> bytes:
    packed: bytes = hiredis.pack_command(args)
    return packed


class Packed:
    """A run of a command's arguments encoded once, for the many commands that repeat it (a tenant's keys and
    limits, a pool's names): `PipelinedRedis.execute_parts` copies its bytes instead of encoding each
    argument again, which is most of what a command costs to send. `args` are the arguments themselves."""

    __slots__ = ("args", "count", "data")

    def __init__(self, *args: Any) -> None:
        self.args = args
        self.count = len(args)
        packed = _pack(args) if args else b"*0\r\n"
        self.data = packed[packed.index(b"\r\n") + 2 :]  # without the "*<count>" header


def pack_parts(parts: tuple[Any, ...]) -> bytes:
    """One command from arguments and `Packed` runs of them, in order. (Each argument is encoded inline, as
    hiredis would encode it: a call per argument would cost as much as the encoding.)"""
    count = 0
    out = [b""]
    append = out.append
    for part in parts:
        kind = type(part)
        if kind is Packed:
            append(part.data)
            count += part.count
            continue
        count += 1
        if kind is str:
            data = part.encode()
        elif kind is int:
            data = b"%d" % part
        elif kind is bytes:
            data = part
        elif kind is float:
            data = repr(part).encode()
        else:
            append(_pack((part,))[4:])  # anything else as hiredis encodes it
            continue
        append(b"$%d\r\n%s\r\n" % (len(data), data))
    out[0] = b"*%d\r\n" % count
    return b"".join(out)


class _Protocol(asyncio.Protocol):
    """One connection: writes packed commands, matches replies to waiting futures in order."""

    def __init__(self, owner: PipelinedRedis, loop: asyncio.AbstractEventLoop) -> None:
        self._owner = owner
        self._loop = loop
        self._reader = hiredis.Reader()
        self._transport: asyncio.Transport | None = None
        # (future, deadline), oldest first: the order Redis answers in.
        self.waiting: deque[tuple[asyncio.Future[Any], float]] = deque()
        self._out: list[bytes] = []
        self._flush_scheduled = False
        # The oldest waiting command's deadline (the others' are later: one timeout for all).
        self._deadline = Deadline(loop, self._on_deadline)
        self.lost = False

    # -- commands ------------------------------------------------------------------------------------------

    def command(self, packed: bytes, timeout_s: float) -> asyncio.Future[Any]:
        loop = self._loop
        fut = loop.create_future()
        deadline = loop.time() + timeout_s
        self.waiting.append((fut, deadline))
        self._out.append(packed)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        if self._deadline.when is None:  # the only command waiting: its deadline is the oldest
            self._deadline.at(deadline)
        return fut

    def _flush(self) -> None:
        self._flush_scheduled = False
        out = self._out
        if not out or self.lost or self._transport is None:
            out.clear()
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        self._transport.write(data)

    def _on_deadline(self) -> None:
        if self.waiting:
            self.fail(rx.TimeoutError("Timeout reading from the quota Redis"))

    def fail(self, exc: Exception) -> None:
        """Fail every waiting command and close: a pipeline cannot skip a reply it never got."""
        self.lost = True
        self._owner._forget(self)
        self._deadline.close()
        waiting, self.waiting = self.waiting, deque()
        for fut, _ in waiting:
            if not fut.done():
                fut.set_exception(exc)
        if self._transport is not None:
            self._transport.abort()

    # -- asyncio.Protocol -----------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # a stream transport

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        try:
            reader.feed(data)
            reply = reader.gets()
        except hiredis.ProtocolError as exc:
            self.fail(rx.ConnectionError(f"invalid reply from the quota Redis: {exc}"))
            return
        waiting = self.waiting
        while reply is not False:
            if not waiting:
                self.fail(rx.ConnectionError("the quota Redis sent a reply nobody asked for"))
                return
            fut, _ = waiting.popleft()
            if not fut.done():  # a cancelled caller's reply is read and dropped
                if isinstance(reply, hiredis.ReplyError):
                    message = str(reply)
                    fut.set_exception(
                        rx.NoScriptError(message) if message.startswith("NOSCRIPT") else rx.ResponseError(message)
                    )
                else:
                    fut.set_result(reply)
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as exc:
                self.fail(rx.ConnectionError(f"invalid reply from the quota Redis: {exc}"))
                return
        if waiting:
            self._deadline.at(waiting[0][1])
        else:
            self._deadline.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost:
            self.fail(rx.ConnectionError("the connection to the quota Redis was lost"))


class PipelinedRedis:
    """EVALSHA / SCRIPT LOAD (and any other simple command) over one pipelined connection."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 6379,
        path: str | None = None,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        timeout_s: float = 0.25,
    ) -> None:
        self._host, self._port, self._path = host, port, path
        self._ssl = ssl_context
        self._timeout = timeout_s
        self._hello: list[bytes] = []
        if password is not None:
            auth = ("AUTH", username, password) if username else ("AUTH", password)
            self._hello.append(_pack(auth))
        if db:
            self._hello.append(_pack(("SELECT", db)))
        self._conn: _Protocol | None = None
        self._connecting: asyncio.Task[_Protocol] | None = None
        self._closed = False

    @classmethod
    def from_url(cls, url: str, *, timeout_s: float = 0.25) -> PipelinedRedis:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"unsupported Redis URL scheme {parts.scheme!r} (redis://, rediss:// or unix://)")
        query = parse_qs(parts.query)
        db_text = query.get("db", [""])[0] or ("" if parts.scheme == "unix" else parts.path.lstrip("/")) or "0"
        try:
            db = int(db_text)
        except ValueError:
            raise ValueError(f"not a Redis database number: {db_text!r}") from None
        username = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password is not None else None
        if parts.scheme == "unix":
            return cls(path=parts.path, db=db, username=username, password=password, timeout_s=timeout_s)
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 6379,
            db=db,
            username=username,
            password=password,
            ssl_context=ssl.create_default_context() if parts.scheme == "rediss" else None,
            timeout_s=timeout_s,
        )

    def execute_command(self, *args: Any) -> Awaitable[Any]:
        """The reply to one command, to await. Connected (the usual case), that is the command's own future:
        no coroutine per call, whose frames every reply would resume on its way to the caller."""
        conn = self._conn
        if conn is None:
            return self._connect_then(_pack(args))
        return conn.command(_pack(args), self._timeout)

    def execute_parts(self, *parts: Any) -> Awaitable[Any]:
        """`execute_command` for a command given as arguments and `Packed` runs of them."""
        conn = self._conn
        if conn is None:
            return self._connect_then(pack_parts(parts))
        return conn.command(pack_parts(parts), self._timeout)

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Awaitable[Any]:
        return self.execute_command("EVALSHA", sha, numkeys, *keys_and_args)

    async def _connect_then(self, packed: bytes) -> Any:
        conn = await self._connect()
        return await conn.command(packed, self._timeout)

    async def script_load(self, script: str) -> Any:
        return await self.execute_command("SCRIPT", "LOAD", script)

    async def ping(self) -> Any:
        return await self.execute_command("PING")

    async def aclose(self) -> None:
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
        if self._conn is not None:
            self._conn.fail(rx.ConnectionError("the quota Redis client was closed"))

    # -- connections ----------------------------------------------------------------------------------------

    def _forget(self, conn: _Protocol) -> None:
        if self._conn is conn:
            self._conn = None

    async def _connect(self) -> _Protocol:
        if self._closed:
            raise rx.ConnectionError("the quota Redis client is closed")
        # Callers arriving while a connection is being made wait for that one; a caller cancelled meanwhile
        # does not cancel it for the others.
        task = self._connecting
        if task is None or task.done():
            task = self._connecting = asyncio.ensure_future(self._open())
        return await asyncio.shield(task)

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        conn = _Protocol(self, loop)
        try:
            async with asyncio.timeout(self._timeout):
                if self._path is not None:
                    await loop.create_unix_connection(lambda: conn, self._path)
                else:
                    await loop.create_connection(
                        lambda: conn,
                        self._host,
                        self._port,
                        ssl=self._ssl,
                        server_hostname=self._host if self._ssl is not None else None,
                    )
                hello = [conn.command(packed, self._timeout) for packed in self._hello]
                for reply in hello:
                    await reply
        except TimeoutError:
            conn.fail(rx.TimeoutError("Timeout connecting to the quota Redis"))
            raise rx.TimeoutError("Timeout connecting to the quota Redis") from None
        except OSError as exc:
            conn.fail(rx.ConnectionError("cannot connect to the quota Redis"))
            raise rx.ConnectionError(f"cannot connect to the quota Redis: {exc.strerror or exc}") from None
        except rx.ResponseError as exc:
            conn.fail(rx.ConnectionError("the quota Redis refused the connection"))
            raise rx.ConnectionError(f"the quota Redis refused the connection: {exc}") from None
        if conn.lost:
            raise rx.ConnectionError("the connection to the quota Redis was lost")
        self._conn = conn
        return conn
