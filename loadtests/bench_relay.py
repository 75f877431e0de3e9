"""What the stream relay costs per event, for each stream format it knows.

    .venv/bin/python -m loadtests.bench_relay                # --tokens 200 --streams 200 --repeat 5

Streams shaped as the simulator (and vLLM) writes them go through `Relay.run_direct`, the path the
gateway's own server takes: the backend's reads are handed to the relay's sink one by one, and its output
goes to a client writer that accepts everything. Only the time inside the sink is counted (the relay's
parsing, metering, model-name swap and write), as CPU time per relayed event, best of `--repeat` runs:

- chat, one event per read (tokens paced apart, as they arrive from a real backend);
- chat, four events per read (a backend that got ahead of the gateway);
- responses, one event per read.

The model-name swap is on, as for a model whose upstream name differs. Figures go to docs/BENCHMARKS.md by
hand; nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson

from gateway.sim import shapes
from gateway.sim.engine import Usage
from gateway.upstream import Relay

UPSTREAM, PUBLIC = "sim-model", "chat-model"
SWAP = (b'"model":' + orjson.dumps(UPSTREAM), b'"model":' + orjson.dumps(PUBLIC))


def chat_events(tokens: int) -> list[bytes]:
    rid, usage = "chatcmpl-bench", Usage(20, 0, tokens)
    chunks = [shapes.chat_chunk(rid, 0, UPSTREAM, {"role": "assistant", "content": ""}, None, True)]
    for i in range(tokens):
        finish = "length" if i == tokens - 1 else None
        chunks.append(shapes.chat_chunk(rid, 0, UPSTREAM, {"content": shapes.token_text(i)}, finish, True))
    chunks.append(shapes.usage_chunk(rid, 0, UPSTREAM, "chat.completion.chunk", usage))
    return [b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks] + [b"data: [DONE]\n\n"]


def responses_events(tokens: int) -> list[bytes]:
    rid, item, usage, body = "resp_bench", "msg_bench", Usage(20, 0, tokens), {"max_output_tokens": tokens}
    numbers = iter(range(10**9))

    def event(kind: str, fields: dict[str, Any]) -> bytes:
        data = {**fields, "sequence_number": next(numbers), "type": kind}
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"

    started = shapes.response(rid, 0, UPSTREAM, body, status="in_progress", output=[], usage=None)
    at = {"content_index": 0, "item_id": item, "output_index": 0}
    text = shapes.output_text(tokens)
    return [
        event("response.created", {"response": started}),
        event("response.in_progress", {"response": started}),
        event("response.output_item.added", {"item": shapes.response_message(item, None, "in_progress")}),
        event("response.content_part.added", {**at, "part": shapes.output_text_part("")}),
        *(
            event("response.output_text.delta", {**at, "delta": shapes.token_text(i), "logprobs": []})
            for i in range(tokens)
        ),
        event("response.output_text.done", {**at, "logprobs": [], "text": text}),
        event("response.content_part.done", {**at, "part": shapes.output_text_part(text)}),
        event("response.output_item.done", {"item": shapes.response_message(item, text, "completed")}),
        event("response.completed", {"response": shapes.finished_response(rid, 0, UPSTREAM, usage, body, "length")}),
    ]


class _Recorded:
    """A backend response in push mode that replays recorded reads into the relay's sink, timing the sink."""

    def __init__(self, reads: list[bytes]) -> None:
        self.reads = reads
        self.spent_ns = 0
        self._sink: Callable[[bytes], bool] | None = None

    def stream_to(self, sink: Callable[[bytes], bool]) -> None:
        self._sink = sink

    def resume_reading(self) -> None:
        pass

    async def wait_end(self) -> None:
        sink = self._sink
        assert sink is not None
        start = time.process_time_ns()
        for read in self.reads:
            sink(read)
        self.spent_ns += time.process_time_ns() - start


class _Client:
    def write_body(self, data: bytes) -> bool:
        return True

    def when_writable(self, callback: Callable[[], None]) -> None:
        pass

    def on_gone(self, callback: Callable[[], None] | None) -> None:
        pass


async def _discard(message: Any) -> None:
    pass


def ns_per_event(endpoint: str, events: list[bytes], per_read: int, streams: int, repeat: int) -> float:
    reads = [b"".join(events[i : i + per_read]) for i in range(0, len(events), per_read)]
    loop = asyncio.new_event_loop()
    best = float("inf")
    try:
        for _ in range(repeat):
            spent = 0
            for _ in range(streams):
                relay = Relay(
                    _discard, endpoint=endpoint, client_wants_usage=False, model_from=SWAP[0], model_to=SWAP[1]
                )
                resp = _Recorded(reads)
                loop.run_until_complete(relay.run_direct(resp, _Client(), time.perf_counter()))  # type: ignore[arg-type]
                assert relay.outcome.done and relay.outcome.usage_seen and not relay.outcome.failed
                spent += resp.spent_ns
            best = min(best, spent / (streams * len(events)))
    finally:
        loop.close()
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    chat, responses = chat_events(args.tokens), responses_events(args.tokens)
    cases = [
        ("chat, 1 event per read", "chat", chat, 1),
        ("chat, 4 events per read", "chat", chat, 4),
        ("responses, 1 event per read", "responses", responses, 1),
    ]
    print(f"{args.tokens} tokens a stream, {args.streams} streams, best of {args.repeat}: CPU per relayed event")
    for label, endpoint, events, per_read in cases:
        print(f"  {label:<30} {ns_per_event(endpoint, events, per_read, args.streams, args.repeat):8.0f} ns")


if __name__ == "__main__":
    main()
