"""Prompt token estimates (gateway/admission/tokens.py): what text is counted, the two counters, and which one a
gateway picks. cl100k_base comes from the litellm package (the `providers` extra), never from the network."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.admission.tokens import (
    EXACT_MAX_CHARS,
    ByteCounter,
    TiktokenCounter,
    counter_for,
    load_cl100k,
    prompt_text,
    prompt_tokens,
)
from gateway.config import Settings
from gateway.upstream.providers import cl100k_file

PROSE = (
    "The gateway sits in front of the model servers and gives each tenant its own credentials, its fair "
    "share of scarce GPUs, its own prefix-cache scope, and its own bill. Requests beyond capacity wait in "
    "per-tenant queues; a slot that frees goes to the backlogged tenant with the lowest virtual counter. "
)


def settings(**data: Any) -> Settings:
    return Settings.model_validate(data)


def cl100k() -> Any:
    if cl100k_file() is None:
        pytest.skip("needs the `providers` extra (litellm ships cl100k_base)")
    return load_cl100k()  # never tiktoken.get_encoding alone: it would download


def test_bytes_counter() -> None:
    counter = ByteCounter()
    assert counter.count("") == 0
    assert counter.count("abcd") == 1 and counter.count("abcde") == 2
    assert counter.count("日本語") == 3  # nine UTF-8 bytes, rounded up


def test_only_the_text_a_model_reads_is_counted() -> None:
    body = {
        "model": "m",
        "temperature": 0.3,
        "messages": [
            {"role": "system", "content": "be brief"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "x"}}],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}],
            },
            {"role": "tool", "name": "f", "content": "42"},
        ],
        "tools": [{"type": "function", "function": {"name": "f"}}],
    }
    texts, extra = prompt_text("chat", body)
    assert texts[:6] == ["be brief", "look", "f", '{"a":1}', "42", "f"]
    assert texts[6].startswith('[{"type":"function"')
    assert extra == 4 * 4 + 85  # four messages' template markers and one image
    assert "temperature" not in "".join(texts) and "role" not in "".join(texts[:6])


@pytest.mark.parametrize(
    ("endpoint", "body", "texts", "extra"),
    [
        ("completions", {"prompt": "a b c"}, ["a b c"], 0),
        ("completions", {"prompt": ["x", "y"]}, ["x", "y"], 0),
        ("completions", {"prompt": [1, 2, 3]}, [], 3),
        ("embeddings", {"input": [[1, 2], [3]]}, [], 3),
        ("embeddings", {"input": "hello"}, ["hello"], 0),
        ("responses", {"instructions": "sys", "input": "hi"}, ["sys", "hi"], 0),
        ("responses", {"input": [{"role": "user", "content": [{"type": "input_text", "text": "q"}]}]}, ["q"], 4),
    ],
)
def test_prompt_text_per_endpoint(endpoint: str, body: dict[str, Any], texts: list[str], extra: int) -> None:
    assert prompt_text(endpoint, body) == (texts, extra)


def test_prompt_tokens_is_at_least_one() -> None:
    assert prompt_tokens("completions", {"prompt": ""}, ByteCounter()) == 1
    assert prompt_tokens("chat", {"messages": [{"role": "user", "content": "x" * 40}]}, ByteCounter()) == 10 + 4


@pytest.mark.providers
def test_tiktoken_is_exact_up_to_the_threshold() -> None:
    encoding = cl100k()
    counter = TiktokenCounter(encoding.encode_ordinary)
    text = PROSE[:EXACT_MAX_CHARS]
    assert counter.count(text) == len(encoding.encode_ordinary(text))


@pytest.mark.providers
def test_tiktoken_samples_long_texts_and_stays_close() -> None:
    encoding = cl100k()
    seen: list[int] = []

    def encode(text: str) -> list[int]:
        seen.append(len(text))
        result: list[int] = encoding.encode_ordinary(text)
        return result

    counter = TiktokenCounter(encode, exact_max_chars=1024, sample_chars=512)
    long = PROSE * 400  # about 120 KB
    estimate = counter.count(long)
    exact = len(encoding.encode_ordinary(long))
    assert seen == [512, 512]  # the cost is bounded whatever the size
    assert abs(estimate - exact) / exact < 0.05
    mixed = ("日本語のテキストと English words. " * 200) + PROSE * 20
    assert abs(counter.count(mixed) - len(encoding.encode_ordinary(mixed))) / len(encoding.encode_ordinary(mixed)) < 0.2


@pytest.mark.providers
def test_auto_picks_tiktoken_only_with_a_litellm_backend() -> None:
    vllm = {"name": "v", "kind": "vllm", "url": "http://127.0.0.1:1"}
    assert counter_for(settings(backends=[vllm])).name == "bytes"
    cl100k()
    claude = {"name": "c", "kind": "litellm", "url": "http://127.0.0.1:1", "provider_model": "anthropic/claude-x"}
    assert counter_for(settings(backends=[vllm, claude])).name == "tiktoken"
    assert counter_for(settings(backends=[claude], limits={"tokenizer": "bytes"})).name == "bytes"
    assert counter_for(settings(backends=[vllm], limits={"tokenizer": "tiktoken"})).name == "tiktoken"
