"""The simulator's ASGI application: routing, the request lifecycle of each endpoint, and fault injection.

A plain ASGI callable (no framework) because the simulator is the upstream of every benchmark and must
never be their bottleneck. Each generation request reads top to bottom: read the body, take any injected
fault, parse and validate, then run on the engine (at once when nothing needs to wait, otherwise under a
disconnect watch) and send the result.
"""

from __future__ import annotations

import contextlib
import itertools
import secrets
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import orjson

from gateway.sim import anthropic, shapes
from gateway.sim.asgi import (
    ClientGone,
    Receive,
    Scope,
    Send,
    cancel_on_disconnect,
    close_connection,
    read_body,
    send_body,
    wait_disconnect,
)
from gateway.sim.config import SimConfig
from gateway.sim.engine import Admission, Engine
from gateway.sim.errors import SimError, error_body
from gateway.sim.faults import Fault, Faults
from gateway.sim.metrics import CONTENT_TYPE, render_metrics
from gateway.sim.requests import Job, parse_chat, parse_completion, parse_embeddings, parse_responses
from gateway.sim.stats import Stats

__all__ = ["SimApp", "create_sim_app"]

Handler = Callable[[Scope, Receive, Send], Awaitable[None]]

_SSE_START = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")],
}
_DONE = b"data: [DONE]\n\n"
_UNWATCHED_S = 0.002
_ID_PREFIX = {"chat": "chatcmpl-", "completion": "cmpl-", "responses": "resp_", "messages": "msg_"}
_MESSAGES = "/v1/messages"
_PING = anthropic.event({"type": "ping"})
_BLOCK_START = anthropic.event(
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
)
_BLOCK_STOP = anthropic.event({"type": "content_block_stop", "index": 0})
_MESSAGE_STOP = anthropic.event({"type": "message_stop"})


class _Dropped(Exception):
    """A drop_midstream fault reached its point: cut the connection."""


def _disconnect_guard(receive: Receive, admission: Admission | None) -> AbstractAsyncContextManager[None]:
    """Watch for the client going away, unless the request will be over before that could matter.

    The watch costs a task per request, which halves the throughput of a simulator set to near-zero
    latencies; a request admitted at once that holds its slot for under 2 ms goes without.
    """
    if admission is not None and admission.ttft_s + admission.decode_s < _UNWATCHED_S:
        return contextlib.nullcontext()
    return cancel_on_disconnect(receive)


def create_sim_app(config: SimConfig) -> SimApp:
    return SimApp(config)


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


class SimApp:
    """An ASGI app simulating one vLLM server. All state lives here, created with the app."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.engine = Engine(config)
        self.stats = Stats()
        self.faults = Faults()
        self._ids = itertools.count(1)
        self._id_salt = secrets.token_hex(4)
        self._created = int(time.time())
        self._routes: dict[tuple[str, str], Handler] = {
            ("POST", "/v1/chat/completions"): self._chat,
            ("POST", "/v1/completions"): self._completions,
            ("POST", "/v1/responses"): self._responses,
            ("POST", "/v1/embeddings"): self._embeddings,
            ("POST", _MESSAGES): self._messages,
            ("GET", "/v1/models"): self._models,
            ("GET", "/health"): self._health,
            ("GET", "/metrics"): self._metrics,
            ("GET", "/sim/stats"): self._sim_stats,
            ("POST", "/sim/reset"): self._sim_reset,
            ("GET", "/sim/faults"): self._sim_faults,
            ("POST", "/sim/faults"): self._sim_faults,
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        # Nothing to open or close: all state is in memory. Answering lets servers run the protocol.
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        handler = self._routes.get((method, path))
        if handler is None:
            if method == "GET" and path.startswith("/v1/models/"):
                handler = self._model
            else:
                known = any(p == path for _, p in self._routes)
                status = 405 if known else 404
                await send_body(send, status, orjson.dumps(error_body(status, f"{method} {path} is not served")))
                return
        counted = path.startswith("/v1/")
        stats = self.stats
        if counted:
            stats.received(path)
            stats.active += 1
        try:
            # Bodiless probes take their faults here; generation endpoints first record the body.
            if method == "GET" and not path.startswith("/sim/"):
                fault = self._take_fault(path)
                if fault is not None:
                    await self._inject(fault, receive, send)
                    return
            await handler(scope, receive, send)
        except SimError as exc:
            if counted:
                stats.failed += 1
            body = anthropic.error_body(exc.status, exc.message) if path == _MESSAGES else exc.body()
            await send_body(send, exc.status, orjson.dumps(body))
        except ClientGone:
            if counted:
                stats.cancelled += 1
        finally:
            if counted:
                stats.active -= 1

    # -- generation -------------------------------------------------------------------------------------

    async def _chat(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._generate(receive, send, scope["path"], parse_chat)

    async def _completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._generate(receive, send, scope["path"], parse_completion)

    async def _responses(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._generate(receive, send, scope["path"], parse_responses)

    async def _generate(
        self, receive: Receive, send: Send, path: str, parse: Callable[[dict[str, Any], SimConfig], Job]
    ) -> None:
        body = await self._read_json(receive)
        fault = self._take_fault(path)
        if fault is not None and fault.mode != "drop_midstream":
            await self._inject(fault, receive, send)
            return
        job = parse(body, self.config)
        if job.stream and job.kind == "responses":
            await self._responses_stream(job, body, receive, send, fault)
            return
        if job.stream:
            await self._stream(job, receive, send, fault)
            return
        admission = self.engine.try_admit(job)
        async with _disconnect_guard(receive, admission):
            usage = await self.engine.complete(job, admission)
        rid = self._new_id(job.kind)
        now = int(time.time())
        result: dict[str, Any]
        if job.kind == "chat":
            result = shapes.chat_completion(rid, now, job.model, usage, job.finish_reason, job.choices)
        elif job.kind == "completion":
            result = shapes.completion(rid, now, job.model, usage, job.finish_reason, job.choices)
        else:
            result = shapes.finished_response(rid, now, job.model, usage, body, job.finish_reason)
        await self._send_result(result, receive, send, fault)

    async def _stream(self, job: Job, receive: Receive, send: Send, fault: Fault | None) -> None:
        rid = self._new_id(job.kind)
        created = int(time.time())
        model = job.model
        last = job.max_tokens - 1
        with_usage = job.include_usage
        drop_after = None if fault is None else fault.after_tokens
        chat = job.kind == "chat"
        stamp = self.config.stamp_chunks
        choices = range(job.choices)

        async def on_token(i: int) -> None:
            if drop_after is not None and i >= drop_after:
                raise _Dropped
            finish = job.finish_reason if i == last else None
            text = shapes.token_text(i)
            data = b""
            if chat and i == 0:
                # As vLLM does: each choice's role arrives before the first token, in a chunk of its own.
                role = {"role": "assistant", "content": ""}
                starts = (shapes.chat_chunk(rid, created, model, role, None, with_usage, c) for c in choices)
                data = b"".join(_sse(chunk) for chunk in starts)
            for c in choices:
                if chat:
                    chunk = shapes.chat_chunk(rid, created, model, {"content": text}, finish, with_usage, c)
                else:
                    chunk = shapes.completion_chunk(rid, created, model, text, finish, with_usage, c)
                if stamp:
                    chunk["x_sim_sent_ns"] = time.monotonic_ns()
                data += _sse(chunk)
            await send({"type": "http.response.body", "body": data, "more_body": True})

        # Headers go first, as vLLM sends them before the request is even scheduled; and nothing may
        # suspend between taking a slot and the engine's `finally` that gives it back.
        await send(_SSE_START)
        admission = self.engine.try_admit(job)
        try:
            async with _disconnect_guard(receive, admission):
                usage = await self.engine.stream(job, on_token, admission)
                if drop_after is not None:
                    raise _Dropped
                tail = _DONE
                if with_usage:
                    obj = "chat.completion.chunk" if chat else "text_completion"
                    tail = _sse(shapes.usage_chunk(rid, created, model, obj, usage)) + _DONE
                await send({"type": "http.response.body", "body": tail, "more_body": False})
        except _Dropped:
            self.stats.dropped += 1
            await close_connection(receive)
            return
        self.stats.completed += 1

    async def _responses_stream(
        self, job: Job, body: dict[str, Any], receive: Receive, send: Send, fault: Fault | None
    ) -> None:
        """vLLM's event sequence for a streamed response: response.created and response.in_progress at once;
        with the first token, response.output_item.added and response.content_part.added; one
        response.output_text.delta per token; then response.output_text.done, response.content_part.done,
        response.output_item.done, and response.completed, whose response carries the usage. Each event is
        an `event: <type>` line and a `data: <json>` line, numbered by `sequence_number`; no [DONE]."""
        rid = self._new_id(job.kind)
        created = int(time.time())
        item_id = shapes.message_id(rid)
        drop_after = None if fault is None else fault.after_tokens
        stamp = self.config.stamp_chunks
        numbers = itertools.count()

        def event(kind: str, fields: dict[str, Any]) -> bytes:
            # The SDK's field order: the event's own fields, then sequence_number and type.
            data = {**fields, "sequence_number": next(numbers), "type": kind}
            return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"

        def response(status: str) -> dict[str, Any]:
            return shapes.response(rid, created, job.model, body, status=status, output=[], usage=None)

        async def on_token(i: int) -> None:
            if drop_after is not None and i >= drop_after:
                raise _Dropped
            delta: dict[str, Any] = {
                "content_index": 0,
                "delta": shapes.token_text(i),
                "item_id": item_id,
                "logprobs": [],
                "output_index": 0,
            }
            if stamp:
                delta["x_sim_sent_ns"] = time.monotonic_ns()
            data = b""
            if i == 0:
                item = shapes.response_message(item_id, None, "in_progress")
                part = shapes.output_text_part("")
                data = event("response.output_item.added", {"item": item, "output_index": 0}) + event(
                    "response.content_part.added",
                    {"content_index": 0, "item_id": item_id, "output_index": 0, "part": part},
                )
            data += event("response.output_text.delta", delta)
            await send({"type": "http.response.body", "body": data, "more_body": True})

        await send(_SSE_START)
        start = event("response.created", {"response": response("in_progress")})
        start += event("response.in_progress", {"response": response("in_progress")})
        await send({"type": "http.response.body", "body": start, "more_body": True})
        admission = self.engine.try_admit(job)
        try:
            async with _disconnect_guard(receive, admission):
                usage = await self.engine.stream(job, on_token, admission)
                if drop_after is not None:
                    raise _Dropped
                text = shapes.output_text(usage.completion_tokens)
                at = {"content_index": 0, "item_id": item_id, "output_index": 0}
                tail = (
                    event("response.output_text.done", {**at, "logprobs": [], "text": text})
                    + event("response.content_part.done", {**at, "part": shapes.output_text_part(text)})
                    + event(
                        "response.output_item.done",
                        {"item": shapes.response_message(item_id, text, "completed"), "output_index": 0},
                    )
                    + event(
                        "response.completed",
                        {"response": shapes.finished_response(rid, created, job.model, usage, body, job.finish_reason)},
                    )
                )
                await send({"type": "http.response.body", "body": tail, "more_body": False})
        except _Dropped:
            self.stats.dropped += 1
            await close_connection(receive)
            return
        self.stats.completed += 1

    # -- Anthropic Messages ----------------------------------------------------------------------------

    async def _messages(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await self._read_json(receive)
        fault = self._take_fault(_MESSAGES)
        if fault is not None and fault.mode != "drop_midstream":
            await self._inject(fault, receive, send)
            return
        anthropic.check_headers(dict(scope["headers"]), self.config.api_key)
        job = anthropic.parse_messages(body, self.config)
        rid = self._new_id("messages")
        if job.stream:
            await self._messages_stream(job, rid, receive, send, fault)
            return
        admission = self.engine.try_admit(job)
        async with _disconnect_guard(receive, admission):
            usage = await self.engine.complete(job, admission)
        text = shapes.output_text(usage.completion_tokens)
        await self._send_result(anthropic.message(rid, job.model, text, usage, job.finish_reason), receive, send, fault)

    async def _messages_stream(self, job: Job, rid: str, receive: Receive, send: Send, fault: Fault | None) -> None:
        """Anthropic's event sequence: message_start, content_block_start, ping, one content_block_delta per
        token, content_block_stop, message_delta (stop reason, output usage), message_stop."""
        drop_after = None if fault is None else fault.after_tokens
        admission = self.engine.try_admit(job)

        async def on_token(i: int) -> None:
            if drop_after is not None and i >= drop_after:
                raise _Dropped
            text = {"type": "text_delta", "text": shapes.token_text(i)}
            data = anthropic.event({"type": "content_block_delta", "index": 0, "delta": text})
            if i == 0:
                assert admission is not None
                start = anthropic.event(anthropic.message_start(rid, job.model, admission.usage))
                data = start + _BLOCK_START + _PING + data
            await send({"type": "http.response.body", "body": data, "more_body": True})

        await send(_SSE_START)
        try:
            async with _disconnect_guard(receive, admission):
                if admission is None:
                    # Admitted here (not inside the engine) so the first event can report the cached tokens;
                    # nothing suspends between taking the slot and the engine's `finally` that frees it.
                    admission = await self.engine.admit(job)
                usage = await self.engine.stream(job, on_token, admission)
                if drop_after is not None:
                    raise _Dropped
                end = {
                    "type": "message_delta",
                    "delta": {"stop_reason": job.finish_reason, "stop_sequence": None},
                    "usage": {"output_tokens": usage.completion_tokens},
                }
                tail = _BLOCK_STOP + anthropic.event(end) + _MESSAGE_STOP
                await send({"type": "http.response.body", "body": tail, "more_body": False})
        except _Dropped:
            self.stats.dropped += 1
            await close_connection(receive)
            return
        self.stats.completed += 1

    # -- embeddings -------------------------------------------------------------------------------------

    async def _embeddings(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await self._read_json(receive)
        fault = self._take_fault(scope["path"])
        if fault is not None and fault.mode != "drop_midstream":
            await self._inject(fault, receive, send)
            return
        job = parse_embeddings(body, self.config)
        dim = self.config.embedding_dim
        vectors = [shapes.embedding_vector(text, dim) for text in job.inputs]
        rid = f"embd-{self._id_salt}{next(self._ids):x}"
        result = shapes.embeddings(
            rid, int(time.time()), job.model, vectors, job.encoding_format, sum(job.token_counts)
        )
        await self._send_result(result, receive, send, fault)

    # -- models and probes ------------------------------------------------------------------------------

    async def _models(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.stats.completed += 1
        cards = [shapes.model_card(m, self._created, self.config.max_model_len) for m in self.config.models]
        await send_body(send, 200, orjson.dumps({"object": "list", "data": cards}))

    async def _model(self, scope: Scope, receive: Receive, send: Send) -> None:
        model = scope["path"].removeprefix("/v1/models/")
        if model not in self.config.models:
            raise SimError(404, f"The model `{model}` does not exist.", "model")
        self.stats.completed += 1
        card = shapes.model_card(model, self._created, self.config.max_model_len)
        await send_body(send, 200, orjson.dumps(card))

    async def _health(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_body(send, 200, b"", b"text/plain")

    async def _metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_body(send, 200, render_metrics(self.engine, self.config.models[0]), CONTENT_TYPE)

    # -- test control -----------------------------------------------------------------------------------

    async def _sim_stats(self, scope: Scope, receive: Receive, send: Send) -> None:
        snapshot = self.stats.snapshot()
        engine = self.engine
        snapshot.update(
            running=engine.slots.running,
            waiting=engine.slots.waiting,
            cache_blocks=len(engine.cache),
            prefix_cache_queries=engine.cache.queries,
            prefix_cache_hits=engine.cache.hits,
            faults=self.faults.describe(),
        )
        await send_body(send, 200, orjson.dumps(snapshot))

    async def _sim_reset(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.engine.cache.clear()
        self.stats.reset()
        self.faults.clear()
        await send_body(send, 200, b'{"status":"reset"}')

    async def _sim_faults(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] == "POST":
            try:
                self.faults.configure(orjson.loads(await read_body(receive, self.config.max_body_bytes)))
            except orjson.JSONDecodeError as exc:
                await send_body(send, 400, orjson.dumps(error_body(400, f"invalid JSON: {exc}")))
                return
            except SimError as exc:
                await send_body(send, exc.status, orjson.dumps(exc.body()))
                return
        await send_body(send, 200, orjson.dumps(self.faults.describe()))

    # -- helpers ----------------------------------------------------------------------------------------

    async def _read_json(self, receive: Receive) -> dict[str, Any]:
        raw = await read_body(receive, self.config.max_body_bytes)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise SimError(400, f"Invalid JSON body: {exc}") from None
        if not isinstance(body, dict):
            raise SimError(400, "The request body must be a JSON object.")
        self.stats.body(body)
        return body

    def _take_fault(self, path: str) -> Fault | None:
        fault = self.faults.take(path)
        if fault is not None:
            self.stats.faulted += 1
        return fault

    async def _inject(self, fault: Fault, receive: Receive, send: Send) -> None:
        """Apply a fault that replaces the whole response (drop_midstream here means: close at once)."""
        if fault.mode.startswith("error_"):
            raise SimError(int(fault.mode.removeprefix("error_")), f"simulated fault: {fault.mode}")
        if fault.mode == "hang":
            await wait_disconnect(receive)
            raise ClientGone
        self.stats.dropped += 1
        await close_connection(receive)

    async def _send_result(self, result: dict[str, Any], receive: Receive, send: Send, fault: Fault | None) -> None:
        body = orjson.dumps(result)
        if fault is None:
            await send_body(send, 200, body)
            self.stats.completed += 1
            return
        # drop_midstream on a non-streaming response: a declared length, half the bytes, then nothing.
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))],
            }
        )
        await send({"type": "http.response.body", "body": body[: len(body) // 2], "more_body": True})
        self.stats.dropped += 1
        await close_connection(receive)

    def _new_id(self, kind: str) -> str:
        return f"{_ID_PREFIX[kind]}{self._id_salt}{next(self._ids):x}"
