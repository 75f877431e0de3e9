"""Running the gateway under uvicorn: one worker in-process, or N workers via an app factory.

Graceful shutdown (SIGTERM or SIGINT): `/readyz` turns 503 at once, the listener stays open for
`shutdown_drain_s` so load balancers see it, then closes; in-flight requests (streams included) run to
completion for up to `shutdown_grace_s`, after which remaining streams end with an SSE error event and are
billed as partial; the lifespan flushes billing; the process exits 0.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from types import FrameType

import uvicorn
from prometheus_client import multiprocess
from uvicorn.supervisors import Multiprocess

from gateway.app import GatewayApp, create_app
from gateway.config import Settings, load_settings
from gateway.wire.httpserver import HttpLimits, HttpProtocol

__all__ = ["GracefulServer", "configure_logging", "http_limits", "run", "uvicorn_config"]

log = logging.getLogger("gateway")


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def http_limits(settings: Settings) -> HttpLimits:
    """The client deadlines and sizes of the HTTP protocol, from the settings."""
    limits = settings.limits
    return HttpLimits(
        header_timeout_s=limits.client_header_timeout_s,
        body_timeout_s=limits.client_body_timeout_s,
        keep_alive_s=limits.keep_alive_timeout_s,
        max_header_bytes=limits.max_header_bytes,
    )


def uvicorn_config(app: object, settings: Settings, host: str, port: int, workers: int = 1) -> uvicorn.Config:
    """uvicorn's config for one process serving `app`, or (`workers` > 1) for the supervisor of N workers,
    each of which builds its own app (see `_WorkerConfig`)."""
    config_class = _WorkerConfig if workers > 1 else uvicorn.Config
    return config_class(
        app,  # type: ignore[arg-type]
        host=host,
        port=port,
        workers=workers,
        # Our own HTTP/1.1 protocol (gateway/wire/httpserver.py) with the client limits of the settings;
        # uvicorn runs the processes, sockets and lifespan. uvicorn calls it as it would call the class.
        http=HttpProtocol.with_limits(http_limits(settings)),  # type: ignore[arg-type]
        loop="uvloop",
        server_header=False,
        lifespan="on",
        access_log=False,
        # The gateway reads no client address; uvicorn would wrap every request in a middleware for it.
        proxy_headers=False,
        log_level="warning",
        timeout_keep_alive=int(settings.limits.keep_alive_timeout_s),
        timeout_graceful_shutdown=settings.shutdown_grace_s,  # type: ignore[arg-type]  # a float works
        factory=workers > 1,
    )


class _WorkerConfig(uvicorn.Config):
    """The config of `--workers N`, which every worker process receives (pickled) and loads. Loading it, a
    worker reads the settings itself, from the same file and environment as the supervisor (and again when
    a SIGHUP restarts it), and builds both its app and its HTTP protocol's limits from that one reading;
    without Redis, its own fair queues take 1 / N of every engine's limit (`GATEWAY_WORKERS`)."""

    def load(self) -> None:
        settings = load_settings(os.environ.get("GATEWAY_CONFIG"))
        configure_logging(settings.log_level)
        self.app = functools.partial(create_app, settings, metrics_dir=os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        # uvicorn calls the protocol with its limits bound as it would call the class.
        self.http = HttpProtocol.with_limits(http_limits(settings))  # type: ignore[assignment]
        super().load()


class GracefulServer(uvicorn.Server):
    """uvicorn's server, with a drain period between the signal and closing the listener."""

    def __init__(self, config: uvicorn.Config, app: GatewayApp, drain_s: float) -> None:
        super().__init__(config)
        self._app = app
        self._drain_s = drain_s
        self._exit_at: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._exit_at is None and sig in (signal.SIGTERM, signal.SIGINT):
            log.info("signal %s: draining (readyz 503), closing the listener in %.1fs", sig, self._drain_s)
            self._app.draining = True
            self._exit_at = time.monotonic() + self._drain_s
            self._captured_signals.append(sig)
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self._exit_at is not None and time.monotonic() >= self._exit_at:
            self.should_exit = True
        return await super().on_tick(counter)


def _exit_zero(sig: int, frame: FrameType | None) -> None:
    # uvicorn re-raises the signal it handled once it has shut down; a clean shutdown exits 0.
    raise SystemExit(0)


class _Workers(Multiprocess):
    """uvicorn's worker supervisor, which also retires a dead worker's live gauges (in-flight, queued)
    from the shared metrics directory, so that a crashed worker's requests are not counted forever."""

    def __init__(self, config: uvicorn.Config, sockets: list[object], metrics_dir: str) -> None:
        super().__init__(config, sockets=sockets)  # type: ignore[arg-type]
        self._metrics_dir = metrics_dir
        self._pids: set[int] = set()

    def _reap(self) -> None:
        alive = {p.pid for p in self.processes if p.pid is not None}
        for pid in self._pids - alive:
            multiprocess.mark_process_dead(pid, self._metrics_dir)  # type: ignore[no-untyped-call]
        self._pids = alive

    def init_processes(self) -> None:
        super().init_processes()
        self._reap()

    def keep_subprocess_alive(self) -> None:
        super().keep_subprocess_alive()
        self._reap()

    def restart_all(self) -> None:
        super().restart_all()
        self._reap()


def run(settings: Settings, config_path: str | None, host: str, port: int, workers: int) -> int:
    configure_logging(settings.log_level)
    if workers > 1:
        # Each worker process loads the settings itself from the same file and environment. Without Redis,
        # each runs its own fair queue with 1 / workers of every engine's limit (with Redis they share one).
        if config_path:
            os.environ["GATEWAY_CONFIG"] = os.path.abspath(config_path)
        os.environ["GATEWAY_LISTEN__HOST"] = host
        os.environ["GATEWAY_LISTEN__PORT"] = str(port)
        os.environ["GATEWAY_WORKERS"] = str(workers)
        # The workers' metrics meet in one directory; /metrics on any worker reports all of them.
        metrics_dir = tempfile.mkdtemp(prefix="gateway-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        config = uvicorn_config(create_app, settings, host, port, workers)
        sock = config.bind_socket()
        try:
            _Workers(config, [sock], metrics_dir).run()
        finally:
            shutil.rmtree(metrics_dir, ignore_errors=True)
        return 0
    settings = settings.model_copy(update={"workers": 1})
    app = create_app(settings)
    if config_path:
        app.reloader = lambda: load_settings(config_path).model_copy(update={"workers": 1})
    server = GracefulServer(uvicorn_config(app, settings, host, port), app, settings.shutdown_drain_s)
    signal.signal(signal.SIGTERM, _exit_zero)
    signal.signal(signal.SIGINT, _exit_zero)
    try:
        server.run()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0 if server.started else 1
