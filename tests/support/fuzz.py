"""Hypothesis strategies for hostile request bodies, shared by the in-process fuzzer of request parsing
(tests/test_fuzz_requests.py) and the one over real sockets (tests/test_fuzz_http.py)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st

__all__ = ["ENDPOINTS", "LITERALS", "OWNED", "VALID", "bodies", "dumps", "hostile_texts", "json_values"]

ENDPOINTS = st.sampled_from(["chat", "completions", "embeddings", "responses"])
numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2**31, 2**53 + 1, 2**63, 2**64, 10**30, -(10**30)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.5, -0.0, 1e-320, 1.7976931348623157e308]),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=20))
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=20,
)
OWNED = [
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
    "best_of",
    "use_beam_search",
    "echo",
    "cache_salt",
    "user",
]
bodies = st.dictionaries(st.sampled_from(OWNED) | st.text(max_size=10), json_values, max_size=8)
VALID = {
    "chat": {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
    "completions": {"model": "m", "prompt": "hi"},
    "embeddings": {"model": "m", "input": "hi"},
    "responses": {"model": "m", "input": "hi"},
}


def dumps(body: Any) -> bytes:
    # json, not orjson: it writes NaN, Infinity and integers of any size, which a hostile client may send.
    return json.dumps(body).encode()


LITERALS = [
    b"NaN",
    b"-NaN",
    b"Infinity",
    b"-Infinity",
    b"1e400",
    b"-1e400",
    b"1e-400",
    b"123456789012345678901234567890",
    b"-9223372036854775809",
    b"18446744073709551616",
    b"1.0",
    b"-0",
    b"0x10",
    b"01",
    b"true",
    b"null",
    b'"\\ud800"',
    b'"\\udfff\\ud800"',
    b'"\xff\xfe"',
    b'"\xc3\x28"',
    b'"\xed\xa0\x80"',
    b'"\xc0\xaf"',
    b'"a\x00b"',
    b"[]",
    b"{}",
]


@st.composite
def hostile_texts(draw: st.DrawFn) -> bytes:
    """A JSON object's text with owned fields set to hostile literals, duplicated with conflicting values,
    and invalid bytes spliced into strings."""
    endpoint = draw(ENDPOINTS)
    members = [json.dumps(k).encode() + b": " + dumps(v) for k, v in VALID[endpoint].items()]
    for _ in range(draw(st.integers(1, 4))):
        name = json.dumps(draw(st.sampled_from(OWNED))).encode()
        members.insert(draw(st.integers(0, len(members))), name + b": " + draw(st.sampled_from(LITERALS)))
    text = b"{" + b", ".join(members) + b"}"
    if draw(st.booleans()):
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.binary(min_size=1, max_size=3)) + text[at:]
    return text
