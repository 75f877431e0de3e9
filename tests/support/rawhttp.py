"""HTTP/1.1 over a raw socket, for the tests of the gateway's own HTTP server: what a client library would
hide (pipelining, a body sent in pieces, a head never finished) is written byte by byte here."""

from __future__ import annotations

import socket

__all__ = ["closed_by_peer", "connect", "post", "read_response"]


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_response(sock: socket.socket, buffered: bytearray | None = None) -> tuple[int, dict[str, str], bytes]:
    """One response (content-length or chunked) from `sock`; leftover bytes stay in `buffered`. A chunked
    body is returned only once its terminating chunk arrived (ConnectionError if the connection ends first)."""
    buf = buffered if buffered is not None else bytearray()

    def fill() -> None:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        buf.extend(chunk)

    while b"\r\n\r\n" not in buf:
        fill()
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    buf[:] = rest
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    if status == 100:
        return status, headers, b""
    if "content-length" in headers:
        length = int(headers["content-length"])
        while len(buf) < length:
            fill()
        body = bytes(buf[:length])
        buf[:] = buf[length:]
        return status, headers, body
    body = bytearray()
    while True:
        while b"\r\n" not in buf:
            fill()
        size_line, _, rest = bytes(buf).partition(b"\r\n")
        size = int(size_line, 16)
        buf[:] = rest
        while len(buf) < size + 2:
            fill()
        body += buf[:size]
        buf[:] = buf[size + 2 :]
        if size == 0:
            return status, headers, bytes(body)


def closed_by_peer(sock: socket.socket, within_s: float) -> bool:
    """Does the peer close the connection within `within_s` (whatever it sends before)?"""
    sock.settimeout(within_s)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return True


def post(key: str, body: bytes, extra: bytes = b"", path: bytes = b"/v1/chat/completions") -> bytes:
    """A POST with a JSON body and a bearer key, as bytes."""
    return (
        b"POST "
        + path
        + b" HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        + b"Authorization: Bearer "
        + key.encode()
        + b"\r\nContent-Length: %d\r\n" % len(body)
        + extra
        + b"\r\n"
        + body
    )
