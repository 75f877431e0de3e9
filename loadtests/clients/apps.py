"""Forwarding servers measured by run.py: one (server layer, upstream HTTP client) combination per process.

Every variant does the same work per request, the minimum the gateway's hot path cannot avoid:
read the request body, parse it with orjson, serialise it again, POST it to the upstream over a pooled
keep-alive connection, and answer with the upstream's status, content type and body.

Run by uvicorn as a factory, with the variant chosen by environment variables::

    BENCH_VARIANT=asgi-aiohttp BENCH_UPSTREAM=http://127.0.0.1:8080/v1/chat/completions \
        python -m uvicorn --app-dir loadtests/clients apps:create_app --factory

The upstream client (and its pool) is created once per process, in the ASGI lifespan, never per request.
"""

import os
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PATH = "/v1/chat/completions"
JSON = "application/json"
REQUEST_HEADERS = {"content-type": JSON}
#: Pool limits for the "generous" httpx/httpx2 variants: never the bottleneck at 64 concurrent requests.
GENEROUS = {"max_connections": 1000, "max_keepalive_connections": 1000}


@dataclass(frozen=True)
class Variant:
    """One measured combination."""

    server: str  # "fastapi" (a FastAPI route) or "asgi" (a bare ASGI callable)
    client: str  # "httpx", "httpx2" or "aiohttp"
    limits: str  # "default" (the client's default pool) or "generous"
    label: str


VARIANTS: dict[str, Variant] = {
    "fastapi-httpx-default": Variant("fastapi", "httpx", "default", "FastAPI + httpx (default Limits)"),
    "fastapi-httpx": Variant("fastapi", "httpx", "generous", "FastAPI + httpx (Limits 1000/1000)"),
    "fastapi-httpx2-default": Variant("fastapi", "httpx2", "default", "FastAPI + httpx2 (default Limits)"),
    "fastapi-httpx2": Variant("fastapi", "httpx2", "generous", "FastAPI + httpx2 (Limits 1000/1000)"),
    "fastapi-aiohttp": Variant("fastapi", "aiohttp", "generous", "FastAPI + aiohttp (TCPConnector limit=0)"),
    "asgi-httpx": Variant("asgi", "httpx", "generous", "bare ASGI + httpx (Limits 1000/1000)"),
    "asgi-httpx2": Variant("asgi", "httpx2", "generous", "bare ASGI + httpx2 (Limits 1000/1000)"),
    "asgi-aiohttp": Variant("asgi", "aiohttp", "generous", "bare ASGI + aiohttp (TCPConnector limit=0)"),
}


class Forwarder(Protocol):
    """A pooled upstream client: opened in the lifespan, shared by every request."""

    async def start(self) -> None: ...

    async def post(self, body: bytes) -> tuple[int, str, bytes]: ...

    async def close(self) -> None: ...


class HttpxForwarder:
    """httpx.AsyncClient, or httpx2.AsyncClient (a fork with the same API) when ``module == "httpx2"``."""

    def __init__(self, module: str, url: str, generous: bool) -> None:
        self.module_name = module
        self.url = url
        self.generous = generous
        self.client: Any = None

    async def start(self) -> None:
        if self.module_name == "httpx2":
            import httpx2 as httpx_module
        else:
            import httpx as httpx_module
        kwargs: dict[str, Any] = {"trust_env": False}  # never route loopback traffic through an env proxy
        if self.generous:
            kwargs["limits"] = httpx_module.Limits(**GENEROUS)
        self.client = httpx_module.AsyncClient(**kwargs)

    async def post(self, body: bytes) -> tuple[int, str, bytes]:
        response = await self.client.post(self.url, content=body, headers=REQUEST_HEADERS)
        return response.status_code, response.headers.get("content-type", JSON), response.content

    async def close(self) -> None:
        await self.client.aclose()


class AiohttpForwarder:
    """aiohttp.ClientSession over a TCPConnector with no connection cap and keep-alive on."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.session: Any = None

    async def start(self) -> None:
        import aiohttp

        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
        self.session = aiohttp.ClientSession(connector=connector)

    async def post(self, body: bytes) -> tuple[int, str, bytes]:
        async with self.session.post(self.url, data=body, headers=REQUEST_HEADERS) as response:
            return response.status, response.headers.get("content-type", JSON), await response.read()

    async def close(self) -> None:
        await self.session.close()


def make_forwarder(variant: Variant, url: str) -> Forwarder:
    if variant.client == "aiohttp":
        return AiohttpForwarder(url)
    return HttpxForwarder(variant.client, url, generous=variant.limits == "generous")


def fastapi_app(forwarder: Forwarder) -> ASGIApp:
    """A FastAPI route, written the way a FastAPI gateway would be (raw body, no pydantic model)."""
    from fastapi import FastAPI, Request, Response

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await forwarder.start()
        yield
        await forwarder.close()

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.post(PATH)
    async def chat_completions(request: Request) -> Response:
        payload = orjson.loads(await request.body())
        status, content_type, body = await forwarder.post(orjson.dumps(payload))
        return Response(content=body, status_code=status, media_type=content_type)

    return app


def asgi_app(forwarder: Forwarder) -> ASGIApp:
    """A bare ASGI callable: no routing table, no middleware stack, no request/response objects."""

    async def lifespan(receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await forwarder.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await forwarder.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def respond(send: Send, status: int, content_type: str, body: bytes) -> None:
        headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        if scope["method"] != "POST" or scope["path"] != PATH:
            await respond(send, 404, JSON, b'{"error":"not found"}')
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        payload = orjson.loads(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        status, content_type, body = await forwarder.post(orjson.dumps(payload))
        await respond(send, status, content_type, body)

    return app


def create_app() -> ASGIApp:
    """uvicorn factory: the variant and the upstream URL come from BENCH_VARIANT and BENCH_UPSTREAM."""
    variant = VARIANTS[os.environ["BENCH_VARIANT"]]
    forwarder = make_forwarder(variant, os.environ["BENCH_UPSTREAM"])
    return fastapi_app(forwarder) if variant.server == "fastapi" else asgi_app(forwarder)
