"""One contract for every upstream pool: what the request path needs of `httpclient.Pool` (engines) and of
`providers.LitellmPool` (hosted providers, through litellm), run over both against the simulator as a real
process (its OpenAI endpoints for the first, its Anthropic Messages endpoint for the second).

The request path has no provider branch, so both must behave the same: an answer of any status is a
response (read whole, iterated as SSE, or pushed to a sink with back-pressure); a backend that cannot be
reached raises the client's own `UpstreamError`, so fallbacks and the circuit breaker treat both alike.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.config import BackendConfig
from gateway.upstream import UpstreamPool
from gateway.wire import httpclient
from tests.support.procs import free_port
from tests.support.sim import SimHandle, start_sim

CHAT = "/v1/chat/completions"
HEADERS = {"content-type": "application/json"}

KINDS = [
    "http",
    pytest.param(
        "litellm",
        marks=[
            pytest.mark.providers,
            # litellm's pydantic types warn when first built (in the gateway's process that is only a log line).
            pytest.mark.filterwarnings("ignore:Item .* is using the `ReadOnly` qualifier"),
            pytest.mark.skipif(importlib.util.find_spec("litellm") is None, reason="needs the providers extra"),
        ],
    ),
]


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimHandle]:
    handle = start_sim("--ttft-ms", "1", "--itl-ms", "2", log_dir=tmp_path_factory.mktemp("sim-contract"))
    yield handle
    handle.stop()


def open_pool(kind: str, url: str, read_timeout_s: float = 10.0) -> UpstreamPool:
    if kind == "http":
        return httpclient.Pool(url, connect_timeout_s=2.0, read_timeout_s=read_timeout_s)
    from gateway.upstream.providers import LitellmPool, import_litellm

    config = BackendConfig(name="provider", kind="litellm", url=url, provider_model="anthropic/claude-haiku-4-5")
    return LitellmPool(config, "sk-ant-test", import_litellm(), read_timeout_s=read_timeout_s)


@pytest.fixture(params=KINDS)
async def pool(request: pytest.FixtureRequest, sim: SimHandle) -> AsyncIterator[tuple[str, UpstreamPool]]:
    opened = open_pool(request.param, sim.url)
    yield request.param, opened
    await opened.close()


def body(**extra: Any) -> bytes:
    return orjson.dumps(
        {"model": "sim-model", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5, **extra}
    )


async def test_an_answer_is_read_whole_with_its_usage(pool: tuple[str, UpstreamPool]) -> None:
    _, upstream = pool
    async with await upstream.request("POST", CHAT, body(), HEADERS) as resp:
        assert resp.status == 200
        answer = orjson.loads(await resp.read())
    assert answer["choices"][0]["message"]["content"]
    assert answer["usage"]["completion_tokens"] == 5 and answer["usage"]["prompt_tokens"] > 0


async def test_a_stream_iterates_as_sse_and_ends_with_its_usage_and_done(pool: tuple[str, UpstreamPool]) -> None:
    _, upstream = pool
    stream = body(stream=True, stream_options={"include_usage": True})
    async with await upstream.request("POST", CHAT, stream, HEADERS) as resp:
        assert resp.status == 200
        raw = b"".join([chunk async for chunk in resp])
    events = [e for e in raw.split(b"\n\n") if e.strip()]
    assert events[-1].strip() == b"data: [DONE]"
    usage = orjson.loads(events[-2].removeprefix(b"data: "))["usage"]
    assert usage["completion_tokens"] == 5


async def test_a_stream_pushed_to_a_sink_pauses_while_the_sink_is_full(pool: tuple[str, UpstreamPool]) -> None:
    _, upstream = pool
    got: list[bytes] = []
    paused = 0
    resp = await upstream.request("POST", CHAT, body(stream=True, max_tokens=40), HEADERS)
    async with resp:

        def sink(chunk: bytes) -> bool:
            nonlocal paused
            got.append(chunk)
            if len(got) % 3 == 0:
                paused += 1
                # The consumer is "full": it resumes the producer a moment later, as a client transport does.
                asyncio.get_running_loop().call_later(0.01, resp.resume_reading)
                return False
            return True

        resp.stream_to(sink)
        await resp.wait_end()
    assert paused > 0
    assert b"".join(got).rstrip().endswith(b"data: [DONE]")


async def test_an_error_answer_is_a_response_not_an_exception(pool: tuple[str, UpstreamPool], sim: SimHandle) -> None:
    kind, upstream = pool
    path = CHAT if kind == "http" else "/v1/messages"
    sim.set_faults("error_500", count=1, paths=[path])
    try:
        async with await upstream.request("POST", CHAT, body(), HEADERS) as resp:
            assert resp.status >= 500
            error = orjson.loads(await resp.read())
        assert "error" in error
    finally:
        sim.set_faults("none")


@pytest.mark.parametrize("kind", KINDS)
async def test_an_unreachable_backend_raises_the_clients_own_error(kind: str, tmp_path: Path) -> None:
    upstream = open_pool(kind, f"http://127.0.0.1:{free_port()}")
    try:
        with pytest.raises(httpclient.UpstreamError):
            async with await upstream.request("POST", CHAT, body(), HEADERS) as resp:
                await resp.read()
    finally:
        await upstream.close()


@pytest.mark.parametrize("kind", KINDS)
async def test_a_backend_that_hangs_times_out(kind: str, sim: SimHandle) -> None:
    path = CHAT if kind == "http" else "/v1/messages"
    sim.set_faults("hang", count=1, paths=[path])
    upstream = open_pool(kind, sim.url, read_timeout_s=0.5)
    try:
        with pytest.raises(httpclient.UpstreamError):
            async with await upstream.request("POST", CHAT, body(), HEADERS) as resp:
                await resp.read()
    finally:
        sim.set_faults("none")
        await upstream.close()
