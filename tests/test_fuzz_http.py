"""Fuzzing over real sockets: hostile bodies, paths and headers sent to a running gateway (a real process,
the simulator behind it), a few hundred examples. Every answer is below 500 or one of the documented 502
and 503, an error is in OpenAI's shape, every answer has an x-request-id, a stream ends with its format's
own end (`[DONE]`, a Responses API terminal event) or an error event, and afterwards the process is alive,
serving, and its log holds no traceback and no key.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.support.admin import tenant_with_key
from tests.support.fuzz import ENDPOINTS, VALID, bodies, dumps, hostile_texts
from tests.support.gateway import GatewayProc, start_gateway
from tests.support.sim import SimHandle, start_sim

EXAMPLES = 300
PATHS = {
    "chat": "/v1/chat/completions",
    "completions": "/v1/completions",
    "embeddings": "/v1/embeddings",
    "responses": "/v1/responses",
}
# How a stream's last event may start: chat's [DONE], the Responses API's terminal events, or an error event.
STREAM_ENDS = (
    "data: [DONE]",
    "event: response.completed",
    "event: response.incomplete",
    "event: response.failed",
    "event: error",
)
# h11 (the client) refuses values with surrounding whitespace; raw-socket header tricks are in test_server.py.
header_values = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40).map(str.strip)
extra_headers = st.dictionaries(
    st.sampled_from(["x-request-id", "content-type", "accept", "x-forwarded-for", "openai-organization", "x-junk"]),
    header_values,
    max_size=3,
)


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimHandle]:
    handle = start_sim("--ttft-ms", "0", "--itl-ms", "0", log_dir=tmp_path_factory.mktemp("sim-fuzz"))
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def gw(sim: SimHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProc]:
    workdir = tmp_path_factory.mktemp("gw-fuzz")
    config = {
        "backends": [{"name": "sim", "kind": "vllm", "url": sim.url}],
        "models": [{"name": "m", "backends": ["sim"]}],
        "limits": {"max_tokens_cap": 64, "max_body_bytes": 65536},
        "billing": {"sinks": [{"kind": "jsonl", "path": str(workdir / "billing.jsonl")}]},
    }
    proc = start_gateway(config, workdir)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def key(gw: GatewayProc) -> str:
    return tenant_with_key(gw.url, gw.admin_key, "fuzz", allow_client_salt=True, user_field="tenant")


@pytest.fixture(scope="module")
def http(gw: GatewayProc) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gw.url, timeout=30) as client:
        yield client


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, str, bytes, dict[str, str]]:
    endpoint = draw(ENDPOINTS)
    kind = draw(st.sampled_from(["valid+fields", "random", "hostile", "bytes", "deep"]))
    if kind == "deep":
        depth = draw(st.integers(1, 1100))
        raw = dumps(VALID[endpoint])[:-1] + b', "x": ' + b"[" * depth + b"]" * depth + b"}"
    elif kind == "valid+fields":
        raw = dumps({**VALID[endpoint], **draw(bodies)})
    elif kind == "random":
        raw = dumps(draw(bodies))
    elif kind == "hostile":
        raw = draw(hostile_texts())
    else:
        raw = draw(st.binary(max_size=300))
    event(kind)
    path = (
        PATHS[endpoint]
        if draw(st.integers(0, 9))
        else draw(st.sampled_from(["/v1/models/" + "x" * 300, "/v1//chat", "/v1/chat/completions/"]))
    )
    return "POST", path, raw, draw(extra_headers)


def check_answer(resp: httpx.Response, body: bytes) -> None:
    status = resp.status_code
    event(f"status {status}")
    assert status < 500 or status in (502, 503), (status, body[:500])
    assert resp.headers.get("x-request-id")
    if status >= 400:
        error = json.loads(body)["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert isinstance(error["message"], str) and error["message"]
    elif resp.headers.get("content-type", "").startswith("text/event-stream"):
        last = body.decode().rstrip().rsplit("\n\n", 1)[-1]
        assert last.startswith(STREAM_ENDS) or '"error"' in last, last[-300:]
    else:
        json.loads(body)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(request=requests())
def test_hostile_requests_over_sockets(
    http: httpx.Client, key: str, request: tuple[str, str, bytes, dict[str, str]]
) -> None:
    method, path, raw, extra = request
    headers = {"content-type": "application/json", **extra, "authorization": f"Bearer {key}"}
    with http.stream(method, path, content=raw, headers=headers) as resp:
        body = resp.read()
    check_answer(resp, body)


def test_the_gateway_survived_and_logged_nothing_it_should_not(gw: GatewayProc, http: httpx.Client, key: str) -> None:
    """Runs after the fuzzing above (same module): the process is alive and serving."""
    assert gw.proc.popen is not None and gw.proc.popen.poll() is None
    assert http.get("/livez").status_code == 200
    resp = http.post(
        "/v1/chat/completions", json={**VALID["chat"], "max_tokens": 2}, headers={"authorization": f"Bearer {key}"}
    )
    assert resp.status_code == 200, resp.text
    log = gw.output()
    for marker in ("Traceback", "unhandled error", "exception in the ASGI app"):
        assert marker not in log, log[-4000:]
    assert key not in log and gw.admin_key not in log
