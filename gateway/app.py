"""The application: `create_app(settings)` builds the ASGI callable; its lifespan owns every client.

Routing is a dict lookup on the path. The inference endpoints run on plain ASGI (see `gateway.pipeline`);
the admin API and its OpenAPI document are a FastAPI app mounted under `/admin`, where the framework's
validation and schema are worth their cost. Every response, from either side, carries `x-request-id`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import re
import signal
import socket
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import ModuleType

import aiohttp
import redis.asyncio as aioredis
from redis.asyncio import BlockingConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.admin.api import AdminContext, create_admin_app
from gateway.admin.console import PREFIX as CONSOLE_PREFIX
from gateway.admin.console import Console
from gateway.admin.stats import LiveStats
from gateway.admission import Admission
from gateway.admission.capacity import CapacityControl
from gateway.admission.limits import (
    FailoverQuotaStore,
    LocalQuotaStore,
    PipelinedRedis,
    QuotaStore,
    RedisQuotaStore,
    ReplicaLink,
)
from gateway.admission.tokens import counter_for
from gateway.asgi import ClientDisconnected, Message, Receive, Scope, Send, header, send_response
from gateway.auth import Authenticator, authorization_header, bearer_token, secret_matches
from gateway.billing import Billing
from gateway.billing.ledger import UsageLedger
from gateway.config import ConfigError, Price, Settings
from gateway.errors import AuthenticationError, GatewayError, NotFoundError
from gateway.telemetry.metrics import Metrics
from gateway.telemetry.tracing import Tracing
from gateway.tenancy.propagation import ChangeListener
from gateway.tenancy.state import load_salt_secret, reconcile_config
from gateway.tenancy.store import RedisStore, SqliteStore, Store
from gateway.upstream.backends import BackendPool
from gateway.upstream.connections import Connections
from gateway.upstream.providers import bundled_prices, import_litellm
from gateway.upstream.salt import SaltDeriver
from gateway.wiring import Services, Wired, wire

__all__ = ["GatewayApp", "create_app"]

log = logging.getLogger("gateway")

_ENDPOINTS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
    "/v1/responses": "responses",
}
_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")
_ADMIN_PREFIXES = ("/admin", "/openapi.json", "/docs", "/redoc")


@dataclass
class _Running:
    """Everything the lifespan creates; None until start-up completes."""

    store: Store
    session: aiohttp.ClientSession
    services: Services
    wired: Wired
    admin: object
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)


class GatewayApp:
    def __init__(self, settings: Settings, tracing: Tracing | None = None, metrics_dir: str | None = None) -> None:
        self.settings = settings
        self.tracing = tracing
        self.metrics = Metrics(multiprocess_dir=metrics_dir)
        self.ready = False
        self.draining = False
        self._running: _Running | None = None
        # Where SIGHUP re-reads the settings from (set by `gateway serve`; None: no hot reload).
        self.reloader: Callable[[], Settings] | None = None
        self._reloads: set[asyncio.Task[bool]] = set()
        # litellm, imported at start-up only if a `kind: litellm` backend is configured (gateway.upstream.providers).
        self._litellm: ModuleType | None = None
        self.console = Console()
        # Set at start-up: what to tell admission when the shared queues go out of reach.
        self._queues_lost: Callable[[str], None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    # --- lifespan -------------------------------------------------------------------------------

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    log.exception("start-up failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def startup(self) -> None:
        settings = self.settings
        redis_client = None
        store: Store
        if settings.redis_url:
            # Bounded: a burst of store reads waits for a connection (up to redis_timeout_s) rather than
            # opening hundreds of them at once.
            pool = BlockingConnectionPool.from_url(
                settings.redis_url,
                max_connections=32,
                timeout=settings.redis_timeout_s,
                socket_timeout=settings.redis_timeout_s,
                socket_connect_timeout=settings.redis_timeout_s,
                health_check_interval=10,
                # A pooled connection that died with a Redis restart is replaced once, at once; a timeout
                # is not retried, so no request waits on Redis longer than redis_timeout_s.
                # (Retry's own default would also retry timeouts: a frozen Redis then cost twice the timeout.)
                retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
                retry_on_error=[RedisConnectionError],
            )
            redis_client = aioredis.Redis.from_pool(pool)
            store = RedisStore(redis_client)
        else:
            store = SqliteStore(settings.state_path)
        salt_secret = await load_salt_secret(settings, store)
        await reconcile_config(settings, store)
        for tenant in await store.list_tenants(limit=500):
            self.metrics.know_tenant(tenant.id, tenant.weight)
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30, ttl_dns_cache=300),
            auto_decompress=False,
            skip_auto_headers=("User-Agent",),
        )
        authenticator = Authenticator(store, ttl_s=settings.auth_cache_ttl_s)
        self._load_providers(settings)
        billing = Billing(settings, self.metrics, _provider_prices(settings))
        await billing.start()
        ledger = UsageLedger(store)
        ledger.start()
        if self.tracing is None:
            self.tracing = Tracing.from_environment()
        local = LocalQuotaStore()
        quotas, quota_client = self._quota_store(settings, local)
        admission = Admission(
            settings=settings,
            quotas=quotas,
            metrics=self.metrics,
            worst_cost=lambda model, prompt, output: billing.cost(model, prompt, output)[0],
            tokens=counter_for(settings),
        )
        local.fairshare.on_grant = lambda waiter, endpoint: admission.grant(waiter, endpoint, "local")
        self._queues_lost = admission.queues_lost
        services = Services(
            authenticator=authenticator,
            admission=admission,
            billing=billing,
            ledger=ledger,
            salts=SaltDeriver(salt_secret),
            metrics=self.metrics,
            tracing=self.tracing,
        )
        wired = await wire(settings, services, check=lambda b: b.check_all(session), litellm=self._litellm)
        # Alone (embedded, one worker) this process's counters are the whole picture; otherwise each
        # process publishes its own for the others to sum.
        live = LiveStats(
            self.metrics,
            store,
            interval_s=settings.stats_interval_s,
            publish=bool(settings.redis_url) or settings.workers > 1,
            shared_queues=bool(settings.redis_url),
        )
        live.start()
        admin = create_admin_app(AdminContext(settings, store, authenticator, self.metrics, ledger, live))
        self._running = _Running(store, session, services, wired, admin)
        self._running.closers.append(live.close)
        self._running.closers.append(quotas.close)
        if quota_client is not None:
            self._running.closers.append(quota_client.aclose)
        self._running.tasks.append(asyncio.create_task(self._health_loop(session)))
        capacity = self._capacity_control(settings, quotas, admission, session)
        admission.on_release = capacity.observe
        await capacity.tick()  # every pool has its limits before the first request
        self._running.tasks.append(asyncio.create_task(capacity.run()))
        if any(b.discovery is not None for b in settings.backends):
            self._running.tasks.append(asyncio.create_task(self._discovery_loop(session, capacity)))
        if isinstance(quotas, FailoverQuotaStore) and settings.redis_url:
            # This replica's end of the shared fair queues: its heartbeat and the permits granted to it.
            blocking = aioredis.Redis.from_url(settings.redis_url, socket_connect_timeout=settings.redis_timeout_s)
            link = ReplicaLink(quotas.primary, blocking, admission.grant, on_lapse=admission.queues_lost)
            await link.beat()
            self._running.tasks.append(asyncio.create_task(link.run()))
            self._running.closers.append(blocking.aclose)
        if redis_client is not None:
            # Pub/sub needs a connection without the per-command timeout: it waits for messages.
            listener_client = aioredis.Redis.from_url(
                settings.redis_url or "", socket_connect_timeout=settings.redis_timeout_s
            )
            listener = ChangeListener(listener_client, authenticator)
            self._running.tasks.append(asyncio.create_task(listener.run()))
            self._running.closers.append(listener_client.aclose)
        if self.reloader is not None and threading.current_thread() is threading.main_thread():
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._on_sighup)
        # What start-up built (settings, the admin app's models, the store) lives as long as the process:
        # moved out of the garbage collector's sight, full collections no longer walk it, and the tail
        # latency of requests no longer carries them (measured: p99 at 32 connections 34-37 ms -> 9-13 ms,
        # CPU per request unchanged). The thresholds stay Python's: raising them (20,000 / 50 / 1,000) bought
        # 5% of throughput but let per-request reference cycles pile up in the old generation (RSS +0.37
        # MB/min in the 10-minute soak).
        gc.collect()
        gc.freeze()
        self.ready = True
        log.info("gateway ready: %d backends, %d models", len(settings.backends), len(settings.models))

    def _load_providers(self, settings: Settings) -> None:
        """Import litellm (offline), once, if and only if a backend needs it."""
        if self._litellm is None and any(b.kind == "litellm" for b in settings.backends):
            self._litellm = import_litellm()

    def _check_metrics_token(self, scope: Scope) -> None:
        token = self.settings.metrics_token
        if token is None:
            return
        given = bearer_token(authorization_header(scope["headers"]))
        if given is None or not secret_matches(given, token):
            raise AuthenticationError("The metrics endpoint needs 'Authorization: Bearer <metrics token>'.")

    def _quota_store(self, settings: Settings, local: LocalQuotaStore) -> tuple[QuotaStore, PipelinedRedis | None]:
        if not settings.redis_url:
            return local, None
        metrics = self.metrics
        mode = settings.redis_failure_mode

        def on_change(degraded: bool) -> None:
            metrics.redis_degraded.labels(mode).set(1 if degraded else 0)
            if degraded:
                metrics.redis_failures.labels("quotas").inc()
                log.warning("Redis unreachable: rate limits now in failure mode %r (%s)", mode, _MODES[mode])
                if self._queues_lost is not None:
                    self._queues_lost("redis")
            else:
                log.info("Redis is back: rate limits are shared again")

        metrics.redis_degraded.labels(mode).set(0)
        # The admission path's own client (two scripts per request): pipelined, see gateway/wire/resp.py.
        client = PipelinedRedis.from_url(settings.redis_url, timeout_s=settings.redis_timeout_s)
        replica = f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"
        store = FailoverQuotaStore(
            RedisQuotaStore(client, replica=replica), local, mode=mode, replicas=settings.replicas, on_change=on_change
        )
        return store, client

    def _capacity_control(
        self, settings: Settings, quotas: QuotaStore, admission: Admission, session: aiohttp.ClientSession
    ) -> CapacityControl:
        shared = isinstance(quotas, FailoverQuotaStore)
        # Without Redis, several workers of one replica each run their own fair queue: each takes its share.
        divide = 1 if shared else max(1, settings.workers)

        async def publish(pool: str, limits: dict[str, int], lead: bool) -> tuple[int, dict[str, int], int]:
            if isinstance(quotas, FailoverQuotaStore):
                status = await quotas.set_capacity(pool, limits, shared=lead)
            else:
                share = {e: max(1, n // divide) if n else 0 for e, n in limits.items()}
                status = await quotas.set_capacity(pool, share)
            admission.capacity_changed(pool, status.limit)
            return status.limit, status.held_by_endpoint, status.waiting_tenants

        async def lead(pool: str) -> bool:
            if isinstance(quotas, FailoverQuotaStore):
                return await quotas.lead(pool, max(3.0, 12 * settings.capacity.interval_s))
            return True

        def backends() -> BackendPool:
            assert self._running is not None
            return self._running.wired.backends

        return CapacityControl(
            config=settings.capacity,
            backends=backends,
            publish=publish,
            lead=lead,
            metrics=self.metrics,
            session=session,
            engine_wait=admission.engine_wait_changed,
        )

    async def _discovery_loop(self, session: aiohttp.ClientSession, capacity: CapacityControl) -> None:
        """Re-resolve the DNS pools; probe what joins, forget what leaves."""
        interval = min(b.discovery.interval_s for b in self.settings.backends if b.discovery is not None)
        while True:
            running = self._running
            if running is None:
                return
            backends = running.wired.backends
            before = {(b.name, e) for b in backends.backends.values() for e in b.endpoints}
            try:
                if await backends.discover():
                    await backends.check_all(session)
            except Exception:  # discovery must never stop
                log.exception("endpoint discovery failed")
            after = {(b.name, e) for b in backends.backends.values() for e in b.endpoints}
            for name, endpoint in before - after:
                capacity.forget(name, endpoint)
            for name, connections in running.wired.pools.items():
                await connections.retire({e for b, e in after if b == name})
            await asyncio.sleep(interval)

    def _on_sighup(self) -> None:
        task = asyncio.create_task(self.reload_from_source())
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def reload_from_source(self) -> bool:
        """Re-read the config (SIGHUP). An invalid config is refused and the running one stays in force."""
        if self.reloader is None:
            return False
        try:
            settings = self.reloader()
        except ConfigError as exc:
            log.error("config reload refused, the running configuration stays in force: %s", exc)
            return False
        await self.reload(settings)
        return True

    async def reload(self, settings: Settings) -> None:
        """Swap in new backends, models and config-declared tenants without dropping a request.

        In-flight requests keep the handler they started with; new ones get the new handler. The listener,
        the stores, billing sinks and secrets are not reloaded (they need a restart; a warning says so).
        """
        running = self._running
        if running is None:
            raise RuntimeError("not started")
        for field_name in ("listen", "redis_url", "state_path", "billing", "salt_secret", "admin_key"):
            if getattr(settings, field_name) != getattr(self.settings, field_name):
                log.warning("config reload: %s changed; it takes effect after a restart", field_name)
        await reconcile_config(settings, running.store)
        for tenant in settings.tenants:
            self.metrics.know_tenant(tenant.id, tenant.weight)
        self._load_providers(settings)
        old = running.wired
        running.wired = await wire(
            settings,
            running.services,
            check=lambda b: b.check_all(running.session),
            previous=old,
            litellm=self._litellm,
        )
        self.settings = settings
        running.services.authenticator.invalidate()
        for name, old_pool in old.pools.items():
            if running.wired.pools.get(name) is not old_pool:
                # In-flight requests on a replaced pool keep their connections; only idle ones close now.
                running.tasks.append(asyncio.create_task(_close_later(old_pool, settings.shutdown_grace_s)))
        log.info("config reloaded: %d backends, %d models", len(settings.backends), len(settings.models))

    async def shutdown(self) -> None:
        self.ready = False
        running, self._running = self._running, None
        if running is None:
            return
        # Requests the drain cancelled settle first (their leases, tpm and budget), while the quota store's
        # client is still open; their billing events are queued by then.
        await running.services.admission.drain(max(1.0, 4 * self.settings.redis_timeout_s))
        for task in running.tasks:
            task.cancel()
        for task in running.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for close in running.closers:
            await close()
        for connections in running.wired.pools.values():
            await connections.close()
        await running.session.close()
        await running.services.billing.close()
        await running.services.ledger.close()
        await running.store.close()
        if self.tracing is not None:
            self.tracing.shutdown()

    async def _health_loop(self, session: aiohttp.ClientSession) -> None:
        while True:
            await asyncio.sleep(self.settings.health_interval_s)
            running = self._running
            if running is None:
                return
            try:
                await running.wired.backends.check_all(session)
            except Exception:  # a health check must never stop the loop
                log.exception("health check failed")

    # --- requests -------------------------------------------------------------------------------

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        given = header(scope, b"x-request-id")
        request_id = given.decode() if given and _REQUEST_ID.match(given) else "req_" + os.urandom(12).hex()
        rid = (b"x-request-id", request_id.encode())
        path: str = scope["path"]
        method: str = scope["method"]
        endpoint = _ENDPOINTS.get(path)
        running = self._running
        try:
            if endpoint is not None and method == "POST":
                if running is None:
                    raise GatewayError("The gateway is starting up.", code="not_ready")
                await running.wired.handler.handle(scope, receive, send, endpoint, request_id)
            elif path == "/livez":
                await send_response(send, 200, b'{"status":"ok"}', [rid])
            elif path == "/readyz":
                ok = self.ready and not self.draining
                body = b'{"status":"ready"}' if ok else b'{"status":"not ready"}'
                await send_response(send, 200 if ok else 503, body, [rid])
            elif path == "/metrics":
                self._check_metrics_token(scope)
                await send_response(
                    send, 200, self.metrics.exposition(), [rid], content_type=b"text/plain; version=0.0.4"
                )
            elif path.startswith("/v1/models") and method == "GET" and running is not None:
                await running.wired.handler.models(scope, send, path, request_id)
            elif path.startswith(_ADMIN_PREFIXES) and running is not None:
                await running.admin(scope, receive, _with_header(send, rid))  # type: ignore[operator]
            elif path.startswith(CONSOLE_PREFIX):
                await self.console(scope, send, [rid])
            else:
                raise NotFoundError(f"Unknown path: {method} {path[:200]}", code="not_found")
        except GatewayError as exc:
            await _send_error(send, exc, rid)
            # The frames it passed through hold it (a local bound to it before `raise`): dropping its
            # traceback frees them now rather than at the next garbage collection (a 429 is a common answer).
            exc.__traceback__ = None
        except ClientDisconnected as exc:
            exc.__traceback__ = None  # nobody to answer; as above
        except Exception:
            log.exception("unhandled error on %s %s (request %s)", method, path[:200], request_id)
            await _send_error(send, GatewayError("The gateway failed to handle the request."), rid)


_MODES = {
    "local": "each replica enforces its share in-process",
    "open": "requests are admitted without limits",
    "closed": "requests are refused with 503",
}


async def _close_later(pool: Connections, delay_s: float) -> None:
    await asyncio.sleep(delay_s)
    await pool.close()


def _backend_keys(settings: Settings) -> dict[str, str]:
    """Keys sent as `Authorization: Bearer` by the HTTP client (litellm backends hold their own)."""
    return {
        b.name: settings.env_secrets[b.api_key_env] for b in settings.backends if b.api_key_env and b.kind != "litellm"
    }


def _provider_prices(settings: Settings) -> dict[str, Price]:
    """litellm's bundled prices for the hosted models whose model has no price in the config."""
    unpriced = {name for m in settings.models if m.price is None for name in m.backends}
    wanted = [b.provider_model for b in settings.backends if b.name in unpriced and b.provider_model]
    if not wanted:
        return {}
    return bundled_prices(wanted)


def _with_header(send: Send, extra: tuple[bytes, bytes]) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", []), extra]
        await send(message)

    return wrapped


async def _send_error(send: Send, exc: GatewayError, rid: tuple[bytes, bytes]) -> None:
    headers = [rid, *((k.encode(), v.encode()) for k, v in exc.headers.items())]
    # If the response had already started (a stream), nothing more can be said on this connection.
    with contextlib.suppress(RuntimeError):
        await send_response(send, exc.status, exc.body(), headers)


def create_app(settings: Settings, tracing: Tracing | None = None, *, metrics_dir: str | None = None) -> GatewayApp:
    """Build the app. No I/O happens here: the lifespan opens the store and the upstream pool.

    `tracing` defaults to what the standard `OTEL_*` environment variables ask for (off when unset);
    `metrics_dir` is the shared metrics directory of `serve --workers N`.
    """
    return GatewayApp(settings, tracing, metrics_dir)
