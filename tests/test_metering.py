"""Metering you can bill from: for every way a request can end, the usage billed is the usage charged.

Each test ends requests one way (an answer, a backend error, a fallback, a downgrade, a client leaving, a
stream cut, the gateway shutting down, Redis killed or frozen), then reads the billing events (a jsonl
sink) and the tenant's quota state straight out of Redis (tests/support/quota.py) and checks that:

- the tokens charged to tpm are the prompt + completion tokens of the events, exactly;
- the spend charged to the budget is the events' cost;
- every lease came back;
- the event says what happened (status, partial, fallback, downgrade) and is one per request.

Everything is real: two simulators (the second one a fallback), a redis-server of this module's own that a
test may kill or freeze, the gateway as a process, the official openai SDK and httpx as clients.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.support.admin import tenant_with_key
from tests.support.gateway import GatewayProc, start_gateway
from tests.support.quota import QuotaProbe
from tests.support.redis_server import RedisServer
from tests.support.sim import SimHandle, start_sim

TPM = 10**6
PRICE = {"input_per_1k": 0.5, "output_per_1k": 1.5, "currency": "USD"}
LIMITS = {"tpm": TPM, "max_concurrency": 50}
BUDGET = {"amount": 1000, "period": "day"}
# Faults hit the requests under test only, never the gateway's health probes (which use /v1/completions).
CHAT = ["/v1/chat/completions"]
PROMPT = [{"role": "user", "content": "Tell me about the weather in some detail, please. " * 20}]


@pytest.fixture(scope="module")
def redis_srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """Durable (AOF, fsync on every write), so a kill and a restart lose nothing acknowledged."""
    server = RedisServer(tmp_path_factory.mktemp("redis-metering"))
    server.start(appendonly=True, extra=("--appendfsync", "always"))
    yield server
    if server.proc is not None and server.proc.poll() is None:
        os.kill(server.proc.pid, signal.SIGCONT)
    server.kill()


@pytest.fixture(scope="module")
def sims(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SimHandle, SimHandle]]:
    logs = tmp_path_factory.mktemp("sims-metering")
    first = start_sim("--ttft-ms", "1", "--itl-ms", "5", log_dir=logs)
    second = start_sim("--ttft-ms", "1", "--itl-ms", "5", log_dir=logs)
    yield first, second
    first.stop()
    second.stop()


def config(redis_srv: RedisServer, sims: tuple[SimHandle, SimHandle], workdir: Path, **extra: Any) -> dict[str, Any]:
    first, second = sims
    return {
        "redis_url": redis_srv.url,
        "redis_timeout_s": 0.5,
        "health_interval_s": 0.5,
        "backends": [
            {"name": "first", "kind": "vllm", "url": first.url, "capacity": 64},
            {"name": "second", "kind": "vllm", "url": second.url, "capacity": 64},
        ],
        "models": [
            {"name": "m", "backends": ["first"], "price": PRICE},
            {"name": "fb", "backends": ["first", "second"], "price": PRICE},
            {"name": "small", "backends": ["second"], "price": {"input_per_1k": 0, "output_per_1k": 0}},
        ],
        "billing": {"sinks": [{"kind": "jsonl", "path": str(workdir / "billing.jsonl")}]},
        **extra,
    }


@pytest.fixture(scope="module")
def gw(
    redis_srv: RedisServer, sims: tuple[SimHandle, SimHandle], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProc]:
    workdir = tmp_path_factory.mktemp("gw-metering")
    proc = start_gateway(config(redis_srv, sims, workdir), workdir)
    yield proc
    proc.stop()


@pytest.fixture(autouse=True)
def no_faults(sims: tuple[SimHandle, SimHandle]) -> Iterator[None]:
    yield
    for sim in sims:
        sim.set_faults("none")
    # A test's faults may have ejected an engine (three failures in a row): the next health probe (every
    # 0.5 s here) brings it back, before the next test asks for a model it alone serves.
    time.sleep(0.6)


class Tenant:
    """A fresh tenant with a key, its quota state primed for exact reading, and its billing events."""

    counter = 0

    def __init__(self, gw: GatewayProc, redis_srv: RedisServer, **fields: Any) -> None:
        Tenant.counter += 1
        self.id = f"meter{Tenant.counter}"
        self.gw = gw
        fields.setdefault("budget", BUDGET)
        self.key = tenant_with_key(
            gw.url, gw.admin_key, self.id, limits={**LIMITS, **fields.pop("limits", {})}, **fields
        )
        self.probe = QuotaProbe(redis_srv.url, self.id, tpm=TPM)
        self.probe.prime()
        self.client = openai.OpenAI(base_url=gw.url + "/v1", api_key=self.key, max_retries=0)

    def events(self, count: int, *, path: Path | None = None, within_s: float = 15.0) -> list[dict[str, Any]]:
        path = path or self.gw.config_path.parent / "billing.jsonl"
        deadline = time.monotonic() + within_s
        while True:
            lines = path.read_text().splitlines() if path.exists() else []
            mine = [e for e in map(json.loads, lines) if e["subject"] == self.id]
            if len(mine) >= count:
                time.sleep(0.2)  # and no more than that
                lines = path.read_text().splitlines()
                mine = [e for e in map(json.loads, lines) if e["subject"] == self.id]
                assert len(mine) == count, [e["data"] for e in mine]
                return mine
            assert time.monotonic() < deadline, f"{len(mine)} of {count} billing events for {self.id}"
            time.sleep(0.05)

    def check_charged(self, events: list[dict[str, Any]]) -> None:
        """The quota state in Redis says exactly what the billing events say."""
        self.probe.wait_settled()
        billed_tokens = sum(e["data"]["prompt_tokens"] + e["data"]["completion_tokens"] for e in events)
        billed_cost = sum(e["data"]["cost"] for e in events)
        # The tokens bucket is a time (GCRA): Unix seconds in a double, which resolves about 0.24 us there, or
        # 0.004 tokens at this tpm; each admission and settlement moves it once, and each may round.
        resolution = 2.4e-7 * TPM / 60
        assert math.isclose(self.probe.tokens_charged(), billed_tokens, abs_tol=2 * len(events) * resolution), (
            self.probe.tokens_charged(),
            billed_tokens,
        )
        assert math.isclose(self.probe.spent(), billed_cost, rel_tol=1e-9, abs_tol=1e-12)
        assert len({e["id"] for e in events}) == len(events)
        assert all(e["id"].startswith("evt_") for e in events)

    def stream(self, model: str = "m", **body: Any) -> httpx.Response:
        """A raw streamed request, read to its end; returns the response (with .text)."""
        with httpx.stream(
            "POST",
            self.gw.url + "/v1/chat/completions",
            headers={"Authorization": f"Bearer {self.key}"},
            json={"model": model, "messages": PROMPT, "stream": True, **body},
            timeout=30,
        ) as resp:
            resp.read()
        return resp


def test_answers_unary_and_streamed(gw: GatewayProc, redis_srv: RedisServer) -> None:
    t = Tenant(gw, redis_srv)
    t.client.chat.completions.create(model="m", messages=PROMPT, max_tokens=7)
    chunks = list(t.client.chat.completions.create(model="m", messages=PROMPT, max_tokens=9, stream=True))
    assert chunks and all(c.usage is None for c in chunks)  # the usage chunk the gateway asked for is dropped
    events = t.events(2)
    assert [(e["data"]["status"], e["data"]["stream"], e["data"]["partial"]) for e in events] == [
        (200, False, False),
        (200, True, False),
    ]
    assert [e["data"]["completion_tokens"] for e in events] == [7, 9]
    assert all(e["data"]["prompt_tokens"] > 100 and e["data"]["cost"] > 0 for e in events)
    t.check_charged(events)


def test_a_client_that_leaves_a_stream_early_pays_for_the_prompt_and_what_it_was_sent(
    gw: GatewayProc, redis_srv: RedisServer
) -> None:
    t = Tenant(gw, redis_srv)
    ids = []
    for _ in range(3):
        with httpx.stream(
            "POST",
            gw.url + "/v1/chat/completions",
            headers={"Authorization": f"Bearer {t.key}"},
            json={"model": "m", "messages": PROMPT, "stream": True, "max_tokens": 2000},
            timeout=30,
        ) as resp:
            ids.append(resp.headers["x-request-id"])
            for line in resp.iter_lines():
                if '"content"' in line:
                    break  # the stop button
    events = t.events(3)
    for event in events:
        data = event["data"]
        assert data["status"] == 499 and data["partial"] is True and data["request_id"] in ids
        assert data["prompt_tokens"] > 100  # the gateway's own count of the prompt the engine processed
        assert 1 <= data["completion_tokens"] < 2000
    t.check_charged(events)


def test_a_client_that_leaves_before_a_unary_answer_pays_for_the_prompt_and_frees_its_place_at_once(
    gw: GatewayProc, redis_srv: RedisServer, sims: tuple[SimHandle, SimHandle]
) -> None:
    t = Tenant(gw, redis_srv)
    cancelled = sims[0].stats()["cancelled"]
    with pytest.raises(httpx.ReadTimeout):  # about 10 s of generation; the client gives up after half a second
        httpx.post(
            gw.url + "/v1/chat/completions",
            headers={"Authorization": f"Bearer {t.key}"},
            json={"model": "m", "messages": PROMPT, "max_tokens": 2000},
            timeout=0.5,
        )
    t.probe.wait_settled(within_s=3)  # not after the engine would have finished
    (event,) = t.events(1)
    data = event["data"]
    assert (data["status"], data["partial"], data["completion_tokens"]) == (499, True, 0)
    assert data["prompt_tokens"] > 100
    deadline = time.monotonic() + 3
    while sims[0].stats()["cancelled"] == cancelled:  # the engine stopped generating for nobody
        assert time.monotonic() < deadline
        time.sleep(0.05)
    t.check_charged([event])


def test_a_backend_error_charges_nothing_and_says_so(
    gw: GatewayProc, redis_srv: RedisServer, sims: tuple[SimHandle, SimHandle]
) -> None:
    t = Tenant(gw, redis_srv)
    sims[0].set_faults("error_500", count=1, paths=CHAT)
    with pytest.raises(openai.InternalServerError) as info:
        t.client.chat.completions.create(model="m", messages=PROMPT, max_tokens=5)
    assert info.value.status_code == 502
    (event,) = t.events(1)
    assert event["data"]["status"] == 502 and event["data"]["prompt_tokens"] == 0
    assert event["data"]["completion_tokens"] == 0 and event["data"]["cost"] == 0
    t.check_charged([event])


def test_a_fallback_is_billed_where_it_was_served_and_says_where_it_came_from(
    gw: GatewayProc, redis_srv: RedisServer, sims: tuple[SimHandle, SimHandle]
) -> None:
    t = Tenant(gw, redis_srv)
    sims[0].set_faults("close_connection", paths=CHAT)  # every attempt (a stale pooled connection is retried)
    raw = t.client.chat.completions.with_raw_response.create(model="fb", messages=PROMPT, max_tokens=4)
    assert raw.headers["x-gateway-fallback-from"] == "first"
    resp = t.stream("fb", max_tokens=6)
    assert resp.status_code == 200 and resp.headers["x-gateway-fallback-from"] == "first"
    assert resp.text.rstrip().endswith("data: [DONE]")
    events = t.events(2)
    for event in events:
        data = event["data"]
        assert (data["status"], data["backend"], data["fallback_from"]) == (200, "second", "first")
        assert data["fallback_reason"] is not None and not data["partial"]
    assert [e["data"]["completion_tokens"] for e in events] == [4, 6]
    t.check_charged(events)


def test_a_fallback_that_fails_too_keeps_its_fallback_in_the_answer_and_the_bill(
    gw: GatewayProc, redis_srv: RedisServer, sims: tuple[SimHandle, SimHandle]
) -> None:
    t = Tenant(gw, redis_srv)
    sims[0].set_faults("close_connection", paths=CHAT)
    # Unary: the second backend answers 500.
    sims[1].set_faults("error_500", count=1, paths=CHAT)
    with pytest.raises(openai.InternalServerError) as info:
        t.client.chat.completions.create(model="fb", messages=PROMPT, max_tokens=4)
    assert info.value.status_code == 502
    assert info.value.response.headers["x-gateway-fallback-from"] == "first"
    # Streamed: the second backend answers 500 before the stream starts.
    sims[1].set_faults("error_500", count=1, paths=CHAT)
    resp = t.stream("fb", max_tokens=4)
    assert resp.status_code == 502 and resp.headers["x-gateway-fallback-from"] == "first"
    # Streamed: the second backend dies mid-stream, after three tokens.
    sims[1].set_faults("drop_midstream", count=1, after_tokens=3, paths=CHAT)
    resp = t.stream("fb", max_tokens=50)
    assert resp.status_code == 200 and resp.headers["x-gateway-fallback-from"] == "first"
    assert '"error"' in resp.text and "[DONE]" not in resp.text
    events = t.events(3)
    assert [(e["data"]["status"], e["data"]["partial"]) for e in events] == [(502, False), (502, False), (502, True)]
    assert all(e["data"]["fallback_from"] == "first" for e in events)
    cut = events[2]["data"]
    assert cut["prompt_tokens"] > 100 and cut["completion_tokens"] == 3
    t.check_charged(events)


def test_a_downgrade_is_remembered_whatever_the_ending(
    gw: GatewayProc, redis_srv: RedisServer, sims: tuple[SimHandle, SimHandle]
) -> None:
    # A budget too small for `m`; `small` costs nothing, and the tenant's policy sends it there instead.
    t = Tenant(gw, redis_srv, budget={"amount": 0.0001, "period": "day"}, on_limit={"budget": "downgrade:small"})
    raw = t.client.chat.completions.with_raw_response.create(model="m", messages=PROMPT, max_tokens=3)
    assert raw.headers["x-gateway-downgraded-from"] == "m"
    sims[1].set_faults("error_500", count=1, paths=CHAT)
    with pytest.raises(openai.InternalServerError) as info:
        t.client.chat.completions.create(model="m", messages=PROMPT, max_tokens=3)
    assert info.value.response.headers["x-gateway-downgraded-from"] == "m"
    sims[1].set_faults("drop_midstream", count=1, after_tokens=2, paths=CHAT)
    resp = t.stream("m", max_tokens=30)
    assert resp.headers["x-gateway-downgraded-from"] == "m" and '"error"' in resp.text
    events = t.events(3)
    assert [(e["data"]["model"], e["data"]["status"], e["data"]["downgraded_from"]) for e in events] == [
        ("small", 200, "m"),
        ("small", 502, "m"),
        ("small", 502, "m"),
    ]
    t.check_charged(events)


def test_sigterm_past_the_grace_period_settles_before_exit(
    redis_srv: RedisServer, sims: tuple[SimHandle, SimHandle], tmp_path: Path
) -> None:
    gw = start_gateway(config(redis_srv, sims, tmp_path, shutdown_grace_s=0.5, shutdown_drain_s=0.1), tmp_path)
    try:
        t = Tenant(gw, redis_srv)
        bodies: list[str] = []

        def one() -> None:
            bodies.append(t.stream(max_tokens=4000).text)

        streams = [threading.Thread(target=one) for _ in range(4)]
        for s in streams:
            s.start()
        deadline = time.monotonic() + 10
        while t.probe.held() < 4:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.2)
        gw.proc.signal(signal.SIGTERM)
        assert gw.proc.popen is not None and gw.proc.popen.wait(20) == 0, gw.output()
        for s in streams:
            s.join(10)
    finally:
        gw.stop()
    assert len(bodies) == 4 and all("shutting down" in b for b in bodies)
    events = t.events(4, path=tmp_path / "billing.jsonl")
    assert all(e["data"]["status"] == 503 and e["data"]["partial"] for e in events)
    assert all(e["data"]["prompt_tokens"] > 100 and e["data"]["completion_tokens"] > 0 for e in events)
    # Settled before the quota client closed: every lease back, tpm and budget charged as billed.
    t.check_charged(events)


def test_a_request_that_ends_while_redis_is_down_is_charged_once_it_is_back(
    gw: GatewayProc, redis_srv: RedisServer
) -> None:
    t = Tenant(gw, redis_srv)
    holder = threading.Thread(target=t.stream, kwargs={"max_tokens": 150})  # about 0.75 s of tokens
    holder.start()
    deadline = time.monotonic() + 10
    while not t.probe.held():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    redis_srv.kill()
    holder.join(30)
    time.sleep(0.5)
    redis_srv.start(appendonly=True, extra=("--appendfsync", "always"))
    (event,) = t.events(1)
    assert event["data"]["status"] == 200 and event["data"]["completion_tokens"] == 150
    t.check_charged([event])  # the owed settlement went through once Redis was back


def test_a_frozen_redis_costs_a_request_at_most_its_timeout_and_is_charged_after(
    redis_srv: RedisServer, sims: tuple[SimHandle, SimHandle], tmp_path: Path
) -> None:
    timeout_s = 1.0
    gw = start_gateway(config(redis_srv, sims, tmp_path, redis_timeout_s=timeout_s, auth_cache_ttl_s=0.2), tmp_path)
    try:
        t = Tenant(gw, redis_srv)
        t.client.chat.completions.create(model="m", messages=PROMPT, max_tokens=2)  # the key is known
        holder = threading.Thread(target=t.stream, kwargs={"max_tokens": 150})
        holder.start()
        deadline = time.monotonic() + 10
        while not t.probe.held():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert redis_srv.proc is not None
        time.sleep(0.3)  # the key's cache entry expires: the next request asks the frozen store
        os.kill(redis_srv.proc.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            frozen = t.client.chat.completions.with_raw_response.create(model="m", messages=PROMPT, max_tokens=2)
            waited = time.monotonic() - started
            holder.join(30)
        finally:
            os.kill(redis_srv.proc.pid, signal.SIGCONT)
        # The key lookup and admission share one allowance: not two or four of them in turn. (A bound on a
        # deadline, with a wide margin, not a speed figure.)
        assert waited < timeout_s + 0.7, waited
        events = t.events(3, path=tmp_path / "billing.jsonl")
        assert all(e["data"]["status"] == 200 for e in events)
        # The request admitted while Redis was frozen was admitted (and is settled) by this replica's local
        # share; the two admitted in Redis are charged there, the stream's once Redis thawed.
        local_id = frozen.headers["x-request-id"]
        t.check_charged([e for e in events if e["data"]["request_id"] != local_id])
    finally:
        gw.stop()
