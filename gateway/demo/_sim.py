"""The demo's simulator: a child process on a free port, proven to be the one answering there.

A port that was free when it was chosen can be taken before the child binds it; the child then exits
with a bind error while the other process answers on that port. So the child is started with a model id
made for this run (`--model demo-<random>`), and the demo uses the port only once `/v1/models` there
lists that id. A chosen port that turns out to be taken is replaced by another; a port the user named
is an error.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from gateway.demo._ports import PortError, pick_free_port
from gateway.demo._scenario import SIM_CONCURRENCY

__all__ = ["DEFAULT_SIM_PORT", "SimError", "SimProcess", "serves_model", "start_sim"]

DEFAULT_SIM_PORT = 8000
_HOST = "127.0.0.1"
_ATTEMPTS = 3
_START_TIMEOUT_S = 20.0
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


class SimError(Exception):
    """The simulator could not be started; the message says why and where its log is."""


class SimProcess:
    def __init__(self, popen: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
        self.popen = popen
        self.port = port
        self.log_path = log_path

    @property
    def url(self) -> str:
        return f"http://{_HOST}:{self.port}"

    def exited(self) -> int | None:
        return self.popen.poll()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it is still there after a few seconds; always reaped."""
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        self.popen.wait()


def serves_model(url: str, model: str, timeout: float = 1.0) -> bool | None:
    """Whether the server at `url` lists `model` in /v1/models; None if nothing answers there yet."""
    try:
        with urllib.request.urlopen(url + "/v1/models", timeout=timeout) as resp:
            listed = json.loads(resp.read())
    except (OSError, ValueError):
        return None
    data = listed.get("data") if isinstance(listed, dict) else None
    return isinstance(data, list) and any(isinstance(m, dict) and m.get("id") == model for m in data)


def start_sim(port: int | None, avoid: frozenset[int], log_path: Path) -> SimProcess:
    """Start `gateway sim` on `port` (or a free one) and return once it is proven to answer there."""
    for _ in range(_ATTEMPTS):
        chosen = pick_free_port(_HOST, port, DEFAULT_SIM_PORT, "--sim-port", avoid)
        nonce = "demo-" + secrets.token_hex(8)
        sim: SimProcess | None = None
        try:
            with _stop_signals_held():
                sim = _spawn(chosen, nonce, log_path)
            outcome = _wait_until_ours(sim, nonce)
        except BaseException:  # Ctrl-C while it starts: the caller has no handle on it yet
            if sim is not None:
                with _stop_signals_held():
                    sim.stop()
            raise
        if outcome == "ours":
            return sim
        sim.stop()
        if outcome == "failed":
            break
        if port is not None:
            raise PortError(
                f"port {port} on {_HOST} is in use by another process; pick another with --sim-port "
                "(or leave --sim-port out and the demo picks a free one)"
            )
        avoid |= {chosen}
    raise SimError(f"the simulator did not start; its log, {log_path}, ends with:\n{_tail(log_path)}")


def _spawn(port: int, nonce: str, log_path: Path) -> SimProcess:
    args = [sys.executable, "-m", "gateway", "sim", "--host", _HOST, "--port", str(port)]
    args += ["--max-concurrency", str(SIM_CONCURRENCY), "--model", "sim-model", "--model", nonce]
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_in_child
        )
    return SimProcess(popen, port, log_path)


def _wait_until_ours(sim: SimProcess, nonce: str) -> Literal["ours", "taken", "failed"]:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        ours = serves_model(sim.url, nonce)
        if ours:
            return "ours"
        if ours is False:
            return "taken"  # another server answers on the port our child was to bind
        if sim.exited() is not None:
            return "taken" if _in_use(sim.port) else "failed"
        time.sleep(0.05)
    return "failed"


def _in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((_HOST, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


@contextlib.contextmanager
def _stop_signals_held() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM back (they arrive when this ends): a Ctrl-C inside `Popen` would leave a
    child that nobody has a handle on, and one inside `stop` a child half stopped."""
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)


def _in_child() -> None:
    """In the child, before exec: take the stop signals again (the mask is inherited), and on Linux ask
    for SIGTERM when the demo dies, even by SIGKILL."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    if sys.platform == "linux":
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
