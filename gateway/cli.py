"""The `gateway` command line: `serve`, `sim`, `demo`, and admin commands over the admin API.

Each subcommand imports what it needs when it runs, so `gateway --help` stays instant and the
simulator never imports the gateway's server stack (or the reverse).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence


def _serve(args: argparse.Namespace) -> int:
    from gateway.config import ConfigError, load_settings
    from gateway.serve import run

    config_path = args.config or os.environ.get("GATEWAY_CONFIG")
    try:
        settings = load_settings(config_path)
    except ConfigError as exc:
        print(f"gateway: config error: {exc}", file=sys.stderr)
        return 2
    host = args.host or settings.listen.host
    port = args.port if args.port is not None else settings.listen.port
    workers = args.workers if args.workers is not None else settings.workers
    if workers < 1:
        print("gateway: --workers must be at least 1", file=sys.stderr)
        return 2
    return run(settings, config_path, host, port, workers)


def _demo(args: argparse.Namespace) -> int:
    try:
        from gateway.demo import DemoOptions, run_demo
    except KeyboardInterrupt:  # Ctrl-C while the server stack is still loading (seconds on a busy machine)
        return 130

    if args.load_seconds <= 0:
        print("gateway demo: --load-seconds must be more than 0", file=sys.stderr)
        return 2
    options = DemoOptions(
        host=args.host,
        port=args.port,
        sim_port=args.sim_port,
        state_dir=args.state_dir,
        load=args.load,
        load_seconds=args.load_seconds,
    )
    return run_demo(options)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="A tenant-aware, OpenAI-compatible gateway.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", help="YAML config file (default: $GATEWAY_CONFIG)")
    serve.add_argument("--host", help="listen address (overrides listen.host)")
    serve.add_argument("--port", type=int, help="listen port (overrides listen.port)")
    serve.add_argument("--workers", type=int, help="worker processes (default: `workers` in the config, 1)")
    serve.set_defaults(func=_serve)

    import gateway.sim.cli as sim_cli

    sim = sub.add_parser("sim", help="run the built-in vLLM simulator")
    sim_cli.add_arguments(sim)
    sim.set_defaults(func=sim_cli.run)

    demo = sub.add_parser("demo", help="simulator + gateway + two demo tenants, in one command")
    demo.add_argument("--host", default="127.0.0.1", help="gateway listen address (default: %(default)s)")
    demo.add_argument("--port", type=int, help="gateway port (default: 8080, or the next free one)")
    demo.add_argument("--sim-port", type=int, help="simulator port (default: 8000, or the next free one)")
    demo.add_argument(
        "--state-dir",
        default=".gateway/demo",
        help="the demo's config, state and logs; emptied at each start (default: %(default)s)",
    )
    demo.add_argument(
        "--load",
        action="store_true",
        help="also run a load: a steady weight-3 tenant and a noisy rate-limited weight-1 one, with a live summary",
    )
    demo.add_argument("--load-seconds", type=float, default=60.0, help="how long the load runs (default: %(default)g)")
    demo.set_defaults(func=_demo)
    from gateway.admin import cli as admin_cli

    admin_cli.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
