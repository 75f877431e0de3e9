"""Property-based fuzzing of request parsing: whatever the bytes, the answer is a parsed request or a
clear 400 naming the field, never another exception (which would be a 500)."""

from __future__ import annotations

import json
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.errors import BadRequestError
from gateway.requests import parse_request

ENDPOINTS = st.sampled_from(["chat", "completions", "embeddings", "responses"])
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=20,
)
owned = [
    "model",
    "messages",
    "prompt",
    "input",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "n",
    "cache_salt",
    "user",
]
bodies = st.dictionaries(st.sampled_from(owned) | st.text(max_size=10), json_values, max_size=8)


def check(endpoint: str, raw: bytes) -> None:
    try:
        parsed = parse_request(endpoint, raw, max_tokens_cap=1000)
    except BadRequestError as exc:
        assert exc.status == 400
        assert exc.param is None or isinstance(exc.param, str)
        return
    assert isinstance(parsed.model, str) and parsed.model
    assert parsed.max_tokens is None or 1 <= parsed.max_tokens <= 1000
    assert parsed.client_salt is None or isinstance(parsed.client_salt, str)
    # What the gateway forwards re-serialises.
    orjson.dumps(parsed.body)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(ENDPOINTS, bodies)
def test_random_json_objects(endpoint: str, body: dict[str, Any]) -> None:
    check(endpoint, json.dumps(body).encode())


@settings(max_examples=300)
@given(ENDPOINTS, st.binary(max_size=200))
def test_random_bytes(endpoint: str, raw: bytes) -> None:
    check(endpoint, raw)


@given(ENDPOINTS, st.integers(min_value=1, max_value=3000))
def test_deep_nesting(endpoint: str, depth: int) -> None:
    check(endpoint, b'{"model": "m", "x": ' + b"[" * depth + b"]" * depth + b"}")


def test_special_cases() -> None:
    for raw in (
        b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": NaN}',
        b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1e400}',
        b'{"model": "m", "model": "n", "messages": [{"role": "user", "content": "x"}]}',
        b'{"model": "m\xff", "messages": []}',
        b'{"model": "m", "messages": [{"role": "user", "content": "\\ud800"}]}',
        b'{"model": "m", "messages": [{"role": "user"}], "max_tokens": 99999999999999999999999}',
        b'{"model": "m", "messages": [{"role": "user"}], "max_tokens": true}',
    ):
        for endpoint in ("chat", "completions", "embeddings", "responses"):
            check(endpoint, raw)
