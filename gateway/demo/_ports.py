"""Ports for the demo: the one the user named, or the first free one from a default; never one in use.

A port the user named that is taken is an error that names the flag, raised before anything has started.
Without a flag, the default and the next few ports are tried, then any port the system hands out.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator

__all__ = ["PortError", "bind_listener", "pick_free_port"]

_NEARBY = 10


class PortError(Exception):
    """A port cannot be used; the message says which flag to change."""


def bind_listener(host: str, port: int | None, default: int, flag: str) -> socket.socket:
    """A socket listening on `port` (or, if None, on the first free port from `default`).

    The caller keeps it and hands it to the server, so no other process can take the port in between.
    """
    for candidate in _candidates(port, default):
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        # As servers do: a port whose last connections linger in TIME_WAIT is free to listen on.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, candidate))
            # Listening now (uvicorn's later listen() only sets the backlog): a port merely bound could
            # still be taken by a server that sets SO_REUSEADDR.
            sock.listen(2048)
        except OSError as exc:
            sock.close()
            _raise_unless_in_use(exc, host, candidate, port, flag)
            continue
        return sock
    raise PortError(f"no free port on {host}; name one with {flag}")  # pragma: no cover - port 0 always binds


def pick_free_port(host: str, port: int | None, default: int, flag: str, avoid: frozenset[int]) -> int:
    """A port that is free now, for a child process to bind (it may still lose a race: check who answers)."""
    for candidate in _candidates(port, default):
        if port is None and candidate in avoid:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            # The child's server sets it too: connections in TIME_WAIT do not make a port taken.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, candidate))
            except OSError as exc:
                _raise_unless_in_use(exc, host, candidate, port, flag)
                continue
            chosen: int = sock.getsockname()[1]
        if chosen not in avoid:
            return chosen
    raise PortError(f"no free port on {host}; name one with {flag}")  # pragma: no cover


def _candidates(port: int | None, default: int) -> Iterator[int]:
    if port is not None:
        yield port
        return
    yield from range(default, default + _NEARBY)
    for _ in range(_NEARBY):
        yield 0


def _raise_unless_in_use(exc: OSError, host: str, candidate: int, named: int | None, flag: str) -> None:
    if exc.errno != errno.EADDRINUSE:
        raise PortError(f"cannot listen on {host}:{candidate}: {exc.strerror}") from None
    if named is not None:
        raise PortError(
            f"port {named} on {host} is in use by another process; pick another with {flag} "
            f"(or leave {flag} out and the demo picks a free one)"
        )
