"""A real Prometheus server for the tests (Debian's `prometheus`), on a free loopback port.

It scrapes the given targets every second, evaluates the given rule files every second, keeps its TSDB in
the test's directory, and answers PromQL through its HTTP API, so dashboards and rules are checked
against the real query engine rather than a parser of our own.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.support.procs import Proc, free_port

__all__ = ["PrometheusServer", "QueryError", "promtool"]


class QueryError(Exception):
    """Prometheus refused a query (a parse or evaluation error); the message is Prometheus' own."""


def promtool() -> str:
    binary = shutil.which("promtool")
    if binary is None:
        raise RuntimeError("promtool is not installed (scripts/test installs Debian's prometheus)")
    return binary


class PrometheusServer:
    def __init__(
        self,
        workdir: Path,
        targets: list[str],
        *,
        rule_files: tuple[Path, ...] = (),
        interval: str = "1s",
        bearer_token: str | None = None,
    ) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError("prometheus is not installed (scripts/test installs Debian's prometheus)")
        self.binary = binary
        self.workdir = workdir
        self.targets = targets
        self.rule_files = rule_files
        self.interval = interval
        self.bearer_token = bearer_token
        self.port = free_port()
        self.proc: Proc | None = None
        self.http = httpx.Client(base_url=self.url, timeout=10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> PrometheusServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        job: dict[str, Any] = {
            "job_name": "gateway",
            "scrape_timeout": self.interval,
            "static_configs": [{"targets": self.targets}],
        }
        if self.bearer_token is not None:
            # As deploy/prometheus/prometheus.example.yml does it: the token in a file, not in the config.
            token_file = self.workdir / "metrics-token"
            token_file.write_text(self.bearer_token)
            job["authorization"] = {"type": "Bearer", "credentials_file": str(token_file)}
        config = {
            "global": {"scrape_interval": self.interval, "evaluation_interval": self.interval},
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": [job],
        }
        config_path = self.workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        args = [
            self.binary,
            f"--config.file={config_path}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        self.proc = Proc(args, self.workdir / "prometheus.log").start()
        try:
            self._wait_ready(timeout=20)
        except Exception:
            self.proc.kill()
            raise RuntimeError("prometheus did not become ready:\n" + self.proc.output()) from None
        return self

    def _wait_ready(self, timeout: float) -> None:
        # Not procs.wait_http: /-/ready answers 503 while the TSDB opens, and urllib leaves that socket open.
        assert self.proc is not None and self.proc.popen is not None
        deadline = time.monotonic() + timeout
        while self.proc.popen.poll() is None:
            with contextlib.suppress(httpx.TransportError):
                if self.http.get("/-/ready", timeout=1).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError("prometheus: /-/ready did not answer 200")
            time.sleep(0.05)
        raise RuntimeError(f"prometheus exited with {self.proc.popen.returncode}")

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query now; the result vector (or a one-element list for a scalar)."""
        resp = self.http.get("/api/v1/query", params={"query": expr})
        body = resp.json()
        if body.get("status") != "success":
            raise QueryError(f"{body.get('errorType')}: {body.get('error')}")
        data = body["data"]
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    def label_values(self, label: str, match: str) -> list[str]:
        resp = self.http.get(f"/api/v1/label/{label}/values", params={"match[]": match})
        resp.raise_for_status()
        values: list[str] = resp.json()["data"]
        return values

    def wait_for(self, expr: str, timeout: float = 15.0) -> list[dict[str, Any]]:
        """Poll until `expr` returns a non-empty result (a scrape or a rule evaluation has happened)."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if result or time.monotonic() > deadline:
                return result
            time.sleep(0.2)

    def stop(self) -> None:
        self.http.close()
        if self.proc is not None:
            self.proc.stop()

    def output(self) -> str:
        return "" if self.proc is None else self.proc.output()
