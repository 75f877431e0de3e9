"""Turning a request body into a job: the prompt as tokens, the output length, and vLLM's validation.

Tokenization is deliberately trivial (one token per whitespace-separated word) so that a test can state
a prompt's token count exactly and the simulator spends no time on it. Chat messages are rendered with
a fixed template ("<|role|>" before each message and "<|assistant|>" at the end), one token each.

As in vLLM, chat reads `max_completion_tokens` before `max_tokens`; chat and completions generate `n`
choices per prompt; a completions `prompt` that lists prompts (strings or token-id lists) is a batch, each
prompt read and given its own n choices. Unlike vLLM, a batch runs as one job: its prompts share a running
slot and one output length (with no limit set, the default lowered to the room its longest prompt leaves).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from gateway.sim.config import SimConfig
from gateway.sim.errors import SimError

__all__ = ["EmbeddingJob", "Job", "parse_chat", "parse_completion", "parse_embeddings", "parse_responses"]

Kind = Literal["chat", "completion", "responses", "messages"]

_SALT_MAX_CHARS = 128
_SALT_FORBIDDEN = ("/", "@", "\\", "\x00")


@dataclass(frozen=True, slots=True)
class Job:
    """One generation request, as the engine needs it."""

    kind: Kind
    model: str
    tokens: list[str]
    salt: str | None
    max_tokens: int
    finish_reason: str
    stream: bool
    include_usage: bool
    n: int = 1
    """Choices generated per prompt, each of `max_tokens`."""
    batch: tuple[list[str], ...] = ()
    """The prompts after the first of a completions batch."""

    @property
    def prompts(self) -> tuple[list[str], ...]:
        return (self.tokens, *self.batch)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(tokens) for tokens in self.prompts)

    @property
    def choices(self) -> int:
        return (1 + len(self.batch)) * self.n


@dataclass(frozen=True, slots=True)
class EmbeddingJob:
    model: str
    inputs: list[str]
    """Each input's text (token-id inputs are rendered as their ids)."""
    token_counts: list[int]
    encoding_format: str


def parse_chat(body: dict[str, Any], config: SimConfig) -> Job:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise SimError(400, "'messages' must be a non-empty list", "messages")
    parts: list[str] = []
    for message in messages:
        if not isinstance(message, dict):
            raise SimError(400, "each message must be an object", "messages")
        parts.append(_render_message(message.get("role"), message.get("content")))
    parts.append("<|assistant|>\n")
    field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    return _job("chat", body, config, "".join(parts).split(), field)


def parse_completion(body: dict[str, Any], config: SimConfig) -> Job:
    prompt = body.get("prompt")
    prompts: list[Any]
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt)):
        prompts = [prompt]
    elif (
        isinstance(prompt, list)
        and prompt
        and (
            all(isinstance(p, str) for p in prompt)
            or all(isinstance(p, list) and p and all(_is_int(t) for t in p) for p in prompt)
        )
    ):
        prompts = prompt
    else:
        raise SimError(
            400, "'prompt' must be a string, a list of token ids, or a list of strings or of token-id lists", "prompt"
        )
    token_lists = [p.split() if isinstance(p, str) else [str(t) for t in p] for p in prompts]
    if not all(token_lists):
        raise SimError(400, "the prompt must not be empty", "prompt")
    first, *rest = token_lists
    return _job("completion", body, config, first, "max_tokens", tuple(rest))


def parse_responses(body: dict[str, Any], config: SimConfig) -> Job:
    parts: list[str] = []
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        parts.append(_render_message("system", instructions))
    items = body.get("input")
    if isinstance(items, str):
        parts.append(_render_message("user", items))
    elif isinstance(items, list) and items:
        for item in items:
            if not isinstance(item, dict):
                raise SimError(400, "each input item must be an object", "input")
            content = item.get("content", item.get("output", ""))
            parts.append(_render_message(item.get("role", item.get("type")), content))
    else:
        raise SimError(400, "'input' must be a string or a non-empty list of items", "input")
    parts.append("<|assistant|>\n")
    return _job("responses", body, config, "".join(parts).split(), "max_output_tokens")


def parse_embeddings(body: dict[str, Any], config: SimConfig) -> EmbeddingJob:
    check_salt(body, config)
    raw = body.get("input")
    items: list[Any]
    if isinstance(raw, str) or (isinstance(raw, list) and raw and all(_is_int(t) for t in raw)):
        items = [raw]
    elif isinstance(raw, list) and raw:
        items = raw
    else:
        raise SimError(400, "'input' must be a string, a list of strings or a list of token-id lists", "input")
    inputs: list[str] = []
    counts: list[int] = []
    for item in items:
        if isinstance(item, str):
            inputs.append(item)
            counts.append(len(item.split()))
        elif isinstance(item, list) and item and all(_is_int(t) for t in item):
            inputs.append(" ".join(str(t) for t in item))
            counts.append(len(item))
        else:
            raise SimError(400, "each input must be a string or a non-empty list of token ids", "input")
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise SimError(400, "'encoding_format' must be 'float' or 'base64'", "encoding_format")
    return EmbeddingJob(_model(body, config), inputs, counts, encoding)


def check_salt(body: dict[str, Any], config: SimConfig) -> str | None:
    """Validate `cache_salt` as vLLM >= 0.9 does and return the salt that enters the block hashes."""
    if config.ignore_cache_salt:
        return None
    salt = body.get("cache_salt")
    # vLLM's validator treats an explicit null as absent.
    if salt is None:
        return None
    if not isinstance(salt, str) or not salt:
        raise SimError(400, "Parameter 'cache_salt' must be a non-empty string if provided.", "cache_salt")
    if len(salt) > _SALT_MAX_CHARS:
        raise SimError(400, f"Parameter 'cache_salt' must be at most {_SALT_MAX_CHARS} characters.", "cache_salt")
    if any(ch in salt for ch in _SALT_FORBIDDEN):
        raise SimError(400, "Parameter 'cache_salt' must not contain '/', '@', '\\' or NUL characters.", "cache_salt")
    return salt


def _job(
    kind: Kind,
    body: dict[str, Any],
    config: SimConfig,
    tokens: list[str],
    limit_field: str,
    batch: tuple[list[str], ...] = (),
) -> Job:
    salt = check_salt(body, config)
    limit = _int_field(body, limit_field)
    n = _int_field(body, "n") if kind in ("chat", "completion") else None
    if n is not None and n < 1:
        raise SimError(400, f"n must be at least 1, got {n}.", "n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool | None):
        raise SimError(400, "'stream' must be a boolean", "stream")
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    longest = max(len(p) for p in (tokens, *batch))
    room = config.max_model_len - longest
    if limit is not None and limit < 1:
        raise SimError(400, f"'{limit_field}' must be at least 1", limit_field)
    requested = limit if limit is not None else min(config.max_tokens_default, room)
    if room < 1 or requested > room:
        raise SimError(
            400,
            f"This model's maximum context length is {config.max_model_len} tokens. However, you requested "
            f"{longest + max(requested, 0)} tokens ({longest} in the messages, "
            f"{max(requested, 0)} in the completion). Please reduce the length of the messages or completion.",
        )
    return Job(
        kind=kind,
        model=_model(body, config),
        tokens=tokens,
        salt=salt,
        max_tokens=requested,
        finish_reason="length" if limit is not None else "stop",
        stream=bool(stream),
        include_usage=include_usage,
        n=n or 1,
        batch=batch,
    )


def _render_message(role: Any, content: Any) -> str:
    return f"<|{role if isinstance(role, str) else 'user'}|>\n{_text(content)}\n"


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        # Text parts only: images and audio have no tokens in the simulator.
        return "\n".join(
            part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def _model(body: dict[str, Any], config: SimConfig) -> str:
    model = body.get("model")
    return model if isinstance(model, str) and model else config.models[0]


def _int_field(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value):
        raise SimError(400, f"'{name}' must be an integer", name)
    result: int = value
    return result


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
