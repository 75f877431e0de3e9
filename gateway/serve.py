"""Running the gateway under uvicorn: one worker in-process, or N workers via an app factory."""

from __future__ import annotations

import logging
import os
import sys

import uvicorn
from uvicorn.supervisors import Multiprocess

from gateway.app import GatewayApp, create_app
from gateway.config import Settings, load_settings

__all__ = ["configure_logging", "run", "worker_app"]


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def uvicorn_config(app: object, settings: Settings, host: str, port: int, workers: int = 1) -> uvicorn.Config:
    return uvicorn.Config(
        app,  # type: ignore[arg-type]
        host=host,
        port=port,
        workers=workers,
        http="httptools",
        loop="uvloop",
        lifespan="on",
        access_log=False,
        log_level="warning",
        # Streams can be long; the gateway itself decides when a request is over.
        timeout_keep_alive=30,
        timeout_graceful_shutdown=30,
        factory=workers > 1,
    )


def run(settings: Settings, config_path: str | None, host: str, port: int, workers: int) -> int:
    configure_logging(settings.log_level)
    if workers > 1:
        # Each worker process loads the settings itself from the same file and environment.
        if config_path:
            os.environ["GATEWAY_CONFIG"] = os.path.abspath(config_path)
        os.environ["GATEWAY_LISTEN__HOST"] = host
        os.environ["GATEWAY_LISTEN__PORT"] = str(port)
        config = uvicorn_config("gateway.serve:worker_app", settings, host, port, workers)
    else:
        config = uvicorn_config(create_app(settings), settings, host, port)
    server = uvicorn.Server(config)
    if workers > 1:
        sock = config.bind_socket()
        Multiprocess(config, sockets=[sock]).run()
        return 0
    server.run()
    return 0 if server.started else 1


def worker_app() -> GatewayApp:
    """The app factory each worker process calls (`--workers N`)."""
    settings = load_settings(os.environ.get("GATEWAY_CONFIG"))
    configure_logging(settings.log_level)
    return create_app(settings)
