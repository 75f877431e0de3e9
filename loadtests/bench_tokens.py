"""What a prompt token estimate costs on the hot path, and how close it is to cl100k_base.

    .venv/bin/python loadtests/bench_tokens.py            # needs the `providers` extra for cl100k_base
    .venv/bin/python loadtests/bench_tokens.py --repeat 5

For chat bodies of about 100 B, 4 KB and 100 KB of message text (English prose, Python source, Japanese),
it times `gateway.admission.tokens.prompt_tokens` (text extraction included) with each counter, CPU time per call,
best of `--repeat` runs, and compares the estimate with an exact cl100k_base count. It also reports the
one-off cost of loading cl100k_base and of importing litellm (each in a fresh interpreter). Figures go
to docs/BENCHMARKS.md by hand; nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import asyncio.base_events
import inspect
import json
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from gateway.admission.tokens import ByteCounter, TiktokenCounter, TokenCounter, load_cl100k, prompt_tokens
from gateway.upstream.providers import offline_environment

SIZES = {"100 B": 100, "4 KB": 4096, "100 KB": 100_000}
PROSE = (
    "The gateway sits in front of the model servers and gives each tenant its own credentials, its fair share "
    "of scarce GPUs, its own prefix-cache scope, and its own bill. Requests beyond capacity wait in per-tenant "
    "queues; whenever a slot frees, the backlogged tenant with the lowest virtual token counter goes first. "
)
JAPANESE = "ゲートウェイはモデルサーバーの前に立ち、各テナントに独自の認証情報と公平な計算資源を与えます。"


def corpora() -> dict[str, str]:
    code = inspect.getsource(asyncio.base_events)
    return {"prose": PROSE * 400, "code": code * 2, "japanese": JAPANESE * 2000}


def body(text: str, size: int) -> dict[str, Any]:
    """A chat body whose message text is about `size` bytes (a system and a user message)."""
    cut = text.encode()[:size].decode(errors="ignore")
    half = len(cut) // 4
    return {
        "model": "m",
        "messages": [{"role": "system", "content": cut[:half]}, {"role": "user", "content": cut[half:]}],
        "max_tokens": 100,
    }


def cpu_us(fn: Callable[[], object], *, budget_s: float = 0.2, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        n = 0
        start = time.process_time()
        while True:
            fn()
            n += 1
            elapsed = time.process_time() - start
            if elapsed >= budget_s:
                break
        best = min(best, elapsed / n * 1e6)
    return best


def one_off(code: str) -> dict[str, float]:
    """Run `code` in a fresh interpreter with the offline settings; it prints a JSON object."""
    env = {**offline_environment(), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


_MEASURE = """
import json, time
def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS"))
import gateway.app  # what a gateway has loaded before it gets here
before, t = rss_mb(), time.perf_counter()
{action}
print(json.dumps({{"ms": (time.perf_counter() - t) * 1000, "rss_mb": rss_mb() - before}}))
"""
LOAD_CL100K = _MEASURE.format(action="from gateway.admission.tokens import load_cl100k; load_cl100k()")
IMPORT_LITELLM = _MEASURE.format(action="from gateway.upstream.providers import import_litellm; import_litellm()")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    encoding = load_cl100k()
    counters: dict[str, TokenCounter] = {
        "bytes": ByteCounter(),
        "tiktoken": TiktokenCounter(encoding.encode_ordinary),
    }
    exact = TiktokenCounter(encoding.encode_ordinary, exact_max_chars=10**9)
    print("| text | size | counter | CPU us per request | estimate / exact cl100k |")
    print("|---|---|---|--:|--:|")
    for kind, text in corpora().items():
        for label, size in SIZES.items():
            b = body(text, size)
            truth = prompt_tokens("chat", b, exact)
            for name, counter in counters.items():
                us = cpu_us(lambda b=b, counter=counter: prompt_tokens("chat", b, counter), repeat=args.repeat)
                ratio = prompt_tokens("chat", b, counter) / truth
                print(f"| {kind} | {label} | {name} | {us:.1f} | {ratio:.2f} |")
    cl = one_off(LOAD_CL100K)
    lite = one_off(IMPORT_LITELLM)
    print()
    print(f"load cl100k_base (fresh process, after gateway.app): {cl['ms']:.0f} ms, RSS +{cl['rss_mb']:.0f} MB")
    print(f"import litellm offline (same, tokenizer included): {lite['ms']:.0f} ms, RSS +{lite['rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
