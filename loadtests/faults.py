"""Faults injected for real, with the billing record counted before and after each one: for every
request that reached a backend there must be exactly one usage event, whatever failed meanwhile.

    .venv/bin/python -m loadtests.faults --doc docs/SECURITY.md --doc docs/BENCHMARKS.md

One redis-server, one simulator and one gateway (Redis quotas; billing to a Redis Stream and a JSONL file)
are started on loopback. Each fault runs as: a batch of ordinary requests, the fault with requests in
flight, a batch after it. The client keeps every answer's x-request-id; the script then counts the events
in both sinks (unique ids, duplicates, missing, unexpected) at the end of each phase. The faults:

- backend answers 500 (the simulator's `error_500`), backend closes the connection, backend hangs (the
  gateway's read timeout fires), backend dies mid-stream (`drop_midstream`), clients walk away mid-stream;
- Redis (quota store and one billing sink) SIGKILLed under load and restarted (events spooled, replayed);
- the gateway SIGTERMed with streams in flight, then started again;
- the gateway SIGKILLed with streams in flight, then started again: what a crash loses is measured too.

The tests assert each of these (tests/test_client_api.py, test_faults.py, test_billing.py); this script
records the figures docs/SECURITY.md and docs/BENCHMARKS.md quote.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis
import yaml

from loadtests.common import PY, ROOT, free_port, stop, wait_http
from loadtests.soak import ADMIN_KEY, spawn

MSG = [{"role": "user", "content": "hello"}]
STREAM = "billing"


@dataclass
class Run:
    workdir: Path
    redis_url: str
    sim_url: str
    redis_proc: subprocess.Popen[bytes]
    port: int = 0
    gateway: subprocess.Popen[bytes] | None = None
    key: str = ""
    # Request ids of answers that reached a backend, in the order they were sent.
    billed: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> dict[str, Any]:
        fast = {"backoff_initial_s": 0.05, "backoff_max_s": 0.3, "timeout_s": 0.5}
        return {
            "listen": {"host": "127.0.0.1", "port": self.port},
            "redis_url": self.redis_url,
            "state_path": str(self.workdir / "state.db"),
            "backends": [{"name": "sim", "kind": "vllm", "url": self.sim_url}],
            "models": [{"name": "m", "backends": ["sim"], "price": {"input_per_1k": 1.0, "output_per_1k": 2.0}}],
            "limits": {"read_timeout_s": 1.0},
            "billing": {
                "sinks": [
                    {"kind": "redis_stream", "name": "redis", "url": self.redis_url, "stream": STREAM, **fast},
                    {"kind": "jsonl", "name": "jsonl", "path": str(self.workdir / "billing.jsonl")},
                ]
            },
            # No health probe may take a fault meant for a request.
            "health_interval_s": 600,
            "shutdown_drain_s": 0.2,
            "log_level": "warning",
        }

    def start_gateway(self) -> None:
        if self.port == 0:
            self.port = free_port()
        path = self.workdir / "gateway.yaml"
        path.write_text(yaml.safe_dump(self.config()))
        env = {"GATEWAY_ADMIN_KEY": ADMIN_KEY, "GATEWAY_SALT_SECRET": "faults-salt-secret-0123456789abcdef"}
        self.gateway = spawn(
            [PY, "-m", "gateway", "serve", "--config", str(path)], env=env, log=self.workdir / "gateway.log"
        )
        wait_http(self.url + "/readyz")

    def sim_faults(self, mode: str, **plan: Any) -> None:
        httpx.post(self.sim_url + "/sim/faults", json={"mode": mode, **plan}).raise_for_status()

    def note(self, resp_id: str | None, status: int = 200) -> None:
        # 429 and the gateway's own 503 (no backend: the circuit breaker ejected it) never reached a backend.
        if resp_id and status not in (429, 503):
            with self.lock:
                self.billed.append(resp_id)

    # --- what the clients do -------------------------------------------------------------------------

    def unary(self, n: int) -> dict[int, int]:
        statuses: dict[int, int] = {}
        with httpx.Client(timeout=30) as http:
            for _ in range(n):
                resp = http.post(
                    self.url + "/v1/chat/completions",
                    headers={"Authorization": f"Bearer {self.key}"},
                    json={"model": "m", "messages": MSG, "max_tokens": 3},
                )
                statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
                self.note(resp.headers.get("x-request-id"), resp.status_code)
        return statuses

    def _stream(self, tokens: int) -> Any:
        """A streamed chat completion (a context manager over the response)."""
        return httpx.stream(
            "POST",
            self.url + "/v1/chat/completions",
            headers={"Authorization": f"Bearer {self.key}"},
            json={"model": "m", "messages": MSG, "max_tokens": tokens, "stream": True},
            timeout=30,
        )

    def streams(self, n: int, *, tokens: int = 5, leave_after: int | None = None) -> int:
        done = 0
        for _ in range(n):
            with self._stream(tokens) as resp:
                self.note(resp.headers.get("x-request-id"), resp.status_code)
                for i, _ in enumerate(resp.iter_lines()):
                    if leave_after is not None and i >= leave_after:
                        break  # the client walks away mid-stream
                done += 1
        return done

    def concurrent_streams(self, n: int, tokens: int, then: Any) -> list[str]:
        """`n` streams at once; `then()` runs once all of them have their first chunk. Returns their ids."""
        started = threading.Barrier(n + 1)
        ids: list[str] = []

        def one() -> None:
            try:
                with self._stream(tokens) as resp:
                    rid = resp.headers.get("x-request-id")
                    if rid:
                        ids.append(rid)
                    lines = resp.iter_lines()
                    next(lines)
                    started.wait(20)
                    for _ in lines:
                        pass
            except (httpx.HTTPError, threading.BrokenBarrierError):
                pass  # the gateway died under it

        threads = [threading.Thread(target=one) for _ in range(n)]
        for t in threads:
            t.start()
        started.wait(20)
        then()
        for t in threads:
            t.join(30)
        for rid in ids:
            self.note(rid)
        return ids

    def wait_backend(self, timeout_s: float = 90.0) -> int:
        """After a backend fault the circuit breaker may have ejected the backend (5 s, doubling): wait until a
        request is served again. Returns how many were refused meanwhile (503, not billed)."""
        refused = 0
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            statuses = self.unary(1)
            if 200 in statuses:
                return refused
            refused += 1
            time.sleep(0.5)
        raise SystemExit("the backend did not come back")

    # --- counting ------------------------------------------------------------------------------------

    def events(self) -> dict[str, list[str]]:
        path = self.workdir / "billing.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        # Matched to the requests by the x-request-id each answer carried (events have ids of their own).
        jsonl = [json.loads(line)["data"]["request_id"] for line in lines]
        try:
            client = redis.Redis.from_url(self.redis_url, socket_timeout=2)
            entries = client.xrange(STREAM)
            stream = [json.loads(fields[b"event"])["data"]["request_id"] for _, fields in entries]
            client.close()
        except redis.RedisError:
            stream = []
        return {"jsonl": jsonl, "redis": stream}

    def count(self, settle_s: float = 8.0) -> dict[str, Any]:
        """Both sinks' events against the requests so far, once both hold as many as expected (or settle_s)."""
        deadline = time.monotonic() + settle_s
        expected = set(self.billed)
        while True:
            events = self.events()
            if all(len(set(v)) >= len(expected) for v in events.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        time.sleep(0.3)  # nothing more may arrive
        events = self.events()
        out: dict[str, Any] = {"requests": len(self.billed), "unique_request_ids": len(expected)}
        for sink, ids in events.items():
            seen = set(ids)
            out[sink] = {
                "events": len(ids),
                "duplicates": len(ids) - len(seen),
                "missing": len(expected - seen),
                "unexpected": len(seen - expected),
            }
        return out


def provision(run: Run) -> None:
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    httpx.post(run.url + "/admin/tenants", json={"id": "faults"}, headers=admin).raise_for_status()
    resp = httpx.post(run.url + "/admin/tenants/faults/keys", json={"name": "f"}, headers=admin)
    resp.raise_for_status()
    run.key = resp.json()["key"]


def start_durable_redis(workdir: Path, port: int) -> subprocess.Popen[bytes]:
    """redis-server whose acknowledged writes survive SIGKILL (AOF, fsync before every reply), as a real
    deployment's billing stream would be."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed")
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes"]
    proc = spawn([*args, "--appendfsync", "always", "--dir", str(workdir)], log=workdir / "redis.log")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if redis.Redis(port=port, socket_timeout=0.2).ping():
                return proc
        except redis.RedisError:
            time.sleep(0.05)
    raise SystemExit("redis-server did not start")


def restart_redis(run: Run) -> None:
    run.redis_proc = start_durable_redis(run.workdir / "redis", int(run.redis_url.rsplit(":", 1)[1].split("/")[0]))


def faults(run: Run, n: int) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []

    def phase(name: str, inject: Any, description: str) -> None:
        run.unary(n)
        before = run.count()
        detail = inject()
        run.unary(n)
        after = run.count()
        results.append({"fault": name, "description": description, "before": before, "after": after, "detail": detail})
        print(json.dumps(results[-1]), flush=True)

    def backend(mode: str, **plan: Any) -> Any:
        def inject() -> Any:
            run.sim_faults(mode, count=n, paths=["/v1/chat/completions"], **plan)
            try:
                if mode == "drop_midstream":
                    detail: dict[str, Any] = {"streams": run.streams(n, tokens=50)}
                else:
                    detail = {"statuses": run.unary(n)}
            finally:
                run.sim_faults("none")
            detail["refused_while_ejected"] = run.wait_backend()
            return detail

        return inject

    phase("backend 500", backend("error_500"), f"{n} requests answered 500 by the backend (502 to the client)")
    phase("backend closes", backend("close_connection"), f"{n} requests whose backend connection is closed")
    phase("backend hangs", backend("hang"), f"{n} requests whose backend never answers (1 s read timeout, 502)")
    phase("backend dies mid-stream", backend("drop_midstream", after_tokens=3), f"{n} streams cut after 3 tokens")
    phase(
        "client leaves mid-stream",
        lambda: {"streams": run.streams(n, tokens=500, leave_after=3)},
        f"{n} streams the client leaves after 3 chunks (billed partial, 499)",
    )

    def billing_counters() -> dict[str, float]:
        out: dict[str, float] = {}
        for line in httpx.get(run.url + "/metrics").text.splitlines():
            if line.startswith("gateway_billing_events_total{") and 'sink="redis"' in line:
                outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
                out[outcome] = float(line.rsplit(" ", 1)[1])
        return out

    def kill_redis() -> Any:
        stop_load = threading.Event()
        statuses: dict[int, int] = {}
        before = billing_counters()

        def load() -> None:
            while not stop_load.is_set():
                for status, count in run.unary(1).items():
                    statuses[status] = statuses.get(status, 0) + count

        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.6)
        os.kill(run.redis_proc.pid, signal.SIGKILL)
        run.redis_proc.wait(5)
        time.sleep(1.0)  # requests go on: quotas fall back to local, events to the spool
        restart_redis(run)
        time.sleep(0.6)
        stop_load.set()
        for t in threads:
            t.join(30)
        time.sleep(1.0)  # the spool's replay
        after = billing_counters()
        delta = {k: after.get(k, 0) - before.get(k, 0) for k in ("emitted", "spooled", "replayed")}
        return {"statuses": statuses, "redis_sink": delta}

    phase("Redis SIGKILLed under load", kill_redis, "Redis (quotas and a billing sink) killed for 1 s under 4 clients")

    def sigterm() -> Any:
        assert run.gateway is not None
        gateway = run.gateway
        ids = run.concurrent_streams(20, 20, lambda: gateway.send_signal(signal.SIGTERM))
        code = gateway.wait(30)
        run.start_gateway()
        return {"in_flight": len(ids), "exit_code": code}

    phase("gateway SIGTERM", sigterm, "SIGTERM with 20 streams in flight, then a new start")

    def sigkill() -> Any:
        assert run.gateway is not None
        gateway = run.gateway
        ids = run.concurrent_streams(20, 200, lambda: gateway.send_signal(signal.SIGKILL))
        gateway.wait(10)
        run.start_gateway()
        return {"in_flight": len(ids)}

    phase("gateway SIGKILL", sigkill, "SIGKILL with 20 streams in flight, then a new start")
    return results


MARK_START = "<!-- faults:start -->"
MARK_END = "<!-- faults:end -->"


def table(results: list[dict[str, Any]]) -> str:
    """The figures as a Markdown table: requests that reached a backend and events in each sink, before the
    fault and after it (and the batch after it)."""
    rows = [
        "| fault | requests before (so far) | events before (stream / file) | requests after"
        " | events after (stream / file) | duplicates |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for f in results:
        b, a = f["before"], f["after"]
        dup = sum(phase[sink]["duplicates"] for phase in (b, a) for sink in ("redis", "jsonl"))
        rows.append(
            f"| {f['fault']}: {f['description']} | {b['requests']} | {b['redis']['events']} / {b['jsonl']['events']}"
            f" | {a['requests']} | {a['redis']['events']} / {a['jsonl']['events']} | {dup} |"
        )
    return "\n".join(rows)


def write_doc(doc: Path, results: list[dict[str, Any]]) -> None:
    """Replace the table between the faults markers of `doc`."""
    text = doc.read_text()
    head, rest = text.split(MARK_START, 1)
    _, tail = rest.split(MARK_END, 1)
    doc.write_text(head + MARK_START + "\n" + table(results) + "\n" + MARK_END + tail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=20, help="requests per batch")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench" / "faults.json")
    parser.add_argument("--doc", type=Path, action="append", default=[], help="a doc whose faults table to update")
    parser.add_argument("--from-json", type=Path, default=None, help="only rewrite the tables from a saved run")
    args = parser.parse_args()
    if args.from_json is not None:
        for doc in args.doc:
            write_doc(doc, json.loads(args.from_json.read_text())["faults"])
        return
    workdir = Path(tempfile.mkdtemp(prefix="faults-"))
    (workdir / "redis").mkdir()
    sim = None
    run = None
    try:
        redis_port = free_port()
        redis_proc = start_durable_redis(workdir / "redis", redis_port)
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        sim_port = free_port()
        sim_args = ["--ttft-ms", "1", "--itl-ms", "5", "--host", "127.0.0.1", "--port", str(sim_port)]
        sim = spawn([PY, "-m", "gateway", "sim", *sim_args], log=workdir / "sim.log")
        wait_http(f"http://127.0.0.1:{sim_port}/health")
        run = Run(workdir, redis_url, f"http://127.0.0.1:{sim_port}", redis_proc)
        run.start_gateway()
        provision(run)
        results = faults(run, args.n)
    finally:
        for proc in (run.gateway if run else None, sim, run.redis_proc if run else None):
            if proc is not None:
                stop(proc)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"requests_per_batch": args.n, "faults": results}, indent=1) + "\n")
    for doc in args.doc:
        write_doc(doc, results)
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
