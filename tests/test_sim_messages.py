"""The simulator's Anthropic Messages endpoint (`POST /v1/messages`), as a real process over loopback: the
message shape, the streaming event sequence, the headers it requires, errors in Anthropic's shape, and
fault injection. Written against Anthropic's documented wire format, which is what litellm reads."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from tests.support.sim import SimHandle, start_sim

API_KEY = "sk-ant-sim-test"
HEADERS = {"x-api-key": API_KEY, "anthropic-version": "2023-06-01"}


@pytest.fixture(scope="module")
def messages_sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimHandle]:
    sim = start_sim(
        *("--ttft-ms", "0", "--itl-ms", "0", "--prefill-us-per-token", "0", "--api-key", API_KEY),
        log_dir=tmp_path_factory.mktemp("sim"),
    )
    yield sim
    sim.stop()
    assert "Traceback" not in sim.output(), sim.output()


@pytest.fixture
def sim(messages_sim: SimHandle) -> SimHandle:
    messages_sim.reset()
    return messages_sim


def body(**extra: Any) -> dict[str, Any]:
    return {
        "model": "claude-test",
        "max_tokens": 4,
        "messages": [{"role": "user", "content": "one two three"}],
        **extra,
    }


def post(sim: SimHandle, payload: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    return sim.http.post("/v1/messages", json=payload, headers=HEADERS if headers is None else headers)


def events(raw: str) -> list[tuple[str, dict[str, Any]]]:
    """Parse an SSE body into (event name, data) pairs, checking that the names match the data's type."""
    out = []
    for block in raw.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        data = orjson.loads(lines["data"])
        assert lines["event"] == data["type"]
        out.append((lines["event"], data))
    return out


def test_message_shape(sim: SimHandle) -> None:
    resp = post(sim, body())
    assert resp.status_code == 200, resp.text
    msg = resp.json()
    assert msg["id"].startswith("msg_")
    assert (msg["type"], msg["role"], msg["model"]) == ("message", "assistant", "claude-test")
    assert msg["content"] == [{"type": "text", "text": "tok0 tok1 tok2 tok3"}]
    assert (msg["stop_reason"], msg["stop_sequence"]) == ("max_tokens", None)
    # "<|user|> one two three <|assistant|>": five prompt tokens, as the chat endpoint counts them.
    assert msg["usage"] == {
        "input_tokens": 5,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": 4,
    }


def test_system_and_content_blocks_count_as_prompt(sim: SimHandle) -> None:
    payload = body(
        system=[{"type": "text", "text": "be kind"}],
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "a b"}, {"type": "image", "source": {}}]},
            {"role": "assistant", "content": "c"},
            {"role": "user", "content": "d"},
        ],
    )
    usage = post(sim, payload).json()["usage"]
    # system (1 + 2) + user (1 + 2) + assistant (1 + 1) + user (1 + 1) + the final marker (1).
    assert usage["input_tokens"] == 11


def test_end_turn_when_the_model_stops_before_max_tokens(sim: SimHandle) -> None:
    msg = post(sim, body(max_tokens=1000)).json()
    assert msg["stop_reason"] == "end_turn"
    assert msg["usage"]["output_tokens"] == 16  # the simulator's --max-tokens-default


def test_prefix_cache_reports_cache_reads(sim: SimHandle) -> None:
    long = " ".join(f"w{i}" for i in range(100))
    first = post(sim, body(messages=[{"role": "user", "content": long}])).json()["usage"]
    again = post(sim, body(messages=[{"role": "user", "content": long}])).json()["usage"]
    assert first["cache_read_input_tokens"] == 0
    assert again["cache_read_input_tokens"] == 96  # six full blocks of 16
    assert again["input_tokens"] + again["cache_read_input_tokens"] == first["input_tokens"]


def test_stream_event_sequence(sim: SimHandle) -> None:
    with sim.http.stream("POST", "/v1/messages", json=body(stream=True, max_tokens=3), headers=HEADERS) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        seq = events(resp.read().decode())
    names = [name for name, _ in seq]
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        *["content_block_delta"] * 3,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start = seq[0][1]["message"]
    assert start["id"].startswith("msg_") and start["content"] == [] and start["stop_reason"] is None
    assert start["usage"]["input_tokens"] == 5
    assert seq[1][1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    text = "".join(data["delta"]["text"] for name, data in seq if name == "content_block_delta")
    assert text == "tok0 tok1 tok2"
    assert all(data["delta"]["type"] == "text_delta" for name, data in seq if name == "content_block_delta")
    delta = seq[-2][1]
    assert delta["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert delta["usage"] == {"output_tokens": 3}


@pytest.mark.parametrize(
    ("headers", "status", "kind"),
    [
        ({"anthropic-version": "2023-06-01"}, 401, "authentication_error"),
        ({"x-api-key": "wrong", "anthropic-version": "2023-06-01"}, 401, "authentication_error"),
        ({"x-api-key": API_KEY}, 400, "invalid_request_error"),
    ],
)
def test_headers_are_required(sim: SimHandle, headers: dict[str, str], status: int, kind: str) -> None:
    resp = post(sim, body(), headers)
    assert resp.status_code == status
    assert resp.json()["type"] == "error" and resp.json()["error"]["type"] == kind


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"max_tokens": None}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "system", "content": "x"}]}, "role"),
        ({"messages": [{"role": "user", "content": 5}]}, "content"),
        ({"temperature": 1.5}, "temperature"),
        ({"stop_sequences": "END"}, "stop_sequences"),
        ({"stream": "yes"}, "stream"),
        ({"max_tokens": 40000}, "too long"),
    ],
)
def test_invalid_requests_get_anthropic_errors(sim: SimHandle, change: dict[str, Any], field: str) -> None:
    payload = {k: v for k, v in {**body(), **change}.items() if v is not None}
    resp = post(sim, payload)
    assert resp.status_code == 400
    error = resp.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert field in error["error"]["message"]


@pytest.mark.parametrize(
    ("mode", "status", "kind"),
    [("error_429", 429, "rate_limit_error"), ("error_500", 500, "api_error"), ("error_529", 529, "overloaded_error")],
)
def test_injected_errors_take_anthropic_shape(sim: SimHandle, mode: str, status: int, kind: str) -> None:
    sim.set_faults(mode, count=1, paths=["/v1/messages"])
    resp = post(sim, body())
    assert resp.status_code == status and resp.json()["error"]["type"] == kind
    assert post(sim, body()).status_code == 200  # count=1: the next one is served
    assert sim.stats()["faulted"] == 1


def test_drop_midstream_cuts_the_stream(sim: SimHandle) -> None:
    sim.set_faults("drop_midstream", count=1, after_tokens=2, paths=["/v1/messages"])
    got = b""
    with (
        pytest.raises(httpx.RemoteProtocolError),
        sim.http.stream("POST", "/v1/messages", json=body(stream=True, max_tokens=8), headers=HEADERS) as resp,
    ):
        for chunk in resp.iter_bytes():
            got += chunk
    assert got.count(b"event: content_block_delta") == 2
    assert b"message_stop" not in got
    deadline = time.monotonic() + 3
    while sim.stats()["dropped"] != 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_counted_in_stats_by_path(sim: SimHandle) -> None:
    post(sim, body())
    stats = sim.stats()
    assert stats["requests_by_path"] == {"/v1/messages": 1}
    assert stats["completed"] == 1 and stats["last_requests"][-1]["model"] == "claude-test"
