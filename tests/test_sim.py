"""The vLLM simulator, tested as a real process over loopback with the official openai SDK as the client."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest

from gateway.sim.slots import Slots
from tests.support.procs import python_cmd
from tests.support.sim import SimHandle, start_sim

ZERO_LATENCY = ("--ttft-ms", "0", "--itl-ms", "0", "--prefill-us-per-token", "0")
BLOCK = 16  # the simulator's default --block-size
# A 1,000-word user message is 1,002 prompt tokens with the chat template: 62 full blocks.
THOUSAND_WORD_HIT = 62 * BLOCK


def words(n: int, tag: str = "w") -> str:
    return " ".join(f"{tag}{i}" for i in range(n))


def output(n: int) -> str:
    """The simulator's text of n generated tokens."""
    return " ".join(f"tok{i}" for i in range(n))


def chat_body(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": content}], **extra}


def wait_until(predicate: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def _sim_fixture(*args: str) -> Callable[..., Iterator[SimHandle]]:
    @pytest.fixture(scope="module")
    def fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimHandle]:
        sim = start_sim(*args, log_dir=tmp_path_factory.mktemp("sim"))
        yield sim
        sim.stop()
        # Faults and cancellations are normal events; none may surface as an error of the app.
        assert "Traceback" not in sim.output(), sim.output()

    return fixture


fast_sim = _sim_fixture(*ZERO_LATENCY)
old_vllm_sim = _sim_fixture(*ZERO_LATENCY, "--ignore-cache-salt", "--model", "a", "--model", "b")
tiny_cache_sim = _sim_fixture(*ZERO_LATENCY, "--cache-blocks", "4")
timed_sim = _sim_fixture("--ttft-ms", "5", "--itl-ms", "20", "--prefill-us-per-token", "100", "--max-concurrency", "1")


@pytest.fixture
def sim(fast_sim: SimHandle) -> SimHandle:
    fast_sim.reset()
    return fast_sim


@pytest.fixture
def timed(timed_sim: SimHandle) -> Iterator[SimHandle]:
    timed_sim.reset()
    yield timed_sim
    wait_until(lambda: timed_sim.stats()["active"] == 0, timeout=10)


@pytest.fixture
def client(sim: SimHandle) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=sim.base_url, api_key="x", max_retries=0, timeout=10) as c:
        yield c


def post(sim: SimHandle, path: str, body: Any, timeout: float = 10) -> httpx.Response:
    return sim.post(path, body, timeout)


def cached(sim: SimHandle, body: dict[str, Any], path: str = "/v1/chat/completions") -> int:
    response = post(sim, path, body)
    assert response.status_code == 200, response.text
    value: int = response.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    return value


# -- shapes ----------------------------------------------------------------------------------------------


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["sim-model"]
    card = client.models.retrieve("sim-model")
    assert (card.id, card.object, card.owned_by) == ("sim-model", "model", "vllm")
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("no-such-model")
    assert err.value.body is not None


def test_chat_completion_shape(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="any-name", messages=[{"role": "user", "content": "one two three"}], max_tokens=3
    )
    assert reply.id.startswith("chatcmpl-")
    assert (reply.object, reply.model) == ("chat.completion", "any-name")
    choice = reply.choices[0]
    assert (choice.message.role, choice.message.content, choice.finish_reason) == (
        "assistant",
        "tok0 tok1 tok2",
        "length",
    )
    assert reply.usage is not None
    # Three words plus the "<|user|>" and "<|assistant|>" template tokens.
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (5, 3, 8)
    assert reply.usage.prompt_tokens_details is not None
    assert reply.usage.prompt_tokens_details.cached_tokens == 0


def test_chat_without_limit_uses_default_and_stops(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="m",
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        ],
    )
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 16
    assert reply.usage.prompt_tokens == 2 + 1 + 2 + 1


def test_max_completion_tokens_wins(client: openai.OpenAI) -> None:
    """As in vLLM: chat reads max_completion_tokens first, whichever of the two is smaller."""
    for completion_limit, legacy_limit in ((2, 9), (9, 2)):
        reply = client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "x"}],
            max_completion_tokens=completion_limit,
            max_tokens=legacy_limit,
        )
        assert reply.choices[0].message.content == output(completion_limit)
        assert reply.usage is not None and reply.usage.completion_tokens == completion_limit


def test_n_choices_share_the_prompt_and_sum_their_tokens(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], n=3, max_tokens=4)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert {c.message.content for c in reply.choices} == {output(4)}
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (3, 12)  # the prompt is read once
    done = client.completions.create(model="m", prompt="a b c", n=2, max_tokens=5)
    assert [(c.index, c.text, c.finish_reason) for c in done.choices] == [(i, output(5), "length") for i in (0, 1)]
    assert done.usage is not None and (done.usage.prompt_tokens, done.usage.completion_tokens) == (3, 10)


def test_n_without_a_limit_gives_each_choice_the_default(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], n=2)
    assert reply.usage is not None and reply.usage.completion_tokens == 2 * 16
    assert {c.finish_reason for c in reply.choices} == {"stop"}


def test_a_list_of_prompts_is_a_batch_each_with_n_choices(client: openai.OpenAI) -> None:
    reply = client.completions.create(model="m", prompt=["a b", "c d e"], n=2, max_tokens=3)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert {c.text for c in reply.choices} == {output(3)}
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (2 + 3, 4 * 3)
    by_ids = client.completions.create(model="m", prompt=[[1, 2], [3], [4, 5, 6]], max_tokens=2)
    assert len(by_ids.choices) == 3
    assert by_ids.usage is not None and (by_ids.usage.prompt_tokens, by_ids.usage.completion_tokens) == (6, 6)
    # One prompt given as a list of one is not a batch.
    single = client.completions.create(model="m", prompt=["a b c"], max_tokens=1)
    assert len(single.choices) == 1


def test_each_prompt_of_a_batch_meets_the_prefix_cache(sim: SimHandle) -> None:
    body = {"model": "m", "prompt": [words(40, "a"), words(40, "b")], "max_tokens": 1}
    assert cached(sim, body, "/v1/completions") == 0
    # 40 tokens each: two whole blocks of each prompt are reused.
    assert cached(sim, body, "/v1/completions") == 2 * 2 * BLOCK


def test_completion_shape(client: openai.OpenAI) -> None:
    reply = client.completions.create(model="m", prompt="a b c d", max_tokens=2)
    assert reply.id.startswith("cmpl-")
    assert reply.object == "text_completion"
    assert (reply.choices[0].text, reply.choices[0].finish_reason) == ("tok0 tok1", "length")
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (4, 2)
    by_ids = client.completions.create(model="m", prompt=[1, 2, 3], max_tokens=1)
    assert by_ids.usage is not None
    assert by_ids.usage.prompt_tokens == 3


def test_embeddings(sim: SimHandle, client: openai.OpenAI) -> None:
    result = client.embeddings.create(model="e", input=["hello world", "other text here"])
    assert result.model == "e"
    assert [d.index for d in result.data] == [0, 1]
    for item in result.data:
        assert len(item.embedding) == 16
        assert math.isclose(math.fsum(v * v for v in item.embedding), 1.0, rel_tol=1e-5)
    assert result.usage.prompt_tokens == result.usage.total_tokens == 5
    again = post(sim, "/v1/embeddings", {"model": "e", "input": "hello world", "encoding_format": "float"}).json()
    assert again["data"][0]["embedding"] == pytest.approx(result.data[0].embedding, rel=1e-6)
    assert post(sim, "/v1/embeddings", {"model": "e", "input": [[1, 2], [3]]}).json()["usage"]["prompt_tokens"] == 3


def test_responses(sim: SimHandle, client: openai.OpenAI) -> None:
    reply = client.responses.create(model="r", input="say something", max_output_tokens=4)
    assert reply.object == "response"
    assert reply.output_text == "tok0 tok1 tok2 tok3"
    assert reply.usage is not None
    assert (reply.usage.input_tokens, reply.usage.output_tokens) == (4, 4)
    assert reply.usage.input_tokens_details.cached_tokens == 0
    # As vLLM reports a generation that stopped at its length limit.
    assert reply.status == "incomplete" and reply.incomplete_details is not None
    assert reply.incomplete_details.reason == "max_output_tokens"
    items = client.responses.create(model="r", input=[{"role": "user", "content": "a b"}], instructions="sys")
    assert items.usage is not None
    assert items.usage.input_tokens == (1 + 1) + (1 + 2) + 1  # system, user, assistant prompt
    assert items.status == "completed" and items.incomplete_details is None


def test_responses_stream_as_vllm_does(sim: SimHandle, client: openai.OpenAI) -> None:
    with sim.http.stream("POST", "/v1/responses", json={"model": "r", "input": "a b", "stream": True}) as raw:
        lines = [line for line in raw.iter_lines() if line]
    # Every event is an event line and a data line of that type; no [DONE].
    assert len(lines) % 2 == 0 and "data: [DONE]" not in lines
    for event, data in zip(lines[::2], lines[1::2], strict=True):
        assert event.removeprefix("event: ") == json.loads(data.removeprefix("data: "))["type"]
    events = list(client.responses.create(model="r", input="say something", max_output_tokens=3, stream=True))
    assert [e.type for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 3,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].response.usage is None and events[0].response.status == "in_progress"
    final = events[-1].response
    assert final.output_text == "tok0 tok1 tok2" and final.status == "incomplete"
    assert final.usage is not None and (final.usage.input_tokens, final.usage.output_tokens) == (4, 3)
    # The SDK's own assembly of the stream (it checks every item's identity) agrees.
    with client.responses.stream(model="r", input="say something") as stream:
        assembled = stream.get_final_response()
    assert assembled.output_text == " ".join(f"tok{i}" for i in range(16)) and assembled.status == "completed"


def test_responses_stream_cut_by_a_fault(sim: SimHandle) -> None:
    sim.set_faults("drop_midstream", count=1, after_tokens=2, paths=["/v1/responses"])
    body = {"model": "r", "input": "x", "max_output_tokens": 10, "stream": True}
    seen: list[str] = []
    with pytest.raises(httpx.RemoteProtocolError), sim.http.stream("POST", "/v1/responses", json=body) as response:
        seen.extend(line for line in response.iter_lines() if line.startswith("event: "))
    assert seen.count("event: response.output_text.delta") == 2 and "event: response.completed" not in seen
    assert sim.stats()["dropped"] == 1


@pytest.mark.parametrize(
    "body",
    [
        {"messages": "not a list"},
        {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
        {"messages": [{"role": "user", "content": "x"}], "max_tokens": "5"},
        {"messages": [{"role": "user", "content": "x"}], "max_tokens": 10**9},
        {"messages": [{"role": "user", "content": "x"}], "n": 0},
        {"messages": [{"role": "user", "content": "x"}], "n": "2"},
    ],
)
def test_bad_requests_are_400(sim: SimHandle, body: dict[str, Any]) -> None:
    response = post(sim, "/v1/chat/completions", body)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "BadRequestError"


def test_malformed_json_is_400(sim: SimHandle) -> None:
    for raw in (b"{not json", b"[1, 2]", b"\xff\xfe"):
        response = sim.http.post("/v1/chat/completions", content=raw)
        assert response.status_code == 400
        assert response.json()["error"]["code"] == 400


def test_unknown_route_is_openai_shaped_404(sim: SimHandle) -> None:
    response = sim.get("/v1/nothing")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "NotFoundError"


# -- streaming -------------------------------------------------------------------------------------------


def test_stream_one_chunk_per_token_without_usage(client: openai.OpenAI) -> None:
    with client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=5, stream=True
    ) as stream:
        chunks = list(stream)
    assert len(chunks) == 1 + 5
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "tok0 tok1 tok2 tok3 tok4"
    assert [c.choices[0].finish_reason for c in chunks][-2:] == [None, "length"]
    assert all(c.usage is None and c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1


def test_stream_usage_chunk_only_when_asked(client: openai.OpenAI) -> None:
    with client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        stream=True,
        stream_options={"include_usage": True},
    ) as stream:
        chunks = list(stream)
    assert len(chunks) == 1 + 3 + 1
    final = chunks[-1]
    assert final.choices == []
    assert final.usage is not None
    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (3, 3)
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_stream(client: openai.OpenAI) -> None:
    with client.completions.create(
        model="m", prompt="a b", max_tokens=4, stream=True, stream_options={"include_usage": True}
    ) as stream:
        chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "tok0 tok1 tok2 tok3"
    assert len(chunks) == 4 + 1
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == 6


def test_stream_with_n_sends_every_choice_each_token(client: openai.OpenAI) -> None:
    with client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "hi"}],
        n=3,
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
    ) as stream:
        chunks = list(stream)
    texts = ["", "", ""]
    roles = []
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        texts[choice.index] += choice.delta.content or ""
        if choice.delta.role:
            roles.append(choice.index)
    assert roles == [0, 1, 2]
    assert texts == [output(4)] * 3
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (3, 12)


def test_stream_of_a_batch(client: openai.OpenAI) -> None:
    with client.completions.create(
        model="m", prompt=["a", "b c"], n=2, max_tokens=2, stream=True, stream_options={"include_usage": True}
    ) as stream:
        chunks = list(stream)
    by_index: dict[int, str] = {}
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        by_index[choice.index] = by_index.get(choice.index, "") + choice.text
    assert by_index == dict.fromkeys(range(4), output(2))
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (3, 8)


def test_raw_sse_framing(sim: SimHandle) -> None:
    body = chat_body("hi", max_tokens=2, stream=True)
    with sim.http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        text = response.read().decode()
    events = text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(e.startswith("data: ") for e in events[:-1])


# -- prefix cache and cache_salt --------------------------------------------------------------------------


def test_repeated_prompt_hits_whole_blocks(sim: SimHandle) -> None:
    body = chat_body(words(1000), max_tokens=1)
    assert cached(sim, body) == 0
    assert cached(sim, body) == THOUSAND_WORD_HIT
    assert sim.metric("vllm:prefix_cache_hits_total") == THOUSAND_WORD_HIT
    assert sim.metric("vllm:prefix_cache_queries_total") == 2 * 1002


def test_shared_prefix_hits_only_common_blocks(sim: SimHandle) -> None:
    cached(sim, {"model": "m", "prompt": words(100), "max_tokens": 1}, "/v1/completions")
    # Same first 40 words, then different: blocks 0 and 1 (32 tokens) are shared.
    other = words(40) + " " + words(60, "x")
    assert cached(sim, {"model": "m", "prompt": other, "max_tokens": 1}, "/v1/completions") == 2 * BLOCK


def test_full_prompt_hit_still_recomputes_last_token(sim: SimHandle) -> None:
    body = {"model": "m", "prompt": words(32), "max_tokens": 1}
    cached(sim, body, "/v1/completions")
    # Both blocks are cached, but vLLM never serves the whole prompt from cache.
    assert cached(sim, body, "/v1/completions") == BLOCK


def test_cache_salt_isolates_prefixes(sim: SimHandle) -> None:
    prompt = words(1000)
    assert cached(sim, chat_body(prompt, max_tokens=1, cache_salt="tenant-a")) == 0
    assert cached(sim, chat_body(prompt, max_tokens=1, cache_salt="tenant-a")) == THOUSAND_WORD_HIT
    assert cached(sim, chat_body(prompt, max_tokens=1, cache_salt="tenant-b")) == 0
    assert cached(sim, chat_body(prompt, max_tokens=1)) == 0
    assert cached(sim, chat_body(prompt, max_tokens=1, cache_salt=None)) == THOUSAND_WORD_HIT
    assert cached(sim, chat_body(prompt, max_tokens=1, cache_salt="tenant-b")) == THOUSAND_WORD_HIT


@pytest.mark.parametrize("salt", ["", "x" * 129, "a/b", "a@b", "a\\b", "a\x00b", 7, ["s"]], ids=lambda s: repr(s)[:12])
@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", chat_body("hi")),
        ("/v1/completions", {"model": "m", "prompt": "hi"}),
        ("/v1/embeddings", {"model": "m", "input": "hi"}),
        ("/v1/responses", {"model": "m", "input": "hi"}),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_invalid_cache_salt_is_rejected(sim: SimHandle, salt: Any, path: str, body: dict[str, Any]) -> None:
    response = post(sim, path, {**body, "cache_salt": salt})
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("BadRequestError", "cache_salt", 400)


def test_longest_valid_salt_is_accepted(sim: SimHandle) -> None:
    assert post(sim, "/v1/chat/completions", chat_body("hi", cache_salt="A-_" + "x" * 125)).status_code == 200


def test_old_vllm_ignores_cache_salt(old_vllm_sim: SimHandle) -> None:
    sim = old_vllm_sim
    sim.reset()
    assert post(sim, "/v1/chat/completions", chat_body("hi", cache_salt="")).status_code == 200
    assert post(sim, "/v1/embeddings", {"model": "m", "input": "x", "cache_salt": "a/b"}).status_code == 200
    prompt = words(1000)
    assert cached(sim, chat_body(prompt, max_tokens=1, cache_salt="tenant-a")) == 0
    assert cached(sim, chat_body(prompt, max_tokens=1, cache_salt="tenant-b")) == THOUSAND_WORD_HIT


def test_served_models_are_listed(old_vllm_sim: SimHandle) -> None:
    with openai.OpenAI(base_url=old_vllm_sim.base_url, api_key="x", max_retries=0) as client:
        assert [m.id for m in client.models.list()] == ["a", "b"]
        assert client.models.retrieve("b").id == "b"
        # Any model name is served all the same, so a gateway can map names freely.
        reply = client.completions.create(model="whatever", prompt="x", max_tokens=1)
        assert reply.model == "whatever"


def test_invalid_flags_exit_2() -> None:
    done = subprocess.run(python_cmd("sim", "--block-size", "0"), capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "block_size" in done.stderr


def test_lru_eviction(tiny_cache_sim: SimHandle) -> None:
    sim = tiny_cache_sim
    sim.reset()
    p1, p2, p3 = ({"model": "m", "prompt": words(33, tag), "max_tokens": 1} for tag in "abc")

    def hit(body: dict[str, Any]) -> int:
        return cached(sim, body, "/v1/completions")

    assert hit(p1) == 0
    assert hit(p2) == 0  # the cache (4 blocks) is now full
    assert hit(p1) == 2 * BLOCK  # p1 becomes the most recently used
    assert hit(p3) == 0  # evicts p2, the least recently used
    assert sim.stats()["cache_blocks"] == 4
    assert hit(p1) == 2 * BLOCK
    assert hit(p2) == 0


# -- timing, queueing, cancellation -----------------------------------------------------------------------


def time_to_first_token(sim: SimHandle, body: dict[str, Any]) -> float:
    elapsed: float | None = None
    start = time.perf_counter()
    with sim.http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        for line in r.iter_lines():
            if elapsed is None and '"content":"tok0"' in line:
                elapsed = time.perf_counter() - start
    assert elapsed is not None, "no token arrived"
    return elapsed


def test_ttft_grows_with_uncached_tokens(timed: SimHandle) -> None:
    # 5 ms base + 100 us per uncached token.
    long_prompt = chat_body(words(2000), max_tokens=1)
    miss = time_to_first_token(timed, long_prompt)
    hit = time_to_first_token(timed, long_prompt)
    short = time_to_first_token(timed, chat_body(words(200, "s"), max_tokens=1))
    assert miss > 4 * hit
    assert miss > 3 * short
    assert short > hit
    assert miss >= 0.2


def test_stream_chunks_arrive_as_produced(timed: SimHandle) -> None:
    arrivals: list[float] = []
    body = chat_body("x", max_tokens=6, stream=True)  # one token every 20 ms
    with timed.http.stream("POST", "/v1/chat/completions", json=body) as response:
        for line in response.iter_lines():
            if '"content":"' in line and '"content":""' not in line:
                arrivals.append(time.perf_counter())
    assert len(arrivals) == 6
    # Tokens are flushed as they are made, not buffered to the end (a loaded host may bunch a few).
    gaps = sorted(b - a for a, b in itertools.pairwise(arrivals))
    assert gaps[len(gaps) // 2] > 0.010
    assert arrivals[-1] - arrivals[0] > 0.080


def test_waiting_queue_shows_in_metrics(timed: SimHandle) -> None:
    body = chat_body("queue me", max_tokens=10)  # about 200 ms each, one at a time
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(post, timed, "/v1/chat/completions", body) for _ in range(3)]
        wait_until(lambda: timed.metric("vllm:num_requests_waiting") == 2)
        assert timed.metric("vllm:num_requests_running") == 1
        assert 0 < timed.metric("vllm:kv_cache_usage_perc") <= 1
        assert timed.stats()["waiting"] == 2
        assert all(f.result().status_code == 200 for f in futures)
    assert timed.metric("vllm:num_requests_waiting") == 0
    assert timed.metric("vllm:num_requests_running") == 0


def test_queue_time_is_counted_as_vllm_counts_it(timed: SimHandle) -> None:
    # vLLM's request_queue_time_seconds: every request that got a slot, with how long it waited for it.
    total, count = (
        timed.metric("vllm:request_queue_time_seconds_sum"),
        timed.metric("vllm:request_queue_time_seconds_count"),
    )
    body = chat_body("queue me too", max_tokens=10)  # about 200 ms each, one at a time
    with ThreadPoolExecutor(3) as pool:
        assert all(
            f.status_code == 200 for f in pool.map(lambda _: post(timed, "/v1/chat/completions", body), range(3))
        )
    assert timed.metric("vllm:request_queue_time_seconds_count") - count == 3
    waited = timed.metric("vllm:request_queue_time_seconds_sum") - total
    assert 0.45 < waited < 1.5, waited  # 0 + about 0.2 + about 0.4: the second and third waited their turn
    text = timed.metrics()
    assert 'vllm:request_queue_time_seconds_bucket{le="+Inf",' in text
    assert "# TYPE vllm:request_queue_time_seconds histogram" in text


def test_stream_closed_midway_is_cancelled(timed: SimHandle) -> None:
    body = chat_body("long story", max_tokens=500, stream=True)  # 10 s if nobody stops it
    with timed.http.stream("POST", "/v1/chat/completions", json=body) as response:
        lines = response.iter_lines()
        assert sum(1 for line in (next(lines) for _ in range(6)) if line.startswith("data: ")) == 3
    wait_until(lambda: timed.stats()["cancelled"] == 1, timeout=2)
    stats = timed.stats()
    assert (stats["active"], stats["running"], stats["completed"]) == (0, 0, 0)


def test_waiting_client_that_gives_up_leaves_the_queue(timed: SimHandle) -> None:
    body = chat_body("slow", max_tokens=15)  # about 300 ms
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(post, timed, "/v1/chat/completions", body)
        wait_until(lambda: timed.stats()["running"] == 1)
        with pytest.raises(httpx.ReadTimeout):
            post(timed, "/v1/chat/completions", body, timeout=0.1)
        wait_until(lambda: timed.stats()["cancelled"] == 1)
        assert timed.stats()["waiting"] == 0
        assert first.result().status_code == 200
    assert post(timed, "/v1/chat/completions", chat_body("next", max_tokens=1)).status_code == 200


def test_nonstream_client_timeout_during_decode_is_cancelled(timed: SimHandle) -> None:
    with pytest.raises(httpx.ReadTimeout):
        post(timed, "/v1/chat/completions", chat_body("slow", max_tokens=50), timeout=0.2)
    wait_until(lambda: timed.stats()["cancelled"] == 1)
    assert timed.stats()["running"] == 0


async def test_slots_are_fifo_and_waiters_can_leave() -> None:
    slots = Slots(1)
    assert slots.try_acquire()
    order: list[str] = []

    async def worker(name: str) -> None:
        await slots.acquire()
        order.append(name)

    tasks = {name: asyncio.create_task(worker(name)) for name in "abc"}
    await asyncio.sleep(0)
    assert (slots.running, slots.waiting) == (1, 3)
    tasks["b"].cancel()
    await asyncio.sleep(0)
    assert slots.waiting == 2
    assert not slots.try_acquire()  # a newcomer never overtakes the queue
    for _ in range(3):
        slots.release()
        await asyncio.sleep(0)
    assert order == ["a", "c"]
    assert (slots.running, slots.waiting) == (0, 0)
    await asyncio.gather(*tasks.values(), return_exceptions=True)


# -- faults ----------------------------------------------------------------------------------------------


def test_fault_error_500_then_recovers(sim: SimHandle, client: openai.OpenAI) -> None:
    sim.set_faults("error_500", count=1)
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    stats = sim.stats()
    assert (stats["faulted"], stats["failed"], stats["completed"]) == (1, 1, 1)


def test_fault_error_503_until_reset(sim: SimHandle) -> None:
    sim.set_faults("error_503")
    for _ in range(3):
        response = post(sim, "/v1/completions", {"model": "m", "prompt": "x"})
        assert response.status_code == 503
        assert response.json()["error"]["type"] == "ServiceUnavailableError"
    # Probes are not hit unless a test names them.
    assert sim.get("/health").status_code == 200
    assert sim.get("/v1/models").status_code == 200
    sim.reset()
    assert post(sim, "/v1/completions", {"model": "m", "prompt": "x"}).status_code == 200


def test_fault_paths_can_target_probes(sim: SimHandle) -> None:
    sim.set_faults("error_503", paths=["/v1/models", "/health"])
    assert sim.get("/v1/models").status_code == 503
    assert sim.get("/health").status_code == 503
    assert post(sim, "/v1/completions", {"model": "m", "prompt": "x"}).status_code == 200
    sim.set_faults("close_connection", paths=["/health"])
    with pytest.raises(httpx.RemoteProtocolError):
        sim.get("/health")


def test_fault_hang_until_client_leaves(sim: SimHandle) -> None:
    sim.set_faults("hang", count=1)
    with pytest.raises(httpx.ReadTimeout):
        post(sim, "/v1/chat/completions", chat_body("x"), timeout=0.3)
    wait_until(lambda: sim.stats()["cancelled"] == 1)
    assert sim.stats()["active"] == 0


def test_fault_drop_midstream(sim: SimHandle) -> None:
    sim.set_faults("drop_midstream", count=1, after_tokens=2)
    seen: list[str] = []
    with (
        pytest.raises(httpx.RemoteProtocolError),
        sim.http.stream("POST", "/v1/chat/completions", json=chat_body("x", max_tokens=10, stream=True)) as response,
    ):
        assert response.status_code == 200
        seen.extend(line for line in response.iter_lines() if line)
    assert len(seen) == 1 + 2
    assert sim.stats()["dropped"] == 1


def test_fault_drop_midstream_with_openai_sdk(sim: SimHandle, client: openai.OpenAI) -> None:
    sim.set_faults("drop_midstream", count=1, after_tokens=3)
    received = 0
    # openai 3.x wraps the cut in APIError; 2.x (what litellm 1.104 allows) lets httpx's error through.
    with pytest.raises((openai.APIError, httpx.TransportError)):
        stream = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}], max_tokens=20, stream=True
        )
        with stream:
            for _ in stream:
                received += 1
    assert received == 1 + 3


def test_fault_drop_non_streaming(sim: SimHandle) -> None:
    sim.set_faults("drop_midstream", count=1)
    with pytest.raises(httpx.RemoteProtocolError):
        post(sim, "/v1/embeddings", {"model": "m", "input": "x"})


def test_fault_close_connection(sim: SimHandle, client: openai.OpenAI) -> None:
    sim.set_faults("close_connection", count=2)
    with pytest.raises(openai.APIConnectionError):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(httpx.RemoteProtocolError):
        post(sim, "/v1/completions", {"model": "m", "prompt": "x"})
    client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert sim.stats()["dropped"] == 2


def test_fault_plan_is_validated(sim: SimHandle) -> None:
    assert post(sim, "/sim/faults", {"mode": "explode"}).status_code == 400
    assert post(sim, "/sim/faults", {"mode": "hang", "count": -1}).status_code == 400
    assert sim.set_faults("none")["mode"] == "none"


# -- stats -----------------------------------------------------------------------------------------------


def test_stats_record_requests(sim: SimHandle) -> None:
    for i in range(55):
        post(sim, "/v1/completions", {"model": "m", "prompt": f"p{i}", "max_tokens": 1})
    post(sim, "/v1/chat/completions", chat_body("last"))
    stats = sim.stats()
    assert stats["requests"] == 56
    assert stats["requests_by_path"] == {"/v1/completions": 55, "/v1/chat/completions": 1}
    assert len(stats["last_requests"]) == 50
    assert stats["last_requests"][-1] == chat_body("last")
    assert stats["last_requests"][0]["prompt"] == "p6"
    assert (stats["completed"], stats["active"], stats["cancelled"]) == (56, 0, 0)


def test_stats_count_requests_per_cache_salt(sim: SimHandle) -> None:
    # What a pool's engines tell a benchmark: which cache scopes each one served, and how often.
    for salt in ("team-a", "team-b", "team-a", None):
        body = {"model": "m", "prompt": "hello", "max_tokens": 1}
        post(sim, "/v1/completions", body if salt is None else {**body, "cache_salt": salt})
    assert sim.stats()["requests_by_cache_salt"] == {"team-a": 2, "team-b": 1}
    sim.reset()
    assert sim.stats()["requests_by_cache_salt"] == {}
