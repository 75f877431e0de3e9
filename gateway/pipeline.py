"""The inference request path, top to bottom in one place.

    authenticate -> parse -> authorise model -> place (admission) -> rewrite -> forward -> close

Each stage returns a plain value (a principal, a parsed request, a placement) or raises a `GatewayError`;
the stages do not call each other. Nothing here knows about ASGI routing.

One exit. However a request ends (an answer, a refusal, a backend error, a fallback, a downgrade, the
client leaving, the gateway shutting down, Redis down or frozen), `_close` runs once, in a `finally`,
from one `Record` of what happened: it counts the request in the metrics, bills it (if it reached a
backend) and settles what admission reserved, all from the same figures. The figures are the backend's
own usage when it reported one; when it did not (a stream cut short, a client that left), the prompt is
charged from the gateway's own count and the output from the tokens relayed, so leaving early is never
free.

Fallbacks: when the backend fails before the first byte of an answer reaches the client (no connection, a
timeout, a dropped connection, a 5xx or 429 answer), admission moves the request to the next backend that
may serve it (`Admission.move`); the request keeps its one admission, and the record keeps where it
started and why it moved.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.admission import Admission, Placement
from gateway.asgi import ClientDisconnected, Receive, Scope, Send, read_body, send_response
from gateway.auth import Authenticator, authorization_header
from gateway.billing import Billing
from gateway.billing.ledger import UsageLedger
from gateway.config import LimitsConfig, ModelConfig
from gateway.errors import GatewayError, NotFoundError, ServiceUnavailableError, UpstreamError
from gateway.ids import unique_id
from gateway.requests import ParsedRequest, parse_request
from gateway.telemetry.metrics import Metrics
from gateway.telemetry.tracing import Tracing
from gateway.tenancy import Principal
from gateway.upstream import (
    UPSTREAM_FAILED,
    DirectWriter,
    Relay,
    Usage,
    backend_headers,
    error_from_backend,
    usage_from,
)
from gateway.upstream.backends import Backend, BackendPool
from gateway.upstream.connections import Connections
from gateway.upstream.salt import SaltDeriver
from gateway.wire import httpclient

__all__ = ["InferenceHandler", "Record", "rewrite"]

log = logging.getLogger("gateway.pipeline")

_PATHS = {
    "chat": "/v1/chat/completions",
    "completions": "/v1/completions",
    "embeddings": "/v1/embeddings",
    "responses": "/v1/responses",
}
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
_FAILURE_REASONS = {"ConnectError": "connect_error", "ReadTimeout": "timeout", "ProtocolError": "protocol_error"}
# The status of a request whose client went away: nginx's convention, never sent to anyone.
CLIENT_GONE = 499


@dataclass(slots=True)
class Record:
    """Everything the one exit needs to know about a request, filled in as it goes."""

    request_id: str
    endpoint: str
    started: float
    # A unique id of the gateway's own for the usage event; the client's x-request-id is not one.
    event_id: str = ""
    tenant_label: str = "unauthenticated"
    model_label: str = "unknown"
    principal: Principal | None = None
    placement: Placement | None = None
    status: int = 500
    stream: bool = False
    # The backend's own usage, when it reported one.
    engine_usage: Usage | None = None
    # The backend took the request and worked on it (a stream began, or the request was sent and the
    # client or the gateway gave up waiting): its prompt was processed even if no usage came back.
    processed: bool = False
    relayed_tokens: int = 0
    partial: bool = False
    finish_reason: str | None = None
    ttft_s: float | None = None
    span: Any = None

    def figures(self) -> Usage:
        """The usage this request is metered, billed and charged with."""
        if self.engine_usage is not None:
            return self.engine_usage
        if not self.processed or self.placement is None:
            return Usage()
        return Usage(prompt_tokens=self.placement.prompt_estimate, completion_tokens=self.relayed_tokens)


class _Failover(Exception):
    """The backend failed before any byte reached the client; `error` is what the client gets if no other
    backend takes the request."""

    def __init__(self, reason: str, error: GatewayError) -> None:
        super().__init__(reason)
        self.reason = reason
        self.error = error


class InferenceHandler:
    """The request path for one configuration; `gateway.wiring` builds one at start-up and at every reload."""

    def __init__(
        self,
        *,
        limits: LimitsConfig,
        models: Mapping[str, ModelConfig],
        authenticator: Authenticator,
        admission: Admission,
        backends: BackendPool,
        connections: Mapping[str, Connections],
        backend_keys: Mapping[str, str],
        salts: SaltDeriver,
        billing: Billing,
        ledger: UsageLedger,
        metrics: Metrics,
        tracing: Tracing,
    ) -> None:
        self._limits = limits
        self._models = models
        self._auth = authenticator
        self._admission = admission
        self._backends = backends
        self._connections = connections
        self._backend_keys = backend_keys
        self._salts = salts
        self._billing = billing
        self._ledger = ledger
        self._metrics = metrics
        self._tracing = tracing

    async def handle(self, scope: Scope, receive: Receive, send: Send, endpoint: str, request_id: str) -> None:
        record = Record(request_id, endpoint, time.perf_counter())
        with self._tracing.server_span(endpoint, request_id) as span:
            record.span = span
            try:
                await self._handle(scope, receive, send, record)
            except GatewayError as exc:
                record.status = exc.status
                if record.placement is not None:
                    # Every answer says what moved it, errors included.
                    exc.headers.update((k.decode(), v.decode()) for k, v in record.placement.headers())
                raise
            except ClientDisconnected:
                record.status = CLIENT_GONE
                raise
            except asyncio.CancelledError:
                # Shutdown past its grace period (or the server giving up on the connection).
                record.status = 503
                raise
            finally:
                await self._close(record)

    async def _handle(self, scope: Scope, receive: Receive, send: Send, record: Record) -> None:
        # One allowance for waiting on shared state, the key lookup and admission together: when the lookup
        # already waited out the store's timeout (a frozen or unreachable Redis), admission goes straight to
        # its failure mode instead of waiting the timeout again.
        loop = asyncio.get_running_loop()
        asked = loop.time()
        principal = await self._auth.authenticate(authorization_header(scope["headers"]))
        deadline = loop.time() if self._auth.store_failed_at >= asked else None
        record.principal = principal
        record.tenant_label = self._metrics.tenant_label(principal.tenant_id, principal.tenant.weight)
        raw = await read_body(scope, receive, self._limits.max_body_bytes)
        request = parse_request(record.endpoint, raw, self._limits.max_tokens_cap)
        record.stream = request.stream
        model = self._authorise(principal, request.model, record)
        if record.span is not None:
            Tracing.identify(record.span, record.endpoint, model.name, principal.tenant_id)
        cache_scope = principal.cache_scope()
        placement = await self._admission.place(
            principal,
            request,
            model,
            receive=receive,
            # Prefix affinity works within the request's cache scope (named by its salt), never across.
            scope_salt="" if cache_scope is None else self._salts.derive(cache_scope),
            deadline=deadline,
        )
        record.placement = placement
        record.model_label = placement.model.name
        record.event_id = "evt_" + unique_id()
        self._metrics.adder(self._metrics.inflight, record.tenant_label)(1)
        try:
            direct: DirectWriter | None = scope.get("gateway.exchange")
            while True:
                try:
                    if request.stream:
                        await self._stream(receive, send, request, placement, record, direct)
                    else:
                        await self._unary(send, request, placement, record, direct)
                    return
                except _Failover as failover:
                    if not await self._admission.move(placement, failover.reason, receive=receive):
                        raise failover.error from None
        finally:
            self._metrics.adder(self._metrics.inflight, record.tenant_label)(-1)

    def _authorise(self, principal: Principal, name: str, record: Record) -> ModelConfig:
        model = self._models.get(name)
        if model is not None:
            record.model_label = model.name
        if model is None or not principal.may_use(name):
            # One answer for a model that does not exist and one the caller may not use: no tenant learns
            # by name which models others may use.
            raise NotFoundError(
                f"The model '{name[:200]}' does not exist or you do not have access to it.", param="model"
            )
        return model

    # --- forwarding -----------------------------------------------------------------------------------

    def _payload(self, request: ParsedRequest, placement: Placement) -> bytes:
        backend = placement.backend
        salted = backend.config.kind == "vllm"
        return rewrite(
            request,
            placement.principal,
            placement.model.upstream_name,
            salts=self._salts if salted else None,
            scope=placement.principal.cache_scope(),
            inject=placement.inject,
        )

    def _failed_to_answer(self, placement: Placement, exc: httpclient.UpstreamError) -> _Failover:
        backend = placement.backend
        self._metrics.upstream_errors.labels(backend.name, type(exc).__name__).inc()
        self._backends.failed(backend, placement.endpoint)
        reason = _FAILURE_REASONS.get(type(exc).__name__, "connect_error")
        return _Failover(reason, UpstreamError(UPSTREAM_FAILED))

    def _error_answer(self, backend: Backend, status: int, data: bytes) -> GatewayError:
        """A backend's error answer: a 5xx or 429 may move the request to another backend."""
        if status >= 500:
            self._metrics.upstream_errors.labels(backend.name, f"http_{status}").inc()
        error = error_from_backend(status, data)
        if status >= 500 or status == 429:
            raise _Failover(f"http_{status}", error)
        return error

    async def _unary(
        self,
        send: Send,
        request: ParsedRequest,
        placement: Placement,
        record: Record,
        direct: DirectWriter | None,
    ) -> None:
        backend, model = placement.backend, placement.model
        headers = backend_headers(backend, record.request_id, self._backend_keys.get(backend.name))
        payload = self._payload(request, placement)
        pool = self._connections[backend.name].to(placement.endpoint.id)
        # From here the backend may be working on it: a client or a gateway that stops waiting still pays for
        # the prompt.
        record.processed = True
        gone = None
        if direct is not None:
            # Under the gateway's own server a client that leaves cancels this task at once (which closes the
            # backend connection, which stops the generation), and its permit comes back: no task for it.
            gone = _Canceller(asyncio.current_task())
            direct.on_gone(gone)
        try:
            with self._tracing.client_span(request.endpoint, model.upstream_name, backend.name, backend.config.kind):
                async with await pool.request("POST", _PATHS[request.endpoint], payload, headers) as resp:
                    status, data = resp.status, await resp.read()
        except httpclient.UpstreamError as exc:
            record.processed = False
            raise self._failed_to_answer(placement, exc) from None
        except asyncio.CancelledError:
            if gone is not None and gone.fired and gone.task.uncancel() == 0:
                record.status, record.partial = CLIENT_GONE, True
                return  # our own cancellation, not the server's
            raise
        finally:
            if direct is not None:
                direct.on_gone(None)
        self._backends.succeeded(backend, placement.endpoint)
        self._metrics.observer(self._metrics.upstream_latency, backend.name)(time.perf_counter() - record.started)
        if status >= 400:
            record.processed = False
            raise self._error_answer(backend, status, data)
        swap_from, swap_to = _model_swap(model)
        responses = request.endpoint == "responses"
        if swap_from is not None and swap_to is not None and not responses:
            # OpenAI's chat and completions objects put `model` before anything the client wrote.
            data = data.replace(swap_from, swap_to, 1)
        with contextlib.suppress(orjson.JSONDecodeError):
            parsed = orjson.loads(data)
            record.engine_usage = usage_from(parsed)
            record.finish_reason = _finish_reason(parsed)
            if responses and swap_from is not None and isinstance(parsed, dict):
                # A response object carries the client's `metadata` before its `model`: swap the field itself.
                parsed["model"] = model.name
                data = orjson.dumps(parsed)
        record.status = status
        await send_response(send, status, data, [(b"x-request-id", record.request_id.encode()), *placement.headers()])

    async def _stream(
        self,
        receive: Receive,
        send: Send,
        request: ParsedRequest,
        placement: Placement,
        record: Record,
        direct: DirectWriter | None,
    ) -> None:
        backend, model = placement.backend, placement.model
        headers = backend_headers(backend, record.request_id, self._backend_keys.get(backend.name))
        payload = self._payload(request, placement)
        swap_from, swap_to = _model_swap(model)
        relay = Relay(
            send,
            endpoint=request.endpoint,
            client_wants_usage=request.client_wants_usage,
            model_from=swap_from,
            model_to=swap_to,
        )
        response_headers = [*_SSE_HEADERS, (b"x-request-id", record.request_id.encode()), *placement.headers()]
        started = record.started

        async def forward() -> None:
            with self._tracing.client_span(request.endpoint, model.upstream_name, backend.name, backend.config.kind):
                pool = self._connections[backend.name].to(placement.endpoint.id)
                try:
                    resp = await pool.request("POST", _PATHS[request.endpoint], payload, headers)
                except httpclient.UpstreamError as exc:
                    raise self._failed_to_answer(placement, exc) from None
                self._backends.succeeded(backend, placement.endpoint)
                async with resp:
                    self._metrics.observer(self._metrics.upstream_latency, backend.name)(time.perf_counter() - started)
                    if resp.status != 200:
                        raise self._error_answer(backend, resp.status, await resp.read())
                    await send({"type": "http.response.start", "status": 200, "headers": response_headers})
                    record.processed = True
                    if direct is not None:
                        await relay.run_direct(resp, direct, started)
                    else:
                        await relay.run(resp, started)

        try:
            if direct is not None:
                client_gone, exc = await _watched_by_server(forward(), direct)
            else:
                client_gone, exc = await _watched_by_task(forward(), receive)
        except asyncio.CancelledError:
            # The server is shutting down past its grace period: end the stream with an error event rather
            # than a silent cut, and bill what was generated.
            if record.processed:
                error = ServiceUnavailableError("The gateway is shutting down; the answer is incomplete.")
                with contextlib.suppress(Exception):
                    await send({"type": "http.response.body", "body": relay.error_event(error)})
            self._stream_figures(record, relay, 503, partial=True)
            raise
        if client_gone:
            # The client went away: the upstream call was cancelled, which closed its connection, which
            # stops the generation.
            self._stream_figures(record, relay, CLIENT_GONE, partial=True)
            return
        if exc is not None:
            raise exc
        failed = relay.outcome.failed
        self._stream_figures(record, relay, 502 if failed else 200, partial=failed)

    @staticmethod
    def _stream_figures(record: Record, relay: Relay, status: int, *, partial: bool) -> None:
        out = relay.outcome
        record.status, record.partial = status, partial
        record.relayed_tokens = out.content_chunks
        record.finish_reason, record.ttft_s = out.finish_reason, out.first_chunk_at
        if out.usage_seen:
            record.engine_usage = out.usage

    # --- the one exit ---------------------------------------------------------------------------------

    async def _close(self, record: Record) -> None:
        """Count, bill and settle the request, from one set of figures; runs once, whatever happened."""
        m = self._metrics
        placement = record.placement
        if placement is None:
            m.child(m.requests, record.tenant_label, record.model_label, str(record.status)).inc()
            if record.span is not None:
                Tracing.finish(record.span, record.status, None)
            return
        usage = record.figures()
        model = placement.model.name
        backend = placement.backend.name
        cost, currency = self._billing.cost(model, usage.prompt_tokens, usage.completion_tokens, backend)
        tenant = record.tenant_label
        duration = time.perf_counter() - record.started
        m.adder(m.requests, tenant, model, str(record.status))(1)
        m.observer(m.duration, tenant, model)(duration)
        if record.ttft_s is not None:
            m.observer(m.ttft, tenant, model)(record.ttft_s)
        if usage.prompt_tokens:
            m.adder(m.tokens, tenant, model, "prompt")(usage.prompt_tokens)
        if usage.completion_tokens:
            m.adder(m.tokens, tenant, model, "completion")(usage.completion_tokens)
        if usage.cached_tokens:
            m.adder(m.tokens, tenant, model, "cached")(usage.cached_tokens)
        if cost:
            m.adder(m.spend, tenant, currency)(cost)
        engine = placement.endpoint.id.split("://", 1)[-1]  # host:port, as in the metrics' labels
        if record.processed or record.engine_usage is not None:
            m.adder(m.endpoint_requests, backend, engine)(1)
            if usage.prompt_tokens:
                m.adder(m.endpoint_tokens, backend, engine, "prompt")(usage.prompt_tokens)
            if usage.cached_tokens:
                m.adder(m.endpoint_tokens, backend, engine, "cached")(usage.cached_tokens)
        principal = placement.principal
        self._ledger.record(
            principal.tenant_id,
            principal.key.id,
            time.time(),
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.cached_tokens,
            cost,
            currency,
        )
        self._billing.emit(
            record.event_id,
            principal.tenant_id,
            {
                "request_id": record.request_id,
                "tenant": principal.tenant_id,
                "key_id": principal.key.id,
                "model": model,
                "backend": backend,
                "engine": engine,
                "endpoint": record.endpoint,
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens,
                "cached_tokens": usage.cached_tokens,
                "cost": cost,
                "currency": currency,
                "status": record.status,
                "finish_reason": record.finish_reason,
                "stream": record.stream,
                "partial": record.partial or (record.status != 200 and record.processed),
                "downgraded_from": placement.downgraded_from,
                "fallback_from": placement.fallback_from,
                "fallback_reason": placement.fallback_reason,
                "timings": {
                    "duration_ms": round(duration * 1000, 3),
                    "ttft_ms": None if record.ttft_s is None else round(record.ttft_s * 1000, 3),
                    "queue_ms": round(placement.queue_wait_s * 1000, 3),
                    "engine_queue_ms": round(placement.engine_wait_s * 1000, 3),
                },
            },
        )
        if record.span is not None:
            Tracing.finish(record.span, record.status, usage, record.finish_reason)
        await self._admission.settle(
            placement, prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens, cost=cost
        )

    # --- /v1/models -----------------------------------------------------------------------------------

    async def models(self, scope: Scope, send: Send, path: str, request_id: str) -> None:
        """`GET /v1/models` (only what the caller may use) and `GET /v1/models/{id}`."""
        principal = await self._auth.authenticate(authorization_header(scope["headers"]))
        rid = [(b"x-request-id", request_id.encode())]
        if path in ("/v1/models", "/v1/models/"):
            data = [_model_object(m) for m in self._models.values() if principal.may_use(m.name)]
            await send_response(send, 200, orjson.dumps({"object": "list", "data": data}), rid)
            return
        name = path[len("/v1/models/") :]
        if not path.startswith("/v1/models/") or name not in self._models or not principal.may_use(name):
            # A model the caller may not use looks unknown: no tenant learns what others may use.
            raise NotFoundError(
                f"The model '{name[:200]}' does not exist or you do not have access to it.", param="model"
            )
        await send_response(send, 200, orjson.dumps(_model_object(self._models[name])), rid)


def rewrite(
    request: ParsedRequest,
    principal: Principal,
    upstream_model: str,
    *,
    salts: SaltDeriver | None,
    scope: str | None,
    inject: dict[str, int] | None = None,
) -> bytes:
    """The body the backend gets: the upstream model name, our `cache_salt` (for a backend that enforces salts,
    `salts` given, and a tenant that is not in the global scope) in place of the client's, usage asked for on
    streams, `user` per the tenant's policy, the output limit admission reserved when the client set none
    (`inject`); every other field as the client sent it."""
    body = request.body
    body["model"] = upstream_model
    if inject:
        body.update(inject)
    # The client's own salt is never forwarded as is: it could name another tenant's scope.
    body.pop("cache_salt", None)
    if salts is not None and scope is not None:
        if request.client_salt is not None and principal.tenant.allow_client_salt:
            body["cache_salt"] = salts.derive_sub(scope, request.client_salt)
        else:
            body["cache_salt"] = salts.derive(scope)
    if request.stream and request.endpoint != "responses":
        options = body.get("stream_options") or {}
        body["stream_options"] = {**options, "include_usage": True}
    policy = principal.tenant.user_field
    if policy == "tenant":
        body["user"] = principal.tenant_id
    elif policy == "strip":
        body.pop("user", None)
    return orjson.dumps(body)


def _model_swap(model: ModelConfig) -> tuple[bytes | None, bytes | None]:
    if model.upstream_name == model.name:
        return None, None
    return b'"model":' + orjson.dumps(model.upstream_name), b'"model":' + orjson.dumps(model.name)


def _finish_reason(obj: object) -> str | None:
    """The first choice's finish reason; for a Responses API object, why it is incomplete, else its status."""
    if not isinstance(obj, dict):
        return None
    choices = obj.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        reason = choices[0].get("finish_reason")
        return reason if isinstance(reason, str) else None
    if obj.get("object") == "response":
        details = obj.get("incomplete_details")
        if isinstance(details, dict) and isinstance(details.get("reason"), str):
            return str(details["reason"])[:40]
        status = obj.get("status")
        return status[:40] if isinstance(status, str) else None
    return None


def _model_object(model: ModelConfig) -> dict[str, object]:
    return {"id": model.name, "object": "model", "created": 0, "owned_by": "gateway"}


class _Canceller:
    """Cancels `task` when the gateway's server calls it (its client went away); `fired` says it did."""

    __slots__ = ("fired", "task")

    def __init__(self, task: asyncio.Task[Any] | None) -> None:
        assert task is not None
        self.task = task
        self.fired = False

    def __call__(self) -> None:
        self.fired = True
        self.task.cancel()


async def _watched_by_task(work: Coroutine[Any, Any, None], receive: Receive) -> tuple[bool, BaseException | None]:
    """Run `work` while a second task watches for the client going away (any ASGI server).

    Returns (client gone, what `work` raised); cancels `work` if the client went away. A cancellation of
    the caller (shutdown) cancels both and propagates."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        watcher.cancel()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise
    if task not in done:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return True, None
    watcher.cancel()
    return False, task.exception()


async def _watched_by_server(
    work: Coroutine[Any, Any, None], direct: DirectWriter
) -> tuple[bool, BaseException | None]:
    """Run `work` in this task; the gateway's server calls back when the client goes away, which cancels it.

    The same contract as `_watched_by_task`, without a second task and `asyncio.wait` per stream."""
    gone = _Canceller(asyncio.current_task())
    direct.on_gone(gone)
    try:
        await work
    except asyncio.CancelledError as exc:
        if gone.fired and gone.task.uncancel() == 0:
            exc.__traceback__ = None  # its frames would otherwise wait for the garbage collector
            return True, None  # our own cancellation, not the server's
        raise
    except Exception as exc:
        return False, exc
    finally:
        direct.on_gone(None)
    return False, None


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
