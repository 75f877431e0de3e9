"""Every stream format the gateway relays, end to end: the official openai SDK -> the gateway -> a backend,
each a real server on loopback. A stream must arrive intact, end cleanly, and be billed from its own usage
event; one that breaks must end with its format's error event and be billed as partial.

The relay has two ways to deliver, so the gateway runs two ways: as a process under its own HTTP server
(events written from the backend connection's callback) and in-process under uvicorn's own protocol
(events through ASGI `send`). The simulator plays vLLM. A scripted OpenAI-compatible server plays what the
simulator cannot: a backend that reports its own failure mid-stream, or cuts events anywhere in its writes.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn
import yaml

from gateway.app import create_app
from gateway.config import load_settings
from tests.support.admin import tenant_with_key
from tests.support.gateway import start_gateway
from tests.support.procs import free_port
from tests.support.sim import SimHandle, start_sim

ADMIN = "sk-admin-formats-0123456789"
SALT_SECRET = "formats-salt-secret-0123456789abcdef"
MODELS = ["chat-model", "scripted-model"]


def poll(predicate: Callable[[], bool], within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


class Scripted:
    """An OpenAI-compatible backend that answers each POST with the next script: a list of byte strings,
    each written (as one HTTP chunk) a little after the last, so that each arrives in a read of its own."""

    def __init__(self) -> None:
        self.scripts: list[list[bytes]] = []
        scripts = self.scripts

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                body = b'{"object":"list","data":[]}'
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["content-length"]))
                pieces = scripts.pop(0)
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                for piece in pieces:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    self.wfile.flush()
                    time.sleep(0.005)
                self.wfile.write(b"0\r\n\r\n")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Gateway:
    url: str
    billing: Path

    def billed(self, request_id: str) -> dict[str, Any]:
        """The billing event of one request, from the gateway's jsonl sink."""
        found: dict[str, Any] = {}

        def seen() -> bool:
            for line in self.billing.read_text().splitlines() if self.billing.exists() else []:
                event = json.loads(line)
                if event["data"]["request_id"] == request_id:
                    found.update(event["data"])
                    return True
            return False

        poll(seen)
        return found


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimHandle]:
    handle = start_sim("--ttft-ms", "1", "--itl-ms", "1", log_dir=tmp_path_factory.mktemp("sim"))
    yield handle
    handle.stop()
    assert "Traceback" not in handle.output(), handle.output()


@pytest.fixture(scope="module")
def scripted() -> Iterator[Scripted]:
    backend = Scripted()
    yield backend
    backend.stop()


def gateway_config(sim: SimHandle, scripted: Scripted, workdir: Path) -> dict[str, Any]:
    return {
        "backends": [
            {"name": "sim", "kind": "vllm", "url": sim.url},
            {"name": "scripted", "kind": "openai", "url": scripted.url},
        ],
        "models": [
            {"name": "chat-model", "backends": ["sim"], "upstream_model": "sim-model"},
            {"name": "scripted-model", "backends": ["scripted"], "upstream_model": "scripted-upstream"},
        ],
        "billing": {"sinks": [{"kind": "jsonl", "path": str(workdir / "billing.jsonl")}]},
    }


@pytest.fixture(scope="module", params=["own-server", "asgi-send"])
def gw(
    request: pytest.FixtureRequest, sim: SimHandle, scripted: Scripted, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    workdir = tmp_path_factory.mktemp(request.param)
    config = gateway_config(sim, scripted, workdir)
    if request.param == "own-server":
        proc = start_gateway(config, workdir, admin_key=ADMIN, env={"GATEWAY_SALT_SECRET": SALT_SECRET})
        yield Gateway(proc.url, workdir / "billing.jsonl")
        proc.stop()
        return
    # uvicorn's own HTTP protocol offers no direct writer: the relay sends through ASGI.
    port = free_port()
    config = {**config, "listen": {"host": "127.0.0.1", "port": port}, "state_path": str(workdir / "state.db")}
    (workdir / "gateway.yaml").write_text(yaml.safe_dump(config))
    settings = load_settings(
        workdir / "gateway.yaml", env={"GATEWAY_ADMIN_KEY": ADMIN, "GATEWAY_SALT_SECRET": SALT_SECRET}
    )
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, lifespan="on", log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    poll(lambda: server.started and httpx.get(url + "/readyz").status_code == 200, within_s=20)
    yield Gateway(url, workdir / "billing.jsonl")
    server.should_exit = True
    thread.join(15)


@pytest.fixture(scope="module")
def key(gw: Gateway) -> str:
    return tenant_with_key(gw.url, ADMIN, "formats", models=MODELS)


@pytest.fixture
def client(gw: Gateway, key: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=20) as c:
        yield c


@pytest.fixture(autouse=True)
def clean_sim(sim: SimHandle) -> Iterator[None]:
    sim.reset()
    yield
    sim.reset()


def stream_responses(client: openai.OpenAI, **body: Any) -> tuple[list[Any], str]:
    """The events of one streamed response, as the SDK yields them, and the request's id."""
    raw = client.responses.with_raw_response.create(stream=True, **body)
    return list(raw.parse()), raw.headers["x-request-id"]


# -- the Responses API, from the simulator ----------------------------------------------------------------


def test_a_streamed_response_arrives_intact_ends_cleanly_and_is_billed_from_its_usage(
    gw: Gateway, client: openai.OpenAI
) -> None:
    # 22 prompt tokens: the second request finds a full block in the prefix cache.
    prompt = " ".join(f"w{i}" for i in range(20))
    for _ in range(2):
        events, request_id = stream_responses(
            client, model="chat-model", input=prompt, max_output_tokens=5, metadata={"model": "sim-model"}
        )
        assert [e.sequence_number for e in events] == list(range(len(events)))
        assert events[0].type == "response.created" and events[-1].type == "response.completed"
        assert "error" not in [e.type for e in events]
        deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
        assert "".join(deltas) == "tok0 tok1 tok2 tok3 tok4"
        final = events[-1].response
        # The public model name in every response object; the client's own metadata untouched.
        assert {e.response.model for e in events if hasattr(e, "response")} == {"chat-model"}
        assert final.metadata == {"model": "sim-model"}
        assert final.output_text == "tok0 tok1 tok2 tok3 tok4"
        usage = final.usage
        assert usage is not None
        billed = gw.billed(request_id)
        assert (billed["status"], billed["partial"], billed["stream"]) == (200, False, True)
        assert (billed["endpoint"], billed["model"], billed["finish_reason"]) == (
            "responses",
            "chat-model",
            "max_output_tokens",
        )
        reported = (usage.input_tokens, usage.output_tokens, usage.input_tokens_details.cached_tokens)
        assert (billed["prompt_tokens"], billed["completion_tokens"], billed["cached_tokens"]) == reported
        assert billed["timings"]["ttft_ms"] is not None and billed["cost"] >= 0
    assert reported == (22, 5, 16)


def test_the_sdks_stream_helper_assembles_the_relayed_response(client: openai.OpenAI) -> None:
    with client.responses.stream(model="chat-model", input="say something", instructions="be brief") as stream:
        texts = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert final.output_text == "".join(texts) and len(texts) == 16  # the simulator's default length
    assert final.status == "completed" and final.model == "chat-model"


def test_a_response_cut_mid_stream_ends_with_an_error_event_and_is_billed_as_partial(
    gw: Gateway, client: openai.OpenAI, sim: SimHandle
) -> None:
    sim.set_faults("drop_midstream", count=1, after_tokens=3, paths=["/v1/responses"])
    events, request_id = stream_responses(client, model="chat-model", input="say something", max_output_tokens=50)
    error = events[-1]
    assert error.type == "error" and [e.type for e in events].count("error") == 1
    assert error.code == "upstream_error" and "incomplete" in error.message
    assert error.sequence_number == events[-2].sequence_number + 1
    assert "response.completed" not in [e.type for e in events]
    assert [e.delta for e in events if e.type == "response.output_text.delta"] == ["tok0", " tok1", " tok2"]
    billed = gw.billed(request_id)
    assert (billed["status"], billed["partial"], billed["stream"]) == (502, True, True)
    assert billed["completion_tokens"] == 3  # the output relayed, one token per delta


# -- chat completions: as before ----------------------------------------------------------------------------


def test_a_chat_stream_is_relayed_and_billed_from_its_usage_chunk(gw: Gateway, client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="chat-model",
        messages=[{"role": "user", "content": "hello there"}],
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(raw.parse())
    assert {c.model for c in chunks} == {"chat-model"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "tok0 tok1 tok2 tok3"
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    billed = gw.billed(raw.headers["x-request-id"])
    assert (billed["status"], billed["partial"], billed["finish_reason"]) == (200, False, "length")
    assert (billed["prompt_tokens"], billed["completion_tokens"]) == (usage.prompt_tokens, usage.completion_tokens)


def test_a_chat_stream_cut_mid_way_ends_with_an_error_chunk_and_is_billed_as_partial(
    gw: Gateway, client: openai.OpenAI, sim: SimHandle
) -> None:
    sim.set_faults("drop_midstream", count=1, after_tokens=3, paths=["/v1/chat/completions"])
    raw = client.chat.completions.with_raw_response.create(
        model="chat-model", messages=[{"role": "user", "content": "hello"}], max_tokens=50, stream=True
    )
    got = 0
    with pytest.raises(openai.APIError) as info:
        for _ in raw.parse():
            got += 1
    assert "incomplete" in info.value.message and got == 1 + 3  # the role chunk, then three tokens
    billed = gw.billed(raw.headers["x-request-id"])
    assert (billed["status"], billed["partial"], billed["completion_tokens"]) == (502, True, 3)


# -- what only a scripted backend does ----------------------------------------------------------------------


def sse(kind: str | None, data: dict[str, Any]) -> bytes:
    line = b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"
    return line if kind is None else f"event: {kind}\n".encode() + line


def response_object(status: str, usage: dict[str, Any] | None, **extra: Any) -> dict[str, Any]:
    return {
        "id": "resp_1",
        "created_at": 0,
        "metadata": {},
        "model": "scripted-upstream",
        "object": "response",
        "output": [],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "status": status,
        "usage": usage,
        **extra,
    }


def responses_script(end: list[bytes], *, event_lines: bool = True) -> list[bytes]:
    def kind(name: str) -> str | None:
        return name if event_lines else None

    def delta(n: int, text: str) -> bytes:
        fields = {"content_index": 0, "delta": text, "item_id": "msg_1", "logprobs": [], "output_index": 0}
        return sse(kind("response.output_text.delta"), {**fields, "sequence_number": n, "type": kind_name})

    kind_name = "response.output_text.delta"
    created = {"response": response_object("in_progress", None), "sequence_number": 0, "type": "response.created"}
    item = {"id": "msg_1", "content": [], "role": "assistant", "status": "in_progress", "type": "message"}
    added = {"item": item, "output_index": 0, "sequence_number": 1, "type": "response.output_item.added"}
    part = {"annotations": [], "text": "", "type": "output_text"}
    part_added = {
        "content_index": 0,
        "item_id": "msg_1",
        "output_index": 0,
        "part": part,
        "sequence_number": 2,
        "type": "response.content_part.added",
    }
    return [
        sse(kind("response.created"), created),
        sse(kind("response.output_item.added"), added) + sse(kind("response.content_part.added"), part_added),
        delta(3, "a"),
        delta(4, " b"),
        *end,
    ]


USAGE = {
    "input_tokens": 7,
    "input_tokens_details": {"cached_tokens": 3},
    "output_tokens": 2,
    "output_tokens_details": {"reasoning_tokens": 0},
    "total_tokens": 9,
}


def test_a_backends_error_event_ends_the_response_stream_as_it_sent_it(
    gw: Gateway, client: openai.OpenAI, scripted: Scripted
) -> None:
    error = {"type": "error", "code": "server_error", "message": "engine died", "param": None, "sequence_number": 5}
    scripted.scripts.append(responses_script([sse("error", error)]))
    events, request_id = stream_responses(client, model="scripted-model", input="x")
    assert events[-1].type == "error" and events[-1].message == "engine died"
    assert [e.type for e in events].count("error") == 1  # the gateway adds none of its own
    billed = gw.billed(request_id)
    assert (billed["status"], billed["partial"], billed["completion_tokens"]) == (502, True, 2)


@pytest.mark.parametrize(
    ("kind", "status", "extra", "billed_as"),
    [
        ("response.incomplete", "incomplete", {"incomplete_details": {"reason": "max_output_tokens"}}, (200, False)),
        ("response.failed", "failed", {"error": {"code": "server_error", "message": "engine died"}}, (502, True)),
    ],
)
def test_incomplete_and_failed_end_the_response_stream_and_carry_its_usage(
    gw: Gateway,
    client: openai.OpenAI,
    scripted: Scripted,
    kind: str,
    status: str,
    extra: dict[str, Any],
    billed_as: tuple[int, bool],
) -> None:
    end = {"response": response_object(status, USAGE, **extra), "sequence_number": 5, "type": kind}
    scripted.scripts.append(responses_script([sse(kind, end)]))
    events, request_id = stream_responses(client, model="scripted-model", input="x")
    assert events[-1].type == kind and "error" not in [e.type for e in events]
    assert events[-1].response.model == "scripted-model"
    billed = gw.billed(request_id)
    assert (billed["status"], billed["partial"]) == billed_as
    assert (billed["prompt_tokens"], billed["completion_tokens"], billed["cached_tokens"]) == (7, 2, 3)
    assert billed["finish_reason"] == ("max_output_tokens" if status == "incomplete" else "failed")


def test_events_cut_anywhere_and_without_event_lines_arrive_whole(
    gw: Gateway, client: openai.OpenAI, scripted: Scripted
) -> None:
    end = {"response": response_object("completed", USAGE), "sequence_number": 5, "type": "response.completed"}
    whole = b"".join(responses_script([sse(None, end)], event_lines=False))
    # Written in 7-byte pieces: events and even the blank lines between them are split across reads.
    scripted.scripts.append([whole[i : i + 7] for i in range(0, len(whole), 7)])
    events, request_id = stream_responses(client, model="scripted-model", input="x")
    assert [e.type for e in events] == [
        "response.created",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.completed",
    ]
    assert events[-1].response.model == "scripted-model"
    billed = gw.billed(request_id)
    assert (billed["status"], billed["partial"], billed["prompt_tokens"], billed["completion_tokens"]) == (
        200,
        False,
        7,
        2,
    )


def test_a_backends_error_chunk_ends_the_chat_stream_as_it_sent_it(gw: Gateway, key: str, scripted: Scripted) -> None:
    chunk = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "scripted-upstream",
        "choices": [{"index": 0, "delta": {"content": "a"}, "finish_reason": None}],
    }
    failure = {"error": {"message": "engine died", "type": "InternalServerError", "param": None, "code": 500}}
    scripted.scripts.append([sse(None, chunk), sse(None, failure), b"data: [DONE]\n\n"])
    body = {"model": "scripted-model", "messages": [{"role": "user", "content": "x"}], "stream": True}
    resp = httpx.post(gw.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
    events = [e for e in resp.text.split("\n\n") if e]
    assert events[0].startswith("data: {") and '"model":"scripted-model"' in events[0]
    assert json.loads(events[1].removeprefix("data: ")) == failure  # relayed as sent, and only that one
    assert events[2:] == ["data: [DONE]"]
    billed = gw.billed(resp.headers["x-request-id"])
    assert (billed["status"], billed["partial"], billed["completion_tokens"]) == (502, True, 1)
