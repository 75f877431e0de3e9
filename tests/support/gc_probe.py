"""Serve the gateway in this process and count what its request paths leave in reference cycles.

Usage: python -m tests.support.gc_probe CONFIG ADMIN_KEY KEY. Starts the app under uvicorn with the
gateway's own protocol, turns the garbage collector off once start-up is done, sends requests of every
kind over loopback (unary, streams, 401s, 429s, streams the client leaves), then collects with
DEBUG_SAVEALL and prints, as one JSON line, the gateway objects and frames found in cycles. Every request
path should free what it made by reference counting alone (tests/test_memory.py)."""

from __future__ import annotations

import asyncio
import collections
import gc
import json
import sys

import uvicorn

from gateway.app import create_app
from gateway.config import load_settings
from gateway.serve import uvicorn_config


async def _request(port: int, raw: bytes, *, read: int | None = None) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    data = await (reader.read(read) if read else reader.read())
    writer.close()
    await writer.wait_closed()
    return data


def _post(path: str, key: str, body: bytes) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


async def _drive(port: int, admin: str, key: str) -> dict[str, object]:
    for _ in range(200):
        try:
            if (await _request(port, b"GET /readyz HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")).startswith(
                b"HTTP/1.1 200"
            ):
                break
        except OSError:
            pass
        await asyncio.sleep(0.05)
    tenant = json.dumps({"id": "probe-limited", "limits": {"rpm": 2}}).encode()
    await _request(port, _post("/admin/tenants", admin, tenant))
    created = await _request(port, _post("/admin/tenants/probe-limited/keys", admin, b'{"name": "k"}'))
    limited = json.loads(created.split(b"\r\n\r\n", 1)[1])["key"]
    chat = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}).encode()
    stream = json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
    ).encode()
    long_stream = json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000, "stream": True}
    ).encode()
    statuses: collections.Counter[str] = collections.Counter()
    gc.collect()
    gc.disable()
    for body, who, times, read in (
        (chat, key, 100, None),
        (stream, key, 50, None),
        (chat, "sk-gw-" + "0" * 43, 50, None),
        (chat, limited, 50, None),
        (long_stream, key, 30, 400),  # the client leaves mid-stream
    ):
        for _ in range(times):
            answer = await _request(port, _post("/v1/chat/completions", who, body), read=read)
            statuses[answer[9:12].decode()] += 1
    await asyncio.sleep(0.5)  # let the streams the clients left wind down
    gc.set_debug(gc.DEBUG_SAVEALL)
    gc.collect()
    found: collections.Counter[str] = collections.Counter()
    for obj in gc.garbage:
        module = getattr(type(obj), "__module__", "") or ""
        if module.startswith("gateway"):
            found[type(obj).__qualname__] += 1
        elif type(obj).__name__ == "frame" and "/gateway/" in obj.f_code.co_filename:
            found["frame " + obj.f_code.co_qualname] += 1
    gc.set_debug(0)
    return {"statuses": dict(statuses), "in_cycles": dict(found)}


def main() -> None:
    config_path, admin, key = sys.argv[1:4]
    settings = load_settings(config_path)
    app = create_app(settings)
    server = uvicorn.Server(uvicorn_config(app, settings, "127.0.0.1", settings.listen.port))
    result: dict[str, object] = {}

    async def run() -> None:
        serving = asyncio.ensure_future(server.serve())
        try:
            result.update(await _drive(settings.listen.port, admin, key))
        finally:
            server.should_exit = True
            await serving

    asyncio.run(run())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
