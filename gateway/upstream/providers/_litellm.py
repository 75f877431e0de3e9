"""A `kind: litellm` backend: hosted providers (Anthropic, Bedrock, Gemini, ...) through litellm, presented to
the request path exactly like an `httpclient.Pool`.

    pool = LitellmPool(backend_config, api_key, litellm_module, ...)
    async with await pool.request("POST", "/v1/chat/completions", body, headers) as resp:
        resp.status, await resp.read()          # OpenAI-shaped JSON (an error body for a provider's 4xx/5xx)
        async for chunk in resp: ...            # or OpenAI-shaped SSE: data: {...}\\n\\n ... data: [DONE]\\n\\n

So `gateway.pipeline` needs no branch of its own: it meters, relays and bills this answer like vLLM's.

Translation at the seam:

- The request body is the OpenAI body the pipeline rewrote. Only OpenAI's chat parameters (and `top_k`,
  which Anthropic and Gemini take) become litellm arguments; other fields are dropped. This is the one
  exception to "unknown fields pass through": litellm reads its own settings from the same keyword
  arguments (`api_base`, `api_key`, `mock_response`, `aws_region_name`, `s3_endpoint_url`, ... over 300 of
  them), and several would let a tenant send the gateway's provider credentials anywhere.
- litellm's exceptions become what the HTTP client would have produced: a timeout is `ReadTimeout`, a
  connection failure `ConnectError` (before any answer byte, so the pipeline may fall back to another
  backend), and an answer the provider refused is a `ProviderResponse` with the provider's status and an
  OpenAI error body whose message is the provider's own message, never litellm's text (which can name the
  provider's URL). The pipeline then maps its status onto the gateway's own errors as for every backend
  (`relay.error_from_backend`).
- Only chat completions are served (streamed or not); the other endpoints answer 400.

No retries here (`num_retries=0`): falling back to another backend is the pipeline's decision.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from types import ModuleType, TracebackType
from typing import Any

import aiohttp
import httpx
import orjson

from gateway.config import BackendConfig
from gateway.wire import httpclient

__all__ = ["LitellmPool", "ProviderResponse"]

log = logging.getLogger("gateway.upstream.providers")

# OpenAI chat parameters litellm translates for the provider (the rest go in extra_body).
_CHAT_PARAMS = frozenset(
    {
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "n",
        "stop",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "logprobs",
        "top_logprobs",
        "seed",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "response_format",
        "user",
        "reasoning_effort",
        "functions",
        "function_call",
        "modalities",
        "audio",
        "prediction",
        "web_search_options",
        "service_tier",
        "store",
        "verbosity",
        "prompt_cache_key",
        "safety_identifier",
        "thinking",
        # Not OpenAI's, but a provider sampling parameter litellm passes on as it is.
        "top_k",
    }
)
_OWN = frozenset({"model", "messages", "stream", "stream_options"})
_USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens")
_DONE = b"data: [DONE]\n\n"


class ProviderResponse:
    """One provider answer in the shape of `httpclient.Response`: a status, a body, or an SSE stream."""

    headers: list[tuple[bytes, bytes]] = []

    def __init__(
        self,
        status: int,
        body: bytes = b"",
        stream: Any = None,
        model: str = "",
        closers: set[asyncio.Task[None]] | None = None,
    ) -> None:
        self.status = status
        self._body = body
        self._stream = stream
        self._iter: AsyncIterator[Any] | None = None
        self._model = model
        self._pending: list[bytes] = []
        self._usage: dict[str, Any] | None = None
        self._ended = stream is None
        self._closers = closers if closers is not None else set()
        # Push mode (`stream_to`): a task feeds the sink; it waits on `_writable` while the sink is full.
        self._pump: asyncio.Task[None] | None = None
        self._writable: asyncio.Event | None = None

    async def read(self) -> bytes:
        if self._stream is None:
            return self._body
        return b"".join([chunk async for chunk in self])

    def __aiter__(self) -> ProviderResponse:
        return self

    async def __anext__(self) -> bytes:
        if self._stream is None:
            if self._body:
                body, self._body = self._body, b""
                return body
            raise StopAsyncIteration
        while not self._pending:
            if self._ended:
                raise StopAsyncIteration
            await self._pull()
        out = b"".join(self._pending)
        self._pending.clear()
        return out

    async def _pull(self) -> None:
        if self._iter is None:
            self._iter = self._stream.__aiter__()
        try:
            chunk = await self._iter.__anext__()
        except StopAsyncIteration:
            self._finish()
            return
        except asyncio.CancelledError:
            self.close()
            raise
        except Exception as exc:
            self.close()
            raise _connection_error(exc) from None
        events, usage = _chunk_events(chunk.model_dump(exclude_none=True), self._model)
        self._pending.extend(events)
        if usage is not None:
            self._usage = usage

    def _finish(self) -> None:
        self._ended = True
        if self._usage is not None:
            self._pending.append(b"data: " + orjson.dumps(self._usage) + b"\n\n")
        self._pending.append(_DONE)
        self._stream = _Finished()

    def stream_to(self, sink: Callable[[bytes], bool]) -> None:
        """Push mode, as `httpclient.Response.stream_to`: every event batch goes to `sink` as litellm yields
        it; False from the sink holds the provider's stream until `resume_reading()`. Then `wait_end()`."""
        writable = self._writable = asyncio.Event()
        writable.set()

        async def pump() -> None:
            async for chunk in self:
                if not sink(chunk):
                    writable.clear()
                    await writable.wait()

        self._pump = asyncio.get_running_loop().create_task(pump())

    def resume_reading(self) -> None:
        if self._writable is not None:
            self._writable.set()

    async def wait_end(self) -> None:
        """Until the stream has been pushed in full; raises what ended it otherwise (cancelling this cancels
        the pump, which closes the provider's stream)."""
        if self._pump is not None:
            await self._pump

    def release(self) -> None:
        if not self._ended:
            self.close()

    def close(self) -> None:
        """Stop the provider's stream: closing it closes its connection, so the provider stops generating."""
        stream, self._stream = self._stream, None
        self._ended = True
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            task = asyncio.get_running_loop().create_task(_quietly(aclose()))
            self._closers.add(task)
            task.add_done_callback(self._closers.discard)

    async def __aenter__(self) -> ProviderResponse:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class _Finished:
    """What a finished stream is replaced with: nothing left to close."""


class LitellmPool:
    """The `httpclient.Pool` interface over `litellm.acompletion` for one backend."""

    def __init__(
        self,
        config: BackendConfig,
        api_key: str | None,
        litellm: ModuleType,
        *,
        read_timeout_s: float,
    ) -> None:
        if config.provider_model is None:
            raise ValueError("a litellm backend needs a provider_model")
        self._model = config.provider_model
        assert config.url is not None  # a litellm backend has one (config validation)
        self._api_base = config.url.rstrip("/")
        self._api_key = api_key
        self._litellm = litellm
        self._timeout = read_timeout_s
        self._closers: set[asyncio.Task[None]] = set()
        self._closed = False

    async def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: Mapping[str, str] | Sequence[tuple[bytes, bytes]] | None = None,
        *,
        read_timeout_s: float | None = None,
    ) -> ProviderResponse:
        if self._closed:
            raise httpclient.ConnectError("the provider backend is closed")
        if method != "POST" or path != "/v1/chat/completions":
            return _error(400, "This model's backend serves chat completions only.")
        try:
            request = orjson.loads(body)
        except orjson.JSONDecodeError:
            return _error(400, "The request body is not valid JSON.")
        model = request.get("model") if isinstance(request.get("model"), str) else ""
        kwargs = self._arguments(request, headers)
        try:
            result = await self._litellm.acompletion(**kwargs)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return self._refused(exc)
        if kwargs["stream"]:
            return ProviderResponse(200, stream=result, model=model, closers=self._closers)
        return ProviderResponse(200, orjson.dumps(_completion(result.model_dump(exclude_none=True), model)))

    async def close(self) -> None:
        self._closed = True
        for task in list(self._closers):
            await task

    def _arguments(
        self, request: dict[str, Any], headers: Mapping[str, str] | Sequence[tuple[bytes, bytes]] | None
    ) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "model": self._model,
            "messages": request.get("messages"),
            "api_base": self._api_base,
            "stream": request.get("stream") is True,
            "timeout": self._timeout,
            "num_retries": 0,
            "max_retries": 0,
        }
        if self._api_key:
            kwargs["api_key"] = self._api_key
        if kwargs["stream"]:
            kwargs["stream_options"] = {"include_usage": True}
        dropped = []
        for name, value in request.items():
            if name in _CHAT_PARAMS:
                kwargs[name] = value
            elif name not in _OWN:
                dropped.append(name)
        if dropped:
            log.debug("fields not forwarded to provider %s: %s", self._model, ", ".join(sorted(dropped))[:300])
        request_id = _request_id(headers)
        if request_id is not None:
            kwargs["extra_headers"] = {"x-request-id": request_id}
        return kwargs

    def _refused(self, exc: Exception) -> ProviderResponse:
        status = getattr(exc, "status_code", None)
        name = type(exc).__name__
        if name in ("Timeout", "APIConnectionError") or not isinstance(status, int) or status < 400:
            raise _connection_error(exc) from None
        transport = _transport_failure(exc)
        if transport is not None:
            # litellm reports some providers' refused connections as a 500 (Anthropic's, for one): it is a
            # failure to answer, for fallbacks and the circuit breaker alike, not an answer.
            raise transport from None
        log.info("provider %s refused a request: %s %s", self._model, status, name)
        return _error(status, _provider_message(exc, self._api_base), _error_type(status))


def _transport_failure(exc: BaseException) -> httpclient.UpstreamError | None:
    """The connection failure or timeout behind a litellm error, if there is one in its chain of causes."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen and len(seen) < 16:
        seen.add(id(cause))
        if isinstance(cause, httpx.TimeoutException | TimeoutError | aiohttp.ServerTimeoutError):
            return httpclient.ReadTimeout(f"the provider did not answer in time: {type(cause).__name__}")
        if isinstance(cause, httpx.TransportError | aiohttp.ClientConnectionError | ConnectionError):
            return httpclient.ConnectError(f"the provider could not be reached: {type(cause).__name__}")
        cause = cause.__cause__ or cause.__context__
    return None


def _connection_error(exc: BaseException) -> httpclient.UpstreamError:
    # The message is for logs only (it may name the provider's address); the client gets a generic 502.
    if type(exc).__name__ == "Timeout":
        return httpclient.ReadTimeout(f"the provider did not answer in time: {exc}")
    return httpclient.ConnectError(f"{type(exc).__name__}: {exc}")


def _error(status: int, message: str, kind: str = "invalid_request_error") -> ProviderResponse:
    body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return ProviderResponse(status, orjson.dumps(body))


def _error_type(status: int) -> str:
    return "invalid_request_error" if status < 500 else "server_error"


def _provider_message(exc: Exception, api_base: str) -> str:
    """The provider's own error message, from its JSON body as litellm quotes it; a generic one otherwise."""
    text = str(getattr(exc, "message", "") or exc)
    start = text.find("{")
    message: object = None
    if start >= 0:
        try:
            obj = orjson.loads(text[start:])
        except orjson.JSONDecodeError:
            obj = None
        if isinstance(obj, dict):
            err = obj.get("error", obj)
            message = err.get("message") if isinstance(err, dict) else None
    if not isinstance(message, str) or not message:
        # litellm's own refusals ("does not support parameters: [...]") are about the request; keep the part
        # after its "litellm.Error: Provider - " prefix unless it could name an address.
        message = text.rsplit(" - ", 1)[-1].split(". To drop these", 1)[0].strip()
    if not message or "://" in message or api_base in message:
        message = "The provider rejected the request."
    return message[:2000]


def _request_id(headers: Mapping[str, str] | Sequence[tuple[bytes, bytes]] | None) -> str | None:
    if isinstance(headers, Mapping):
        return headers.get("x-request-id")
    for name, value in headers or ():
        if name == b"x-request-id":
            return value.decode("latin-1")
    return None


def _completion(obj: dict[str, Any], model: str) -> dict[str, Any]:
    """litellm's ModelResponse as OpenAI's chat.completion: litellm's extras removed, the requested name kept
    (the pipeline swaps it for the client's model name as it does for every backend)."""
    obj["model"] = model
    obj.setdefault("object", "chat.completion")
    for choice in obj.get("choices") or ():
        message = choice.get("message") if isinstance(choice, dict) else None
        if isinstance(message, dict):
            message.pop("provider_specific_fields", None)
    if isinstance(obj.get("usage"), dict):
        obj["usage"] = _usage(obj["usage"])
    return obj


def _usage(raw: dict[str, Any]) -> dict[str, Any]:
    usage: dict[str, Any] = {k: raw[k] for k in _USAGE_KEYS if isinstance(raw.get(k), int)}
    details = raw.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    usage["prompt_tokens_details"] = {"cached_tokens": cached if isinstance(cached, int) else 0}
    return usage


def _chunk_events(obj: dict[str, Any], model: str) -> tuple[list[bytes], dict[str, Any] | None]:
    """One litellm stream chunk as OpenAI SSE events, and its usage chunk if it carries usage. Usage is held
    back and sent last, in a chunk of its own with no choices, as OpenAI and vLLM do (the pipeline's relay
    meters it and forwards it only if the client asked)."""
    obj["model"] = model
    raw = obj.pop("usage", None)
    usage: dict[str, Any] | None = None
    if isinstance(raw, dict):
        usage = {
            "id": obj.get("id"),
            "object": "chat.completion.chunk",
            "created": obj.get("created"),
            "model": model,
            "choices": [],
            "usage": _usage(raw),
        }
    choices = obj.get("choices")
    if not isinstance(choices, list) or not any(_has_content(c) for c in choices):
        return [], usage
    for choice in choices:
        if isinstance(choice, dict):
            choice.pop("provider_specific_fields", None)
            delta = choice.get("delta")
            if isinstance(delta, dict):
                delta.pop("provider_specific_fields", None)
    return [b"data: " + orjson.dumps(obj) + b"\n\n"], usage


def _has_content(choice: object) -> bool:
    if not isinstance(choice, dict):
        return False
    delta = choice.get("delta")
    return bool(choice.get("finish_reason")) or (isinstance(delta, dict) and any(v for v in delta.values()))


async def _quietly(closing: Any) -> None:
    try:
        await asyncio.wait_for(closing, timeout=5)
    except Exception as exc:  # closing a stream the provider already dropped; nothing to tell anyone
        log.debug("closing a provider stream: %s", type(exc).__name__)
