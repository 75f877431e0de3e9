"""The OpenAI-compatible client API, end to end: the official `openai` SDK -> gateway (a real process on
loopback) -> the simulator (a real process). Nothing is mocked."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.support.admin import create_key, tenant_with_key
from tests.support.gateway import GatewayProc, start_gateway
from tests.support.procs import free_port
from tests.support.sim import SimHandle, start_sim

CFG_KEY = "sk-gw-" + "C" * 43


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimHandle]:
    handle = start_sim("--ttft-ms", "1", "--itl-ms", "1", log_dir=tmp_path_factory.mktemp("sim"))
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def gw(sim: SimHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProc]:
    config = {
        "backends": [
            {"name": "sim", "kind": "vllm", "url": sim.url, "capacity": 64},
            {"name": "dead", "kind": "vllm", "url": f"http://127.0.0.1:{free_port()}"},
        ],
        "models": [
            {"name": "chat-model", "backends": ["sim"], "upstream_model": "sim-model"},
            {"name": "premium-model", "backends": ["sim"]},
            {"name": "dead-model", "backends": ["dead"]},
        ],
        "limits": {"max_body_bytes": 65536, "max_tokens_cap": 1000},
        "tenants": [{"id": "cfg-tenant", "models": ["chat-model"], "keys": [{"name": "ci", "key_env": "CFG_KEY"}]}],
    }
    proc = start_gateway(config, tmp_path_factory.mktemp("gw"), env={"CFG_KEY": CFG_KEY})
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def key(gw: GatewayProc) -> str:
    return tenant_with_key(gw.url, gw.admin_key, "alpha", models=["chat-model", "dead-model", "premium-*"])


@pytest.fixture
def client(gw: GatewayProc, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)


def last_request(sim: SimHandle) -> dict[str, Any]:
    body: dict[str, Any] = sim.stats()["last_requests"][-1]
    return body


MESSAGES: list[Any] = [{"role": "user", "content": "hello there"}]


def test_chat_non_stream_sync(client: openai.OpenAI, sim: SimHandle) -> None:
    raw = client.chat.completions.with_raw_response.create(model="chat-model", messages=MESSAGES, max_tokens=5)
    assert raw.headers["x-request-id"].startswith("req_")
    completion = raw.parse()
    assert completion.model == "chat-model"  # the name the client used, not the upstream name
    assert completion.choices[0].message.content
    assert completion.usage is not None and completion.usage.completion_tokens == 5
    forwarded = last_request(sim)
    assert forwarded["model"] == "sim-model"
    assert "stream_options" not in forwarded


async def test_chat_stream_async_no_usage_unless_asked(gw: GatewayProc, key: str, sim: SimHandle) -> None:
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)
    stream = await client.chat.completions.create(model="chat-model", messages=MESSAGES, max_tokens=7, stream=True)
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    assert all(c.usage is None for c in chunks)
    assert all(c.model == "chat-model" for c in chunks)
    # The gateway always asks the backend for usage, to meter.
    assert last_request(sim)["stream_options"] == {"include_usage": True}
    await client.close()


def test_chat_stream_usage_forwarded_when_asked(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="chat-model", messages=MESSAGES, max_tokens=4, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4


def test_stream_response_has_request_id(client: openai.OpenAI) -> None:
    with client.chat.completions.with_streaming_response.create(
        model="chat-model", messages=MESSAGES, max_tokens=2, stream=True
    ) as resp:
        assert resp.headers["x-request-id"].startswith("req_")
        assert resp.headers["content-type"].startswith("text/event-stream")


def test_completions_stream_and_not(client: openai.OpenAI) -> None:
    done = client.completions.create(model="chat-model", prompt="once upon a time", max_tokens=3)
    assert done.choices[0].text and done.usage is not None
    text = "".join(
        c.choices[0].text
        for c in client.completions.create(model="chat-model", prompt="once", max_tokens=3, stream=True)
        if c.choices
    )
    assert text.strip()


def test_embeddings(client: openai.OpenAI) -> None:
    result = client.embeddings.create(model="chat-model", input=["a b c", "d e"])
    assert len(result.data) == 2 and len(result.data[0].embedding) > 0
    assert result.usage.prompt_tokens > 0


def test_responses_pass_through(client: openai.OpenAI, sim: SimHandle) -> None:
    response = client.responses.create(model="chat-model", input="say something", max_output_tokens=3)
    assert response.output_text
    assert last_request(sim)["model"] == "sim-model"
    assert "cache_salt" in last_request(sim)


def test_models_only_lists_allowed(gw: GatewayProc) -> None:
    cfg = openai.OpenAI(base_url=gw.url + "/v1", api_key=CFG_KEY, max_retries=0)
    assert [m.id for m in cfg.models.list()] == ["chat-model"]
    assert cfg.models.retrieve("chat-model").id == "chat-model"
    with pytest.raises(openai.NotFoundError):
        cfg.models.retrieve("premium-model")


def test_unknown_fields_pass_through(client: openai.OpenAI, sim: SimHandle) -> None:
    client.chat.completions.create(
        model="chat-model",
        messages=MESSAGES,
        max_tokens=1,
        extra_body={"top_k": 5, "repetition_penalty": 1.1, "guided_choice": ["a", "b"]},
    )
    forwarded = last_request(sim)
    assert forwarded["top_k"] == 5
    assert forwarded["repetition_penalty"] == 1.1
    assert forwarded["guided_choice"] == ["a", "b"]


# --- every client-API error, in OpenAI's shape ------------------------------------------------------


def error_of(resp: httpx.Response) -> dict[str, Any]:
    assert resp.headers.get("x-request-id"), "every response carries x-request-id"
    body: dict[str, Any] = resp.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    return body


def post(gw: GatewayProc, key: str | None, body: Any = None, content: bytes | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if content is not None:
        headers["content-type"] = "application/json"
        return httpx.post(gw.url + "/v1/chat/completions", content=content, headers=headers)
    return httpx.post(gw.url + "/v1/chat/completions", json=body, headers=headers)


def test_401_missing_and_wrong_key(gw: GatewayProc) -> None:
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-gw-" + "x" * 43, max_retries=0).models.list()
    body = error_of(post(gw, None, {"model": "chat-model", "messages": MESSAGES}))
    assert body["code"] == "invalid_api_key" and body["type"] == "invalid_request_error"


def test_401_expired_key(gw: GatewayProc, key: str) -> None:
    expired = create_key(gw.url, gw.admin_key, "alpha", name="old", expires_at=1.0)
    resp = post(gw, expired, {"model": "chat-model", "messages": MESSAGES})
    assert resp.status_code == 401
    assert "expired" in error_of(resp)["message"]


def test_a_forbidden_model_looks_unknown(gw: GatewayProc) -> None:
    """A model the tenant may not use answers exactly as one that does not exist: no tenant can list, by
    name, the models others may use. The operator's metric still names the model."""

    def count(model: str) -> float:
        for line in httpx.get(gw.url + "/metrics").text.splitlines():
            if line.startswith("gateway_requests_total{") and f'model="{model}"' in line and 'status="404"' in line:
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=CFG_KEY, max_retries=0)
    before = count("premium-model")
    answers = []
    for name in ("premium-model", "no-such-model"):
        with pytest.raises(openai.NotFoundError) as info:
            client.chat.completions.create(model=name, messages=MESSAGES)
        body = info.value.response.json()["error"]
        answers.append({**body, "message": body["message"].replace(name, "NAME")})
    assert answers[0] == answers[1]
    assert answers[0]["code"] == "model_not_found" and answers[0]["param"] == "model"
    assert count("premium-model") == before + 1


def test_404_unknown_model(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert info.value.code == "model_not_found"


@pytest.mark.parametrize(
    ("content", "param"),
    [
        (b"{not json", None),
        (b"\xff\xfe{}", None),
        (b'{"model": "chat-model", "messages": [{"role": "user", "content": NaN}]}', None),
        (b"[1, 2]", None),
        (b'{"messages": []}', "model"),
        (b'{"model": 7, "messages": []}', "model"),
        (b'{"model": "chat-model", "messages": "hi"}', "messages"),
        (b'{"model": "chat-model", "messages": [{"content": "x"}]}', "messages[0].role"),
        (b'{"model": "chat-model", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}', "stream"),
        (b'{"model": "chat-model", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}', "max_tokens"),
        (b'{"model": "chat-model", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1001}', "max_tokens"),
        (b'{"model": "chat-model", "messages": [{"role": "user", "content": "x"}], "cache_salt": 5}', "cache_salt"),
        (
            b'{"model": "chat-model", "messages": [{"role": "user", "content": "x"}], "stream_options": 1}',
            "stream_options",
        ),
    ],
)
def test_400_names_the_field(gw: GatewayProc, key: str, content: bytes, param: str | None) -> None:
    resp = post(gw, key, content=content)
    assert resp.status_code == 400, resp.text
    body = error_of(resp)
    assert body["type"] == "invalid_request_error"
    assert body["param"] == param


@pytest.mark.parametrize("depth", [300, 5000])
def test_400_deep_nesting(gw: GatewayProc, key: str, depth: int) -> None:
    # 300: deeper than orjson writes (254) but not than it reads (1024); it used to be admitted, then 500.
    content = b'{"model": "chat-model", "messages": [{"role": "user", "content": "x"}], "x": '
    resp = post(gw, key, content=content + b"[" * depth + b"]" * depth + b"}")
    assert resp.status_code == 400, resp.text
    error_of(resp)
    assert "unhandled error" not in gw.output()


def test_413_body_limit(gw: GatewayProc, key: str) -> None:
    resp = post(gw, key, {"model": "chat-model", "messages": [{"role": "user", "content": "x" * 70000}]})
    assert resp.status_code == 413
    assert error_of(resp)["type"] == "invalid_request_error"


def test_max_tokens_cap_with_sdk(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="chat-model", messages=MESSAGES, max_tokens=5000)
    assert info.value.param == "max_tokens"


def test_503_no_healthy_backend_does_not_leak_address(gw: GatewayProc, key: str) -> None:
    resp = post(gw, key, {"model": "dead-model", "messages": MESSAGES})
    assert resp.status_code == 503
    body = error_of(resp)
    assert body["type"] == "server_error"
    assert "127.0.0.1" not in resp.text and "http" not in body["message"]


@pytest.mark.parametrize("mode", ["error_500", "close_connection"])
def test_502_backend_fault(gw: GatewayProc, key: str, sim: SimHandle, mode: str) -> None:
    # Twice: a connection dropped before any answer byte is retried once on a fresh connection (it may
    # just have been a stale keep-alive connection), so one dropped connection alone is not a failure.
    sim.set_faults(mode, count=2)
    try:
        resp = post(gw, key, {"model": "chat-model", "messages": MESSAGES})
    finally:
        sim.reset()
    assert resp.status_code == 502, resp.text
    body = error_of(resp)
    assert body["type"] == "server_error"
    assert sim.url not in resp.text and "127.0.0.1" not in resp.text


def test_backend_dies_mid_stream_ends_with_error_chunk(client: openai.OpenAI, sim: SimHandle) -> None:
    sim.set_faults("drop_midstream", after_tokens=3)
    try:
        stream = client.chat.completions.create(model="chat-model", messages=MESSAGES, max_tokens=50, stream=True)
        got = 0
        with pytest.raises(openai.APIError) as info:
            for _ in stream:
                got += 1
    finally:
        sim.reset()
    assert got >= 1
    assert "incomplete" in str(info.value.message)


def test_unknown_path_and_health(gw: GatewayProc) -> None:
    resp = httpx.get(gw.url + "/v2/nothing")
    assert resp.status_code == 404 and error_of(resp)["code"] == "not_found"
    assert httpx.get(gw.url + "/livez").status_code == 200
    assert httpx.get(gw.url + "/readyz").status_code == 200


def test_client_request_id_is_kept_if_sane(gw: GatewayProc) -> None:
    assert httpx.get(gw.url + "/livez", headers={"x-request-id": "abc-123"}).headers["x-request-id"] == "abc-123"
    bad = httpx.get(gw.url + "/livez", headers={"x-request-id": "a b"}).headers["x-request-id"]
    assert bad.startswith("req_")


def test_client_disconnect_cancels_upstream(gw: GatewayProc, key: str, sim: SimHandle) -> None:
    before = sim.stats()["cancelled"]
    body = {"model": "chat-model", "messages": MESSAGES, "max_tokens": 500, "stream": True}
    with httpx.stream(
        "POST", gw.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
    ) as resp:
        lines = resp.iter_lines()
        for _ in range(6):
            next(lines)
    # The client closed the connection after a few chunks; the simulator must see its request cancelled.
    import time

    deadline = time.monotonic() + 5
    while sim.stats()["cancelled"] <= before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sim.stats()["cancelled"] == before + 1


def test_metrics_exposed(gw: GatewayProc, client: openai.OpenAI) -> None:
    client.chat.completions.create(model="chat-model", messages=MESSAGES, max_tokens=1)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    text = httpx.get(gw.url + "/metrics").text
    assert 'gateway_requests_total{model="chat-model",status="200",tenant="alpha"}' in text
    # Answers that never reached a backend are counted too.
    assert 'gateway_requests_total{model="unknown",status="404",tenant="alpha"}' in text
    assert 'gateway_requests_total{model="unknown",status="401",tenant="unauthenticated"}' in text
    assert 'gateway_backend_salt_unsupported{backend="sim"} 0.0' in text
    assert 'gateway_backend_up{backend="dead"} 0.0' in text


def test_secrets_not_in_logs(gw: GatewayProc, key: str) -> None:
    log = gw.output()
    assert key not in log and CFG_KEY not in log and gw.admin_key not in log


_ = Path
