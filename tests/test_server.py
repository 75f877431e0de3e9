"""The gateway's own HTTP/1.1 server protocol over raw sockets: keep-alive, pipelining, chunked bodies,
`Expect: 100-continue`, HEAD, and what it does to slow or oversized clients (408, 431, 400), with the
gateway a real process on loopback and the simulator behind it."""

from __future__ import annotations

import json
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.support.admin import tenant_with_key
from tests.support.gateway import GatewayProc, start_gateway
from tests.support.procs import wait_http
from tests.support.rawhttp import closed_by_peer, connect, post, read_response
from tests.support.sim import SimHandle, start_sim

BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimHandle]:
    handle = start_sim(
        "--ttft-ms", "0", "--itl-ms", "0", "--max-model-len", "2000000", log_dir=tmp_path_factory.mktemp("sim-srv")
    )
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def gw(sim: SimHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProc]:
    workdir = tmp_path_factory.mktemp("gw-srv")
    config = {
        "backends": [{"name": "sim", "kind": "vllm", "url": sim.url}],
        "models": [{"name": "m", "backends": ["sim"]}],
        "billing": {"sinks": [{"kind": "jsonl", "path": str(workdir / "billing.jsonl")}]},
        "limits": {
            "client_header_timeout_s": 1.0,
            "client_body_timeout_s": 1.5,
            "keep_alive_timeout_s": 2.0,
            "max_header_bytes": 8192,
            "max_tokens_cap": 1_000_000,
        },
    }
    proc = start_gateway(config, workdir)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def key(gw: GatewayProc) -> str:
    return tenant_with_key(gw.url, gw.admin_key, "raw")


def test_keep_alive_serves_many_requests_on_one_connection(gw: GatewayProc, key: str) -> None:
    with connect(gw.port) as sock:
        for _ in range(5):
            sock.sendall(post(key, BODY))
            status, headers, body = read_response(sock)
            assert status == 200, body
            assert headers["content-length"] == str(len(body))
            assert json.loads(body)["object"] == "chat.completion"
            assert headers["x-request-id"].startswith("req_")
            assert "date" in headers and "server" not in headers


def test_pipelined_requests_are_answered_in_order(gw: GatewayProc, key: str) -> None:
    with connect(gw.port) as sock:
        sock.sendall(
            b"GET /livez HTTP/1.1\r\nHost: gw\r\n\r\n" + post(key, BODY) + b"GET /readyz HTTP/1.1\r\nHost: gw\r\n\r\n"
        )
        buf = bytearray()
        first, second, third = (read_response(sock, buf) for _ in range(3))
        assert first[0] == 200 and json.loads(first[2]) == {"status": "ok"}
        assert second[0] == 200 and json.loads(second[2])["object"] == "chat.completion"
        assert third[0] == 200 and json.loads(third[2]) == {"status": "ready"}


def test_chunked_request_body(gw: GatewayProc, key: str) -> None:
    half = len(BODY) // 2
    chunked = b"%x\r\n%b\r\n%x\r\n%b\r\n0\r\n\r\n" % (half, BODY[:half], len(BODY) - half, BODY[half:])
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n"
        b"Authorization: Bearer " + key.encode() + b"\r\n\r\n"
    )
    with connect(gw.port) as sock:
        sock.sendall(head + chunked)
        status, _, body = read_response(sock)
        assert status == 200, body


def test_expect_100_continue(gw: GatewayProc, key: str) -> None:
    request = post(key, BODY, extra=b"Expect: 100-continue\r\n")
    head, _, body = request.partition(b"\r\n\r\n")
    with connect(gw.port) as sock:
        sock.sendall(head + b"\r\n\r\n")
        buf = bytearray()
        status, _, _ = read_response(sock, buf)
        assert status == 100  # asked for before the body was sent
        sock.sendall(body)
        status, _, answer = read_response(sock, buf)
        assert status == 200, answer


def test_a_refusal_before_the_body_is_read_does_not_wait_for_it(gw: GatewayProc) -> None:
    # No key: the gateway answers 401 at once, without a 100 Continue, and closes (the body never came).
    request = post("sk-gw-" + "x" * 43, BODY, extra=b"Expect: 100-continue\r\n")
    head, _, _ = request.partition(b"\r\n\r\n")
    with connect(gw.port) as sock:
        sock.sendall(head + b"\r\n\r\n")
        status, headers, body = read_response(sock)
        assert status == 401, body
        assert json.loads(body)["error"]["code"] == "invalid_api_key"
        assert headers.get("connection") == "close" or closed_by_peer(sock, 2)


def test_head_has_no_body(gw: GatewayProc) -> None:
    with connect(gw.port) as sock:
        sock.sendall(b"HEAD /livez HTTP/1.1\r\nHost: gw\r\n\r\nGET /livez HTTP/1.1\r\nHost: gw\r\n\r\n")
        data = b""
        deadline = time.monotonic() + 5
        while data.count(b"HTTP/1.1 200") < 2 and time.monotonic() < deadline:
            data += sock.recv(65536)
        first, _, second = data.partition(b"\r\n\r\n")
        assert b"content-length: 15" in first
        assert second.startswith(b"HTTP/1.1 200")  # nothing between the HEAD answer and the next one


def test_http_1_0_closes_after_the_answer(gw: GatewayProc) -> None:
    with connect(gw.port) as sock:
        sock.sendall(b"GET /livez HTTP/1.0\r\n\r\n")
        status, headers, _ = read_response(sock)
        assert status == 200 and headers["connection"] == "close"
        assert closed_by_peer(sock, 2)


def test_a_head_never_finished_gets_408_and_the_connection_is_closed(gw: GatewayProc, key: str) -> None:
    with connect(gw.port) as sock:
        started = time.monotonic()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nX-Slow: ")
        status, headers, body = read_response(sock)
        assert status == 408 and b"head" in body
        assert headers["connection"] == "close"
        assert 0.9 < time.monotonic() - started < 5
        assert closed_by_peer(sock, 2)


def test_a_body_trickled_byte_by_byte_gets_408(gw: GatewayProc, key: str) -> None:
    request = post(key, BODY)
    head, _, body = request.partition(b"\r\n\r\n")
    with connect(gw.port) as sock:
        started = time.monotonic()
        sock.sendall(head + b"\r\n\r\n")
        sock.settimeout(0.2)
        answer = b""
        for byte in body:  # one byte every 0.2 s: never idle for long, never finished in time
            try:
                sock.sendall(bytes([byte]))
                answer += sock.recv(65536)
                if answer:
                    break
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert 1.4 < time.monotonic() - started < 6
    # Meanwhile and after, others are served.
    with connect(gw.port) as sock:
        sock.sendall(post(key, BODY))
        assert read_response(sock)[0] == 200


def children(proc: GatewayProc) -> set[int]:
    assert proc.proc.popen is not None
    ppid = proc.proc.popen.pid
    return {int(pid) for pid in Path(f"/proc/{ppid}/task/{ppid}/children").read_text().split()}


def head_timeout_s(proc: GatewayProc, connections: int) -> list[float]:
    """Open `connections` connections, start a head on each and never finish it: the seconds until each 408."""
    socks = [connect(proc.port) for _ in range(connections)]
    try:
        started = time.monotonic()
        for sock in socks:
            sock.sendall(b"GET /livez HTTP/1.1\r\nHost: gw\r\n")
        waited = []
        for sock in socks:
            sock.settimeout(8)
            status, headers, _ = read_response(sock)
            assert status == 408 and headers["connection"] == "close"
            waited.append(time.monotonic() - started)
        return waited
    finally:
        for sock in socks:
            sock.close()


def test_the_client_limits_reach_every_worker(sim: SimHandle, tmp_path: Path) -> None:
    """With `--workers 2`, each worker builds its HTTP protocol's limits from the settings it reads: heads
    never finished, on connections spread over the workers, get 408 after the configured 1 s (not the
    default 10 s); after the file changes to 3 s, a SIGHUP restarts the workers with the new limit."""
    config = {
        "backends": [{"name": "sim", "kind": "vllm", "url": sim.url}],
        "models": [{"name": "m", "backends": ["sim"]}],
        "limits": {"client_header_timeout_s": 1.0},
    }
    proc = start_gateway(config, tmp_path, extra_args=("--workers", "2"), wait=False)
    try:
        wait_http(f"{proc.url}/readyz", timeout=90, proc=proc.proc.popen)  # two processes starting
        assert max(head_timeout_s(proc, 8)) < 6
        before = children(proc)
        settings = yaml.safe_load(proc.config_path.read_text())
        settings["limits"]["client_header_timeout_s"] = 3.0
        proc.config_path.write_text(yaml.safe_dump(settings))
        assert proc.proc.popen is not None
        proc.proc.popen.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 120  # one worker after the other, each ready before the old one goes
        while len(children(proc) - before) < 2 or len(before - children(proc)) < 2:  # both workers replaced
            assert time.monotonic() < deadline, "the workers were not restarted"
            time.sleep(0.1)
        assert min(head_timeout_s(proc, 8)) > 2.5
    finally:
        proc.stop()


def test_an_idle_keep_alive_connection_is_closed(gw: GatewayProc) -> None:
    with connect(gw.port) as sock:
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: gw\r\n\r\n")
        assert read_response(sock)[0] == 200
        started = time.monotonic()
        assert closed_by_peer(sock, 6)
        assert 1.9 < time.monotonic() - started < 6


@pytest.mark.parametrize(
    "head",
    [
        b"GET /livez HTTP/1.1\r\nHost: gw\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
        b"GET /livez HTTP/1.1\r\nHost: gw\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(150)) + b"\r\n",
        b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: gw\r\n\r\n",
    ],
    ids=["one-huge-header", "too-many-headers", "huge-target"],
)
def test_oversized_heads_get_431(gw: GatewayProc, head: bytes) -> None:
    with connect(gw.port) as sock:
        sock.sendall(head)
        status, headers, _ = read_response(sock)
        assert status == 431 and headers["connection"] == "close"


def test_a_header_value_sent_forever_is_cut_off(gw: GatewayProc) -> None:
    with connect(gw.port) as sock:
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: gw\r\nX-Endless: ")
        answer = b""
        try:
            for _ in range(100):  # 400 KB of one header value, far beyond the 8 KB bound
                sock.sendall(b"a" * 4096)
        except (BrokenPipeError, ConnectionResetError):
            pass
        sock.settimeout(5)
        try:
            answer = sock.recv(65536)
        except ConnectionResetError:
            answer = b"reset"
        assert answer.startswith(b"HTTP/1.1 431") or answer == b"reset"


@pytest.mark.parametrize(
    "raw",
    [b"NOT HTTP AT ALL\r\n\r\n", b"GET /livez HTTP/1.1\r\nHost gw\r\n\r\n", b"GET /\xff\xfe HTTP/1.1\r\n\r\n"],
    ids=["garbage", "header-without-colon", "non-ascii-target"],
)
def test_malformed_requests_get_400(gw: GatewayProc, raw: bytes) -> None:
    with connect(gw.port) as sock:
        sock.sendall(raw)
        status, headers, _ = read_response(sock)
        assert status == 400 and headers["connection"] == "close"


def test_slow_clients_do_not_hold_the_gateway(gw: GatewayProc, key: str) -> None:
    """200 connections that start a head and never finish it: all are cut after the header timeout, and a
    normal request is served meanwhile."""
    slow = [connect(gw.port) for _ in range(200)]
    try:
        for sock in slow:
            sock.sendall(b"GET /livez HTTP/1.1\r\nHost: gw\r\n")
        with connect(gw.port) as sock:
            sock.sendall(post(key, BODY))
            assert read_response(sock)[0] == 200
        time.sleep(1.5)
        assert all(closed_by_peer(sock, 3) for sock in slow)
    finally:
        for sock in slow:
            sock.close()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_a_stream_reader_that_never_reads_holds_the_backend_back(gw: GatewayProc, key: str, sim: SimHandle) -> None:
    """About 50 MB of stream for a client that reads nothing: back-pressure reaches the backend, the gateway's
    memory does not grow with it, and leaving ends the backend's generation."""
    assert gw.proc.popen is not None
    pid = gw.proc.popen.pid
    before = rss_mb(pid)
    body = json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 300_000, "stream": True}
    ).encode()
    with connect(gw.port) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.sendall(post(key, body))
        head = sock.recv(4096)
        assert head.startswith(b"HTTP/1.1 200")
        request_id = head.split(b"x-request-id: ", 1)[1].split(b"\r\n", 1)[0].decode()
        peak = before
        for _ in range(30):  # 3 s without reading
            time.sleep(0.1)
            peak = max(peak, rss_mb(pid))
        assert sim.stats()["active"] >= 1  # held back: a simulator with no latency would be done by now
        assert peak - before < 30, (before, peak)  # far less than the 50 MB the backend wanted to send
    # The client left: the stream is billed for what was generated, flagged partial.
    billing = gw.config_path.parent / "billing.jsonl"
    deadline = time.monotonic() + 10
    event = None
    while event is None and time.monotonic() < deadline:
        if billing.exists():
            event = next((json.loads(x) for x in billing.read_text().splitlines() if request_id in x), None)
        time.sleep(0.05)
    assert event is not None
    assert event["data"]["partial"] is True and event["data"]["status"] == 499
    assert 0 < event["data"]["completion_tokens"] < 300_000


def openai_error(body: bytes) -> dict[str, object]:
    error: dict[str, object] = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_the_protocols_own_errors_are_openai_shaped(gw: GatewayProc) -> None:
    for raw, status, code in (
        (b"NOT HTTP AT ALL\r\n\r\n", 400, "invalid_http_request"),
        (
            b"GET /livez HTTP/1.1\r\nHost: gw\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
            431,
            "request_header_fields_too_large",
        ),
        (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nX-Slow: ", 408, "request_timeout"),
    ):
        with connect(gw.port) as sock:
            sock.sendall(raw)
            got, headers, body = read_response(sock)
            assert got == status and headers["content-type"] == "application/json"
            error = openai_error(body)
            assert error["code"] == code and error["type"] == "invalid_request_error"


# Header injection and request smuggling: llhttp in strict mode refuses each of these before the app sees
# them, so no value can smuggle a second header (or a second request) past the gateway to the backend.
KEYLESS = b"Authorization: Bearer sk-gw-" + b"k" * 43 + b"\r\n"


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /v1/models HTTP/1.1\r\nHost: gw\r\nX-A: foo\rInjected: bar\r\n" + KEYLESS + b"\r\n",
        b"GET /v1/models HTTP/1.1\r\nHost: gw\r\nX-A: foo\nInjected: bar\r\n" + KEYLESS + b"\r\n",
        b"GET /v1/models HTTP/1.1\r\nHost: gw\r\nX-A: foo\r\n bar\r\n" + KEYLESS + b"\r\n",
        b"GET /v1/models HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer\r\n\tsk-gw-" + b"k" * 43 + b"\r\n\r\n",
        b"GET /v1/models HTTP/1.1\r\nHost: gw\r\nX-A: a\x00b\r\n" + KEYLESS + b"\r\n",
        b"GET /v1/models HTTP/1.1\r\nHost: gw\r\nAuthorization : Bearer sk-gw-" + b"k" * 43 + b"\r\n\r\n",
        b"GET /v1/models HTTP/1.1\nHost: gw\n" + KEYLESS.replace(b"\r\n", b"\n") + b"\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n"
        + KEYLESS
        + b"\r\n0\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\nContent-Length: 6\r\n"
        + KEYLESS
        + b"\r\nhello!",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: xchunked\r\n" + KEYLESS + b"\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: -1\r\n" + KEYLESS + b"\r\n",
    ],
    ids=[
        "bare-cr-in-value",
        "bare-lf-in-value",
        "obs-fold",
        "obs-fold-in-authorization",
        "nul-in-value",
        "space-before-colon",
        "lf-only-line-ends",
        "content-length-and-chunked",
        "two-content-lengths",
        "unknown-transfer-encoding",
        "negative-content-length",
    ],
)
def test_header_injection_and_smuggling_get_400(gw: GatewayProc, key: str, raw: bytes) -> None:
    with connect(gw.port) as sock:
        sock.sendall(raw)
        status, headers, body = read_response(sock)
        assert status == 400 and headers["connection"] == "close"
        assert openai_error(body)["type"] == "invalid_request_error"
        assert closed_by_peer(sock, 2)
    with connect(gw.port) as sock:  # the gateway serves the next client as usual
        sock.sendall(post(key, BODY))
        assert read_response(sock)[0] == 200


def models_with(gw: GatewayProc, *auth_lines: bytes) -> tuple[int, dict[str, object] | None]:
    head = b"GET /v1/models HTTP/1.1\r\nHost: gw\r\n" + b"".join(b"%s\r\n" % line for line in auth_lines) + b"\r\n"
    with connect(gw.port) as sock:
        sock.sendall(head)
        status, _, body = read_response(sock)
    return status, (openai_error(body) if status >= 400 else None)


def test_two_authorization_headers_are_refused_whichever_comes_first(gw: GatewayProc, key: str) -> None:
    """Ambiguous credentials are refused rather than guessed: proxies and frameworks disagree on which of two
    Authorization headers wins (first, last, or both joined), so the gateway could authenticate one caller
    while something in front of it or behind it logs or forwards the other."""
    good, wrong = b"Authorization: Bearer " + key.encode(), b"Authorization: Bearer sk-gw-" + b"x" * 43
    for lines in ((good, wrong), (wrong, good), (good, good), (good, b"Authorization: ")):
        status, error = models_with(gw, *lines)
        assert status == 400 and error is not None and error["code"] == "duplicate_authorization"


def test_authorization_forms(gw: GatewayProc, key: str) -> None:
    k = key.encode()
    # Accepted, per RFC 9110 and RFC 6750: the scheme is case-insensitive, 1*SP separates it from the
    # token, and whitespace around a field value is not part of it.
    for line in (
        b"Authorization: Bearer " + k,
        b"Authorization: bearer " + k,
        b"authorization:   BEARER   " + k + b"  ",
    ):
        assert models_with(gw, line)[0] == 200, line
    # Refused with 401 invalid_api_key: anything that is not exactly the key after `Bearer `.
    for line in (
        b"Authorization: Token " + k,
        b"Authorization: Basic " + k,
        b"Authorization: Bearer\t" + k,
        b"Authorization: Bearer " + k + b" extra",
        b"Authorization: Bearer " + k[:20] + b" " + k[20:],
        b"Authorization: Bearer " + k[:-1],
        b"Authorization: Bearer " + k.lower(),
        b"Authorization: Bearer sk-xx-" + k[6:],
        b"Authorization: Bearer \xc3\xa9" + k,
        b"Authorization: " + k,
        b"Authorization: Bearer",
    ):
        status, error = models_with(gw, line)
        assert status == 401 and error is not None, line
        assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
    assert key not in gw.output()
