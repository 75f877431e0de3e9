"""What a request makes the engine process (gateway/admission/demand.py), endpoint by endpoint: the output
limit as vLLM resolves it, every field that multiplies it, the per-model default and its injection, the
context cap, and hostile values (a 400 naming the field, or a demand within the gateway's bound)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.admission.demand import INJECT_MARGIN, Demand, resolve_demand
from gateway.admission.tokens import ByteCounter, prompt_tokens
from gateway.config import LimitsConfig, ModelConfig
from gateway.errors import BadRequestError
from gateway.requests import OUTPUT_CAP_FACTOR, ParsedRequest, parse_request
from tests.support.fuzz import ENDPOINTS, VALID, bodies, dumps

COUNTER = ByteCounter()  # UTF-8 bytes / 4: "x" * 400 is 100 tokens
LIMITS = LimitsConfig()  # max_tokens_cap 32768, default_max_tokens 1024
PLAIN = ModelConfig(name="m", backends=("b",))
HUGE = OUTPUT_CAP_FACTOR * LIMITS.max_tokens_cap


def model(**fields: Any) -> ModelConfig:
    return ModelConfig(name="m", backends=("b",), **fields)


def parse(endpoint: str, body: dict[str, Any], cap: int = LIMITS.max_tokens_cap) -> ParsedRequest:
    return parse_request(endpoint, orjson.dumps({"model": "m", **body}), cap)


def demand(endpoint: str, body: dict[str, Any], on: ModelConfig = PLAIN, limits: LimitsConfig = LIMITS) -> Demand:
    return resolve_demand(parse(endpoint, body, limits.max_tokens_cap), on, limits, COUNTER)


def chat(content: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}], **extra}


def chat_prompt(content: str) -> int:
    return prompt_tokens("chat", chat(content), COUNTER)


# -- chat -------------------------------------------------------------------------------------------------


def test_chat_max_tokens_is_reserved_per_sequence() -> None:
    d = demand("chat", chat(max_tokens=500))
    assert d == Demand(chat_prompt("hello"), 500, 1, 1, 500, None)
    assert d.total_tokens == d.prompt_tokens + 500


def test_chat_max_completion_tokens_wins_over_max_tokens_whatever_their_values() -> None:
    """vLLM reads max_completion_tokens first: the smaller max_tokens beside it changes nothing."""
    assert demand("chat", chat(max_tokens=1, max_completion_tokens=2000)).output_tokens == 2000
    assert demand("chat", chat(max_tokens=2000, max_completion_tokens=1)).output_tokens == 1
    assert demand("chat", chat(max_tokens=None, max_completion_tokens=7)).output_tokens == 7
    assert demand("chat", chat(max_tokens=9, max_completion_tokens=None)).output_tokens == 9


def test_chat_n_multiplies_output_not_prompt() -> None:
    d = demand("chat", chat(n=8, max_tokens=500))
    assert (d.sequences, d.max_tokens_per_sequence, d.output_tokens) == (8, 500, 4000)
    assert d.prompt_tokens == chat_prompt("hello")  # the n sequences share one prefill


def test_best_of_and_beam_search_widen_the_sequences() -> None:
    assert demand("chat", chat(n=2, best_of=5, max_tokens=10)).sequences == 5
    assert demand("completions", {"prompt": "p", "n": 3, "best_of": 2, "max_tokens": 10}).sequences == 3
    beams = demand("chat", chat(n=4, use_beam_search=True, max_tokens=10))
    assert (beams.sequences, beams.output_tokens) == (4, 40)
    assert demand("completions", {"prompt": "p", "best_of": 6, "use_beam_search": True}).output_tokens == 6 * 16


def test_chat_without_a_limit_falls_back_to_the_gateway_default() -> None:
    assert demand("chat", chat()).output_tokens == 1024
    assert demand("chat", chat(), limits=LimitsConfig(default_max_tokens=77)).output_tokens == 77
    assert demand("chat", chat(), on=model(max_output_tokens=300)).output_tokens == 300
    assert demand("chat", chat(n=3), on=model(max_output_tokens=300)).output_tokens == 900


def test_the_default_is_capped_by_what_the_prompt_leaves_of_the_context() -> None:
    prompt = chat_prompt("x" * 400)  # 100 tokens and the message's template markers
    d = demand("chat", chat("x" * 400), on=model(context_length=600))
    assert d.output_tokens == d.max_tokens_per_sequence == 600 - prompt
    # A prompt that fills the context leaves one token: the engine refuses it, nothing is reserved below 1.
    assert demand("chat", chat("x" * 4000), on=model(context_length=600)).output_tokens == 1


def test_an_explicit_limit_is_not_lowered_by_the_context() -> None:
    """vLLM honours an explicit limit or refuses the request; it never generates less than asked for."""
    d = demand("chat", chat("x" * 400, max_tokens=550), on=model(context_length=600))
    assert d.output_tokens == 550


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (chat(max_tokens=600), "max_tokens"),
        (chat(max_tokens=1, max_completion_tokens=601), "max_completion_tokens"),
    ],
)
def test_a_limit_that_alone_fills_the_context_is_refused(body: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequestError) as info:
        demand("chat", body, on=model(context_length=600))
    assert (info.value.status, info.value.param) == (400, param)
    assert "600 tokens" in info.value.message


# -- injection --------------------------------------------------------------------------------------------


def test_the_default_is_injected_where_the_client_sets_no_limit() -> None:
    on = model(context_length=8192, max_output_tokens=512, inject_max_tokens=True)
    assert demand("chat", chat(), on=on).inject == {"max_completion_tokens": 512}
    assert demand("completions", {"prompt": "p", "max_tokens": None}, on=on).inject == {"max_tokens": 512}
    assert demand("responses", {"input": "hi"}, on=on).inject == {"max_output_tokens": 512}
    assert demand("chat", chat(n=2), on=on).output_tokens == 1024
    # Never over a limit the client set, nor where the engine already stops: completions' absent max_tokens.
    assert demand("chat", chat(max_tokens=3), on=on).inject is None
    assert demand("completions", {"prompt": "p"}, on=on).inject is None
    assert demand("embeddings", {"input": "p"}, on=on).inject is None
    # Injection is the model's choice.
    assert demand("chat", chat(), on=model(context_length=8192, max_output_tokens=512)).inject is None


def test_no_injection_where_an_underestimated_prompt_could_overflow_the_context() -> None:
    """An engine answers 400 to prompt + max_tokens beyond its context: the default goes in only if the
    prompt could be twice its estimate. Without it the engine may run to the end of the context, and that
    is what is reserved."""
    on = model(context_length=8192, max_output_tokens=512, inject_max_tokens=True)
    fits = "x" * (4 * 3000)
    assert INJECT_MARGIN * chat_prompt(fits) + 512 <= 8192
    assert demand("chat", chat(fits), on=on).inject == {"max_completion_tokens": 512}
    long = "x" * (4 * 4000)
    d = demand("chat", chat(long), on=on)
    assert d.inject is None
    assert d.output_tokens == 8192 - chat_prompt(long)


# -- completions ------------------------------------------------------------------------------------------


def test_completions_default_to_16_when_max_tokens_is_left_out_and_unbounded_when_null() -> None:
    assert demand("completions", {"prompt": "p"}).output_tokens == 16
    assert demand("completions", {"prompt": "p"}, on=model(max_output_tokens=900)).output_tokens == 16
    assert demand("completions", {"prompt": "p", "max_tokens": None}).output_tokens == 1024
    assert demand("completions", {"prompt": "p", "max_tokens": None}, on=model(max_output_tokens=9)).output_tokens == 9


def test_a_batch_of_prompts_is_read_whole_and_each_prompt_gets_n_sequences() -> None:
    prompts = ["x" * 40, "y" * 80, "z" * 4]  # 10, 20 and 1 tokens
    d = demand("completions", {"prompt": prompts, "n": 2, "max_tokens": 10})
    assert (d.prompts, d.sequences, d.prompt_tokens, d.output_tokens) == (3, 2, 31, 60)
    ids = demand("completions", {"prompt": [[1, 2, 3], [4, 5]], "max_tokens": 4})
    assert (ids.prompts, ids.prompt_tokens, ids.output_tokens) == (2, 5, 8)


def test_one_prompt_in_a_list_is_not_a_batch() -> None:
    assert demand("completions", {"prompt": [7, 8, 9], "max_tokens": 1}) == Demand(3, 1, 1, 1, 1, None)
    assert demand("completions", {"prompt": ["x" * 40], "max_tokens": 1}).prompts == 1
    assert demand("completions", {"prompt": [[7, 8]], "max_tokens": 1}).prompt_tokens == 2


def test_each_prompt_of_a_batch_has_its_own_room_in_the_context() -> None:
    body = {"prompt": [list(range(10)), list(range(90))], "max_tokens": None}
    d = demand("completions", body, on=model(context_length=100))
    assert (d.max_tokens_per_sequence, d.output_tokens) == (90, 90 + 10)


def test_one_long_prompt_keeps_the_whole_batch_from_injection() -> None:
    on = model(context_length=1000, max_output_tokens=100, inject_max_tokens=True)
    short = {"prompt": [[1] * 10, [2] * 10], "max_tokens": None}
    assert demand("completions", short, on=on).inject == {"max_tokens": 100}
    d = demand("completions", {"prompt": [[1] * 10, [2] * 600], "max_tokens": None}, on=on)
    assert d.inject is None and d.output_tokens == (1000 - 10) + (1000 - 600)


def test_echo_without_generation_still_generates_one_token() -> None:
    d = demand("completions", {"prompt": "p", "echo": True, "max_tokens": 0, "n": 2})
    assert (d.max_tokens_per_sequence, d.output_tokens) == (1, 2)
    # Echo returns the prompt as text: nothing more is generated or read.
    assert demand("completions", {"prompt": "p", "echo": True, "max_tokens": 5}).output_tokens == 5
    assert demand("chat", chat(echo=True, max_tokens=5)) == demand("chat", chat(max_tokens=5))


def test_fields_that_change_nothing() -> None:
    plain = demand("chat", chat(max_tokens=50))
    for extra in (
        {"logprobs": True, "top_logprobs": 5},
        {"prompt_logprobs": 3},
        {"min_tokens": 50, "ignore_eos": True},
        {"truncate_prompt_tokens": 1},
        {"stream": True, "stream_options": {"include_usage": True}},
    ):
        assert demand("chat", {**chat(max_tokens=50), **extra}) == plain, extra


# -- responses and embeddings -----------------------------------------------------------------------------


def test_responses_read_max_output_tokens_and_nothing_multiplies_them() -> None:
    prompt = prompt_tokens("responses", {"input": "say it"}, COUNTER)
    assert demand("responses", {"input": "say it", "max_output_tokens": 100, "n": 4}) == Demand(
        prompt, 100, 1, 1, 100, None
    )
    # vLLM's responses endpoint has no max_tokens: it is the default that applies.
    assert demand("responses", {"input": "say it", "max_tokens": 5}).output_tokens == 1024


def test_responses_lower_an_explicit_limit_to_the_room_left() -> None:
    """Unlike chat, vLLM's responses endpoint lowers max_output_tokens to what the prompt leaves."""
    body = {"input": "x" * 400, "max_output_tokens": 5000}
    prompt = prompt_tokens("responses", body, COUNTER)
    assert demand("responses", body, on=model(context_length=1000)).output_tokens == 1000 - prompt


def test_embeddings_read_every_input_and_generate_nothing() -> None:
    body = {"input": ["x" * 40, "y" * 8, "z"], "n": 5, "max_tokens": 3}
    d = demand("embeddings", body)
    assert d == Demand(prompt_tokens("embeddings", body, COUNTER), 0, 3, 0, 0, None)
    assert demand("embeddings", {"input": [[1, 2], [3]]}).prompt_tokens == 3
    assert demand("embeddings", {"input": "x" * 40}).prompts == 1


# -- bounds -----------------------------------------------------------------------------------------------


def test_sequences_times_the_default_beyond_the_bound_is_refused_naming_n() -> None:
    body = {"prompt": ["a", "b"], "n": 128, "max_tokens": None}
    with pytest.raises(BadRequestError) as info:
        demand("completions", body, on=model(max_output_tokens=LIMITS.max_tokens_cap))
    assert (info.value.status, info.value.param) == (400, "n")
    assert "m's default output limit" in info.value.message
    # The same at the bound exactly is allowed.
    exact = demand("completions", {**body, "prompt": "a"}, on=model(max_output_tokens=LIMITS.max_tokens_cap))
    assert exact.output_tokens == HUGE


def test_a_batch_of_default_limits_beyond_the_bound_is_refused_naming_the_prompt() -> None:
    with pytest.raises(BadRequestError) as info:
        demand("completions", {"prompt": [[1]] * 5000, "max_tokens": None})
    assert info.value.param == "prompt"


def test_a_context_too_large_to_bound_gets_a_400_that_says_so() -> None:
    """Without injection a long prompt may run to the end of the context: that, times n, can be too much."""
    on = model(context_length=10_000, max_output_tokens=100, inject_max_tokens=True)
    body = {"prompt": [[1] * 4960, [2] * 4960], "n": 2, "max_tokens": None}
    with pytest.raises(BadRequestError) as info:
        demand("completions", body, on=on, limits=LimitsConfig(max_tokens_cap=100))
    assert info.value.param == "n"
    assert "5040 (what the prompt leaves of m's context)" in info.value.message


def test_demand_is_an_immutable_value() -> None:
    d = demand("chat", chat(max_tokens=5))
    with pytest.raises(AttributeError):
        d.output_tokens = 1  # type: ignore[misc]


MODELS = [
    PLAIN,
    model(context_length=64),
    model(context_length=4096, max_output_tokens=100),
    model(context_length=4096, max_output_tokens=1000, inject_max_tokens=True),
]


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(ENDPOINTS, bodies, st.booleans(), st.sampled_from(MODELS))
def test_any_request_that_parses_has_a_bounded_demand_or_a_400(
    endpoint: str, body: dict[str, Any], on_valid: bool, on: ModelConfig
) -> None:
    """Random and hostile values of every field the gateway reads, over a valid request or alone."""
    limits = LimitsConfig(max_tokens_cap=1000)
    try:
        request = parse_request(endpoint, dumps({**VALID[endpoint], **body} if on_valid else body), 1000)
    except BadRequestError:
        return
    try:
        d = resolve_demand(request, on, limits, COUNTER)
    except BadRequestError as exc:
        assert exc.status == 400 and isinstance(exc.param, str) and exc.body()
        return
    assert d.prompt_tokens >= 1 and d.prompts >= 1
    assert 0 <= d.output_tokens <= OUTPUT_CAP_FACTOR * limits.max_tokens_cap
    assert d.output_tokens <= d.prompts * d.sequences * d.max_tokens_per_sequence
    if endpoint == "embeddings":
        assert d.output_tokens == d.sequences == 0
    else:
        assert d.output_tokens >= d.sequences >= 1
        assert d.prompt_tokens >= d.prompts  # each prompt of a batch is at least one token
    if d.inject is not None:
        assert request.max_tokens is None and on.inject_max_tokens
        assert list(d.inject.values()) == [on.max_output_tokens]
        orjson.dumps({**request.body, **d.inject})
