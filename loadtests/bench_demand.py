"""What parsing a request and resolving its demand cost on the hot path.

    .venv/bin/python loadtests/bench_demand.py
    PYTHONPATH=/path/to/other/checkout .venv/bin/python loadtests/bench_demand.py   # the same bodies, another build

For a few typical bodies (a short and a 4 KB chat, chat with n, a completions batch of strings and one of
token-id lists, embeddings inputs) it times `gateway.requests.parse_request`, the prompt estimate alone
(`gateway.admission.tokens.prompt_tokens`, what admission computed before demands) and, where the build
has it, `gateway.admission.demand.resolve_demand`, all with the bytes counter: CPU time per call, best of
`--repeat` runs. Figures go to docs/BENCHMARKS.md by hand; nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import time
from collections.abc import Callable
from typing import Any

import orjson

from gateway.admission.tokens import ByteCounter, prompt_tokens
from gateway.config import LimitsConfig, ModelConfig
from gateway.requests import parse_request

PROSE = "The gateway reserves what the engine will really generate, read the way vLLM reads the request. "
BODIES: dict[str, tuple[str, dict[str, Any]]] = {
    "chat 100 B": ("chat", {"model": "m", "messages": [{"role": "user", "content": PROSE}], "max_tokens": 64}),
    "chat 4 KB": (
        "chat",
        {"model": "m", "messages": [{"role": "user", "content": PROSE * 42}], "max_completion_tokens": 64},
    ),
    "chat n=8 no limit": ("chat", {"model": "m", "messages": [{"role": "user", "content": PROSE}], "n": 8}),
    "completions 64 prompts": ("completions", {"model": "m", "prompt": [PROSE] * 64, "max_tokens": 16}),
    "completions 64 x 128 ids": ("completions", {"model": "m", "prompt": [list(range(128))] * 64}),
    "embeddings 256 inputs": ("embeddings", {"model": "m", "input": [PROSE] * 256}),
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    resolve: Callable[..., object] | None = None
    if importlib.util.find_spec("gateway.admission.demand") is not None:
        from gateway.admission.demand import resolve_demand

        model = ModelConfig(name="m", backends=("b",), context_length=32768, max_output_tokens=1024)
        limits, counter = LimitsConfig(), ByteCounter()
        resolve = functools.partial(resolve_demand, model=model, limits=limits, counter=counter)
    print(f"{'body':<26}{'parse_request us':>18}{'prompt_tokens us':>18}{'resolve_demand us':>19}")
    for name, (endpoint, body) in BODIES.items():
        raw = orjson.dumps(body)
        parse_us = cpu_us(functools.partial(parse_request, endpoint, raw, 32768), repeat=args.repeat)
        estimate_us = cpu_us(functools.partial(prompt_tokens, endpoint, body, ByteCounter()), repeat=args.repeat)
        demand_us = "-"
        if resolve is not None:
            request = parse_request(endpoint, raw, 32768)
            demand_us = f"{cpu_us(functools.partial(resolve, request), repeat=args.repeat):.2f}"
        print(f"{name:<26}{parse_us:>18.2f}{estimate_us:>18.2f}{demand_us:>19}")


if __name__ == "__main__":
    main()
