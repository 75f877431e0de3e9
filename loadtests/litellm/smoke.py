"""Show that the pinned LiteLLM Proxy installs, starts offline and serves, and report what it costs.

From the repository root (the gateway's venv runs this script; LiteLLM runs from its own)::

    .venv/bin/python -m loadtests.litellm.smoke [--seconds 5] [--connections 4]

1. ``ensure_venv()`` (loadtests/litellm/setup), then LiteLLM's version.
2. nginx (Debian's) as a fixed-response OpenAI upstream; LiteLLM Proxy in front of it on core 0: start-up
   time (spawn to ready, ready including one real completion) and RSS.
3. wrk on core 1: non-streaming chat completions with the master key, ``--connections`` for ``--seconds``;
   while it runs, every TCP connection of the proxy is sampled with ``ss`` and must be on loopback.
4. The project's simulator (--itl-ms 50) as a streaming upstream, a second proxy in front of it, and 10
   concurrent streams: each must get its chunks one by one (first chunk well before the last) and [DONE].

A check, not a benchmark: it fails when something does not work, never on time. To see every connect()
the processes make, run it under ``strace -f -e trace=connect``; to prove it needs no network at all, run
it in a namespace with only loopback (``unshare -n sh -c 'ip link set lo up && ...'``).
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from loadtests import harness
from loadtests.common import PY, free_port, spawn, stop, wait_http, wrk_post
from loadtests.litellm_proxy import ensure_venv, litellm_version, start_litellm

KEY = "sk-bench-" + "L" * 40
BODY = '{"model":"bench-model","messages":[{"role":"user","content":"Say hello."}],"max_tokens":16}'


def rss_mb(pid: int) -> float:
    return harness.rss_mb([pid])


def cpu_seconds(pid: int) -> float:
    return harness.cpu_seconds([pid])


def remote_peers(pid: int) -> set[str]:
    """Remote addresses of the TCP connections that ``pid`` holds (any state but listening)."""
    out = subprocess.run(["ss", "-tnpH"], capture_output=True, text=True, check=True).stdout
    peers = set()
    for line in out.splitlines():
        if f"pid={pid}," in line:
            peers.add(line.split()[4].rsplit(":", 1)[0])
    return peers


def non_loopback(peers: set[str]) -> set[str]:
    return {p for p in peers if not (p.startswith("127.") or p in ("[::1]", "[::ffff:127.0.0.1]"))}


def started(
    upstream: str, port: int, tmp: Path, name: str, upstream_model: str = "bench-up"
) -> tuple[subprocess.Popen[bytes], float]:
    t0 = time.monotonic()
    proc = start_litellm(upstream, port, cpu=0, workdir=tmp / name, master_key=KEY, upstream_model=upstream_model)
    return proc, time.monotonic() - t0


def nonstreaming(tmp: Path, seconds: int, connections: int) -> None:
    proxy_port = free_port()
    with harness.nginx(1) as (nginx_port, _nginx):
        proxy, startup = started(f"http://127.0.0.1:{nginx_port}", proxy_port, tmp, "nonstream")
        try:
            rss_start = rss_mb(proxy.pid)
            print(f"start-up: {startup:.1f} s to ready (incl. one completion); RSS {rss_start:.0f} MB")
            peers: set[str] = set()
            stop_sampling = threading.Event()

            def sample() -> None:
                while not stop_sampling.wait(0.25):
                    peers.update(remote_peers(proxy.pid))

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            cpu0 = cpu_seconds(proxy.pid)
            res = wrk_post(
                f"http://127.0.0.1:{proxy_port}/v1/chat/completions",
                BODY,
                {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"},
                connections=connections,
                seconds=seconds,
                cpu=1,
            )
            cpu_used = cpu_seconds(proxy.pid) - cpu0
            stop_sampling.set()
            sampler.join()
            print(
                f"wrk -t1 -c{connections} -d{seconds}s: {res.rps:.1f} req/s, p50 {res.p50_ms:.1f} ms, "
                f"p90 {res.p90_ms:.1f} ms, p99 {res.p99_ms:.1f} ms, {res.requests} requests, {res.errors} errors; "
                f"proxy CPU {1000 * cpu_used / max(res.requests, 1):.2f} ms/request; "
                f"RSS after {rss_mb(proxy.pid):.0f} MB"
            )
            print(f"proxy's TCP peers while serving: {sorted(peers)}")
            if res.errors or res.requests == 0:
                raise SystemExit(f"wrk saw {res.errors} errors in {res.requests} requests")
            if bad := non_loopback(peers):
                raise SystemExit(f"the proxy connected beyond loopback: {sorted(bad)}")
        finally:
            stop(proxy)


def one_stream(port: int, result: dict[str, object]) -> None:
    body = json.dumps(
        {
            "model": "bench-model",
            "messages": [{"role": "user", "content": "Stream please."}],
            "max_tokens": 20,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    t0 = time.monotonic()
    conn.request(
        "POST",
        "/v1/chat/completions",
        body,
        {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"},
    )
    resp = conn.getresponse()
    result["status"] = resp.status
    arrivals: list[float] = []
    text = []
    done = False
    while line := resp.readline():
        if not line.startswith(b"data: "):
            continue
        data = line[6:].strip()
        if data == b"[DONE]":
            done = True
            break
        arrivals.append(time.monotonic() - t0)
        for choice in json.loads(data).get("choices", []):
            text.append((choice.get("delta") or {}).get("content") or "")
    conn.close()
    result.update(arrivals=arrivals, done=done, text="".join(text))


def streaming(tmp: Path, streams: int = 10) -> None:
    sim_port, proxy_port = free_port(), free_port()
    sim = spawn(
        [PY, "-m", "gateway", "sim", "--port", str(sim_port), "--itl-ms", "50", "--model", "bench-up"],
        cpu=1,
        log=tmp / "sim.log",
    )
    try:
        wait_http(f"http://127.0.0.1:{sim_port}/v1/models")
        proxy, startup = started(f"http://127.0.0.1:{sim_port}", proxy_port, tmp, "stream")
        print(f"start-up (second proxy, simulator upstream): {startup:.1f} s")
        try:
            results: list[dict[str, object]] = [{} for _ in range(streams)]
            threads = [threading.Thread(target=one_stream, args=(proxy_port, r)) for r in results]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            peers = remote_peers(proxy.pid)
        finally:
            stop(proxy)
    finally:
        stop(sim)
    for i, r in enumerate(results):
        arrivals = r.get("arrivals") or []
        assert isinstance(arrivals, list)
        if r.get("status") != 200 or not r.get("done") or len(arrivals) < 5:
            raise SystemExit(f"stream {i}: status {r.get('status')}, {len(arrivals)} chunks, done={r.get('done')}")
        spread = arrivals[-1] - arrivals[0]
        if spread < 0.5:  # 20 tokens 50 ms apart upstream: chunks that all came at once were buffered
            raise SystemExit(f"stream {i}: all {len(arrivals)} chunks within {spread * 1000:.0f} ms (buffered?)")
    firsts = [r["arrivals"][0] for r in results]  # type: ignore[index]
    lasts = [r["arrivals"][-1] for r in results]  # type: ignore[index]
    gaps = [b - a for r in results for a, b in zip(r["arrivals"][:-1], r["arrivals"][1:], strict=False)]  # type: ignore[index]
    counts = sorted(len(r["arrivals"]) for r in results)  # type: ignore[arg-type]
    print(
        f"{streams} concurrent streams: all 200 with [DONE]; chunks per stream {counts[0]}-{counts[-1]}; "
        f"first chunk median {1000 * statistics.median(firsts):.0f} ms, last {1000 * statistics.median(lasts):.0f} ms; "
        f"median gap {1000 * statistics.median(gaps):.0f} ms; text of stream 0: {results[0]['text']!r}"
    )
    print(f"proxy's TCP peers after streaming: {sorted(peers)}")
    if bad := non_loopback(peers):
        raise SystemExit(f"the proxy connected beyond loopback: {sorted(bad)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=4)
    args = parser.parse_args()
    t0 = time.monotonic()
    ensure_venv()
    print(f"LiteLLM {litellm_version()} (venv ready in {time.monotonic() - t0:.1f} s)")
    tmp = Path(tempfile.mkdtemp(prefix="bench-litellm-"))
    nonstreaming(tmp, args.seconds, args.connections)
    streaming(tmp)
    print(f"ok (logs in {tmp})")


if __name__ == "__main__":
    main()
