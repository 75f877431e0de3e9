"""The admission path's pipelined Redis client against a real redis-server: replies matched in order under
concurrency, cancellation, errors, timeouts, a dead and a restarted server, AUTH, databases, unix sockets."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import hiredis
import pytest
from redis import exceptions as rx
from redis.asyncio import Redis

from gateway.admission.limits import PipelinedRedis
from gateway.wire.resp import Packed, pack_parts
from tests.support.redis_server import RedisServer


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    srv = RedisServer(tmp_path / "redis")
    srv.start()
    yield srv
    if srv.proc is not None and srv.proc.poll() is None:
        os.kill(srv.proc.pid, signal.SIGCONT)
    srv.kill()


@pytest.fixture
async def client(server: RedisServer) -> AsyncIterator[PipelinedRedis]:
    c = PipelinedRedis.from_url(server.url, timeout_s=0.5)
    yield c
    await c.aclose()


def test_a_command_in_packed_runs_is_the_command_hiredis_packs() -> None:
    args = ("EVALSHA", "a" * 40, 2, "{t}:k1", "{t}:k2", "", 1.5, 0.1, -7, 2**40, b"raw\r\n", "caf\u00e9")
    assert pack_parts(args) == hiredis.pack_command(args)
    runs = (Packed("EVALSHA", "a" * 40, 2), Packed("{t}:k1", "{t}:k2"), "", 1.5, Packed(), 0.1, -7)
    assert pack_parts((*runs, Packed(2**40, b"raw\r\n"), "caf\u00e9")) == hiredis.pack_command(args)
    with pytest.raises(TypeError):  # what hiredis refuses is refused, not sent as something else
        pack_parts(("SET", "k", None))


async def test_a_command_sent_in_parts_runs(client: PipelinedRedis) -> None:
    assert await client.execute_parts(Packed("SET", "parts:k"), "v") == b"OK"
    assert await client.execute_parts("GET", Packed("parts:k")) == b"v"


async def test_concurrent_commands_each_get_their_own_reply(client: PipelinedRedis) -> None:
    replies = await asyncio.gather(*(client.execute_command("ECHO", f"r{i}") for i in range(2000)))
    assert replies == [f"r{i}".encode() for i in range(2000)]
    assert await client.execute_command("INCRBY", "n", 5) == 5


async def test_all_callers_share_one_connection(client: PipelinedRedis, server: RedisServer) -> None:
    await asyncio.gather(*(client.ping() for _ in range(200)))
    inspector = Redis.from_url(server.url)
    try:
        clients = await inspector.client_list()
        assert len(clients) == 2  # the pipelined client and the inspector
    finally:
        await inspector.aclose()


async def test_a_cancelled_caller_leaves_the_pipeline_in_step(client: PipelinedRedis) -> None:
    # BLPOP holds the connection for 0.3 s; the ECHO behind it must get its own reply, not BLPOP's.
    blocked = asyncio.ensure_future(client.execute_command("BLPOP", "nothing-here", "0.3"))
    await asyncio.sleep(0.05)
    blocked.cancel()
    assert await client.execute_command("ECHO", "after") == b"after"


async def test_error_replies_are_raised_and_the_connection_stays_usable(client: PipelinedRedis) -> None:
    with pytest.raises(rx.NoScriptError):
        await client.evalsha("0" * 40, 0)
    with pytest.raises(rx.ResponseError):
        await client.execute_command("NOT-A-COMMAND")
    sha = await client.script_load("return ARGV[1] .. KEYS[1]")
    assert await client.evalsha(sha.decode(), 1, "k", "v") == b"vk"


async def test_a_hung_server_times_out_every_waiting_command_then_recovers(
    client: PipelinedRedis, server: RedisServer
) -> None:
    await client.ping()
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        results = await asyncio.gather(*(client.ping() for _ in range(50)), return_exceptions=True)
        waited = time.monotonic() - started
        assert all(isinstance(r, rx.TimeoutError) for r in results)
        assert waited < 3  # bounded by the 0.5 s timeout, not by the server
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    assert await client.execute_command("ECHO", "back") == b"back"


async def test_each_command_is_timed_from_its_own_start(client: PipelinedRedis) -> None:
    """The deadline follows the oldest command waiting: one that Redis holds for most of the timeout, issued
    after others were answered (whose deadline may still be pending), gets its reply; one held for longer
    than the timeout fails, and not before its own timeout has passed."""
    await client.ping()  # a deadline 0.5 s from now, which the reply clears
    await asyncio.sleep(0.3)
    assert await client.execute_command("BLPOP", "nothing-here", "0.4") is None  # ends after the ping's deadline
    await client.ping()
    await asyncio.sleep(0.3)
    started = time.monotonic()
    with pytest.raises(rx.TimeoutError):
        await client.execute_command("BLPOP", "nothing-here", "2")
    assert time.monotonic() - started >= 0.45
    assert await client.execute_command("ECHO", "after") == b"after"  # on a new connection


async def test_a_dead_server_fails_fast_and_a_restarted_one_is_used_again(
    client: PipelinedRedis, server: RedisServer
) -> None:
    await client.ping()
    server.kill()
    with pytest.raises(rx.ConnectionError):
        await asyncio.wait_for(client.ping(), 5)
    with pytest.raises(rx.ConnectionError):  # nothing listens: refused at once
        await asyncio.wait_for(client.ping(), 5)
    server.start()
    assert await client.ping() in (b"PONG", "PONG")


async def test_password_and_database_from_the_url(tmp_path: Path) -> None:
    srv = RedisServer(tmp_path / "auth")
    srv.start(extra=("--requirepass", "s3cr:t"))
    try:
        good = PipelinedRedis.from_url(f"redis://:s3cr%3At@127.0.0.1:{srv.port}/3", timeout_s=1.0)
        await good.execute_command("SET", "where", "db3")
        inspector = Redis.from_url(f"redis://:s3cr%3At@127.0.0.1:{srv.port}/3")
        assert await inspector.get("where") == b"db3"
        await inspector.aclose()
        await good.aclose()

        bad = PipelinedRedis.from_url(f"redis://:wrong@127.0.0.1:{srv.port}/0", timeout_s=1.0)
        with pytest.raises(rx.ConnectionError) as err:
            await bad.ping()
        assert "wrong" not in str(err.value)  # the password is not echoed
        await bad.aclose()
    finally:
        srv.kill()


async def test_unix_socket(tmp_path: Path) -> None:
    sock = tmp_path / "r.sock"
    srv = RedisServer(tmp_path / "unix")
    srv.start(extra=("--unixsocket", str(sock)))
    try:
        c = PipelinedRedis.from_url(f"unix://{sock}?db=2", timeout_s=1.0)
        await c.execute_command("SET", "k", "v")
        assert await c.execute_command("GET", "k") == b"v"
        assert await c.execute_command("CLIENT", "INFO") is not None
        await c.aclose()
    finally:
        srv.kill()


def test_unsupported_urls_are_refused() -> None:
    with pytest.raises(ValueError, match="scheme"):
        PipelinedRedis.from_url("redis+sentinel://h:26379/mymaster")
    with pytest.raises(ValueError, match="database"):
        PipelinedRedis.from_url("redis://h:6379/x")


async def test_a_closed_client_refuses_commands(client: PipelinedRedis) -> None:
    await client.ping()
    await client.aclose()
    with pytest.raises(rx.ConnectionError):
        await client.ping()
