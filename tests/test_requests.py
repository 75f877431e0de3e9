"""Request parsing (gateway/requests.py): the output limit read as vLLM reads it, never the smallest field;
every token field, `n` and `best_of` checked; absurd products refused with a 400 naming the field; prompt
batches counted. Then the same over real sockets: the openai SDK -> the gateway -> the simulator."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import orjson
import pytest

from gateway.errors import BadRequestError
from gateway.requests import COMPLETIONS_DEFAULT_MAX_TOKENS, OUTPUT_CAP_FACTOR, ParsedRequest, parse_request
from tests.support.admin import tenant_with_key
from tests.support.fuzz import dumps
from tests.support.gateway import GatewayProc, start_gateway
from tests.support.sim import SimHandle, start_sim

CAP = 1000
MESSAGES = [{"role": "user", "content": "hi"}]
INPUT = {
    "chat": {"messages": MESSAGES},
    "completions": {"prompt": "hi"},
    "responses": {"input": "hi"},
    "embeddings": {"input": "hi"},
}


def parse(endpoint: str, **fields: Any) -> ParsedRequest:
    return parse_request(endpoint, dumps({"model": "m", **INPUT[endpoint], **fields}), CAP)


def refused(endpoint: str, **fields: Any) -> BadRequestError:
    with pytest.raises(BadRequestError) as info:
        parse(endpoint, **fields)
    error = info.value
    body = orjson.loads(error.body())["error"]
    assert (error.status, body["type"], body["param"]) == (400, "invalid_request_error", error.param)
    return error


# -- which field sets the limit ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "limit", "param"),
    [
        ({"max_tokens": 1, "max_completion_tokens": 900}, 900, "max_completion_tokens"),
        ({"max_tokens": 900, "max_completion_tokens": 1}, 1, "max_completion_tokens"),
        ({"max_tokens": 30}, 30, "max_tokens"),
        ({"max_tokens": 30, "max_completion_tokens": None}, 30, "max_tokens"),
        ({"max_output_tokens": 5}, None, None),  # not a chat field: vLLM ignores it
        ({}, None, None),
    ],
)
def test_chat_takes_max_completion_tokens_first_never_the_smallest(
    fields: dict[str, Any], limit: int | None, param: str | None
) -> None:
    parsed = parse("chat", **fields)
    assert (parsed.max_tokens, parsed.max_tokens_param) == (limit, param)


def test_completions_read_max_tokens_with_16_when_left_out() -> None:
    assert (parse("completions").max_tokens, parse("completions").max_tokens_param) == (
        COMPLETIONS_DEFAULT_MAX_TOKENS,
        None,
    )
    assert parse("completions", max_tokens=None).max_tokens is None  # explicitly no limit
    assert parse("completions", max_tokens=40, max_completion_tokens=3).max_tokens == 40


def test_responses_read_max_output_tokens_and_embeddings_nothing() -> None:
    assert parse("responses", max_output_tokens=7, max_tokens=3).max_tokens == 7
    assert parse("responses", max_tokens=3).max_tokens is None
    assert parse("embeddings", max_tokens=3).max_tokens is None


def test_completions_echo_may_ask_for_no_generation() -> None:
    parsed = parse("completions", echo=True, max_tokens=0)
    assert (parsed.max_tokens, parsed.echo) == (0, True)
    assert refused("completions", max_tokens=0).param == "max_tokens"
    assert refused("chat", echo=True, max_tokens=0).param == "max_tokens"
    assert "non-negative" in refused("completions", echo=True, max_tokens=-1).message


# -- hostile values ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens", "max_output_tokens"])
@pytest.mark.parametrize("value", [0, -1, "5", 1.5, 5.0, True, [5], {"v": 5}, CAP + 1, 2**64])
@pytest.mark.parametrize("endpoint", ["chat", "completions", "responses", "embeddings"])
def test_every_token_field_is_a_positive_integer_up_to_the_cap(endpoint: str, field: str, value: Any) -> None:
    assert refused(endpoint, **{field: value}).param == field


def test_the_cap_itself_is_allowed() -> None:
    assert parse("chat", max_completion_tokens=CAP, max_tokens=CAP).max_tokens == CAP


@pytest.mark.parametrize("field", ["n", "best_of"])
@pytest.mark.parametrize("value", [0, -3, 129, "2", 2.0, False, [2]])
def test_n_and_best_of_are_integers_from_1_to_128(field: str, value: Any) -> None:
    assert refused("chat", **{field: value}).param == field
    assert refused("completions", **{field: value}).param == field


def test_sampling_fields_are_read() -> None:
    parsed = parse("chat", n=3, best_of=5, use_beam_search=True, echo=True)
    assert (parsed.n, parsed.best_of, parsed.beam_search, parsed.echo) == (3, 5, True, True)
    defaults = parse("chat", n=None, best_of=None, use_beam_search=None, echo=None)
    assert (defaults.n, defaults.best_of, defaults.beam_search, defaults.echo) == (1, None, False, False)
    assert refused("chat", use_beam_search="yes").param == "use_beam_search"
    assert refused("completions", echo=1).param == "echo"
    # Endpoints that have no such fields pass them through unread, as vLLM ignores them.
    other = parse("responses", best_of="x", echo="x", use_beam_search=3)
    assert (other.best_of, other.echo, other.beam_search) == (None, False, False)


@pytest.mark.parametrize(
    ("endpoint", "fields", "param"),
    [
        ("chat", {"n": 128, "max_tokens": CAP, "best_of": 128}, None),  # exactly the bound
        ("chat", {"n": 128, "best_of": 128, "max_completion_tokens": CAP, "max_tokens": 1}, None),
        ("completions", {"n": 128, "max_tokens": CAP, "prompt": ["a", "b"]}, "n"),
        ("completions", {"n": 2, "best_of": 128, "max_tokens": CAP, "prompt": ["a", "b"]}, "best_of"),
        ("completions", {"max_tokens": CAP, "prompt": ["a"] * (OUTPUT_CAP_FACTOR + 1)}, "prompt"),
        ("completions", {"n": 128, "prompt": [[1]] * 62}, None),  # 16 each when left out: 126,976 tokens
        ("completions", {"n": 128, "prompt": [[1]] * 63}, "n"),
    ],
)
def test_absurd_products_of_sequences_prompts_and_limit_are_refused(
    endpoint: str, fields: dict[str, Any], param: str | None
) -> None:
    if param is None:
        parse(endpoint, **fields)
        return
    error = refused(endpoint, **fields)
    assert error.param == param
    assert f"above this gateway's limit of {CAP * OUTPUT_CAP_FACTOR}" in error.message


# -- prompts ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "count"),
    [
        ("a b", 1),
        ([1, 2, 3], 1),
        (["a"], 1),
        (["a", "b", "c"], 3),
        ([[1], [2, 3]], 2),
        ([[1, 2]], 1),
    ],
)
def test_prompts_are_counted(prompt: Any, count: int) -> None:
    assert parse("completions", prompt=prompt).prompts == count
    assert parse("embeddings", input=prompt).prompts == count
    assert parse("chat").prompts == parse("responses", input=[{"role": "user", "content": "x"}]).prompts == 1


@pytest.mark.parametrize("prompt", [["a", [1]], [[1], []], [True, 1], [[1], "a"], [None], [{"a": 1}], ["a", None]])
def test_a_prompt_list_of_any_other_shape_is_refused(prompt: Any) -> None:
    assert refused("completions", prompt=prompt).param == "prompt"
    assert refused("embeddings", input=prompt).param == "input"


# -- over real sockets ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimHandle]:
    handle = start_sim("--ttft-ms", "0", "--itl-ms", "0", log_dir=tmp_path_factory.mktemp("sim"))
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def client(sim: SimHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    config = {
        "backends": [{"name": "sim", "kind": "vllm", "url": sim.url}],
        "models": [{"name": "m", "backends": ["sim"], "upstream_model": "sim-model"}],
        "limits": {"max_tokens_cap": CAP},
    }
    gw: GatewayProc = start_gateway(config, tmp_path_factory.mktemp("gw"))
    key = tenant_with_key(gw.url, gw.admin_key, "t1", models=["m"])
    with openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=10) as c:
        yield c
    gw.stop()


def test_max_completion_tokens_wins_end_to_end(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=1, max_completion_tokens=5)
    assert reply.usage is not None and reply.usage.completion_tokens == 5


def test_n_and_batches_end_to_end(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="m", messages=MESSAGES, n=3, max_tokens=4)
    assert len(reply.choices) == 3
    assert reply.usage is not None and reply.usage.completion_tokens == 12
    batch = client.completions.create(model="m", prompt=["a b", "c"], n=2, max_tokens=3)
    assert len(batch.choices) == 4
    assert batch.usage is not None and (batch.usage.prompt_tokens, batch.usage.completion_tokens) == (3, 12)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_tokens": CAP + 1}, "max_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"n": 129}, "n"),
        ({"best_of": "2"}, "best_of"),
    ],
)
def test_bad_fields_get_a_400_naming_them(client: openai.OpenAI, fields: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="m", messages=MESSAGES, extra_body=fields)
    assert (info.value.status_code, info.value.param) == (400, param)


def test_an_absurd_batch_gets_a_400_naming_n(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="m", prompt=["a", "b"], n=128, max_tokens=CAP)
    assert info.value.param == "n"
    assert "256000 output tokens" in info.value.message
