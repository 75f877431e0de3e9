"""Two exchanges on one connection, through the gateway's HTTP server as a real process on loopback: a request
pipelined behind a long stream (its deadlines wait for its turn, and the stream is never cut for it), and an
answer given before the request's body has arrived (the answer says whether the connection stays open, and
the server keeps its word), over raw sockets and with httpx reusing its connection."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
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
WRONG_KEY = "sk-gw-" + "x" * 43


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


# -- an answer before the body -------------------------------------------------------------------------------


def test_an_early_answer_with_little_body_left_keeps_the_connection(gw: GatewayProc, key: str) -> None:
    """A wrong key is refused before the body is read; the rest of the body is small, so the server reads
    and drops it, and the connection serves the next request."""
    head, _, body = post(WRONG_KEY, BODY).partition(b"\r\n\r\n")
    with connect(gw.port) as sock:
        sock.sendall(head + b"\r\n\r\n" + body[:10])
        buf = bytearray()
        status, headers, answer = read_response(sock, buf)
        assert status == 401 and json.loads(answer)["error"]["code"] == "invalid_api_key"
        assert "connection" not in headers
        sock.sendall(body[10:] + post(key, BODY))
        status, _, answer = read_response(sock, buf)
        assert status == 200, answer


def test_an_early_answer_with_much_body_left_says_close_and_is_readable(gw: GatewayProc, key: str) -> None:
    """A client that writes its whole body before reading, 24 MB where 4 MB are allowed: the 413 comes
    before the body is read and says `connection: close`; the server then reads and drops the rest, so the
    client's writes succeed (no reset) and it reads the answer, then the end of the connection."""
    big = b"x" * (24 << 20)
    with connect(gw.port) as sock:
        sock.sendall(post(key, big))  # more than loopback's socket buffers hold: the server must read it
        status, headers, answer = read_response(sock)
        assert status == 413 and json.loads(answer)["error"]["type"] == "invalid_request_error"
        assert headers["connection"] == "close"
        assert closed_by_peer(sock, 5)


def test_an_early_answer_to_a_client_waiting_for_100_continue_says_close(gw: GatewayProc) -> None:
    head, _, _ = post(WRONG_KEY, BODY, extra=b"Expect: 100-continue\r\n").partition(b"\r\n\r\n")
    with connect(gw.port) as sock:
        sock.sendall(head + b"\r\n\r\n")
        status, headers, _ = read_response(sock)
        assert status == 401 and headers["connection"] == "close"  # the client may never send that body
        assert closed_by_peer(sock, 5)


class Connects:
    """httpcore's trace hook, counting the TCP connections a client opens."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, event: str, info: dict[str, object]) -> None:
        if event == "connection.connect_tcp.complete":
            self.count += 1


def test_httpx_reuses_the_connection_after_an_early_answer(gw: GatewayProc, key: str) -> None:
    def slow_body() -> Iterator[bytes]:
        yield BODY[:10]
        time.sleep(0.3)  # the refusal is written meanwhile
        yield BODY[10:]

    url = gw.url + "/v1/chat/completions"
    connects = Connects()
    with httpx.Client(timeout=10) as client:
        refused = client.post(
            url,
            content=slow_body(),
            headers={"authorization": f"Bearer {WRONG_KEY}", "content-length": str(len(BODY))},
            extensions={"trace": connects},
        )
        assert refused.status_code == 401
        served = client.post(
            url, content=BODY, headers={"authorization": f"Bearer {key}"}, extensions={"trace": connects}
        )
        assert served.status_code == 200
    assert connects.count == 1  # the same connection


def test_httpx_goes_on_after_an_early_answer_that_closes(gw: GatewayProc, key: str) -> None:
    big = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * (3 << 20)}]}).encode()
    url = gw.url + "/v1/chat/completions"
    with httpx.Client(timeout=10) as client:
        refused = client.post(url, content=big, headers={"authorization": f"Bearer {WRONG_KEY}"})
        assert refused.status_code == 401 and refused.headers["connection"] == "close"
        served = client.post(url, content=BODY, headers={"authorization": f"Bearer {key}"})
        assert served.status_code == 200
    # And a body larger than loopback's socket buffers (the 413 comes before it is read): httpx writes it
    # all, reads the answer, and goes on on a new connection.
    with httpx.Client(timeout=10) as client:
        refused = client.post(url, content=b"x" * (24 << 20), headers={"authorization": f"Bearer {key}"})
        assert refused.status_code == 413 and refused.headers["connection"] == "close"
        served = client.post(url, content=BODY, headers={"authorization": f"Bearer {key}"})
        assert served.status_code == 200
