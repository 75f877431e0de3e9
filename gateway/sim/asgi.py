"""ASGI plumbing the app needs and no framework provides cheaply: reading a bounded body, sending bytes,
noticing a client that went away while the request waits, and cutting a connection on purpose."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, MutableMapping
from types import TracebackType
from typing import Any

from gateway.sim.errors import SimError

__all__ = [
    "ClientGone",
    "ConnectionDropped",
    "Message",
    "Receive",
    "Scope",
    "Send",
    "cancel_on_disconnect",
    "close_connection",
    "read_body",
    "send_body",
    "wait_disconnect",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

JSON = b"application/json"


class ClientGone(Exception):
    """The client closed the connection before the response was complete."""


class ConnectionDropped(Exception):
    """Raised to make the server cut the connection when the transport is out of the app's reach."""


async def read_body(receive: Receive, limit: int) -> bytes:
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientGone
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False) and len(body) <= limit:
        return body
    parts = [body]
    size = len(body)
    while message.get("more_body", False):
        if size > limit:
            raise SimError(413, f"the request body is larger than {limit} bytes")
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk: bytes = message.get("body", b"")
        parts.append(chunk)
        size += len(chunk)
    if size > limit:
        raise SimError(413, f"the request body is larger than {limit} bytes")
    return b"".join(parts)


async def send_body(send: Send, status: int, body: bytes, content_type: bytes = JSON) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", content_type), (b"content-length", b"%d" % len(body))],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class cancel_on_disconnect:
    """Cancel the enclosed block as soon as the client disconnects, and raise ClientGone instead.

    The server only tells the app about a disconnect through `receive()`, which nothing calls while a
    request waits in the queue or sleeps through prefill; a watcher task does, and cancels the request's
    own task, so every `finally` on the way out (freeing the slot) runs at once.
    """

    __slots__ = ("_gone", "_receive", "_task", "_watcher")

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._gone = False

    async def __aenter__(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._watcher = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        await wait_disconnect(self._receive)
        self._gone = True
        self._task.cancel()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        self._watcher.cancel()
        if self._gone:
            # The cancellation was ours, not the server's: take it back and say what happened.
            self._task.uncancel()
            raise ClientGone from None
        return False


async def close_connection(receive: Receive) -> None:
    """Close the client's connection without completing the response: a real transport fault.

    ASGI cannot express this. Under uvicorn, `receive` is a bound method of the request cycle, which
    holds the transport; elsewhere the app raises instead, and the server aborts the response itself
    (after logging the exception).
    """
    transport = getattr(getattr(receive, "__self__", None), "transport", None)
    if transport is None or not callable(getattr(transport, "close", None)):
        raise ConnectionDropped
    transport.close()
    # Return only once the server has seen the connection go, or it would log the unfinished
    # response as an error of the app.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(1.0):
            await wait_disconnect(receive)
