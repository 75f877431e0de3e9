"""Model pools: one backend, several engine endpoints, balanced by load, with prefix affinity inside a cache
scope and never across scopes.

Real simulators as the engines (each with its own bounded prefix cache), the gateway as a process, the
official openai SDK as the client. A DNS pool is tested for real too: the gateway runs in a mount namespace
of its own whose /etc/hosts (bind-mounted from a file the test rewrites) gives the pool's name one address
per simulator, all on one port, so endpoints join and leave as a headless Service's would.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.support.admin import tenant_with_key
from tests.support.gateway import start_gateway
from tests.support.procs import free_port
from tests.support.redis_server import RedisServer
from tests.support.sim import SimHandle, start_sim

PROMPT_BODY = "You are the assistant of team {team}. Follow the house rules in every answer. " * 40


def system(team: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": PROMPT_BODY.format(team=team)}]


def ask(client: openai.OpenAI, team: str, question: str, **extra: Any) -> Any:
    return client.chat.completions.with_raw_response.create(
        model="m", messages=[*system(team), {"role": "user", "content": question}], max_tokens=2, **extra
    )


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[SimHandle]]:
    logs = tmp_path_factory.mktemp("sims-pool")
    handles = [start_sim("--ttft-ms", "1", "--itl-ms", "1", log_dir=logs) for _ in range(3)]
    yield handles
    for handle in handles:
        handle.stop()


def pool_config(engines: list[SimHandle], *, affinity: str = "scope", **extra: Any) -> dict[str, Any]:
    return {
        "capacity": {"interval_s": 0.1},
        "backends": [
            {
                "name": "pool",
                "kind": "vllm",
                "endpoints": [e.url for e in engines],
                "capacity": 16,
                "routing": {"affinity": affinity},
            }
        ],
        "models": [{"name": "m", "backends": ["pool"]}],
        **extra,
    }


def served_by(engines: list[SimHandle]) -> list[int]:
    return [e.stats()["requests_by_path"].get("/v1/chat/completions", 0) for e in engines]


def test_spreading_over_a_pool_is_normal_operation_not_a_fallback(engines: list[SimHandle], tmp_path: Path) -> None:
    billing = tmp_path / "billing.jsonl"
    sinks = {"sinks": [{"kind": "jsonl", "path": str(billing)}]}
    gw = start_gateway(pool_config(engines, affinity="none", billing=sinks), tmp_path)
    try:
        key = tenant_with_key(gw.url, gw.admin_key, "spread")
        before = served_by(engines)
        headers: list[httpx.Headers] = []

        def one() -> None:
            with httpx.Client(timeout=30) as http:
                for _ in range(6):
                    resp = http.post(
                        gw.url + "/v1/chat/completions",
                        headers={"Authorization": f"Bearer {key}"},
                        json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20},
                    )
                    assert resp.status_code == 200
                    headers.append(resp.headers)

        threads = [threading.Thread(target=one) for _ in range(9)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        counts = [a - b for a, b in zip(served_by(engines), before, strict=True)]
        assert sum(counts) == 54 and min(counts) > 0, counts  # every engine took part
        assert not any("x-gateway-fallback-from" in h for h in headers)
    finally:
        gw.stop()
    # Each usage event names the engine that served it: the engines' own counts, event by event.
    events = [json.loads(line)["data"] for line in billing.read_text().splitlines()]
    billed = Counter(e["engine"] for e in events if e["tenant"] == "spread")
    assert [billed[e.url.removeprefix("http://")] for e in engines] == counts


def test_a_scopes_prefix_sticks_to_one_engine_and_hits_its_cache(engines: list[SimHandle], tmp_path: Path) -> None:
    gw = start_gateway(pool_config(engines), tmp_path)
    try:
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key=tenant_with_key(gw.url, gw.admin_key, "sticky"))
        before = served_by(engines)
        cached = [
            ask(client, "sticky", f"question {i}").parse().usage.prompt_tokens_details.cached_tokens for i in range(8)
        ]
        counts = [a - b for a, b in zip(served_by(engines), before, strict=True)]
        assert sorted(counts) == [0, 0, 8], counts  # one engine holds the prefix: all go there
        assert cached[0] == 0 and all(c > 100 for c in cached[1:])  # and its cache serves it
    finally:
        gw.stop()


def test_separate_scopes_never_share_placement_and_a_shared_scope_does(
    engines: list[SimHandle], tmp_path: Path
) -> None:
    gw = start_gateway(pool_config(engines), tmp_path)
    try:
        # Twelve tenants with the very same system prompt, each in its own cache scope: their prefixes are
        # cached apart (salted), so nothing is gained by putting them together, and nothing is revealed by
        # where they land: they spread as independent keys do.
        before = served_by(engines)
        for i in range(12):
            key = tenant_with_key(gw.url, gw.admin_key, f"own{i}")
            ask(openai.OpenAI(base_url=gw.url + "/v1", api_key=key), "same", "hello")
        own = [a - b for a, b in zip(served_by(engines), before, strict=True)]
        assert max(own) < 12 and sum(1 for c in own if c) >= 2, own
        # The same twelve prompts from tenants of one group share a scope, a cache, and an engine.
        before = served_by(engines)
        for i in range(12):
            key = tenant_with_key(gw.url, gw.admin_key, f"grouped{i}", cache_scope="group:house")
            ask(openai.OpenAI(base_url=gw.url + "/v1", api_key=key), "same", "hello")
        grouped = [a - b for a, b in zip(served_by(engines), before, strict=True)]
        assert sorted(grouped) == [0, 0, 12], grouped
    finally:
        gw.stop()


def test_two_replicas_place_a_prefix_on_the_same_engine(
    engines: list[SimHandle], redis_server: RedisServer, tmp_path: Path
) -> None:
    config = pool_config(engines, redis_url=redis_server.url)
    a = start_gateway(config, tmp_path / "a")
    b = start_gateway(config, tmp_path / "b")
    try:
        key = tenant_with_key(a.url, a.admin_key, "two-replicas")
        for gw in (a, b):
            client = openai.OpenAI(base_url=gw.url + "/v1", api_key=key)
            before = served_by(engines)
            for i in range(4):
                ask(client, "two", f"q{i}")
            counts = [x - y for x, y in zip(served_by(engines), before, strict=True)]
            assert sorted(counts) == [0, 0, 4], counts
            if gw is a:
                first = counts
        assert counts == first
    finally:
        a.stop()
        b.stop()


def test_an_engine_that_dies_leaves_the_pool_serving(tmp_path: Path) -> None:
    logs = tmp_path / "sims"
    sims = [start_sim("--ttft-ms", "1", "--itl-ms", "1", log_dir=logs) for _ in range(2)]
    gw = start_gateway(pool_config(sims, health_interval_s=0.5), tmp_path)
    try:
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key=tenant_with_key(gw.url, gw.admin_key, "robust"))
        for i in range(4):
            assert ask(client, "robust", f"q{i}").http_response.status_code == 200
        sims[0].proc.kill()
        # Whichever engine this prefix preferred, every request is answered: by the survivor at once when
        # the dead one refuses connections (moved within the pool, not a fallback to another backend).
        for i in range(10):
            raw = ask(client, "robust", f"after {i}")
            assert raw.http_response.status_code == 200
            assert "x-gateway-fallback-from" not in raw.headers
    finally:
        gw.stop()
        for sim in sims:
            sim.stop()


# --- a pool found in DNS ---------------------------------------------------------------------------------


def _can_unshare() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True, check=False)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_unshare(), reason="needs a mount namespace (unshare --mount) for a private /etc/hosts")
def test_endpoints_join_and_leave_through_dns_without_losing_a_request(tmp_path: Path) -> None:
    port = free_port()
    logs = tmp_path / "sims"
    sims = [
        start_sim("--ttft-ms", "1", "--itl-ms", "2", log_dir=logs, port=port, host=f"127.0.0.{i}") for i in (2, 3, 4)
    ]
    hosts = tmp_path / "hosts"

    def publish(*addresses: str) -> None:
        # Rewritten in place: the bind mount follows the file, not its name.
        with open(hosts, "r+" if hosts.exists() else "w") as f:
            f.seek(0)
            f.truncate()
            f.write("127.0.0.1 localhost\n" + "".join(f"{a} pool.gateway.test\n" for a in addresses))

    publish("127.0.0.2")
    config = {
        "health_interval_s": 0.5,
        "capacity": {"interval_s": 0.1},
        "backends": [
            {
                "name": "pool",
                "kind": "vllm",
                "discovery": {"dns": "pool.gateway.test", "port": port, "interval_s": 0.3},
                "routing": {"affinity": "none"},
            }
        ],
        "models": [{"name": "m", "backends": ["pool"]}],
    }
    wrap = (
        "unshare", "--mount", "--propagation", "private", "--",
        "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"', str(hosts),
    )  # fmt: skip
    gw = start_gateway(config, tmp_path / "gw", wrap=wrap)
    stop = threading.Event()
    statuses: Counter[int] = Counter()
    try:
        key = tenant_with_key(gw.url, gw.admin_key, "dns")

        def load() -> None:
            with httpx.Client(timeout=30) as http:
                while not stop.is_set():
                    resp = http.post(
                        gw.url + "/v1/chat/completions",
                        headers={"Authorization": f"Bearer {key}"},
                        json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10},
                    )
                    statuses[resp.status_code] += 1

        threads = [threading.Thread(target=load) for _ in range(6)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        publish("127.0.0.2", "127.0.0.3", "127.0.0.4")  # two engines join
        time.sleep(2.0)
        joined = served_by(sims)
        publish("127.0.0.3", "127.0.0.4")  # the first one leaves (it keeps running: nothing may fail)
        time.sleep(1.0)
        after_leave = served_by(sims)
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join(30)
        final = served_by(sims)
    finally:
        stop.set()
        gw.stop()
        for sim in sims:
            sim.stop()
    assert set(statuses) == {200}, statuses  # not one request lost
    assert joined[1] > 0 and joined[2] > 0  # the new endpoints took traffic
    assert final[0] - after_leave[0] <= 6  # the one that left gets nothing new (what was in flight aside)
