"""A light streaming load: N concurrent SSE streams, each chunk's one-way delay from the simulator's send.

The simulator, started with `--stamp-chunks`, writes its send time (`time.monotonic_ns()`, one clock for
every process of the machine) into every chunk. This client reads the stamps off the raw bytes (no JSON, no
HTTP library: an asyncio protocol on uvloop, a few microseconds per chunk) and records `arrival - sent` for
each. Run straight against the simulator and then through a gateway with the same load, the difference is
what the gateway adds to every chunk: a measure that does not depend on the simulator's timer jitter, and
far less on the client's own load than gaps between chunks would. A stream's first chunk is reported
apart (it is part of the time to first token, and carries the start-up of a burst of streams); every
later chunk counts for the inter-chunk latency.

Several client processes share the streams (`processes`), so that one Python process's event loop is not
what is measured. Usage from the suite: `run(url, key, streams=2000, tokens=20, processes=3, cpu=0)`.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import re
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

_STAMP = re.compile(rb'"x_sim_sent_ns":(\d+)')
_DONE = b"data: [DONE]"


@dataclass
class _Result:
    # (sent at, ns; delay, us) of every chunk after each stream's first: the inter-chunk latency
    delays_us: list[tuple[int, int]]
    # the same for each stream's first chunk (its time to first token, from the simulator's side)
    first_us: list[tuple[int, int]]
    complete: int
    failed: int
    errors: dict[str, int]


class _Stream(asyncio.Protocol):
    def __init__(
        self,
        request: bytes,
        tokens: int,
        delays: list[tuple[int, int]],
        first: list[tuple[int, int]],
        done: asyncio.Future[str],
    ) -> None:
        self._request = request
        self._tokens = tokens
        self._delays = delays
        self._first = first
        self._done = done
        self._tail = b""
        self._chunks = 0
        self._status_checked = False
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic_ns()
        if not self._status_checked:
            self._status_checked = True
            if not data.startswith(b"HTTP/1.1 200"):
                self._finish("status " + data[9:12].decode("latin-1"))
                return
        buf = self._tail + data
        end = 0
        for match in _STAMP.finditer(buf):
            if match.end() == len(buf):
                break  # the number may go on in the next read
            sent = int(match.group(1))
            (self._delays if self._chunks else self._first).append((sent, (now - sent) // 1000))
            self._chunks += 1
            end = match.end()
        # Keep a little of the end, after the last stamp counted: a stamp or [DONE] may be cut in two.
        self._tail = buf[max(end, len(buf) - 40) :]
        if _DONE in buf:
            self._finish("ok" if self._chunks >= self._tokens else f"short ({self._chunks} chunks)")

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish("closed early" if not self._done.done() else "")

    def _finish(self, outcome: str) -> None:
        if not self._done.done():
            self._done.set_result(outcome)
        if self._transport is not None:
            self._transport.close()


async def _streams(
    url: str, key: str, streams: int, tokens: int, model: str, start_at: float, ramp_s: float
) -> _Result:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    body = json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": tokens, "stream": True}
    ).encode()
    request = (
        f"POST {parts.path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {key}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
    loop = asyncio.get_running_loop()
    delays: list[tuple[int, int]] = []
    first: list[tuple[int, int]] = []
    # Every process starts at the same instant; its streams open spread evenly over `ramp_s`.
    await asyncio.sleep(max(0.0, start_at - time.time()))

    async def one(i: int) -> str:
        if ramp_s:
            await asyncio.sleep(ramp_s * i / streams)
        done: asyncio.Future[str] = loop.create_future()
        try:
            await loop.create_connection(lambda: _Stream(request, tokens, delays, first, done), host, port)
        except OSError as exc:
            return type(exc).__name__
        try:
            return await asyncio.wait_for(done, 300)
        except TimeoutError:
            return "timeout"

    outcomes = await asyncio.gather(*(one(i) for i in range(streams)))
    errors: dict[str, int] = {}
    for outcome in outcomes:
        if outcome != "ok":
            errors[outcome] = errors.get(outcome, 0) + 1
    complete = outcomes.count("ok")
    return _Result(delays, first, complete, streams - complete, errors)


def _worker(args: tuple[str, str, int, int, str, float, float, int | None]) -> _Result:
    url, key, streams, tokens, model, start_at, ramp_s, cpu = args
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    try:
        import uvloop

        return uvloop.run(_streams(url, key, streams, tokens, model, start_at, ramp_s))
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(_streams(url, key, streams, tokens, model, start_at, ramp_s))


def percentile(sorted_values: list[int], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return float(sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q))])


def run(
    url: str,
    key: str,
    *,
    streams: int,
    tokens: int = 20,
    processes: int = 3,
    cpu: int | None = None,
    model: str = "bench-model",
    ramp_s: float = 0.0,
) -> dict[str, Any]:
    """Open `streams` streams over `processes` client processes (all at once, or spread evenly over
    `ramp_s`); the chunk delays, summarised: inter-chunk (every chunk after a stream's first) and first."""
    share = [streams // processes + (1 if i < streams % processes else 0) for i in range(processes)]
    start_at = time.time() + 0.5
    started = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(processes) as pool:
        parts = pool.map(_worker, [(url, key, n, tokens, model, start_at, ramp_s, cpu) for n in share if n])
    elapsed = time.perf_counter() - started - 0.5
    all_delays = [d for part in parts for d in part.delays_us]
    first_chunks = [d for part in parts for d in part.first_us]
    delays = sorted(d for _, d in all_delays)
    first = sorted(d for _, d in first_chunks)
    # Steady state: chunks sent once every stream had started (its first chunk sent), so the opening burst's
    # admissions are over and all N streams run at once.
    opened = max((sent for sent, _ in first_chunks), default=0)
    steady = sorted(d for sent, d in all_delays if sent > opened)
    errors: dict[str, int] = {}
    for part in parts:
        for name, count in part.errors.items():
            errors[name] = errors.get(name, 0) + count
    return {
        "streams": streams,
        "tokens": tokens,
        "complete": sum(p.complete for p in parts),
        "errors": errors,
        "ramp_s": ramp_s,
        "chunks": len(delays) + len(first),
        "elapsed_s": round(elapsed, 2),
        "delay_p50_ms": round(percentile(delays, 0.50) / 1000, 3),
        "delay_p90_ms": round(percentile(delays, 0.90) / 1000, 3),
        "delay_p99_ms": round(percentile(delays, 0.99) / 1000, 3),
        "delay_max_ms": round((delays[-1] if delays else float("nan")) / 1000, 3),
        "first_p50_ms": round(percentile(first, 0.50) / 1000, 3),
        "first_p99_ms": round(percentile(first, 0.99) / 1000, 3),
        "steady_chunks": len(steady),
        "steady_p50_ms": round(percentile(steady, 0.50) / 1000, 3),
        "steady_p99_ms": round(percentile(steady, 0.99) / 1000, 3),
    }
