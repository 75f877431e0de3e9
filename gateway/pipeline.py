"""The inference request path, top to bottom in one place.

    authenticate -> parse -> authorise model -> admit (quotas, backend, slot) -> rewrite -> forward -> record

Each stage returns a plain value (a principal, a parsed request, a route, usage) and raises a
`GatewayError` to stop; the stages do not call each other. Nothing here knows about ASGI routing.

Fallbacks: a model lists its backends in order. A request goes to the first that may serve it, or, when
that one is saturated and the tenant's `on_limit.queue` is `fallback`, to a later one with a free slot.
If the backend fails before the first byte of an answer reaches the client (no connection, a timeout, a
dropped connection, a 5xx or 429 answer), the request moves to the next backend in the list, each at most
once; the request keeps its one admission and moves its queue slot. A request that skips the first
backend because it is down, ejected or not isolating counts as a fallback too ("unavailable"). The client is told in
`x-gateway-fallback-from`, and the metric `gateway_fallbacks_total` and the billing event say why.
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

from gateway.admission import Admission, Admitted
from gateway.asgi import ClientDisconnected, Receive, Scope, Send, read_body, send_response
from gateway.auth import Authenticator, authorization_header
from gateway.billing import Billing
from gateway.billing.ledger import UsageLedger
from gateway.config import ModelConfig, Settings
from gateway.errors import (
    GatewayError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ServiceUnavailableError,
    UpstreamError,
)
from gateway.requests import ParsedRequest, parse_request
from gateway.telemetry.metrics import Metrics
from gateway.telemetry.tracing import Tracing
from gateway.tenancy import Principal
from gateway.upstream import (
    UPSTREAM_FAILED,
    DirectWriter,
    Relay,
    UpstreamPool,
    Usage,
    backend_headers,
    error_from_backend,
    usage_from,
)
from gateway.upstream.backends import Backend, BackendPool
from gateway.upstream.salt import SaltDeriver
from gateway.wire import httpclient

__all__ = ["InferenceHandler", "Outcome", "rewrite"]

log = logging.getLogger("gateway.pipeline")

_PATHS = {
    "chat": "/v1/chat/completions",
    "completions": "/v1/completions",
    "embeddings": "/v1/embeddings",
    "responses": "/v1/responses",
}
# Which `on_limit` entry of a tenant answers a refusal for each reason.
_POLICY_KEY = {"queue_full": "queue", "queue_timeout": "queue"}
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


@dataclass(slots=True)
class _Progress:
    """How far a request got, for counting the ones that end before a backend is called."""

    tenant: str = "unauthenticated"
    model: str = "unknown"
    dispatched: bool = False
    span: Any = None


@dataclass(slots=True)
class Outcome:
    """What happened to one request that reached a backend: the input of metering and billing."""

    request_id: str
    principal: Principal
    model: str
    backend: str
    endpoint: str
    stream: bool
    status: int
    usage: Usage
    partial: bool
    finish_reason: str | None
    duration_s: float
    ttft_s: float | None
    downgraded_from: str | None = None
    # Priced from the usage when recorded.
    cost: float = 0.0
    fallback_from: str | None = None
    fallback_reason: str | None = None


@dataclass(slots=True)
class _Route:
    """Where an admitted request goes: its backend, the ones it may fall back to, and why it moved."""

    backend: Backend
    rest: list[Backend]
    fallback_from: str | None = None
    reason: str | None = None


class _Failover(Exception):
    """A backend failed before any byte reached the client, and another backend may take the request."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


_FAILURE_REASONS = {"ConnectError": "connect_error", "ReadTimeout": "timeout", "ProtocolError": "protocol_error"}


@dataclass(slots=True, frozen=True)
class _Call:
    """One dispatched request: what the forwarding stage needs, and how to describe its outcome."""

    request_id: str
    principal: Principal
    model: ModelConfig
    backend: Backend
    request: ParsedRequest
    payload: bytes
    started: float
    response_headers: list[tuple[bytes, bytes]]
    # Another backend may take the request if this one fails before answering.
    can_fail_over: bool = False

    def outcome(
        self,
        *,
        stream: bool,
        status: int,
        usage: Usage,
        partial: bool,
        finish_reason: str | None = None,
        ttft_s: float | None = None,
    ) -> Outcome:
        return Outcome(
            request_id=self.request_id,
            principal=self.principal,
            model=self.model.name,
            backend=self.backend.name,
            endpoint=self.request.endpoint,
            stream=stream,
            status=status,
            usage=usage,
            partial=partial,
            finish_reason=finish_reason,
            duration_s=time.perf_counter() - self.started,
            ttft_s=ttft_s,
        )


class InferenceHandler:
    def __init__(
        self,
        settings: Settings,
        authenticator: Authenticator,
        backends: BackendPool,
        pools: Mapping[str, UpstreamPool],
        salts: SaltDeriver,
        metrics: Metrics,
        backend_keys: Mapping[str, str],
        billing: Billing,
        admission: Admission,
        tracing: Tracing,
        ledger: UsageLedger,
    ) -> None:
        self._tracing = tracing
        self._ledger = ledger
        self._billing = billing
        self._admission = admission
        self._limits = settings.limits
        self._models: dict[str, ModelConfig] = {m.name: m for m in settings.models}
        self._auth = authenticator
        self._backends = backends
        self._pools = pools
        self._salts = salts
        self._metrics = metrics
        self._backend_keys = backend_keys

    async def handle(self, scope: Scope, receive: Receive, send: Send, endpoint: str, request_id: str) -> None:
        progress = _Progress()
        with self._tracing.server_span(endpoint, request_id) as span:
            progress.span = span
            try:
                await self._handle(scope, receive, send, endpoint, request_id, progress)
            except GatewayError as exc:
                if not progress.dispatched:
                    # Answers that never reached a backend (401, 4xx, 429, the gateway's own 503s) count too;
                    # the others were counted with their outcome.
                    m = self._metrics
                    m.child(m.requests, progress.tenant, progress.model, str(exc.status)).inc()
                if span is not None:
                    Tracing.finish(span, exc.status, None)
                raise

    async def _handle(
        self, scope: Scope, receive: Receive, send: Send, endpoint: str, request_id: str, progress: _Progress
    ) -> None:
        started = time.perf_counter()
        principal = await self._auth.authenticate(authorization_header(scope["headers"]))
        tenant_label = progress.tenant = self._metrics.tenant_label(principal.tenant_id, principal.tenant.weight)
        raw = await read_body(scope, receive, self._limits.max_body_bytes)
        request = parse_request(endpoint, raw, self._limits.max_tokens_cap)
        model = self._authorise(principal, request.model)
        progress.model = model.name
        if progress.span is not None:
            Tracing.identify(progress.span, endpoint, model.name, principal.tenant_id)
        cache_scope = principal.cache_scope()
        prompt_estimate, output_estimate = self._admission.estimate(endpoint, request.body, request.max_tokens)
        downgraded_from: str | None = None
        while True:
            try:
                admitted, route = await self._admit(
                    principal, model, prompt_estimate, output_estimate, cache_scope, tenant_label, receive
                )
                break
            except RateLimitError as exc:
                target = None if downgraded_from else self._downgrade_target(principal, exc.reason)
                if target is None:
                    raise
                log.info("downgrading %s request from %s to %s (%s)", tenant_label, model.name, target.name, exc.reason)
                downgraded_from, model = model.name, target
        headers = [(b"x-request-id", request_id.encode()), *admitted.headers]
        if downgraded_from is not None:
            headers.append((b"x-gateway-downgraded-from", downgraded_from.encode()))
        outcome: Outcome | None = None
        progress.dispatched = True
        backend = route.backend
        self._metrics.child(self._metrics.inflight, tenant_label).inc()
        try:
            direct = scope.get("gateway.exchange")
            while True:
                sent = headers
                if route.fallback_from is not None:
                    sent = [*headers, (b"x-gateway-fallback-from", route.fallback_from.encode())]
                payload = self._rewrite(request, principal, model, backend, cache_scope)
                call = _Call(request_id, principal, model, backend, request, payload, started, sent, bool(route.rest))
                try:
                    if request.stream:
                        outcome = await self._stream(receive, send, call, direct)
                    else:
                        outcome = await self._unary(send, call)
                    break
                except _Failover as failover:
                    backend = await self._fail_over(call, admitted, route, failover.reason, receive)
            outcome.downgraded_from = downgraded_from
            outcome.fallback_from, outcome.fallback_reason = route.fallback_from, route.reason
            self._record(outcome)
            if progress.span is not None:
                Tracing.finish(progress.span, outcome.status, outcome.usage, outcome.finish_reason)
        finally:
            self._metrics.child(self._metrics.inflight, tenant_label).dec()
            if outcome is None:
                await self._admission.finish(admitted, 0, 0, 0.0)
            else:
                usage = outcome.usage
                await self._admission.finish(admitted, usage.prompt_tokens, usage.completion_tokens, outcome.cost)

    async def _admit(
        self,
        principal: Principal,
        model: ModelConfig,
        prompt_estimate: int,
        output_estimate: int,
        cache_scope: str | None,
        tenant_label: str,
        receive: Receive,
    ) -> tuple[Admitted, _Route]:
        """Quotas, then a backend, then a slot of its capacity; everything taken is given back on failure."""
        # The most expensive of the model's backends: a budget is never overrun by a fallback.
        worst, _ = self._billing.cost(model.name, prompt_estimate, output_estimate)
        admitted = await self._admission.admit(principal, model, prompt_estimate, output_estimate, worst)
        try:
            candidates = self._backends.candidates(model, cache_scope is not None, tenant_label)
            backend = candidates[0]
            spill = None
            if not self._admission.has_free_slot(backend.name) and principal.tenant.on_limit.get("queue") == "fallback":
                spill = next((b for b in candidates[1:] if self._admission.has_free_slot(b.name)), None)
            await self._take_slot(admitted, principal, spill or backend, model, receive)
        except BaseException:
            await self._admission.finish(admitted, 0, 0, 0.0)
            raise
        if spill is None:
            route = _Route(backend, candidates[1:])
            first = model.backends[0]
            if backend.name != first:
                # The first backend is down, ejected or not isolating: still a fallback, and the bill says so.
                route.fallback_from, route.reason = first, "unavailable"
                self._metrics.fallbacks.labels(model.name, first, backend.name, "unavailable").inc()
            return admitted, route
        self._metrics.fallbacks.labels(model.name, backend.name, spill.name, "saturated").inc()
        return admitted, _Route(spill, [b for b in candidates if b is not spill], backend.name, "saturated")

    async def _take_slot(
        self, admitted: Admitted, principal: Principal, backend: Backend, model: ModelConfig, receive: Receive
    ) -> None:
        """A slot of the backend's capacity: at once if free, else in the fair queue, left if the client goes."""
        if self._admission.has_free_slot(backend.name):
            await self._admission.queue(admitted, principal, backend.name, model.name)
            return
        waiting = asyncio.ensure_future(self._admission.queue(admitted, principal, backend.name, model.name))
        watcher = asyncio.ensure_future(_wait_disconnect(receive))
        done, _ = await asyncio.wait({waiting, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if waiting not in done:
            waiting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiting
            raise ClientDisconnected
        watcher.cancel()
        waiting.result()

    async def _fail_over(
        self, call: _Call, admitted: Admitted, route: _Route, reason: str, receive: Receive
    ) -> Backend:
        """Move the request to the route's next backend: its slot there, the failed one's given back."""
        failed, nxt = route.backend, route.rest.pop(0)
        self._admission.release_slot(admitted)
        try:
            await self._take_slot(admitted, call.principal, nxt, call.model, receive)
        except (GatewayError, ClientDisconnected) as exc:
            # No other backend took it: the request ends on the one that failed.
            status = exc.status if isinstance(exc, GatewayError) else 499
            self._record(call.outcome(stream=call.request.stream, status=status, usage=Usage(), partial=False))
            raise
        log.info(
            "request %s: backend %s failed (%s), falling back to %s", call.request_id, failed.name, reason, nxt.name
        )
        self._metrics.fallbacks.labels(call.model.name, failed.name, nxt.name, reason).inc()
        if route.fallback_from is None:
            route.fallback_from = failed.name
        route.backend, route.reason = nxt, reason
        return nxt

    def _downgrade_target(self, principal: Principal, reason: str | None) -> ModelConfig | None:
        policy = principal.tenant.on_limit.get(_POLICY_KEY.get(reason or "", reason or ""), "reject")
        if not policy.startswith("downgrade:"):
            return None
        target = self._models.get(policy.removeprefix("downgrade:"))
        if target is None or not principal.may_use(target.name):
            log.warning(
                "tenant %s: on_limit names model %r, which is unknown or not allowed", principal.tenant_id, policy
            )
            return None
        return target

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
            raise NotFoundError(f"The model '{name[:200]}' does not exist.", param="model")
        await send_response(send, 200, orjson.dumps(_model_object(self._models[name])), rid)

    def _authorise(self, principal: Principal, name: str) -> ModelConfig:
        model = self._models.get(name)
        if model is None:
            raise NotFoundError(f"The model '{name}' does not exist.", param="model")
        if not principal.may_use(name):
            raise PermissionDeniedError(f"Your key is not allowed to use the model '{name}'.", param="model")
        return model

    def _rewrite(
        self,
        request: ParsedRequest,
        principal: Principal,
        model: ModelConfig,
        backend: Backend,
        cache_scope: str | None,
    ) -> bytes:
        salted = backend.config.kind == "vllm"
        return rewrite(
            request, principal, model.upstream_name, salts=self._salts if salted else None, scope=cache_scope
        )

    def _model_swap(self, model: ModelConfig) -> tuple[bytes | None, bytes | None]:
        if model.upstream_name == model.name:
            return None, None
        return (
            b'"model":' + orjson.dumps(model.upstream_name),
            b'"model":' + orjson.dumps(model.name),
        )

    async def _unary(self, send: Send, call: _Call) -> Outcome:
        request, model, backend, payload = call.request, call.model, call.backend, call.payload
        request_id, started, response_headers = call.request_id, call.started, call.response_headers
        headers = backend_headers(backend, request_id, self._backend_keys.get(backend.name))
        pool = self._pools[backend.name]
        try:
            with self._tracing.client_span(request.endpoint, model.upstream_name, backend.name, backend.config.kind):
                async with await pool.request("POST", _PATHS[request.endpoint], payload, headers) as resp:
                    status = resp.status
                    data = await resp.read()
        except httpclient.UpstreamError as exc:
            self._metrics.upstream_errors.labels(backend.name, type(exc).__name__).inc()
            self._backends.failed(backend)
            if call.can_fail_over:
                raise _Failover(_FAILURE_REASONS.get(type(exc).__name__, "connect_error")) from None
            self._record(call.outcome(stream=False, status=502, usage=Usage(), partial=True))
            raise UpstreamError(UPSTREAM_FAILED) from None
        self._backends.succeeded(backend)
        self._metrics.child(self._metrics.upstream_latency, backend.name).observe(time.perf_counter() - started)
        usage = Usage()
        finish_reason: str | None = None
        if status >= 400:
            if status >= 500:
                self._metrics.upstream_errors.labels(backend.name, f"http_{status}").inc()
            if call.can_fail_over and (status >= 500 or status == 429):
                raise _Failover(f"http_{status}")
            error = error_from_backend(status, data)
            await send_response(send, error.status, error.body(), response_headers)
            status = error.status
        else:
            swap_from, swap_to = self._model_swap(model)
            if swap_from is not None and swap_to is not None:
                data = data.replace(swap_from, swap_to, 1)
            with contextlib.suppress(orjson.JSONDecodeError):
                parsed = orjson.loads(data)
                usage = usage_from(parsed) or Usage()
                finish_reason = _first_finish_reason(parsed)
            await send_response(send, status, data, response_headers)
        return call.outcome(stream=False, status=status, usage=usage, partial=False, finish_reason=finish_reason)

    async def _stream(self, receive: Receive, send: Send, call: _Call, direct: DirectWriter | None) -> Outcome:
        request, model, backend, payload = call.request, call.model, call.backend, call.payload
        request_id, started, response_headers = call.request_id, call.started, call.response_headers
        headers = backend_headers(backend, request_id, self._backend_keys.get(backend.name))
        swap_from, swap_to = self._model_swap(model)
        relay = Relay(send, client_wants_usage=request.client_wants_usage, model_from=swap_from, model_to=swap_to)
        status = 200
        started_response = False

        async def forward() -> None:
            with self._tracing.client_span(request.endpoint, model.upstream_name, backend.name, backend.config.kind):
                await relay_upstream()

        async def relay_upstream() -> None:
            nonlocal status, started_response
            try:
                resp = await self._pools[backend.name].request("POST", _PATHS[request.endpoint], payload, headers)
            except httpclient.UpstreamError as exc:
                self._metrics.upstream_errors.labels(backend.name, type(exc).__name__).inc()
                self._backends.failed(backend)
                if call.can_fail_over:
                    raise _Failover(_FAILURE_REASONS.get(type(exc).__name__, "connect_error")) from None
                raise UpstreamError(UPSTREAM_FAILED) from None
            self._backends.succeeded(backend)
            async with resp:
                self._metrics.child(self._metrics.upstream_latency, backend.name).observe(time.perf_counter() - started)
                if resp.status != 200:
                    data = await resp.read()
                    if resp.status >= 500:
                        self._metrics.upstream_errors.labels(backend.name, f"http_{resp.status}").inc()
                    if call.can_fail_over and (resp.status >= 500 or resp.status == 429):
                        raise _Failover(f"http_{resp.status}")
                    raise error_from_backend(resp.status, data)
                await send(
                    {
                        "type": "http.response.start",
                        "status": 200,
                        "headers": [*_SSE_HEADERS, *response_headers],
                    }
                )
                started_response = True
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
            if started_response:
                error = ServiceUnavailableError("The gateway is shutting down; the answer is incomplete.")
                with contextlib.suppress(Exception):
                    await send({"type": "http.response.body", "body": b"data: " + error.body() + b"\n\n"})
            self._record(self._stream_outcome(call, 503, relay, partial=True))
            raise
        if client_gone:
            # The client went away: the upstream call was cancelled, which closed its connection, which
            # stops the generation.
            status = 499
        else:
            if isinstance(exc, _Failover):
                raise exc
            if isinstance(exc, GatewayError) and not started_response:
                # Nothing was sent yet: the app answers with a normal error response.
                outcome = self._stream_outcome(call, exc.status, relay, partial=False)
                self._record(outcome)
                raise exc
            if exc is not None:
                raise exc
        out = relay.outcome
        partial = client_gone or out.failed
        if partial and status == 200:
            status = 502
        return self._stream_outcome(call, status, relay, partial=partial)

    @staticmethod
    def _stream_outcome(call: _Call, status: int, relay: Relay, *, partial: bool) -> Outcome:
        out = relay.outcome
        usage = out.usage
        if not out.usage_seen:
            # Interrupted before the backend's usage chunk: bill what was relayed (one token per chunk).
            usage = Usage(prompt_tokens=0, completion_tokens=out.content_chunks, cached_tokens=0)
        return call.outcome(
            stream=True,
            status=status,
            usage=usage,
            partial=partial,
            finish_reason=out.finish_reason,
            ttft_s=out.first_chunk_at,
        )

    def _record(self, outcome: Outcome) -> None:
        m = self._metrics
        tenant = m.tenant_label(outcome.principal.tenant_id)
        m.child(m.requests, tenant, outcome.model, str(outcome.status)).inc()
        m.child(m.duration, tenant, outcome.model).observe(outcome.duration_s)
        if outcome.ttft_s is not None:
            m.child(m.ttft, tenant, outcome.model).observe(outcome.ttft_s)
        usage = outcome.usage
        if usage.prompt_tokens:
            m.child(m.tokens, tenant, outcome.model, "prompt").inc(usage.prompt_tokens)
        if usage.completion_tokens:
            m.child(m.tokens, tenant, outcome.model, "completion").inc(usage.completion_tokens)
        if usage.cached_tokens:
            m.child(m.tokens, tenant, outcome.model, "cached").inc(usage.cached_tokens)
        cost, currency = self._billing.cost(
            outcome.model, usage.prompt_tokens, usage.completion_tokens, outcome.backend
        )
        outcome.cost = cost
        if cost:
            m.child(m.spend, tenant, currency).inc(cost)
        self._ledger.record(
            outcome.principal.tenant_id,
            outcome.principal.key.id,
            time.time(),
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.cached_tokens,
            cost,
            currency,
        )
        self._billing.emit(
            outcome.request_id,
            outcome.principal.tenant_id,
            {
                "tenant": outcome.principal.tenant_id,
                "key_id": outcome.principal.key.id,
                "model": outcome.model,
                "backend": outcome.backend,
                "endpoint": outcome.endpoint,
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens,
                "cached_tokens": usage.cached_tokens,
                "cost": cost,
                "currency": currency,
                "status": outcome.status,
                "finish_reason": outcome.finish_reason,
                "stream": outcome.stream,
                "partial": outcome.partial,
                "downgraded_from": outcome.downgraded_from,
                "fallback_from": outcome.fallback_from,
                "fallback_reason": outcome.fallback_reason,
                "timings": {
                    "duration_ms": round(outcome.duration_s * 1000, 3),
                    "ttft_ms": None if outcome.ttft_s is None else round(outcome.ttft_s * 1000, 3),
                },
            },
        )


def rewrite(
    request: ParsedRequest, principal: Principal, upstream_model: str, *, salts: SaltDeriver | None, scope: str | None
) -> bytes:
    """The body the backend gets: the upstream model name, our `cache_salt` (for a backend that enforces salts,
    `salts` given, and a tenant that is not in the global scope) in place of the client's, usage asked for on
    streams, `user` per the tenant's policy; every other field as the client sent it."""
    body = request.body
    body["model"] = upstream_model
    # The client's own salt is never forwarded as is (SPEC section 5).
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


def _first_finish_reason(obj: object) -> str | None:
    if isinstance(obj, dict):
        choices = obj.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            reason = choices[0].get("finish_reason")
            return reason if isinstance(reason, str) else None
    return None


def _model_object(model: ModelConfig) -> dict[str, object]:
    return {"id": model.name, "object": "model", "created": 0, "owned_by": "gateway"}


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
    me = asyncio.current_task()
    assert me is not None
    gone = False

    def on_gone() -> None:
        nonlocal gone
        gone = True
        me.cancel()

    direct.on_gone(on_gone)
    try:
        await work
    except asyncio.CancelledError as exc:
        if gone and me.uncancel() == 0:
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
