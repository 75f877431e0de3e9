"""Hosted providers and fallbacks, end to end: the official `openai` SDK -> the gateway (a real process) ->
litellm inside it -> the simulator's Anthropic Messages endpoint (a real process). Nothing is mocked.

Each gateway here runs under a guard (tests/support/netguard) that refuses, and records, every connection
and name lookup outside loopback and every import of litellm or tiktoken, from inside the process.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from gateway.upstream.providers import litellm_dir
from tests.support.admin import tenant_with_key
from tests.support.gateway import GatewayProc, start_gateway
from tests.support.procs import ROOT, free_port
from tests.support.sim import SimHandle, start_sim

pytestmark = pytest.mark.providers

if litellm_dir() is None:  # found, not imported: importing it here would fetch its price map
    pytest.skip("needs the `providers` extra (scripts/test runs it in .venv-providers)", allow_module_level=True)

PROVIDER_KEY = "sk-ant-test-0123456789"
PROVIDER_MODEL = "anthropic/claude-haiku-4-5"
GUARD = str(ROOT / "tests" / "support" / "netguard")
MESSAGES: list[Any] = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]


def guarded_env(log: Path, **extra: str) -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": GUARD + (os.pathsep + path if path else ""), "NETGUARD_LOG": str(log), **extra}


def guard_lines(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def bundled_price(model: str) -> tuple[float, float]:
    """USD per token, read straight from litellm's file (independently of the gateway's reader)."""
    root = litellm_dir()
    assert root is not None
    entry = json.loads((root / "model_prices_and_context_window_backup.json").read_text())[model.split("/", 1)[1]]
    return entry["input_cost_per_token"], entry["output_cost_per_token"]


def poll(predicate: Callable[[], bool], within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


class Events:
    """The gateway's jsonl billing sink, by request id."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def get(self, request_id: str) -> dict[str, Any]:
        found: dict[str, Any] = {}

        def seen() -> bool:
            if self.path.exists():
                for line in self.path.read_text().splitlines():
                    event = json.loads(line)
                    if event["data"]["request_id"] == request_id:
                        found.update(event["data"])
                        return True
            return False

        poll(seen)
        return found


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimHandle]:
    # Serves both sides: /v1/chat/completions as the vLLM backend, /v1/messages as the hosted provider.
    handle = start_sim(
        *("--ttft-ms", "0", "--itl-ms", "2", "--prefill-us-per-token", "0", "--max-tokens-default", "2000"),
        *("--api-key", PROVIDER_KEY),
        log_dir=tmp_path_factory.mktemp("sim"),
    )
    yield handle
    handle.stop()
    assert "Traceback" not in handle.output(), handle.output()


@pytest.fixture(scope="module")
def doomed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimHandle]:
    """A vLLM backend that a test kills after the gateway has seen it healthy."""
    handle = start_sim("--ttft-ms", "0", "--itl-ms", "0", log_dir=tmp_path_factory.mktemp("doomed"))
    yield handle
    handle.kill()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("providers")


@pytest.fixture(scope="module")
def gw(sim: SimHandle, doomed: SimHandle, workdir: Path) -> Iterator[GatewayProc]:
    def claude(name: str, key_env: str, url: str = sim.url) -> dict[str, Any]:
        return {"name": name, "kind": "litellm", "url": url, "provider_model": PROVIDER_MODEL, "api_key_env": key_env}

    config = {
        "backends": [
            {"name": "vllm-a", "kind": "vllm", "url": sim.url},
            {"name": "vllm-one", "kind": "vllm", "url": sim.url, "capacity": 1},
            {"name": "vllm-doomed", "kind": "vllm", "url": doomed.url},
            claude("claude", "PROVIDER_KEY"),
            claude("claude-badkey", "WRONG_KEY"),
            claude("claude-down", "PROVIDER_KEY", f"http://127.0.0.1:{free_port()}"),
        ],
        "models": [
            {"name": "haiku", "backends": ["claude"]},
            {"name": "haiku-priced", "backends": ["claude"], "price": {"input_per_1k": 1.0, "output_per_1k": 2.0}},
            {"name": "haiku-badkey", "backends": ["claude-badkey"]},
            {"name": "haiku-down", "backends": ["claude-down"]},
            {"name": "llama-or-claude", "backends": ["vllm-a", "claude"], "upstream_model": "sim-model"},
            {"name": "spill", "backends": ["vllm-one", "claude"]},
            {"name": "doomed-or-claude", "backends": ["vllm-doomed", "claude"]},
        ],
        "billing": {"sinks": [{"kind": "jsonl", "path": str(workdir / "billing.jsonl")}]},
        "shutdown_drain_s": 0,
    }
    env = guarded_env(workdir / "guard.log", PROVIDER_KEY=PROVIDER_KEY, WRONG_KEY="sk-ant-wrong")
    proc = start_gateway(config, workdir / "gw", env=env)
    yield proc
    proc.stop()
    assert "Traceback" not in proc.output(), proc.output()


@pytest.fixture(scope="module")
def key(gw: GatewayProc) -> str:
    return tenant_with_key(gw.url, gw.admin_key, "acme")


@pytest.fixture(scope="module")
def spill_key(gw: GatewayProc) -> str:
    return tenant_with_key(gw.url, gw.admin_key, "spiller", on_limit={"queue": "fallback"})


@pytest.fixture(scope="module")
def wait_key(gw: GatewayProc) -> str:
    return tenant_with_key(gw.url, gw.admin_key, "waiter", limits={"max_queue_wait_ms": 300})


@pytest.fixture
def client(gw: GatewayProc, key: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=20) as c:
        yield c


@pytest.fixture
def events(workdir: Path) -> Events:
    return Events(workdir / "billing.jsonl")


@pytest.fixture(autouse=True)
def clean_sim(sim: SimHandle) -> Iterator[None]:
    sim.reset()
    yield
    sim.reset()


def metric(gw: GatewayProc, pattern: str) -> float:
    text = httpx.get(gw.url + "/metrics").text
    values = [float(m.group(1)) for m in re.finditer(pattern + r" ([0-9.e+-]+)$", text, re.M)]
    return sum(values)


def last_messages_request(sim: SimHandle) -> dict[str, Any]:
    bodies = [b for b in sim.stats()["last_requests"] if "max_tokens" in b and "messages" in b]
    assert bodies
    body: dict[str, Any] = bodies[-1]
    return body


# -- the path: SDK -> gateway -> litellm -> /v1/messages ---------------------------------------------------


def test_non_stream_reaches_the_anthropic_api_and_is_billed_with_a_cost(
    client: openai.OpenAI, sim: SimHandle, events: Events
) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="haiku", messages=MESSAGES, max_tokens=5, temperature=0.5, extra_body={"top_k": 3}
    )
    completion = raw.parse()
    assert completion.model == "haiku"
    assert completion.choices[0].message.content == "tok0 tok1 tok2 tok3 tok4"
    assert completion.choices[0].finish_reason == "length"
    usage = completion.usage
    assert usage is not None
    # The simulator's count: "<|system|> be brief <|user|> hello there <|assistant|>".
    assert (usage.prompt_tokens, usage.completion_tokens) == (7, 5)

    sent = last_messages_request(sim)
    assert sent["model"] == "claude-haiku-4-5"
    assert sent["system"] in ("be brief", [{"type": "text", "text": "be brief"}])
    assert sent["max_tokens"] == 5 and sent["temperature"] == 0.5
    assert sent["top_k"] == 3  # a provider sampling parameter travels on
    assert "cache_salt" not in sent  # no salt for a hosted provider: it does not take one

    event = events.get(raw.headers["x-request-id"])
    per_in, per_out = bundled_price(PROVIDER_MODEL)
    assert event["backend"] == "claude" and event["status"] == 200
    assert (event["prompt_tokens"], event["completion_tokens"]) == (7, 5)
    assert event["cost"] == pytest.approx(7 * per_in + 5 * per_out) and event["cost"] > 0
    assert event["currency"] == "USD" and event["fallback_from"] is None


async def test_stream_relays_chunks_and_usage(gw: GatewayProc, key: str, events: Events) -> None:
    async with openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=20) as client:
        stream = await client.chat.completions.create(
            model="haiku", messages=MESSAGES, max_tokens=6, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
        request_id = stream.response.headers["x-request-id"]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "tok0 tok1 tok2 tok3 tok4 tok5"
    assert all(c.model == "haiku" for c in chunks)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    final = chunks[-1]
    assert final.choices == [] and final.usage is not None
    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (7, 6)
    event = events.get(request_id)
    assert event["stream"] is True and event["partial"] is False and event["completion_tokens"] == 6
    assert event["cost"] > 0 and event["timings"]["ttft_ms"] is not None


def test_stream_without_usage_asked_gets_none_but_is_metered(client: openai.OpenAI, events: Events) -> None:
    raw = client.chat.completions.with_raw_response.create(model="haiku", messages=MESSAGES, max_tokens=3, stream=True)
    chunks = list(raw.parse())
    assert all(c.usage is None for c in chunks) and all(c.choices for c in chunks)
    event = events.get(raw.headers["x-request-id"])
    assert (event["prompt_tokens"], event["completion_tokens"]) == (7, 3)


def test_a_provider_stream_ends_with_its_usage_chunk_and_done_and_is_billed_from_it(
    gw: GatewayProc, key: str, events: Events
) -> None:
    body = {"model": "haiku", "messages": MESSAGES, "max_tokens": 4, "stream": True}
    resp = httpx.post(
        gw.url + "/v1/chat/completions",
        json={**body, "stream_options": {"include_usage": True}},
        headers={"Authorization": f"Bearer {key}"},
        timeout=20,
    )
    sent = [e for e in resp.text.split("\n\n") if e]
    assert sent[-1] == "data: [DONE]" and "error" not in resp.text
    usage_chunk = orjson.loads(sent[-2].removeprefix("data: "))
    assert usage_chunk["choices"] == [] and usage_chunk["model"] == "haiku"
    usage = usage_chunk["usage"]
    event = events.get(resp.headers["x-request-id"])
    assert (event["status"], event["partial"], event["finish_reason"]) == (200, False, "length")
    assert (event["prompt_tokens"], event["completion_tokens"]) == (usage["prompt_tokens"], usage["completion_tokens"])
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (7, 4)


def test_litellm_arguments_cannot_come_from_the_client(client: openai.OpenAI, sim: SimHandle) -> None:
    # litellm reads its settings from the same keywords as the request's parameters; none may come from a tenant.
    hostile = {"mock_response": "pwned", "api_base": "http://10.0.0.1:9", "api_key": "x", "headers": {"a": "b"}}
    completion = client.chat.completions.create(model="haiku", messages=MESSAGES, max_tokens=2, extra_body=hostile)
    assert completion.choices[0].message.content == "tok0 tok1"  # the simulator answered, not a mock
    sent = last_messages_request(sim)
    assert not set(hostile) & set(sent)


def test_the_configured_price_wins_over_the_bundled_one(client: openai.OpenAI, events: Events) -> None:
    raw = client.chat.completions.with_raw_response.create(model="haiku-priced", messages=MESSAGES, max_tokens=4)
    event = events.get(raw.headers["x-request-id"])
    assert event["cost"] == pytest.approx(7 / 1000 * 1.0 + 4 / 1000 * 2.0)


def test_client_disconnect_mid_stream_stops_the_provider_stream(
    gw: GatewayProc, key: str, sim: SimHandle, events: Events
) -> None:
    body = {"model": "haiku", "messages": MESSAGES, "max_tokens": 1500, "stream": True}
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, headers=headers, timeout=10) as resp:
        request_id = resp.headers["x-request-id"]
        for line in resp.iter_lines():
            if '"content"' in line:
                break  # walk away after the first token (1,500 tokens would take 3 s)
    poll(lambda: sim.stats()["cancelled"] == 1, within_s=5)
    event = events.get(request_id)
    assert event["status"] == 499 and event["partial"] is True
    assert 0 < event["completion_tokens"] < 1500


# -- provider errors onto the gateway's own errors ---------------------------------------------------------


def test_a_rejected_provider_key_is_a_generic_502(client: openai.OpenAI, sim: SimHandle) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="haiku-badkey", messages=MESSAGES, max_tokens=3)
    assert info.value.status_code == 502
    text = info.value.response.text
    assert "x-api-key" not in text and sim.url not in text and "127.0.0.1" not in text


def test_a_provider_400_keeps_the_providers_message(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="haiku", messages=MESSAGES, max_tokens=3, temperature=1.7)
    assert "temperature" in info.value.message and "127.0.0.1" not in info.value.message


@pytest.mark.parametrize(("fault", "status"), [("error_429", 503), ("error_529", 502), ("error_500", 502)])
def test_provider_overload_and_failures(client: openai.OpenAI, sim: SimHandle, fault: str, status: int) -> None:
    sim.set_faults(fault, count=1, paths=["/v1/messages"])
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="haiku", messages=MESSAGES, max_tokens=3)
    assert info.value.status_code == status
    body = info.value.response.json()["error"]
    assert body["type"] == "server_error" and "127.0.0.1" not in body["message"]
    if status == 503:
        # The provider account's limit is not the caller's: no 429, no rate-limit words about the tenant.
        assert body["code"] == "backend_overloaded"


def test_an_unreachable_provider_is_a_502_naming_no_address(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="haiku-down", messages=MESSAGES, max_tokens=3)
    assert info.value.status_code == 502
    assert "127.0.0.1" not in info.value.response.text and "http" not in info.value.message


def test_only_chat_is_served_by_a_provider_backend(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="haiku", prompt="hello", max_tokens=3)
    assert "chat completions only" in info.value.message


# -- fallbacks ---------------------------------------------------------------------------------------------


def test_a_vllm_failure_falls_back_to_the_provider(
    client: openai.OpenAI, gw: GatewayProc, sim: SimHandle, events: Events
) -> None:
    before = metric(
        gw,
        r'gateway_fallbacks_total\{from_backend="vllm-a",model="llama-or-claude",'
        r'reason="http_500",to_backend="claude"\}',
    )
    sim.set_faults("error_500", count=1, paths=["/v1/chat/completions"])
    raw = client.chat.completions.with_raw_response.create(model="llama-or-claude", messages=MESSAGES, max_tokens=4)
    assert raw.headers["x-gateway-fallback-from"] == "vllm-a"
    assert raw.parse().choices[0].message.content == "tok0 tok1 tok2 tok3"
    assert raw.parse().model == "llama-or-claude"
    event = events.get(raw.headers["x-request-id"])
    assert (event["backend"], event["fallback_from"], event["fallback_reason"]) == ("claude", "vllm-a", "http_500")
    assert event["status"] == 200 and event["cost"] > 0
    after = metric(
        gw,
        r'gateway_fallbacks_total\{from_backend="vllm-a",model="llama-or-claude",'
        r'reason="http_500",to_backend="claude"\}',
    )
    assert after == before + 1
    # Without a failure, vLLM serves, with its salt, and nobody is told about a fallback.
    raw = client.chat.completions.with_raw_response.create(model="llama-or-claude", messages=MESSAGES, max_tokens=2)
    assert "x-gateway-fallback-from" not in raw.headers
    assert "cache_salt" in sim.stats()["last_requests"][-1]


def test_a_stream_falls_back_before_its_first_byte(client: openai.OpenAI, sim: SimHandle, events: Events) -> None:
    sim.set_faults("error_503", count=1, paths=["/v1/chat/completions"])
    raw = client.chat.completions.with_raw_response.create(
        model="llama-or-claude", messages=MESSAGES, max_tokens=3, stream=True
    )
    assert raw.headers["x-gateway-fallback-from"] == "vllm-a"
    text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    assert text == "tok0 tok1 tok2"
    event = events.get(raw.headers["x-request-id"])
    assert (event["backend"], event["fallback_reason"], event["stream"]) == ("claude", "http_503", True)


def test_a_dead_backend_falls_back_then_is_ejected(client: openai.OpenAI, gw: GatewayProc, doomed: SimHandle) -> None:
    assert client.chat.completions.create(model="doomed-or-claude", messages=MESSAGES, max_tokens=2).choices
    assert doomed.stats()["completed"] == 1  # served by vLLM while it was alive
    doomed.kill()
    for _ in range(4):
        raw = client.chat.completions.with_raw_response.create(
            model="doomed-or-claude", messages=MESSAGES, max_tokens=2
        )
        assert raw.parse().choices[0].message.content == "tok0 tok1"
        assert raw.headers["x-gateway-fallback-from"] == "vllm-doomed"
    # Three refused connections eject it: the fourth request went to the provider without trying it.
    assert metric(gw, r'gateway_backend_ejections_total\{backend="vllm-doomed"\}') == 1
    prefix = r'gateway_fallbacks_total\{from_backend="vllm-doomed",model="doomed-or-claude",reason='
    assert metric(gw, prefix + r'"connect_error",to_backend="claude"\}') == 3
    assert metric(gw, prefix + r'"unavailable",to_backend="claude"\}') == 1


def test_a_saturated_backend_spills_over_only_when_the_tenant_allows(
    gw: GatewayProc, sim: SimHandle, spill_key: str, wait_key: str, events: Events
) -> None:
    # One request holds the only slot of vllm-one (capacity 1): the simulator never answers it.
    sim.set_faults("hang", count=1, paths=["/v1/chat/completions"])
    holder = threading.Thread(target=_ignore_timeout, args=(gw, wait_key))
    holder.start()
    poll(lambda: sim.stats()["active"] == 1)
    try:
        with openai.OpenAI(base_url=gw.url + "/v1", api_key=spill_key, max_retries=0, timeout=10) as spiller:
            raw = spiller.chat.completions.with_raw_response.create(model="spill", messages=MESSAGES, max_tokens=2)
        assert raw.headers["x-gateway-fallback-from"] == "vllm-one"
        event = events.get(raw.headers["x-request-id"])
        assert (event["backend"], event["fallback_reason"]) == ("claude", "saturated")
        # A tenant without the policy waits for vllm-one (and here gives up after its 300 ms).
        waiter = openai.OpenAI(base_url=gw.url + "/v1", api_key=wait_key, max_retries=0, timeout=10)
        with waiter, pytest.raises(openai.RateLimitError) as info:
            waiter.chat.completions.create(model="spill", messages=MESSAGES, max_tokens=2)
        assert "queue" in info.value.message
    finally:
        holder.join(10)
    poll(lambda: sim.stats()["active"] == 0)


def _ignore_timeout(gw: GatewayProc, key: str) -> None:
    # The holder walks away after 2.5 s; the gateway (watching a stream's client) then frees the slot.
    with contextlib.suppress(httpx.TimeoutException):
        httpx.post(
            gw.url + "/v1/chat/completions",
            json={"model": "spill", "messages": MESSAGES, "max_tokens": 2, "stream": True},
            headers={"Authorization": f"Bearer {key}"},
            timeout=2.5,
        )


# -- offline, and no litellm where none is configured -----------------------------------------------------


def test_the_provider_gateway_made_no_connection_outside_loopback(
    gw: GatewayProc, client: openai.OpenAI, workdir: Path
) -> None:
    client.chat.completions.create(model="haiku", messages=MESSAGES, max_tokens=2)
    lines = guard_lines(workdir / "guard.log")
    assert "import litellm" in lines  # the guard works: it saw litellm load
    assert [line for line in lines if not line.startswith("import ")] == []
    assert "litellm 1.104.9 loaded offline" in gw.output()


def test_a_vllm_only_gateway_never_imports_litellm(sim: SimHandle, tmp_path: Path) -> None:
    config = {
        "backends": [{"name": "vllm-a", "kind": "vllm", "url": sim.url}],
        "models": [{"name": "llama", "backends": ["vllm-a"]}],
        "shutdown_drain_s": 0,
    }
    log = tmp_path / "guard.log"
    proc = start_gateway(config, tmp_path / "gw", env=guarded_env(log))
    try:
        key = tenant_with_key(proc.url, proc.admin_key, "solo")
        with openai.OpenAI(base_url=proc.url + "/v1", api_key=key, max_retries=0) as client:
            assert client.chat.completions.create(model="llama", messages=MESSAGES, max_tokens=2).choices
            assert list(client.chat.completions.create(model="llama", messages=MESSAGES, max_tokens=2, stream=True))
    finally:
        assert proc.stop() == 0
    assert guard_lines(log) == []  # neither litellm nor tiktoken, and no connection outside loopback


def test_price_map_and_tokenizer_come_from_the_package() -> None:
    from gateway.upstream.providers import bundled_prices, cl100k_file, offline_environment

    env = offline_environment()
    assert env["LITELLM_LOCAL_MODEL_COST_MAP"] == "True" and env["LITELLM_MODE"] == "PRODUCTION"
    root = litellm_dir()
    assert root is not None and Path(env["TIKTOKEN_CACHE_DIR"]).is_relative_to(root)
    tokens = cl100k_file()
    assert tokens is not None and tokens.parent == Path(env["TIKTOKEN_CACHE_DIR"])
    per_in, per_out = bundled_price(PROVIDER_MODEL)
    price = bundled_prices([PROVIDER_MODEL, "anthropic/no-such-model"])
    assert list(price) == [PROVIDER_MODEL]
    assert (price[PROVIDER_MODEL].input_per_1k, price[PROVIDER_MODEL].output_per_1k) == pytest.approx(
        (per_in * 1000, per_out * 1000)
    )
    assert orjson.loads(orjson.dumps(env))  # plain strings only
