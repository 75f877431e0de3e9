"""Prompt token estimates for admission: the tpm reservation and the fair queue's VTC charge.

Only the text a model reads is counted (message contents, tool calls and definitions, prompts, inputs),
not the JSON around it, plus a few tokens per chat message for the template's role markers. The estimate
is corrected with the backend's real usage when the request finishes, so it needs to be cheap and close,
not exact: an overestimate holds tokens for the length of a request, an underestimate becomes debt.

Two counters (`limits.tokenizer`):

- `bytes`: UTF-8 bytes / 4 (the usual English average; about 1.2x high for prose and code and 0.7x for
  CJK against cl100k_base, measured in loadtests/bench_tokens.py). Costs next to nothing and loads nothing.
- `tiktoken`: OpenAI's cl100k_base BPE, from the copy shipped inside the litellm package (the `providers`
  extra), hash-checked, never downloaded. Exact up to `EXACT_MAX_CHARS` (a third of that for non-ASCII
  text); longer texts are sampled (their head and tail are tokenised and the tokens-per-byte ratio scales
  to the whole), which bounds the cost at about 40-60 us whatever the size.

`auto` (the default) picks `tiktoken` when a `kind: litellm` backend is configured (litellm loads that same
encoding anyway, and hosted providers bill per token) and `bytes` otherwise, so a vLLM-only gateway keeps
its start-up time and memory (tiktoken's tables cost about 40 MB of RSS). Measured per request (one
core): see docs/BENCHMARKS.md, "Token estimates".
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Protocol

import orjson

from gateway.config import Settings
from gateway.upstream.providers import cl100k_file

__all__ = [
    "EXACT_MAX_CHARS",
    "ByteCounter",
    "TiktokenCounter",
    "TokenCounter",
    "counter_for",
    "load_cl100k",
    "prompt_text",
    "prompt_tokens",
]

#: Texts up to this many characters are tokenised exactly (about 30 us with cl100k_base).
EXACT_MAX_CHARS = 1024
#: Longer ones: this many characters from each end are tokenised, and the ratio scales to the whole.
SAMPLE_CHARS = 512
# Role markers and separators a chat template adds around each message (OpenAI counts 3-4, Llama 3's 4-5).
_PER_MESSAGE = 4
# An image part of a message; providers charge by size, which the gateway does not look at.
_PER_IMAGE = 85


class TokenCounter(Protocol):
    name: str

    def count(self, text: str) -> int: ...


class ByteCounter:
    """UTF-8 bytes / 4: no tables, about a microsecond for 4 KB."""

    name = "bytes"

    def count(self, text: str) -> int:
        size = len(text) if text.isascii() else len(text.encode())
        return (size + 3) // 4


class TiktokenCounter:
    """cl100k_base, exact for short texts, sampled beyond `exact_max_chars`."""

    name = "tiktoken"

    def __init__(
        self,
        encode: Callable[[str], list[int]],
        *,
        exact_max_chars: int = EXACT_MAX_CHARS,
        sample_chars: int = SAMPLE_CHARS,
    ) -> None:
        self._encode = encode
        self._exact_max = max(exact_max_chars, 2 * sample_chars)
        self._sample = sample_chars

    def count(self, text: str) -> int:
        ascii_only = text.isascii()
        # Non-ASCII text (CJK: three bytes and about one token per character) costs about three times as
        # much per character to tokenise: a third of the characters keeps the cost bound the same.
        exact_max, sample = (self._exact_max, self._sample) if ascii_only else (self._exact_max // 3, self._sample // 3)
        if len(text) <= exact_max:
            return len(self._encode(text))
        head, tail = text[:sample], text[-sample:]
        tokens = len(self._encode(head)) + len(self._encode(tail))
        if ascii_only:
            return round(tokens * len(text) / (2 * sample))
        sampled = len(head.encode()) + len(tail.encode())
        return round(tokens * len(text.encode()) / sampled)


def counter_for(settings: Settings) -> TokenCounter:
    """The counter `limits.tokenizer` asks for (`auto`: tiktoken iff a litellm backend is configured).

    Loading tiktoken reads a 1.7 MB file and builds its tables (about 0.1 s): call it at start-up.
    """
    choice = settings.limits.tokenizer
    if choice == "auto":
        choice = "tiktoken" if any(b.kind == "litellm" for b in settings.backends) else "bytes"
    if choice == "bytes":
        return ByteCounter()
    return TiktokenCounter(load_cl100k().encode_ordinary)


def load_cl100k() -> Any:
    """tiktoken's cl100k_base `Encoding`, from the hash-checked copy in the litellm package.

    Never call `tiktoken.get_encoding` without this: with no local copy in its cache directory, tiktoken
    downloads the file.
    """
    path = cl100k_file()
    if path is None:
        raise RuntimeError(
            "limits.tokenizer 'tiktoken' needs cl100k_base as shipped in the litellm package: "
            "install the gateway's `providers` extra (or set limits.tokenizer: bytes)"
        )
    # tiktoken finds the file under its cache name in this directory (the hash was checked above), so it
    # never downloads; litellm points tiktoken at the same directory, and both share one loaded encoding.
    os.environ["TIKTOKEN_CACHE_DIR"] = str(path.parent)
    import tiktoken

    return tiktoken.get_encoding("cl100k_base")


def prompt_tokens(endpoint: str, body: dict[str, Any], counter: TokenCounter) -> int:
    """The estimated prompt tokens of a parsed request body (at least 1)."""
    texts, extra = prompt_text(endpoint, body)
    return max(1, counter.count("\n".join(texts)) + extra)


def prompt_text(endpoint: str, body: dict[str, Any]) -> tuple[list[str], int]:
    """The texts a model reads from the body, and the tokens known without counting (template markers,
    images, prompts given as token ids)."""
    texts: list[str] = []
    extra = 0
    if endpoint == "chat":
        for message in body.get("messages") or ():
            if not isinstance(message, dict):
                continue
            extra += _PER_MESSAGE + _content(message.get("content"), texts)
            if isinstance(message.get("name"), str):
                texts.append(message["name"])
            for call in message.get("tool_calls") or ():
                function = call.get("function") if isinstance(call, dict) else None
                if isinstance(function, dict):
                    texts.extend(v for v in (function.get("name"), function.get("arguments")) if isinstance(v, str))
        if body.get("tools"):
            # Tool definitions are rendered into the prompt; their JSON is close to what the model reads.
            texts.append(orjson.dumps(body["tools"]).decode())
    elif endpoint == "responses":
        if isinstance(body.get("instructions"), str):
            texts.append(body["instructions"])
        items = body.get("input")
        if isinstance(items, str):
            texts.append(items)
        elif isinstance(items, list):
            for item in items:
                if isinstance(item, dict):
                    extra += _PER_MESSAGE + _content(item.get("content", item.get("output")), texts)
    else:
        extra += _prompts(body.get("prompt" if endpoint == "completions" else "input"), texts)
    return texts, extra


def _content(content: object, texts: list[str]) -> int:
    """Append a message content's text; return the tokens of its images."""
    if isinstance(content, str):
        texts.append(content)
        return 0
    images = 0
    if isinstance(content, list):
        for part in content:
            if not isinstance(part, dict):
                continue
            text = part.get("text")
            if isinstance(text, str):
                texts.append(text)
            elif part.get("type") in ("image_url", "input_image", "image"):
                images += _PER_IMAGE
    return images


def _prompts(value: object, texts: list[str]) -> int:
    """A prompt or an embeddings input: a string, strings, token ids, or lists of token ids."""
    if isinstance(value, str):
        texts.append(value)
        return 0
    if not isinstance(value, list):
        return 0
    ids = 0
    for item in value:
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, list):
            ids += len(item)
        elif isinstance(item, int):
            ids += 1
    return ids
