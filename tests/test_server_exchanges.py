"""Two exchanges on one connection, through the gateway's HTTP server as a real process on loopback: a request
pipelined behind a long stream (its deadlines wait for its turn, and the stream is never cut for it)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from tests.support.admin import tenant_with_key
from tests.support.gateway import GatewayProc, start_gateway
from tests.support.rawhttp import closed_by_peer, connect, post, read_response
from tests.support.sim import SimHandle, start_sim

BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
# 250 tokens at 10 ms each: a stream that lasts longer than the gateway's body deadline below.
STREAM = json.dumps(
    {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 250, "stream": True}
).encode()
BODY_TIMEOUT_S = 1.5


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimHandle]:
    handle = start_sim("--ttft-ms", "0", "--itl-ms", "10", log_dir=tmp_path_factory.mktemp("sim-exchanges"))
    yield handle
    handle.stop()


LIMITS = {
    "client_header_timeout_s": 1.0,
    "client_body_timeout_s": BODY_TIMEOUT_S,
    "keep_alive_timeout_s": 5.0,
    "max_header_bytes": 8192,
}


def gateway_config(sim: SimHandle) -> dict[str, object]:
    return {
        "backends": [{"name": "sim", "kind": "vllm", "url": sim.url}],
        "models": [{"name": "m", "backends": ["sim"]}],
        "limits": LIMITS,
    }


@pytest.fixture(scope="module")
def gw(sim: SimHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProc]:
    proc = start_gateway(gateway_config(sim), tmp_path_factory.mktemp("gw-exchanges"))
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def key(gw: GatewayProc) -> str:
    return tenant_with_key(gw.url, gw.admin_key, "pipeliner")


def stream_is_whole(body: bytes) -> bool:
    return body.rstrip().endswith(b"data: [DONE]")


# -- a request pipelined behind a long stream --------------------------------------------------------------


def test_a_body_pipelined_behind_a_long_stream_is_timed_only_from_its_turn(gw: GatewayProc, key: str) -> None:
    """Request 2's head and a few bytes of its body arrive while request 1 streams for longer than the body
    deadline: the stream ends intact, and request 2's body, finished after the stream, is served."""
    head2, _, body2 = post(key, BODY).partition(b"\r\n\r\n")
    with connect(gw.port) as sock:
        started = time.monotonic()
        sock.sendall(post(key, STREAM) + head2 + b"\r\n\r\n" + body2[:10])
        buf = bytearray()
        status, _, stream = read_response(sock, buf)  # ConnectionError if the connection is cut under it
        assert time.monotonic() - started > BODY_TIMEOUT_S  # the case at hand: request 2 waited that long
        assert status == 200 and stream_is_whole(stream)
        sock.sendall(body2[10:])
        status, _, answer = read_response(sock, buf)
        assert status == 200, answer
        assert json.loads(answer)["object"] == "chat.completion"


def test_a_pipelined_body_that_never_comes_gets_408_after_the_stream(gw: GatewayProc, key: str) -> None:
    head2, _, body2 = post(key, BODY).partition(b"\r\n\r\n")
    with connect(gw.port) as sock:
        sock.sendall(post(key, STREAM) + head2 + b"\r\n\r\n" + body2[:10])
        buf = bytearray()
        status, _, stream = read_response(sock, buf)
        assert status == 200 and stream_is_whole(stream)
        turn = time.monotonic()
        status, headers, answer = read_response(sock, buf)
        assert status == 408 and b"body" in answer and headers["connection"] == "close"
        assert time.monotonic() - turn > BODY_TIMEOUT_S - 0.5  # counted from its turn, not from its head
        assert closed_by_peer(sock, 5)


def test_a_head_pipelined_in_part_behind_a_long_stream_waits_for_its_turn(gw: GatewayProc, key: str) -> None:
    with connect(gw.port) as sock:
        sock.sendall(post(key, STREAM) + b"GET /livez HTTP/1.1\r\nHost: gw\r\n")
        buf = bytearray()
        status, _, stream = read_response(sock, buf)
        assert status == 200 and stream_is_whole(stream)
        sock.sendall(b"\r\n")  # the head's end, well after the header deadline had it counted from its start
        status, _, answer = read_response(sock, buf)
        assert status == 200 and json.loads(answer) == {"status": "ok"}
        # Its turn over, a head never finished gets its 408 as usual.
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: gw\r\n")
        status, headers, answer = read_response(sock, buf)
        assert status == 408 and b"head" in answer and headers["connection"] == "close"


@pytest.mark.parametrize(
    ("second", "status"),
    [
        ([b"NOT HTTP AT ALL\r\n\r\n"], 400),
        ([b"GET /livez HTTP/1.1\r\nHost: gw\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n"], 431),
        # Counted once it is seen unfinished after a read: a head never ending, in reads of 6 KB.
        ([b"GET /livez HTTP/1.1\r\nHost: gw\r\nX-Endless: "] + [b"a" * 6000] * 4, 431),
    ],
    ids=["malformed", "head-too-large", "head-never-ending"],
)
def test_a_bad_request_pipelined_behind_a_long_stream_is_refused_in_its_turn(
    gw: GatewayProc, key: str, second: list[bytes], status: int
) -> None:
    with connect(gw.port) as sock:
        sock.sendall(post(key, STREAM))
        for piece in second:
            time.sleep(0.05)  # separate reads on the server's side
            sock.sendall(piece)
        buf = bytearray()
        got, _, stream = read_response(sock, buf)
        assert got == 200 and stream_is_whole(stream)
        got, headers, answer = read_response(sock, buf)
        assert got == status and headers["connection"] == "close"
        assert json.loads(answer)["error"]["type"] == "invalid_request_error"
        assert closed_by_peer(sock, 5)


def test_a_head_begun_in_the_same_write_as_the_request_before_gets_its_408(gw: GatewayProc) -> None:
    with connect(gw.port) as sock:
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: gw\r\n\r\n" + b"GET /livez HTTP/1.1\r\nHost: gw\r\n")
        buf = bytearray()
        assert read_response(sock, buf)[0] == 200
        status, headers, answer = read_response(sock, buf)
        assert status == 408 and b"head" in answer and headers["connection"] == "close"


def test_an_honest_pipelining_client_gets_both_answers_in_order(gw: GatewayProc, key: str) -> None:
    with connect(gw.port) as sock:
        sock.sendall(post(key, STREAM) + post(key, BODY))
        buf = bytearray()
        status, headers, stream = read_response(sock, buf)
        assert status == 200 and headers["content-type"].startswith("text/event-stream")
        assert stream_is_whole(stream)
        status, _, answer = read_response(sock, buf)
        assert status == 200 and json.loads(answer)["object"] == "chat.completion"


def test_many_pipelined_requests_cut_anywhere_are_all_answered(gw: GatewayProc) -> None:
    """Three hundred small requests (about 23 KB, almost three times the 8 KB head bound) written in pieces
    whose ends fall inside heads: no head is large, so none may be refused as one."""
    request = b"GET /livez HTTP/1.1\r\nHost: gw\r\nX-Filler: " + b"f" * 32 + b"\r\n\r\n"  # 77 bytes
    data = request * 300
    with connect(gw.port) as sock:
        for start in range(0, len(data), 1000):
            sock.sendall(data[start : start + 1000])
            time.sleep(0.001)  # separate reads on the server's side
        buf = bytearray()
        statuses = [read_response(sock, buf)[0] for _ in range(300)]
    assert statuses == [200] * 300
