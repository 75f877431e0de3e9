"""Start the vLLM simulator as a real process (`python -m gateway sim`) on a free port, and drive its
test endpoints (/sim/stats, /sim/reset, /sim/faults)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from tests.support.procs import Proc, free_port, python_cmd, wait_http

__all__ = ["SimHandle", "running_sim", "start_sim"]


class SimHandle:
    """A running simulator: its base URL (without /v1) and its control endpoints."""

    def __init__(self, proc: Proc, port: int, host: str = "127.0.0.1") -> None:
        self.proc = proc
        self.port = port
        self.host = host
        # One pooled client: a new httpx client per call costs tens of milliseconds (TLS context).
        self.http = httpx.Client(base_url=self.url, timeout=10)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI base URL, for `openai.OpenAI(base_url=...)`."""
        return self.url + "/v1"

    def stats(self) -> dict[str, Any]:
        return self._call("GET", "/sim/stats")

    def reset(self) -> None:
        self._call("POST", "/sim/reset")

    def set_faults(
        self,
        mode: str,
        count: int | None = None,
        after_tokens: int | None = None,
        paths: list[str] | None = None,
    ) -> dict[str, Any]:
        """Make the next `count` requests (all of them if None) fail with `mode`; "none" clears."""
        plan: dict[str, Any] = {"mode": mode}
        if count is not None:
            plan["count"] = count
        if after_tokens is not None:
            plan["after_tokens"] = after_tokens
        if paths is not None:
            plan["paths"] = paths
        return self._call("POST", "/sim/faults", plan)

    def post(self, path: str, body: Any, timeout: float = 10) -> httpx.Response:
        """POST a JSON body to the simulator, whatever the answer."""
        return self.http.post(path, json=body, timeout=timeout)

    def get(self, path: str, timeout: float = 10) -> httpx.Response:
        return self.http.get(path, timeout=timeout)

    def metrics(self) -> str:
        response = self.http.get("/metrics")
        response.raise_for_status()
        return response.text

    def metric(self, name: str) -> float:
        """The value of one vLLM metric (first series of that name)."""
        for line in self.metrics().splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)

    def stop(self) -> int | None:
        self.http.close()
        return self.proc.stop()

    def kill(self) -> None:
        self.http.close()
        self.proc.kill()

    def output(self) -> str:
        return self.proc.output()

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        response = self.http.request(method, path, json=body)
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result


def start_sim(*extra_args: str, log_dir: Path, port: int | None = None, host: str = "127.0.0.1") -> SimHandle:
    """Launch `gateway sim --host <host> --port <free> *extra_args` and wait for /health."""
    port = port or free_port()
    log_path = log_dir / f"sim-{host}-{port}.log"
    proc = Proc(python_cmd("sim", "--host", host, "--port", str(port), *extra_args), log_path)
    proc.start()
    try:
        wait_http(f"http://{host}:{port}/health", timeout=15, proc=proc.popen)
    except Exception:
        proc.kill()
        raise RuntimeError("the simulator did not start:\n" + proc.output()) from None
    return SimHandle(proc, port, host)


@contextmanager
def running_sim(*extra_args: str, log_dir: Path) -> Iterator[SimHandle]:
    sim = start_sim(*extra_args, log_dir=log_dir)
    try:
        yield sim
    finally:
        sim.stop()
