"""Property-based fuzzing of request parsing and of the rewrite for the backend: whatever the bytes, the
answer is a parsed request or a clear 400 naming the field, never another exception (which would be a
500), and what a parsed request becomes for the backend is well-formed JSON with the gateway's own fields
(model, cache_salt, stream_options.include_usage, user) set as policy says and every other field intact.

Inputs: random JSON objects over the fields the gateway reads, each of them with values of every JSON
type (and huge, tiny, negative and non-finite numbers); random bytes; deep nesting; hostile JSON text
(NaN and Infinity literals, numbers beyond double and 64-bit range, duplicate keys with conflicting
types, invalid UTF-8 and lone surrogates spliced into strings). Over real sockets: tests/test_fuzz_http.py.
"""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from gateway.errors import BadRequestError
from gateway.pipeline import rewrite
from gateway.requests import MAX_DEPTH, ParsedRequest, parse_request
from gateway.tenancy import KeyRecord, Principal, Tenant
from gateway.upstream.salt import SaltDeriver
from tests.support.fuzz import ENDPOINTS, OWNED, VALID, bodies, dumps, hostile_texts, json_values

SALTS = SaltDeriver(b"fuzz-secret")
principals = st.builds(
    lambda scope, allow, user: Principal(
        tenant=Tenant(id="t1", cache_scope=scope, allow_client_salt=allow, user_field=user),
        key=KeyRecord(id="key_1", tenant_id="t1", secret_hash="0" * 64, prefix="sk-gw-xxxx", created_at=0),
    ),
    st.sampled_from(["tenant", "global", "key", "group:g1"]),
    st.booleans(),
    st.sampled_from(["passthrough", "tenant", "strip"]),
)


def note(outcome: str) -> None:
    if currently_in_test_context():
        event(outcome)  # --hypothesis-show-statistics tells how many examples got how far


def check(endpoint: str, raw: bytes, principal: Principal | None = None, salted: bool = True) -> ParsedRequest | None:
    try:
        parsed = parse_request(endpoint, raw, max_tokens_cap=1000)
    except BadRequestError as exc:
        note("400")
        assert exc.status == 400
        assert exc.param is None or isinstance(exc.param, str)
        assert exc.body()  # serialises: the message quotes nothing that orjson cannot write
        return None
    note("parsed")
    assert isinstance(parsed.model, str) and parsed.model
    assert isinstance(parsed.stream, bool) and isinstance(parsed.client_wants_usage, bool)
    assert parsed.max_tokens is None or 1 <= parsed.max_tokens <= 1000 or (parsed.max_tokens == 0 and parsed.echo)
    assert 1 <= parsed.n <= 128 and (parsed.best_of is None or 1 <= parsed.best_of <= 128)
    assert parsed.prompts >= 1
    assert parsed.client_salt is None or isinstance(parsed.client_salt, str)
    if principal is not None:
        check_rewrite(parsed, principal, salted)
    else:
        orjson.dumps(parsed.body)  # what the gateway forwards re-serialises
    return parsed


def check_rewrite(parsed: ParsedRequest, principal: Principal, salted: bool) -> None:
    original = dict(parsed.body)
    client_salt = original.get("cache_salt")
    scope = principal.cache_scope()
    out = orjson.loads(rewrite(parsed, principal, "upstream/Model-1", salts=SALTS if salted else None, scope=scope))
    assert out["model"] == "upstream/Model-1"
    if salted and scope is not None:
        expected = (
            SALTS.derive_sub(scope, parsed.client_salt)
            if parsed.client_salt is not None and principal.tenant.allow_client_salt
            else SALTS.derive(scope)
        )
        assert out["cache_salt"] == expected and len(expected) == 43
        assert out["cache_salt"] != client_salt
    else:
        assert "cache_salt" not in out  # a client's salt never reaches the backend as sent
    if parsed.stream and parsed.endpoint != "responses":
        assert out["stream_options"]["include_usage"] is True
        for name, value in (original.get("stream_options") or {}).items():
            if name != "include_usage":
                assert out["stream_options"][name] == value
    policy = principal.tenant.user_field
    if policy == "tenant":
        assert out["user"] == "t1"
    elif policy == "strip":
        assert "user" not in out
    elif "user" in original:
        assert out["user"] == original["user"]
    owned = {"model", "cache_salt", "stream_options", "user"}
    assert {k: v for k, v in out.items() if k not in owned} == {k: v for k, v in original.items() if k not in owned}


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(ENDPOINTS, bodies, principals, st.booleans(), st.booleans())
def test_random_json_objects(
    endpoint: str, body: dict[str, Any], principal: Principal, salted: bool, on_valid: bool
) -> None:
    # Half of them over a valid request, so that many get past parsing into the rewrite.
    check(endpoint, dumps({**VALID[endpoint], **body} if on_valid else body), principal, salted)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(ENDPOINTS, st.sampled_from(OWNED), json_values, principals, st.booleans())
def test_each_owned_field_with_values_of_every_type(
    endpoint: str, field: str, value: Any, principal: Principal, salted: bool
) -> None:
    """A valid request with one field the gateway reads or owns replaced by anything at all."""
    body = {**VALID[endpoint], field: value}
    check(endpoint, dumps(body), principal, salted)


@settings(max_examples=300)
@given(ENDPOINTS, st.binary(max_size=200))
def test_random_bytes(endpoint: str, raw: bytes) -> None:
    check(endpoint, raw)


@given(ENDPOINTS, st.integers(min_value=1, max_value=3000), st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
def test_deep_nesting(endpoint: str, depth: int, brackets: tuple[bytes, bytes]) -> None:
    start, end = brackets
    valid = b'{"model": "m", "messages": [{"role": "user"}], "prompt": "p", "input": "i", '
    check(endpoint, valid + b'"x": ' + start * depth + b"1" + end * depth + b"}")


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(ENDPOINTS, hostile_texts(), principals)
def test_hostile_json_text(endpoint: str, raw: bytes, principal: Principal) -> None:
    check(endpoint, raw, principal)


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


def test_duplicate_keys_take_the_last_value_and_the_backend_sees_the_same() -> None:
    """orjson keeps the last of duplicate keys, and the body is re-serialised with one of each, so the
    gateway and the backend can never read different values of one field (no parser differential)."""
    principal = Principal(
        tenant=Tenant(id="t1"),
        key=KeyRecord(id="key_1", tenant_id="t1", secret_hash="0" * 64, prefix="sk-gw-xxxx", created_at=0),
    )
    raw = (
        b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 5, "max_tokens": 7,'
        b' "cache_salt": "mine", "cache_salt": "theirs", "stream": false, "stream": true}'
    )
    parsed = check("chat", raw)
    assert parsed is not None and parsed.max_tokens == 7 and parsed.stream and parsed.client_salt == "theirs"
    out = rewrite(parsed, principal, "up", salts=SALTS, scope=principal.cache_scope())
    assert out.count(b'"max_tokens"') == 1 and out.count(b'"cache_salt"') == 1 and b"theirs" not in out


def test_nesting_the_serialiser_cannot_write_is_refused_at_parse() -> None:
    """Found by this fuzzer: orjson reads 1024 levels but writes 254, so a valid request nested 254-1023
    deep was admitted and then failed with a 500 when it was re-serialised for the backend."""

    def nested(depth: int) -> bytes:  # the top-level object is level 1, `x`'s list the next
        return b'{"model": "m", "messages": [{"role": "user"}], "x": [' + b"[" * depth + b"]" * depth + b"]}"

    for depth in (MAX_DEPTH - 3, MAX_DEPTH - 2):
        parsed = check("chat", nested(depth))
        assert parsed is not None
        orjson.dumps(parsed.body)
    for depth in (MAX_DEPTH - 1, 254, 300, 1000):
        try:
            parse_request("chat", nested(depth), max_tokens_cap=1000)
        except BadRequestError as exc:
            assert "nested too deeply" in exc.message or depth >= 1022
        else:
            raise AssertionError(f"depth {depth} was accepted")
