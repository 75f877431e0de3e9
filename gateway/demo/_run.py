"""`gateway demo`: the simulator, the gateway and two demo tenants in one command; `--load` puts them to work.

In this order, so that nothing is printed before everything works, and nothing is left running after:

1. the state directory (emptied: it is the demo's alone) and the gateway's port, bound and held;
2. the simulator, a child process on a free port, proven to be the one answering there (`_sim`);
3. the gateway, in this process under uvicorn, until `/readyz` answers; then the tenants and their keys,
   created over the admin API as an operator would (`_scenario` says which, and why those numbers);
4. the banner (`_banner`); with `--load`, the load and its live summary (`_load`).

Ctrl-C (SIGINT) or SIGTERM at any point stops the gateway and the simulator. The simulator is also told
to die with the demo (Linux), should the demo itself be killed.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import httpx
import uvicorn

from gateway.app import create_app
from gateway.config import load_settings
from gateway.demo._banner import Running, banner
from gateway.demo._load import run_load
from gateway.demo._ports import PortError, bind_listener
from gateway.demo._scenario import MODEL, SIM_CONCURRENCY, TENANTS
from gateway.demo._sim import SimError, SimProcess, start_sim
from gateway.serve import configure_logging, uvicorn_config

__all__ = ["DEFAULT_PORT", "DemoOptions", "run_demo"]

DEFAULT_PORT = 8080
_MARKER = ".gateway-demo"
# What a demo run leaves in its state directory (earlier versions wrote no marker file).
_WRITTEN = {"gateway.yaml", "state.db", "state.db-wal", "state.db-shm", "state.db-journal", "billing.jsonl", "spool"}
_READY_TIMEOUT_S = 20.0

_CONFIG = """\
# Written by `gateway demo` for this run (the directory is emptied at each start).
# The tenants are not declared here: the demo creates them over the admin API, so they can be changed.
listen: {{host: {host}, port: {port}}}
state_path: {state}
log_level: warning
shutdown_grace_s: 2
backends:
  # The simulator runs {concurrency} requests at once: the gateway lets as many through and queues the rest fairly.
  - {{name: sim, kind: vllm, url: "{sim_url}", capacity: {concurrency}}}
models:
  - name: {model}
    backends: [sim]
    upstream_model: sim-model
    price: {{input_per_1k: 0.0002, output_per_1k: 0.0006, currency: USD}}
billing:
  sinks: [{{kind: jsonl, path: {billing}}}]
"""


@dataclass(frozen=True, slots=True)
class DemoOptions:
    host: str = "127.0.0.1"
    port: int | None = None
    """None: 8080, or the next free port."""
    sim_port: int | None = None
    """None: 8000, or the next free port."""
    state_dir: str = ".gateway/demo"
    load: bool = False
    load_seconds: float = 60.0


class _DemoError(Exception):
    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def run_demo(options: DemoOptions) -> int:
    """Run the demo until Ctrl-C; the exit status (0 after Ctrl-C, 2 for a flag to change, 1 otherwise)."""
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    listener: socket.socket | None = None
    sim: SimProcess | None = None
    interrupted = False
    try:
        state = _prepare_state_dir(Path(options.state_dir))
        listener = bind_listener(options.host, options.port, DEFAULT_PORT, "--port")
        port: int = listener.getsockname()[1]
        sim = start_sim(options.sim_port, frozenset({port}), state / "sim.log")
        return _serve(options, state, listener, sim)
    except PortError as exc:
        return _failed(exc, 2)
    except SimError as exc:
        return _failed(exc, 1)
    except _DemoError as exc:
        return _failed(exc, exc.exit_code)
    except KeyboardInterrupt:
        interrupted = True
        return 0
    finally:
        for sig in previous:
            signal.signal(sig, _ignore)  # a second Ctrl-C must not cut the clean-up short
        if sim is not None:
            sim.stop()
        if listener is not None:
            listener.close()
        if interrupted:
            print("\nStopped the gateway and the simulator." if sim is not None else "\nStopped.", flush=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _failed(error: Exception, exit_code: int) -> int:
    print(f"gateway demo: {error}", file=sys.stderr)
    return exit_code


def _interrupt(sig: int, frame: FrameType | None) -> None:
    # uvicorn takes the signals over while it serves and raises the one it caught again once it has shut
    # down; outside that, the signal lands here. Either way run_demo stops everything it started.
    raise KeyboardInterrupt


def _ignore(sig: int, frame: FrameType | None) -> None:
    pass


def _prepare_state_dir(path: Path) -> Path:
    state = path.resolve()
    if state.exists():
        if not state.is_dir():
            raise _DemoError(f"{state} is not a directory; choose another with --state-dir", 2)
        names = {entry.name for entry in state.iterdir()}
        if names and _MARKER not in names and not names <= _WRITTEN:
            raise _DemoError(
                f"{state} holds files the demo did not write, and the demo empties its directory; "
                "choose another with --state-dir",
                2,
            )
        shutil.rmtree(state)
    state.mkdir(parents=True)
    (state / _MARKER).write_text("Written by `gateway demo`, which empties this directory at each start.\n")
    return state


def _serve(options: DemoOptions, state: Path, listener: socket.socket, sim: SimProcess) -> int:
    port: int = listener.getsockname()[1]
    config_path = state / "gateway.yaml"
    config_path.write_text(
        _CONFIG.format(
            host=json.dumps(options.host),
            port=port,
            state=json.dumps(str(state / "state.db")),
            sim_url=sim.url,
            concurrency=SIM_CONCURRENCY,
            model=MODEL,
            billing=json.dumps(str(state / "billing.jsonl")),
        )
    )
    admin_key = "sk-admin-" + secrets.token_urlsafe(24)
    # Only these variables: a GATEWAY_* setting left in the user's environment must not change the demo.
    env = {"GATEWAY_ADMIN_KEY": admin_key, "GATEWAY_SALT_SECRET": secrets.token_urlsafe(32)}
    settings = load_settings(config_path, env=env)
    configure_logging(settings.log_level)
    server = _DemoServer(uvicorn_config(create_app(settings), settings, options.host, port))
    base_url = f"http://{_url_host(options.host)}:{port}"
    note = (
        f"   ({DEFAULT_PORT} is in use, so the demo took {port})"
        if options.port is None and port != DEFAULT_PORT
        else ""
    )
    session = _Session(options, server, sim, base_url, note, admin_key, config_path)
    return asyncio.run(session.main(listener))


class _DemoServer(uvicorn.Server):
    """uvicorn's server, which also stops the demo's own work (the load) at the first signal."""

    on_exit: Callable[[], object] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.on_exit is not None:
            self.on_exit()
        super().handle_exit(sig, frame)


class _Session:
    def __init__(
        self,
        options: DemoOptions,
        server: _DemoServer,
        sim: SimProcess,
        base_url: str,
        port_note: str,
        admin_key: str,
        config_path: Path,
    ) -> None:
        self._options = options
        self._server = server
        self._sim = sim
        self._base_url = base_url
        self._port_note = port_note
        self._admin_key = admin_key
        self._config_path = config_path

    async def main(self, listener: socket.socket) -> int:
        serving = asyncio.create_task(self._server.serve(sockets=[listener]))
        work = asyncio.create_task(self._work(serving))
        loop = asyncio.get_running_loop()
        # Called from a signal handler: only the thread-safe call may touch the loop there.
        self._server.on_exit = lambda: loop.call_soon_threadsafe(work.cancel)
        await asyncio.wait({serving, work}, return_when=asyncio.FIRST_COMPLETED)
        if not serving.done():
            self._server.should_exit = True  # the work ended by itself: it failed, or the simulator died
        await serving
        work.cancel()
        try:
            return await work
        except asyncio.CancelledError:
            return 0

    async def _work(self, serving: asyncio.Task[None]) -> int:
        while not self._server.started:
            if serving.done():
                raise _DemoError("the gateway did not start (see the messages above)")
            await asyncio.sleep(0.05)
        async with httpx.AsyncClient(base_url=self._base_url, timeout=10) as http:
            await _wait_ready(http)
            keys = await _create_tenants(http, self._admin_key)
        running = Running(self._base_url, self._port_note, self._sim.url, self._admin_key, keys, self._config_path)
        print(banner(running, self._options.load), flush=True)
        watch = asyncio.create_task(self._watch_sim())
        if not self._options.load:
            return await watch
        load = asyncio.create_task(run_load(self._base_url, keys, self._admin_key, self._options.load_seconds))
        try:
            done, _ = await asyncio.wait({watch, load}, return_when=asyncio.FIRST_COMPLETED)
            if load in done:
                load.result()  # a failure of the load itself is reported, not swallowed
            return await watch
        finally:
            load.cancel()
            watch.cancel()
            await asyncio.gather(load, watch, return_exceptions=True)

    async def _watch_sim(self) -> int:
        """Return 1 when the simulator exits by itself: the demo must not serve against its port then."""
        while (code := self._sim.exited()) is None:  # noqa: ASYNC110 - a Popen's exit is not awaitable
            await asyncio.sleep(0.5)
        print(
            f"gateway demo: the simulator exited with status {code} (its log: {self._sim.log_path}); stopping",
            file=sys.stderr,
            flush=True,
        )
        return 1


async def _wait_ready(http: httpx.AsyncClient) -> None:
    deadline = time.monotonic() + _READY_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            if (await http.get("/readyz")).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.05)
    raise _DemoError(f"the gateway was not ready after {_READY_TIMEOUT_S:g} s")


async def _create_tenants(http: httpx.AsyncClient, admin_key: str) -> dict[str, str]:
    """Each demo tenant and one key for it, over the admin API; the keys' secrets by tenant id."""
    auth = {"Authorization": f"Bearer {admin_key}"}
    keys: dict[str, str] = {}
    for tenant in TENANTS:
        created = await http.post("/admin/tenants", json=tenant.body(), headers=auth)
        if created.status_code != 201:
            raise _DemoError(f"creating tenant {tenant.id} answered {created.status_code}: {created.text[:300]}")
        key = await http.post(f"/admin/tenants/{tenant.id}/keys", json={"name": "demo"}, headers=auth)
        if key.status_code != 201:
            raise _DemoError(f"creating a key for {tenant.id} answered {key.status_code}: {key.text[:300]}")
        keys[tenant.id] = key.json()["key"]
    return keys


def _url_host(host: str) -> str:
    """The host to print in URLs: a wildcard address is reached on loopback."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host
