"""Billing events against real things: files, a redis-server this test may kill, an aiohttp webhook receiver
on loopback, and the gateway as a process in front of the simulator. Nothing is mocked.

Invariants checked throughout: every event arrives, each id once, in the order it was emitted, and the
counters (emitted + replayed = delivered, spooled = replayed once the spool is empty) add up.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
import redis
import redis.asyncio as aioredis
from aiohttp import web

from gateway.billing import Billing, Spool
from gateway.config import Settings
from gateway.telemetry.metrics import Metrics
from tests.support.admin import tenant_with_key
from tests.support.gateway import GatewayProc, start_gateway
from tests.support.procs import free_port
from tests.support.redis_server import RedisServer
from tests.support.sim import SimHandle, start_sim

MSG: list[Any] = [{"role": "user", "content": "hello"}]
OUTCOMES = ("emitted", "spooled", "replayed", "failed")
# Fast recovery for tests: the next try after a failure comes within 50-300 ms.
FAST = {"backoff_initial_s": 0.05, "backoff_max_s": 0.3, "timeout_s": 0.5}


# --- helpers ------------------------------------------------------------------------------------


def make_settings(tmp_path: Path, *sinks: dict[str, Any], **billing: Any) -> Settings:
    return Settings.model_validate(
        {"state_path": str(tmp_path / "state.db"), "billing": {"sinks": list(sinks), **billing}}
    )


def emit(billing: Billing, ids: list[str]) -> None:
    for rid in ids:
        billing.emit(rid, "t1", {"tenant": "t1", "status": 200, "partial": False})


def counters(metrics: Metrics, sink: str) -> dict[str, float]:
    sample = metrics.registry.get_sample_value
    out = {o: sample("gateway_billing_events_total", {"sink": sink, "outcome": o}) or 0.0 for o in OUTCOMES}
    out["spool"] = sample("gateway_billing_spool_events", {"sink": sink}) or 0.0
    return out


def stream_ids(url: str, stream: str) -> list[str]:
    with redis.Redis.from_url(url) as client:
        return [fields[b"id"].decode() for _, fields in client.xrange(stream)]


def jsonl_ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text().splitlines()] if path.exists() else []


def stream_request_ids(url: str, stream: str) -> list[str]:
    """The x-request-id of each request the stream's events bill (events carry ids of their own)."""
    with redis.Redis.from_url(url) as client:
        return [orjson.loads(fields[b"event"])["data"]["request_id"] for _, fields in client.xrange(stream)]


def jsonl_request_ids(path: Path) -> list[str]:
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line)["data"]["request_id"] for line in lines]


def start_durable(server: RedisServer) -> None:
    """Start redis-server so that acknowledged writes survive SIGKILL (AOF, fsync before every reply)."""
    server.start(appendonly=True)
    with redis.Redis.from_url(server.url) as client:
        client.config_set("appendfsync", "always")


async def wait_for(predicate: Callable[[], bool], within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def poll(predicate: Callable[[], bool], within_s: float = 15.0) -> None:
    deadline = time.monotonic() + within_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


class Receiver:
    """A webhook endpoint on loopback that records the ids it accepted; it can fail, stall or go away."""

    def __init__(self) -> None:
        self.port = free_port()
        self.ids: list[str] = []
        self.fail_next = 0
        self.delay_s = 0.0
        self.content_types: set[str] = set()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/events"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/events", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.content_types.add(request.content_type)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.fail_next:
            self.fail_next -= 1
            return web.Response(status=500)
        self.ids.extend(event["id"] for event in orjson.loads(body))
        return web.Response(status=204)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own (not started yet), to kill and restart at will."""
    server = RedisServer(tmp_path / "redis")
    yield server
    server.kill()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    yield r
    await r.stop()


# --- in-process: each sink, the spool, outages ----------------------------------------------------


async def test_emit_does_no_io_and_jsonl_gets_every_event_in_order(tmp_path: Path) -> None:
    path = tmp_path / "billing.jsonl"
    metrics = Metrics()
    billing = Billing(make_settings(tmp_path, {"kind": "jsonl", "path": str(path)}), metrics)
    ids = [f"req_{i}" for i in range(2000)]
    emit(billing, ids[:10])
    assert not path.exists() and not (tmp_path / "spool").exists()  # nothing touched the disk yet
    await billing.start()
    try:
        for i in range(10, 2000, 100):
            emit(billing, ids[i : i + 100])
            await asyncio.sleep(0)
    finally:
        await billing.close()
    assert jsonl_ids(path) == ids
    event = json.loads(path.read_text().splitlines()[0])
    assert event["specversion"] == "1.0" and event["type"] == "gateway.usage.v1" and event["subject"] == "t1"
    assert counters(metrics, "jsonl") == {"emitted": 2000, "spooled": 0, "replayed": 0, "failed": 0, "spool": 0}


async def test_redis_stream_sink_adds_each_event_and_bounds_the_stream(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    sinks = (
        {"kind": "redis_stream", "name": "full", "url": redis_server.url, "stream": "t:full"},
        {"kind": "redis_stream", "name": "bounded", "url": redis_server.url, "stream": "t:bounded", "maxlen": 100},
    )
    billing = Billing(make_settings(tmp_path, *sinks))
    await billing.start()
    ids = [f"req_{i}" for i in range(1000)]
    try:
        emit(billing, ids)
        assert await billing.drain(10)
    finally:
        await billing.close()
    assert stream_ids(redis_server.url, "t:full") == ids
    with redis.Redis.from_url(redis_server.url) as client:
        _, fields = client.xrange("t:full", count=1)[0]
        assert orjson.loads(fields[b"event"])["id"] == "req_0"
        # MAXLEN ~ trims whole radix-tree nodes (100 entries each), so the bound is approximate.
        assert 100 <= client.xlen("t:bounded") <= 200


async def test_redis_outage_spools_then_replays_in_order_exactly_once(tmp_path: Path, own_redis: RedisServer) -> None:
    start_durable(own_redis)
    metrics = Metrics()
    sink = {"kind": "redis_stream", "name": "r", "url": own_redis.url, "stream": "s", **FAST}
    billing = Billing(make_settings(tmp_path, sink), metrics)
    ids = [f"req_{i}" for i in range(500)]
    await billing.start()
    try:
        emit(billing, ids[:100])
        assert await billing.drain(5)
        own_redis.kill()
        for i in range(100, 400, 20):
            emit(billing, ids[i : i + 20])
            await asyncio.sleep(0.01)
        await wait_for(lambda: billing.backlog()["r"].spooled == 300)
        assert list((tmp_path / "spool" / "r").glob("*.seg"))  # on disk, not only in memory
        start_durable(own_redis)
        emit(billing, ids[400:])
        assert await billing.drain(10)
    finally:
        await billing.close()
    assert stream_ids(own_redis.url, "s") == ids
    assert not list((tmp_path / "spool" / "r").glob("*.seg"))
    c = counters(metrics, "r")
    assert c["spooled"] >= 300 and c["replayed"] == c["spooled"] and c["failed"] > 0
    assert c["emitted"] + c["replayed"] == 500 and c["spool"] == 0


BUSY_LUA = """
local s = redis.call('TIME')
while true do
  local n = redis.call('TIME')
  if (n[1] - s[1]) * 1000000 + (n[2] - s[2]) > tonumber(ARGV[1]) then return 1 end
end
"""


async def test_a_batch_whose_answer_was_lost_is_not_sent_twice(tmp_path: Path, own_redis: RedisServer) -> None:
    # A busy script stalls Redis past the sink's timeout: the client gives up on the EXEC and closes the
    # connection, yet Redis runs the EXEC once the script ends. The batch landed; the sink does not know.
    own_redis.start()
    admin = aioredis.Redis.from_url(own_redis.url)
    metrics = Metrics()
    # The retry (after 1-2 s) comes after the script, and after this test has looked at the stream.
    sink = {"kind": "redis_stream", "name": "r", "url": own_redis.url, "stream": "s", "timeout_s": 0.2}
    sink["backoff_initial_s"] = 2.0
    billing = Billing(make_settings(tmp_path, sink), metrics)
    await billing.start()
    ids = [f"req_{i}" for i in range(20)]
    try:
        emit(billing, ids[:10])
        assert await billing.drain(5)
        busy = asyncio.ensure_future(admin.eval(BUSY_LUA, 0, "700000"))
        await asyncio.sleep(0.05)
        emit(billing, ids[10:])
        await busy
        await wait_for(lambda: counters(metrics, "r")["failed"] == 10)
        await asyncio.sleep(0.05)
        assert await admin.xlen("s") == 20  # the "failed" batch is in fact there
        assert await billing.drain(5)
    finally:
        await billing.close()
        await admin.aclose()
    assert stream_ids(own_redis.url, "s") == ids


async def test_webhook_failures_and_outage_deliver_every_event_once(tmp_path: Path, receiver: Receiver) -> None:
    metrics = Metrics()
    sink = {"kind": "webhook", "name": "hook", "url": receiver.url, "retries": 2, **FAST, "timeout_s": 2}
    billing = Billing(make_settings(tmp_path, sink), metrics)
    await billing.start()
    ids = [f"req_{i}" for i in range(150)]
    try:
        emit(billing, ids[:50])
        assert await billing.drain(5)
        receiver.fail_next = 5  # more 500s than one delivery's retries: the batch goes to the spool
        emit(billing, ids[50:100])
        assert await billing.drain(10)
        await receiver.stop()  # connection refused
        emit(billing, ids[100:150])
        await wait_for(lambda: billing.backlog()["hook"].spooled == 50)
        await receiver.start()
        assert await billing.drain(10)
    finally:
        await billing.close()
    assert receiver.ids == ids
    assert receiver.content_types == {"application/cloudevents-batch+json"}
    c = counters(metrics, "hook")
    assert c["spooled"] > 0 and c["replayed"] == c["spooled"] and c["failed"] > 0
    assert c["emitted"] + c["replayed"] == 150 and c["spool"] == 0


async def test_a_slow_sink_overflows_to_the_spool_not_to_memory(tmp_path: Path, receiver: Receiver) -> None:
    receiver.delay_s = 0.2
    # The first batches fail only after newer events overflowed to the spool: their undelivered rest must
    # still come first.
    receiver.fail_next = 2
    metrics = Metrics()
    sink = {"kind": "webhook", "name": "slow", "url": receiver.url, "retries": 0, **FAST, "timeout_s": 2}
    sink |= {"batch_max": 100, "buffer_max": 50}
    billing = Billing(make_settings(tmp_path, sink), metrics)
    await billing.start()
    ids = [f"req_{i}" for i in range(400)]
    try:
        peak = 0
        for i in range(0, 400, 25):
            emit(billing, ids[i : i + 25])
            await asyncio.sleep(0.005)
            peak = max(peak, billing.backlog()["slow"].memory)
        assert peak <= 50 + 25 + 100  # the bound, one chunk of emits, one batch in flight
        assert await billing.drain(15)
    finally:
        await billing.close()
    assert receiver.ids == ids
    c = counters(metrics, "slow")
    assert c["failed"] > 0 and c["spooled"] > 0 and c["replayed"] == c["spooled"]


async def test_events_spooled_at_shutdown_are_replayed_on_the_next_start(
    tmp_path: Path, own_redis: RedisServer
) -> None:
    url = own_redis.url  # not listening yet
    settings = make_settings(tmp_path, {"kind": "redis_stream", "name": "r", "url": url, "stream": "s", **FAST})
    ids = [f"req_{i}" for i in range(50)]
    first = Billing(settings)
    await first.start()
    emit(first, ids)
    await first.close()  # nothing listens on the port: everything goes to the spool
    assert sum(len(p.read_text().splitlines()) for p in (tmp_path / "spool" / "r").glob("*.seg")) == 50
    own_redis.start()
    second = Billing(settings)
    await second.start()
    assert second.backlog()["r"].spooled == 50
    try:
        assert await second.drain(5)
    finally:
        await second.close()
    assert stream_ids(url, "s") == ids
    assert not list((tmp_path / "spool" / "r").glob("*.seg"))


def test_spool_slots_progress_torn_tails_and_orphans(tmp_path: Path) -> None:
    a, b = Spool(tmp_path), Spool(tmp_path)
    a.open()
    b.open()
    assert a.dir == tmp_path and b.dir == tmp_path / "worker-1"  # two processes never share a directory
    a.append([("a1", b'{"id":"a1"}'), ("a2", b'{"id":"a2"}'), ("a3", b'{"id":"a3"}')])
    assert [r for r, _ in a.peek(2)] == ["a1", "a2"]
    a.commit(1)
    b.append([("b1", b'{"id":"b1"}')])
    b.close()
    a.close()
    # A crash mid-append leaves a torn line; the next open cuts it off.
    (segment,) = tmp_path.glob("*.seg")
    with segment.open("ab") as f:
        f.write(b'{"id":"torn')
    c = Spool(tmp_path)
    c.open()  # slot 0 again, and it adopts worker-1's orphaned segment
    assert c.pending == 3
    got = c.peek(10)
    c.commit(len(got))
    got += c.peek(10)
    c.commit(1)
    assert [r for r, _ in got] == ["a2", "a3", "b1"]  # a1 was delivered before the restart
    assert c.pending == 0 and not list(tmp_path.rglob("*.seg"))
    c.close()


# --- end to end: the gateway process, the simulator, real clients ---------------------------------


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimHandle]:
    handle = start_sim("--ttft-ms", "1", "--itl-ms", "2", log_dir=tmp_path_factory.mktemp("sim-billing"))
    yield handle
    handle.stop()


@pytest.fixture
def launch(sim: SimHandle, tmp_path: Path) -> Iterator[Callable[[str], GatewayProc]]:
    """Start the gateway (billing to a Redis stream and a JSONL file) as a process; stopped at teardown."""
    started: list[GatewayProc] = []

    def launch(redis_url: str) -> GatewayProc:
        config = {
            "backends": [{"name": "sim", "kind": "vllm", "url": sim.url}],
            "models": [{"name": "m", "backends": ["sim"], "price": {"input_per_1k": 1.0, "output_per_1k": 2.0}}],
            "billing": {
                "sinks": [
                    {"kind": "redis_stream", "name": "redis", "url": redis_url, "stream": "billing", **FAST},
                    {"kind": "jsonl", "name": "jsonl", "path": str(tmp_path / "billing.jsonl")},
                ]
            },
            # No health probe may take a fault meant for a request.
            "health_interval_s": 600,
            "shutdown_drain_s": 0.2,
        }
        gw = start_gateway(config, tmp_path)
        started.append(gw)
        return gw

    yield launch
    for gw in started:
        gw.stop()


def billing_metrics(gw: GatewayProc) -> dict[tuple[str, str], float]:
    text = httpx.get(gw.url + "/metrics").text
    out: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        if line.startswith(("gateway_billing_events_total{", "gateway_billing_spool_events{")):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            kind = labels.get("outcome", "spool")
            out[(labels["sink"], kind)] = float(line.rsplit(" ", 1)[1])
    return out


def post(gw: GatewayProc, key: str, **body: Any) -> httpx.Response:
    return httpx.post(
        gw.url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "m", "messages": MSG, "max_tokens": 3, **body},
        timeout=30,
    )


def test_every_kind_of_request_is_billed_exactly_once(
    sim: SimHandle, own_redis: RedisServer, launch: Callable[[str], GatewayProc], tmp_path: Path
) -> None:
    own_redis.start()
    gw = launch(own_redis.url)
    key = tenant_with_key(gw.url, gw.admin_key, "t")
    n = 4
    kinds: dict[str, list[str]] = {"unary": [], "stream": [], "error": [], "gone": [], "cut": []}
    with openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0) as client:
        for _ in range(n):
            raw = client.chat.completions.with_raw_response.create(model="m", messages=MSG, max_tokens=3)
            kinds["unary"].append(raw.headers["x-request-id"])
            raw_stream = client.chat.completions.with_raw_response.create(
                model="m", messages=MSG, max_tokens=3, stream=True
            )
            assert sum(1 for _ in raw_stream.parse()) >= 3
            kinds["stream"].append(raw_stream.headers["x-request-id"])
        sim.set_faults("error_500", count=n, paths=["/v1/chat/completions"])
        for _ in range(n):  # the backend fails after the gateway dispatched the request
            with pytest.raises(openai.APIStatusError) as info:
                client.chat.completions.create(model="m", messages=MSG, max_tokens=3)
            assert info.value.status_code == 502
            kinds["error"].append(info.value.response.headers["x-request-id"])
    for kind, tokens, fault in (("gone", 500, None), ("cut", 50, "drop_midstream")):
        if fault is not None:
            sim.set_faults(fault, count=n, after_tokens=3, paths=["/v1/chat/completions"])
        for _ in range(n):
            with httpx.stream(
                "POST",
                gw.url + "/v1/chat/completions",
                headers={"Authorization": f"Bearer {key}"},
                json={"model": "m", "messages": MSG, "max_tokens": tokens, "stream": True},
            ) as resp:
                kinds[kind].append(resp.headers["x-request-id"])
                for line in resp.iter_lines():
                    if kind == "gone" and '"content"' in line:
                        break  # the client walks away mid-stream
    total = 5 * n
    poll(lambda: len(stream_ids(own_redis.url, "billing")) >= total)
    time.sleep(0.2)  # nothing more may arrive
    events = [json.loads(line) for line in (tmp_path / "billing.jsonl").read_text().splitlines()]
    order = [e["id"] for e in events]
    assert len(order) == total and len(set(order)) == total
    assert stream_ids(own_redis.url, "billing") == order
    by_id = {e["data"]["request_id"]: e["data"] for e in events}
    assert all(e["id"].startswith("evt_") for e in events)  # the gateway's own ids, not the clients'
    expected = {  # status, stream, partial
        "unary": (200, False, False),
        "stream": (200, True, False),
        "error": (502, False, False),
        "gone": (499, True, True),
        "cut": (502, True, True),
    }
    for kind, rids in kinds.items():
        for rid in rids:
            data = by_id[rid]
            assert (data["status"], data["stream"], data["partial"]) == expected[kind], (kind, data)
            assert data["tenant"] == "t" and data["model"] == "m" and data["backend"] == "sim"
    assert all(by_id[r]["cost"] > 0 and by_id[r]["completion_tokens"] == 3 for r in kinds["unary"])
    assert all(0 < by_id[r]["completion_tokens"] < 500 for r in kinds["gone"])
    written = (tmp_path / "billing.jsonl").read_text()
    assert key not in written and "salt" not in written  # no secret travels with an event
    m = billing_metrics(gw)
    for sink in ("redis", "jsonl"):
        assert m[(sink, "emitted")] == total and m[(sink, "spooled")] == 0 and m[(sink, "spool")] == 0


def load(gw: GatewayProc, key: str, stop: threading.Event, seen: list[tuple[int, str]]) -> None:
    with httpx.Client(timeout=30) as http:
        while not stop.is_set():
            resp = http.post(
                gw.url + "/v1/chat/completions",
                headers={"Authorization": f"Bearer {key}"},
                json={"model": "m", "messages": MSG, "max_tokens": 2},
            )
            seen.append((resp.status_code, resp.headers["x-request-id"]))


def test_redis_killed_mid_run_loses_and_duplicates_nothing(
    own_redis: RedisServer, launch: Callable[[str], GatewayProc], tmp_path: Path
) -> None:
    start_durable(own_redis)
    gw = launch(own_redis.url)
    key = tenant_with_key(gw.url, gw.admin_key, "t")
    stop = threading.Event()
    seen: list[tuple[int, str]] = []
    clients = [threading.Thread(target=load, args=(gw, key, stop, seen)) for _ in range(4)]
    try:
        for t in clients:
            t.start()
        time.sleep(0.6)
        own_redis.kill()  # while requests keep flowing
        poll(lambda: billing_metrics(gw).get(("redis", "spooled"), 0) > 0)
        time.sleep(0.6)
        start_durable(own_redis)
        time.sleep(0.6)
    finally:
        stop.set()
        for t in clients:
            t.join(10)
    assert {status for status, _ in seen} == {200}  # billing never failed a request
    ids = [rid for _, rid in seen]
    poll(lambda: len(stream_ids(own_redis.url, "billing")) >= len(ids))
    streamed = stream_request_ids(own_redis.url, "billing")
    assert len(streamed) == len(ids) and set(streamed) == set(ids)
    assert len(set(stream_ids(own_redis.url, "billing"))) == len(ids)  # no event id twice
    assert streamed == jsonl_request_ids(tmp_path / "billing.jsonl")  # the order the gateway completed them in
    poll(lambda: billing_metrics(gw)[("redis", "spool")] == 0)
    m = billing_metrics(gw)
    assert m[("redis", "spooled")] > 0 and m[("redis", "replayed")] == m[("redis", "spooled")]
    assert m[("redis", "emitted")] + m[("redis", "replayed")] == len(ids)
    assert not list((tmp_path / "spool" / "redis").glob("*.seg"))


def burst(gw: GatewayProc, key: str, n: int, *, sigterm: bool = False) -> list[tuple[int, str]]:
    """`n` concurrent streams; with `sigterm`, SIGTERM the gateway as soon as all of them are under way."""
    done: list[tuple[int, str]] = []
    started = threading.Barrier(n + 1)

    def one() -> None:
        with httpx.stream(
            "POST",
            gw.url + "/v1/chat/completions",
            headers={"Authorization": f"Bearer {key}"},
            json={"model": "m", "messages": MSG, "max_tokens": 20, "stream": True},
            timeout=30,
        ) as resp:
            started.wait(10)
            list(resp.iter_lines())
            done.append((resp.status_code, resp.headers["x-request-id"]))

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    started.wait(10)
    if sigterm:
        gw.proc.signal(signal.SIGTERM)
    for t in threads:
        t.join(30)
    return done


def test_sigterm_right_after_a_burst_flushes_every_event(
    own_redis: RedisServer, launch: Callable[[str], GatewayProc], tmp_path: Path
) -> None:
    own_redis.start()
    gw = launch(own_redis.url)
    key = tenant_with_key(gw.url, gw.admin_key, "t")
    done = burst(gw, key, 30, sigterm=True)
    assert gw.proc.popen is not None and gw.proc.popen.wait(20) == 0, gw.output()
    assert [status for status, _ in done] == [200] * 30  # those in flight finished during the drain
    billed = jsonl_request_ids(tmp_path / "billing.jsonl")
    assert sorted(billed) == sorted(rid for _, rid in done)
    assert stream_request_ids(own_redis.url, "billing") == billed


def test_sink_down_at_shutdown_spools_and_the_next_start_replays(
    own_redis: RedisServer, launch: Callable[[str], GatewayProc], tmp_path: Path
) -> None:
    start_durable(own_redis)
    gw = launch(own_redis.url)
    key = tenant_with_key(gw.url, gw.admin_key, "t")
    before = [post(gw, key).headers["x-request-id"] for _ in range(5)]
    poll(lambda: len(stream_ids(own_redis.url, "billing")) == 5)
    own_redis.kill()
    during = burst(gw, key, 20)
    gw.proc.signal(signal.SIGTERM)
    assert gw.proc.popen is not None and gw.proc.popen.wait(20) == 0, gw.output()
    segments = sorted((tmp_path / "spool" / "redis").glob("*.seg"))
    spooled = [json.loads(line)["data"]["request_id"] for p in segments for line in p.read_text().splitlines()]
    assert sorted(spooled) == sorted(rid for _, rid in during)
    start_durable(own_redis)
    launch(own_redis.url)  # the same state and spool directory
    poll(lambda: len(stream_ids(own_redis.url, "billing")) >= 25)
    assert stream_request_ids(own_redis.url, "billing") == before + spooled
    assert stream_ids(own_redis.url, "billing") == jsonl_ids(tmp_path / "billing.jsonl")
    poll(lambda: not list((tmp_path / "spool" / "redis").glob("*.seg")))
