"""`gateway sim`: its command-line flags, and serving the simulator under uvicorn."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from gateway.sim.config import SimConfig

__all__ = ["add_arguments", "config_from_args", "run", "serve"]

# Long streams and hung requests (the "hang" fault) would otherwise hold a stopping simulator until
# the client gives up; tests stop and restart it freely.
_SHUTDOWN_GRACE_S = 2


class _QuietCancelledStreams(logging.Filter):
    """Drop uvicorn's report of requests it cancelled when the shutdown grace period ran out.

    Streams still open at shutdown are expected for a simulator; uvicorn logs each with a traceback
    as an error of the app, which would bury real errors in test logs.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, asyncio.CancelledError)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = SimConfig()
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    add("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    add("--ttft-ms", type=float, default=d.ttft_ms, help="base time to first token (default: %(default)s)")
    add("--itl-ms", type=float, default=d.itl_ms, help="inter-token latency (default: %(default)s)")
    add(
        "--prefill-us-per-token",
        type=float,
        default=d.prefill_us_per_token,
        help="extra time to first token per uncached prompt token, in microseconds (default: %(default)s)",
    )
    add(
        "--max-concurrency",
        type=int,
        default=d.max_concurrency,
        help="requests running at once; the rest wait in FIFO order (default: %(default)s)",
    )
    add(
        "--ignore-cache-salt",
        action="store_true",
        help="behave like vLLM < 0.9.0: accept any cache_salt and leave it out of the block hashes",
    )
    add("--block-size", type=int, default=d.block_size, help="tokens per KV block (default: %(default)s)")
    add(
        "--cache-blocks",
        type=int,
        default=d.cache_blocks,
        help="prefix-cache capacity in blocks, LRU-evicted (default: %(default)s)",
    )
    add(
        "--max-tokens-default",
        type=int,
        default=d.max_tokens_default,
        help="output tokens when a request sets no limit (default: %(default)s)",
    )
    add(
        "--max-model-len",
        type=int,
        default=d.max_model_len,
        help="prompt plus output tokens allowed per request (default: %(default)s)",
    )
    add("--embedding-dim", type=int, default=d.embedding_dim, help="embedding size (default: %(default)s)")
    add(
        "--stamp-chunks",
        action="store_true",
        help="benchmarks: put each streamed chunk's send time (monotonic ns) in it as x_sim_sent_ns",
    )
    add(
        "--api-key",
        default=None,
        help="the x-api-key that /v1/messages (Anthropic's API) requires; any key is accepted when unset",
    )
    add(
        "--model",
        dest="models",
        action="append",
        metavar="NAME",
        help=f"a served model id, repeatable (default: {d.models[0]}); any model name is still accepted",
    )


def config_from_args(args: argparse.Namespace) -> SimConfig:
    return SimConfig(
        ttft_ms=args.ttft_ms,
        itl_ms=args.itl_ms,
        prefill_us_per_token=args.prefill_us_per_token,
        max_concurrency=args.max_concurrency,
        ignore_cache_salt=args.ignore_cache_salt,
        block_size=args.block_size,
        cache_blocks=args.cache_blocks,
        max_tokens_default=args.max_tokens_default,
        max_model_len=args.max_model_len,
        embedding_dim=args.embedding_dim,
        stamp_chunks=args.stamp_chunks,
        models=tuple(args.models) if args.models else SimConfig().models,
        api_key=args.api_key,
    )


def serve(config: SimConfig, host: str, port: int) -> bool:
    """Serve the simulator until SIGINT/SIGTERM; False if the server could not start."""
    import uvicorn

    from gateway.sim.app import create_sim_app

    server_config = uvicorn.Config(
        create_sim_app(config),
        host=host,
        port=port,
        http="httptools",
        loop="uvloop",
        lifespan="on",
        log_level="warning",
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=_SHUTDOWN_GRACE_S,
    )
    # After uvicorn.Config, which configures uvicorn's loggers.
    logging.getLogger("uvicorn.error").addFilter(_QuietCancelledStreams())
    server = uvicorn.Server(server_config)
    server.run()
    return server.started


def run(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"gateway sim: {exc}", file=sys.stderr)
        return 2
    return 0 if serve(config, args.host, args.port) else 1
