"""gateway.wire.httpclient against real servers on loopback: raw asyncio servers scripted byte by byte (for the
faults a real server only makes by accident), aiohttp.web, and the simulator as a real process.

The raw servers run in the test's own event loop; that changes nothing for the client, which only sees a
socket. Most tests run on the default asyncio loop (the session loop of pytest-asyncio); `test_under_uvloop`
runs the ones that touch transports most (flow control, cancellation, retries) again on uvloop, the loop the
gateway runs on.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import uvloop
from aiohttp import web

from gateway.wire.httpclient import HIGH_WATER, ConnectError, Pool, ProtocolError, ReadTimeout
from tests.support.procs import free_port
from tests.support.sim import SimHandle, start_sim

CHAT = "/v1/chat/completions"

# --------------------------------------------------------------------------- a raw HTTP/1.1 server


@dataclass
class Request:
    method: str
    target: str
    head: bytes
    headers: dict[str, str]
    body: bytes
    index: int  # position of the request on its connection (0: the first)
    number: int  # position among all requests the server received (0: the first)


Respond = Callable[[Request, asyncio.StreamWriter], Awaitable[bool | None]]


class RawServer:
    """Reads each request (head, then a Content-Length body) and lets `respond` write whatever it likes;
    `respond` returns False to close the connection. Counts connections and requests."""

    def __init__(self, respond: Respond, tls: ssl.SSLContext | None = None) -> None:
        self.respond = respond
        self.tls = tls
        self.connections = 0
        self.requests: list[Request] = []
        self.closed = 0  # connections that ended, from either side
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, backlog=1024, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        self.url = f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.connections += 1
        index = 0
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ")
                headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:] if line)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                request = Request(method, target, head, headers, body, index, len(self.requests))
                self.requests.append(request)
                index += 1
                if await self.respond(request, writer) is False:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        except asyncio.CancelledError:
            return  # the server is shutting down (__aexit__); asyncio.start_server would log a cancelled task
        finally:
            self.closed += 1
            self._writers.discard(writer)
            writer.transport.abort()
            self._tasks.discard(task)


def http_response(body: bytes, status: str = "200 OK", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 %s\r\nContent-Length: %d\r\n%s\r\n%s" % (status.encode(), len(body), extra, body)


async def answer(request: Request, writer: asyncio.StreamWriter) -> None:
    """Echo the request body after 'ok:'."""
    writer.write(http_response(b"ok:" + request.body, extra=b"Content-Type: text/plain\r\nX-Multi: a\r\n"))


def chunked_head() -> bytes:
    return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/event-stream\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def eventually(predicate: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def rst_close(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset rather than a FIN (SO_LINGER 0)."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimHandle]:
    handle = start_sim(
        "--ttft-ms", "0", "--itl-ms", "20", "--prefill-us-per-token", "0", log_dir=tmp_path_factory.mktemp("sim")
    )
    yield handle
    handle.stop()


@pytest.fixture
def fresh_sim(sim: SimHandle) -> SimHandle:
    sim.reset()
    return sim


def chat(max_tokens: int, stream: bool = False) -> bytes:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens}
    if stream:
        body["stream"] = True
    return orjson.dumps(body)


JSON = {"content-type": "application/json"}


def events(data: bytes) -> list[bytes]:
    return [e for e in data.split(b"\n\n") if e.startswith(b"data: ")]


# --------------------------------------------------------------------------- bodies


async def test_content_length_body_and_head() -> None:
    async with RawServer(answer) as server:
        pool = Pool(server.url + "/base/")
        async with await pool.request("POST", "/v1/x", b"hello", {"Content-Type": "text/plain", "X-Id": "7"}) as r:
            assert r.status == 200
            assert r.header(b"content-type") == b"text/plain"
            assert (b"x-multi", b"a") in r.headers
            assert await r.read() == b"ok:hello"
        await pool.close()
        head = server.requests[0].head.decode()
        assert head.startswith("POST /base/v1/x HTTP/1.1\r\n")
        assert server.requests[0].headers == {
            "host": f"127.0.0.1:{server.port}",
            "connection": "keep-alive",
            "content-length": "5",
            "content-type": "text/plain",
            "x-id": "7",
        }


async def test_head_from_byte_headers_drops_framing_headers() -> None:
    async with RawServer(answer) as server:
        pool = Pool(server.url)
        headers = [(b"x-a", b"1"), (b"Content-Length", b"999"), (b"Transfer-Encoding", b"chunked"), (b"x-a", b"2")]
        async with await pool.request("POST", "/p", b"abc", headers) as r:
            assert await r.read() == b"ok:abc"
        async with await pool.request("GET", "/g") as r:
            assert await r.read() == b"ok:"
        await pool.close()
        first, second = (req.head.decode() for req in server.requests)
        assert "Content-Length: 3\r\n" in first and "999" not in first and "chunked" not in first
        assert "x-a: 1\r\n" in first and "x-a: 2\r\n" in first
        assert "content-length" not in second.lower()  # a GET without a body says nothing of one


async def test_unsafe_requests_are_refused() -> None:
    pool = Pool("http://127.0.0.1:9")
    for headers in ({"x-a": "1\r\nx-injected: 1"}, [(b"x-a\r\nx-b", b"1")], {"x-a": "1\n"}, {"x-a": "\r"}):
        with pytest.raises(ValueError):
            await pool.request("POST", "/", b"", headers)
    with pytest.raises(ValueError):
        await pool.request("POST", "/a b")
    with pytest.raises(ValueError):
        await pool.request("POST", "/a\r\nb")
    with pytest.raises(ValueError):
        await pool.request("HEAD", "/")
    with pytest.raises(ValueError):
        Pool("ftp://example.com")
    await pool.close()


async def test_chunked_body() -> None:
    parts = [b"first ", b"second ", b"x" * 70_000, b" last"]

    async def respond(request: Request, writer: asyncio.StreamWriter) -> None:
        writer.write(chunked_head())
        for part in parts:
            writer.write(chunk(part))
            await writer.drain()
            await asyncio.sleep(0.01)
        writer.write(b"0\r\n\r\n")

    async with RawServer(respond) as server:
        pool = Pool(server.url)
        async with await pool.request("POST", "/", b"") as r:
            assert await r.read() == b"".join(parts)
        async with await pool.request("POST", "/", b"") as r:
            received = [c async for c in r]
        assert b"".join(received) == b"".join(parts)
        assert len(received) >= 3  # arrived (and was yielded) in pieces
        assert server.connections == 1  # a chunked response ends cleanly: the connection is reused
        await pool.close()


async def test_body_delimited_by_close() -> None:
    async def respond(request: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
        await writer.drain()
        writer.write(b" until the end")
        return False

    async with RawServer(respond) as server:
        pool = Pool(server.url)
        for _ in range(2):
            async with await pool.request("POST", "/", b"") as r:
                assert await r.read() == b"all of it until the end"
        assert server.connections == 2
        assert pool.connections == 0
        await pool.close()


async def test_informational_responses_are_skipped() -> None:
    async def respond(request: Request, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n")
        await writer.drain()
        writer.write(http_response(b"final", "201 Created"))

    async with RawServer(respond) as server:
        pool = Pool(server.url)
        for _ in range(2):
            async with await pool.request("POST", "/", b"") as r:
                assert (r.status, await r.read()) == (201, b"final")
                assert r.header(b"link") is None
        assert server.connections == 1
        await pool.close()


async def test_invalid_response_is_a_protocol_error() -> None:
    async def respond(request: Request, writer: asyncio.StreamWriter) -> None:
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")

    async with RawServer(respond) as server:
        pool = Pool(server.url)
        with pytest.raises(ProtocolError):
            await pool.request("POST", "/", b"")
        assert pool.connections == 0
        await pool.close()


async def test_one_megabyte_both_ways() -> None:
    payload = os.urandom(1 << 20)

    async def echo(request: web.Request) -> web.StreamResponse:
        data = await request.read()
        if request.query.get("chunked"):
            response = web.StreamResponse()
            response.enable_chunked_encoding()
            await response.prepare(request)
            for i in range(0, len(data), 100_000):
                await response.write(data[i : i + 100_000])
            await response.write_eof()
            return response
        return web.Response(body=data)

    async with aiohttp_server({"/echo": echo}) as url:
        pool = Pool(url)
        for path in ("/echo", "/echo?chunked=1"):
            async with await pool.request("POST", path, payload, {"content-type": "application/octet-stream"}) as r:
                assert r.status == 200
                got = await r.read()
            assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
        assert pool.connections == 1
        await pool.close()


async def test_many_concurrent_requests() -> None:
    async def echo(request: web.Request) -> web.Response:
        await asyncio.sleep(0.01)
        return web.Response(body=b"re:" + await request.read())

    async with aiohttp_server({"/echo": echo}) as url:
        pool = Pool(url, max_idle=64)

        async def one(i: int) -> bytes:
            async with await pool.request("POST", "/echo", b"%d" % i, JSON) as r:
                return await r.read()

        results = await asyncio.gather(*(one(i) for i in range(200)))
        assert results == [b"re:%d" % i for i in range(200)]
        assert pool.idle_connections == 64  # the rest were closed as they came back
        await pool.close()
        assert pool.connections == 0


@contextlib.asynccontextmanager
async def aiohttp_server(routes: dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]]) -> Any:
    app = web.Application(client_max_size=4 << 20)
    for path, handler in routes.items():
        app.router.add_post(path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=1024)  # 200 connections at once
    await site.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made by the openssl command."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    tmp = tmp_path_factory.mktemp("tls")
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    command = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    command += ["-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1"]
    command += ["-addext", "subjectAltName=IP:127.0.0.1"]
    subprocess.run(command, check=True, capture_output=True)
    return cert, key


async def test_https(self_signed: tuple[Path, Path]) -> None:
    cert, key = self_signed
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    async with RawServer(answer, tls=server_tls) as server:
        pool = Pool(server.url, ssl_context=ssl.create_default_context(cafile=str(cert)))
        for i in range(3):
            async with await pool.request("POST", "/", b"%d" % i) as r:
                assert await r.read() == b"ok:%d" % i
        assert server.connections == 1
        await pool.close()
        untrusting = Pool(server.url)  # the system's CAs do not know this certificate
        with pytest.raises(ConnectError):
            await untrusting.request("POST", "/", b"")
        await untrusting.close()


# --------------------------------------------------------------------------- keep-alive and the pool


async def test_keep_alive_reuse() -> None:
    async with RawServer(answer) as server:
        pool = Pool(server.url)
        for i in range(20):
            async with await pool.request("POST", "/", b"%d" % i) as r:
                assert await r.read() == b"ok:%d" % i
        assert server.connections == 1
        r.close()  # closing a response that had arrived in full leaves its connection alone
        assert pool.idle_connections == 1
        await asyncio.sleep(0.01)
        assert server.closed == 0

        async def one(i: int) -> bytes:
            async with await pool.request("POST", "/", b"%d" % i) as r:
                return await r.read()

        assert await asyncio.gather(*(one(i) for i in range(10))) == [b"ok:%d" % i for i in range(10)]
        opened = server.connections
        assert opened <= 10
        for i in range(10):  # sequential requests reuse what the burst opened
            assert await one(i) == b"ok:%d" % i
        assert server.connections == opened
        await pool.close()
        await eventually(lambda: server.closed == opened)  # close() closed them all


async def test_connection_close_answer_is_not_reused() -> None:
    async def respond(request: Request, writer: asyncio.StreamWriter) -> None:
        writer.write(http_response(b"bye", extra=b"Connection: close\r\n"))

    async with RawServer(respond) as server:
        pool = Pool(server.url)
        for _ in range(3):
            async with await pool.request("POST", "/", b"") as r:
                assert await r.read() == b"bye"
        assert server.connections == 3
        assert pool.idle_connections == 0
        await pool.close()


async def test_server_closing_idle_connections() -> None:
    async def respond(request: Request, writer: asyncio.StreamWriter) -> bool:
        await answer(request, writer)
        await writer.drain()
        await asyncio.sleep(0.05)  # then close the idle connection, as a keep-alive timeout does
        return False

    async with RawServer(respond) as server:
        pool = Pool(server.url)
        for i in range(3):
            async with await pool.request("POST", "/", b"%d" % i) as r:
                assert await r.read() == b"ok:%d" % i
            await eventually(lambda: pool.connections == 0)  # noticed while idle, and dropped
        assert server.connections == 3
        assert len(server.requests) == 3  # nothing needed a retry
        await pool.close()


async def test_idle_timeout_and_max_idle() -> None:
    async with RawServer(answer) as server:
        pool = Pool(server.url, idle_timeout_s=0.15, max_idle=2)

        async def one() -> None:
            async with await pool.request("POST", "/", b"") as r:
                await r.read()

        await asyncio.gather(*(one() for _ in range(6)))
        assert pool.idle_connections == 2
        await eventually(lambda: server.closed == server.connections - 2)
        await eventually(lambda: pool.connections == 0, within=2)  # the sweeper closed the last two
        await eventually(lambda: server.closed == server.connections)
        opened = server.connections
        await one()
        assert server.connections == opened + 1
        await pool.close()


async def test_pool_close() -> None:
    async def respond(request: Request, writer: asyncio.StreamWriter) -> None:
        if request.target == "/slow":
            writer.write(chunked_head() + chunk(b"part"))  # and the rest never comes
        else:
            await asyncio.sleep(0.05)
            await answer(request, writer)

    async with RawServer(respond) as server:
        pool = Pool(server.url)

        async def one() -> None:
            async with await pool.request("POST", "/", b"") as r:
                await r.read()

        await asyncio.gather(one(), one())  # two connections
        slow = await pool.request("POST", "/slow", b"")  # one busy, one idle
        assert await anext(slow) == b"part"
        assert pool.connections == 2
        await pool.close()
        with pytest.raises(ProtocolError):
            await anext(slow)
        with pytest.raises(ConnectError):
            await pool.request("POST", "/", b"")
        await eventually(lambda: server.closed == 2)


# --------------------------------------------------------------------------- retries


@pytest.mark.parametrize("how", ["fin", "rst"])
async def test_stale_reused_connection_is_retried_once(how: str) -> None:
    """The second request on every connection finds the server gone: it is sent again on a new one."""

    async def respond(request: Request, writer: asyncio.StreamWriter) -> bool | None:
        if request.index == 1:
            if how == "rst":
                rst_close(writer)
            return False
        await answer(request, writer)
        return None

    async with RawServer(respond) as server:
        pool = Pool(server.url)
        for i in range(3):
            async with await pool.request("POST", "/", b"%d" % i) as r:
                assert await r.read() == b"ok:%d" % i
        # 0 on conn 1; 1 on conn 1 (dropped) then on conn 2; 2 on conn 2 (dropped) then on conn 3
        assert [r.body for r in server.requests] == [b"0", b"1", b"1", b"2", b"2"]
        assert server.connections == 3
        await pool.close()


async def test_retry_happens_only_once() -> None:
    async def respond(request: Request, writer: asyncio.StreamWriter) -> bool | None:
        if request.number > 0:
            return False  # everything after the first request: closed without an answer
        await answer(request, writer)
        return None

    async with RawServer(respond) as server:
        pool = Pool(server.url)
        async with await pool.request("POST", "/", b"a") as r:
            await r.read()
        with pytest.raises(ProtocolError):
            await pool.request("POST", "/", b"b")
        assert [r.body for r in server.requests] == [b"a", b"b", b"b"]
        await pool.close()


async def test_no_retry_on_a_new_connection_or_after_a_byte() -> None:
    async def respond(request: Request, writer: asyncio.StreamWriter) -> bool | None:
        if request.body == b"partial":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Le")
            await writer.drain()
        if request.body in (b"close", b"partial"):
            return False
        await answer(request, writer)
        return None

    async with RawServer(respond) as server:
        pool = Pool(server.url)
        with pytest.raises(ProtocolError):  # a new connection: never retried
            await pool.request("POST", "/", b"close")
        assert len(server.requests) == 1
        async with await pool.request("POST", "/", b"warm") as r:
            await r.read()
        with pytest.raises(ProtocolError):  # reused, but a byte of the answer had arrived
            await pool.request("POST", "/", b"partial")
        assert [r.body for r in server.requests] == [b"close", b"warm", b"partial"]
        await pool.close()


async def test_simulator_close_connection(fresh_sim: SimHandle) -> None:
    """The simulator's close_connection fault on a new connection fails; on a reused one it is retried,
    so the simulator sees that request twice (what a backend crashing after reading a request gets)."""
    fresh_sim.set_faults("close_connection", count=1)
    pool = Pool(fresh_sim.url)
    with pytest.raises(ProtocolError):
        await pool.request("POST", CHAT, chat(2), JSON)
    assert fresh_sim.stats()["requests"] == 1
    async with await pool.request("POST", CHAT, chat(2), JSON) as r:
        assert r.status == 200
        await r.read()
    fresh_sim.set_faults("close_connection", count=1)
    async with await pool.request("POST", CHAT, chat(2), JSON) as r:
        assert r.status == 200
        await r.read()
    stats = fresh_sim.stats()
    assert (stats["requests"], stats["faulted"], stats["completed"]) == (4, 2, 2)
    await pool.close()


# --------------------------------------------------------------------------- failures and timeouts


async def test_connect_refused_is_fast() -> None:
    pool = Pool(f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    with pytest.raises(ConnectError):
        await pool.request("POST", "/", b"")
    assert time.monotonic() - started < 1
    await pool.close()


async def test_connect_timeout() -> None:
    # A listening socket that never accepts, with its backlog full: the kernel drops further SYNs.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = []
        try:
            for _ in range(4):
                filler = socket.socket()
                filler.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    filler.connect(("127.0.0.1", port))
                fillers.append(filler)
            await asyncio.sleep(0.05)
            pool = Pool(f"http://127.0.0.1:{port}", connect_timeout_s=0.2)
            started = time.monotonic()
            with pytest.raises(ConnectError, match="timed out"):
                await pool.request("POST", "/", b"")
            assert time.monotonic() - started < 1
            await pool.close()
        finally:
            for filler in fillers:
                filler.close()


async def test_hang_is_a_read_timeout_and_the_backend_sees_it(fresh_sim: SimHandle) -> None:
    fresh_sim.set_faults("hang", count=1)
    pool = Pool(fresh_sim.url, read_timeout_s=0.3)
    started = time.monotonic()
    with pytest.raises(ReadTimeout):
        await pool.request("POST", CHAT, chat(2), JSON)
    assert 0.25 < time.monotonic() - started < 2
    assert pool.connections == 0
    await eventually(lambda: fresh_sim.stats()["cancelled"] == 1)
    await pool.close()


async def test_read_timeout_between_chunks_not_while_data_flows() -> None:
    async def respond(request: Request, writer: asyncio.StreamWriter) -> None:
        writer.write(chunked_head())
        for _ in range(6):  # a steady trickle for twice the timeout, each gap well under it
            writer.write(chunk(b"tick"))
            await writer.drain()
            await asyncio.sleep(0.1)
        if request.body == b"then stall":
            await asyncio.sleep(10)
        writer.write(b"0\r\n\r\n")

    async with RawServer(respond) as server:
        pool = Pool(server.url, read_timeout_s=0.3)
        async with await pool.request("POST", "/", b"") as r:
            assert await r.read() == b"tick" * 6
        received = b""
        async with await pool.request("POST", "/", b"then stall") as r:
            with pytest.raises(ReadTimeout):
                async for part in r:
                    received += part
        assert received == b"tick" * 6
        await pool.close()


async def test_per_request_read_timeout() -> None:
    """A connection's timer outlives its requests; a shorter or longer timeout on the next one still holds."""

    async def respond(request: Request, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(float(request.body))
        await answer(request, writer)

    async with RawServer(respond) as server:
        pool = Pool(server.url, read_timeout_s=60)
        async with await pool.request("POST", "/", b"0") as r:  # leaves a timer pending for 60 s
            await r.read()
        started = time.monotonic()
        with pytest.raises(ReadTimeout):
            await pool.request("POST", "/", b"5", read_timeout_s=0.2)
        assert time.monotonic() - started < 1
        async with await pool.request("POST", "/", b"0", read_timeout_s=0.1) as r:  # a 0.1 s timer pending
            await r.read()
        async with await pool.request("POST", "/", b"0.3", read_timeout_s=5) as r:  # outlasts it
            assert await r.read() == b"ok:0.3"
        assert server.connections == 2
        await pool.close()


async def test_drop_mid_stream_after_the_chunks_received(fresh_sim: SimHandle) -> None:
    fresh_sim.set_faults("drop_midstream", count=1, after_tokens=3)
    pool = Pool(fresh_sim.url)
    received = b""
    async with await pool.request("POST", CHAT, chat(10, stream=True), JSON) as r:
        assert r.status == 200
        with pytest.raises(ProtocolError):
            async for part in r:
                received += part
    assert len(events(received)) == 4  # the role chunk and 3 tokens, then the cut
    assert pool.connections == 0
    await pool.close()


async def test_drop_mid_body_of_a_unary_answer(fresh_sim: SimHandle) -> None:
    fresh_sim.set_faults("drop_midstream", count=1)
    pool = Pool(fresh_sim.url)
    async with await pool.request("POST", CHAT, chat(4), JSON) as r:
        with pytest.raises(ProtocolError):
            await r.read()
    await pool.close()


# --------------------------------------------------------------------------- streaming, cancellation


async def test_sse_chunks_arrive_as_they_are_sent(fresh_sim: SimHandle) -> None:
    pool = Pool(fresh_sim.url)
    arrivals: list[tuple[float, bytes]] = []
    async with await pool.request("POST", CHAT, chat(8, stream=True), JSON) as r:
        assert r.header(b"content-type") == b"text/event-stream; charset=utf-8"
        async for part in r:
            arrivals.append((time.monotonic(), part))
            if len(arrivals) == 1:
                assert not r.complete  # the first event is in hand while the backend still generates
    data = b"".join(part for _, part in arrivals)
    assert events(data)[-1] == b"data: [DONE]"
    # 8 tokens 20 ms apart: separate arrivals, spread over the generation time, not one burst at the end.
    assert len(arrivals) >= 6
    assert arrivals[-1][0] - arrivals[0][0] >= 0.1
    assert pool.idle_connections == 1
    await pool.close()


async def test_cancelling_mid_stream_closes_the_backend_connection(fresh_sim: SimHandle) -> None:
    pool = Pool(fresh_sim.url)
    got_two = asyncio.Event()

    async def relay() -> None:
        async with await pool.request("POST", CHAT, chat(100, stream=True), JSON) as r:
            seen = 0
            async for _ in r:
                seen += 1
                if seen == 2:
                    got_two.set()

    task = asyncio.ensure_future(relay())
    await asyncio.wait_for(got_two.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pool.connections == 0
    await eventually(lambda: fresh_sim.stats()["cancelled"] == 1)
    await pool.close()


async def test_closing_a_response_or_cancelling_before_the_head(fresh_sim: SimHandle) -> None:
    pool = Pool(fresh_sim.url)
    r = await pool.request("POST", CHAT, chat(100, stream=True), JSON)
    await anext(r)
    r.release()  # not read to the end: closed, not pooled
    with pytest.raises(ProtocolError):
        await anext(r)
    assert pool.connections == 0
    await eventually(lambda: fresh_sim.stats()["cancelled"] == 1)

    fresh_sim.set_faults("hang", count=1)
    task = asyncio.ensure_future(pool.request("POST", CHAT, chat(2), JSON))
    await eventually(lambda: fresh_sim.stats()["active"] == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await eventually(lambda: fresh_sim.stats()["cancelled"] == 2)
    assert pool.connections == 0
    await pool.close()


async def test_cancelling_read_closes_the_connection() -> None:
    async def respond(request: Request, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf!")  # and the rest never comes

    async with RawServer(respond) as server:
        pool = Pool(server.url)
        r = await pool.request("POST", "/", b"")
        task = asyncio.ensure_future(r.read())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await eventually(lambda: server.closed == 1)
        assert pool.connections == 0
        await pool.close()


async def test_slow_consumer_pauses_the_transport() -> None:
    total = 8 << 20
    piece = os.urandom(64 * 1024)
    digest = hashlib.sha256(piece * (total // len(piece))).digest()
    server_done = asyncio.Event()

    async def respond(request: Request, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        for _ in range(total // len(piece)):
            writer.write(piece)
            await writer.drain()  # blocks once the client stops reading and the socket buffers fill
        server_done.set()

    async with RawServer(respond) as server:
        pool = Pool(server.url)
        async with await pool.request("POST", "/", b"") as r:
            hasher = hashlib.sha256()
            hasher.update(await anext(r))
            await asyncio.sleep(0.3)  # a slow client: the backend keeps sending meanwhile
            conn = r._conn
            assert conn is not None and conn.paused
            assert r._buffered <= HIGH_WATER + 256 * 1024  # bounded: one socket read past the mark at most
            assert not server_done.is_set()  # back-pressure reached the server
            async for part in r:
                hasher.update(part)
            assert hasher.digest() == digest
        assert pool.idle_connections == 1  # read to the end: reusable, and reading again
        async with await pool.request("POST", "/", b"") as r:
            assert len(await r.read()) == total
        assert server.connections == 1
        await pool.close()


async def test_a_consumer_slower_than_the_read_timeout_is_not_a_timeout() -> None:
    """While the transport is paused for its consumer, the backend is not the one that is silent."""
    total = 4 << 20

    async def respond(request: Request, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        for _ in range(total // 65536):
            writer.write(b"x" * 65536)
            await writer.drain()

    async with RawServer(respond) as server:
        pool = Pool(server.url, read_timeout_s=0.2)
        async with await pool.request("POST", "/", b"") as r:
            received = len(await anext(r))
            await asyncio.sleep(0.7)  # paused meanwhile: more than three read timeouts
            conn = r._conn
            assert conn is not None and conn.paused
            async for part in r:
                received += len(part)
        assert received == total
        await pool.close()


# --------------------------------------------------------------------------- the same on uvloop


def test_under_uvloop(sim: SimHandle) -> None:
    scenarios: list[Callable[[], Coroutine[Any, Any, None]]] = [
        test_content_length_body_and_head,
        test_chunked_body,
        test_body_delimited_by_close,
        test_keep_alive_reuse,
        test_server_closing_idle_connections,
        lambda: test_stale_reused_connection_is_retried_once("fin"),
        lambda: test_stale_reused_connection_is_retried_once("rst"),
        test_no_retry_on_a_new_connection_or_after_a_byte,
        test_connect_refused_is_fast,
        test_read_timeout_between_chunks_not_while_data_flows,
        test_cancelling_read_closes_the_connection,
        test_slow_consumer_pauses_the_transport,
        test_a_consumer_slower_than_the_read_timeout_is_not_a_timeout,
        test_per_request_read_timeout,
        test_many_concurrent_requests,
    ]
    sim_scenarios: list[Callable[[SimHandle], Coroutine[Any, Any, None]]] = [
        test_sse_chunks_arrive_as_they_are_sent,
        test_cancelling_mid_stream_closes_the_backend_connection,
        test_drop_mid_stream_after_the_chunks_received,
    ]
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        for scenario in scenarios:
            runner.run(scenario())
        for sim_scenario in sim_scenarios:
            sim.reset()
            runner.run(sim_scenario(sim))
