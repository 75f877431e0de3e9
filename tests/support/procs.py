"""Real processes on loopback for the tests: free ports, start, wait until healthy, stop or kill.

Every server a test talks to is a real process listening on 127.0.0.1 (never an in-process mock), so a
test can also SIGKILL it to cause the real fault.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 15.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Poll `url` until it answers 2xx; fail early if `proc` died."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:
                if 200 <= resp.status < 300:
                    return
        except (urllib.error.URLError, ConnectionError, OSError) as exc:
            last = exc
        time.sleep(0.02)
    raise TimeoutError(f"{url} not ready after {timeout}s: {last}")


@dataclass
class Proc:
    """A child process plus where its output goes (kept in a file so a failing test can show it)."""

    args: Sequence[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it open
        env = {**os.environ, **self.env}
        # A group of its own: a gateway with --workers has children, and a kill must reach them too.
        self.popen = subprocess.Popen(
            list(self.args), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT), start_new_session=True
        )
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def signal(self, sig: int) -> None:
        assert self.popen is not None
        self.popen.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.popen is None or self.popen.poll() is not None:
            return None if self.popen is None else self.popen.returncode
        self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self._kill_group()
            return self.popen.wait(timeout)
        finally:
            self._kill_group()  # whatever it left behind (workers of a gateway that failed to stop)

    def kill(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self._kill_group()
            self.popen.wait(10)

    def _kill_group(self) -> None:
        assert self.popen is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


def python_cmd(*args: str) -> list[str]:
    """Run the project's console entry point with the interpreter running the tests."""
    return [sys.executable, "-m", "gateway", *args]
