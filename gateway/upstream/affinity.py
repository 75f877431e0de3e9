"""Prefix affinity within a cache scope: a request's affinity key and its order of preference of endpoints.

A prompt's prefix lives in the prefix cache of the engine that served it last. Requests that share a
prefix should go to that engine; but only within one cache scope, because the engines' caches are salted
per scope (`cache_salt`): a prefix cached for another scope is useless here, and routing by it would leak
that scope's traffic pattern into this one's placement.

So a request's *affinity key* is a hash of its scope's salt, the model and the first `prefix_tokens` of its
prompt text (cut at a `block_tokens` boundary, about 4 characters a token, as the engine's KV blocks cut
it). Endpoints are ranked by rendezvous hashing (highest random weight, Thaler and Ravishankar 1998) of
that key: every gateway replica computes the same order from the same endpoint list.

The ranking is a preference, not the placement. The fair queue (lua/fairshare.lua, `fs_choose`) keeps a
table of key -> endpoint per pool: a new key goes to the first endpoint of its ranking that holds fewer
than an even share of the pool's keys, and stays there while used (until `routing.affinity_ttl_s` without
a request); a request whose endpoint is loaded beyond a factor of the pool's mean spills alone, and its
key stays. Hashing alone spreads keys unevenly (32 keys on 4 endpoints: the fullest usually gets 10 or
more), so engines whose caches hold a quarter of the prefixes would thrash while others idle.

Separate scopes never share a key: their keys are independent hashes. They share only the count of keys
each endpoint holds, which decides where a new key lands and says nothing of which prefixes are where.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

__all__ = ["CHARS_PER_TOKEN", "affinity_key", "prompt_prefix", "rank"]

CHARS_PER_TOKEN = 4


def prompt_prefix(endpoint: str, body: dict[str, Any], chars: int) -> str:
    """The beginning of the text the model reads first, up to `chars` characters (system prompt first)."""
    parts: list[str] = []
    size = 0

    def add(text: object) -> bool:
        nonlocal size
        if isinstance(text, str) and text:
            parts.append(text)
            size += len(text)
        return size >= chars

    if endpoint == "chat":
        for message in body.get("messages") or ():
            if not isinstance(message, dict):
                continue
            content = message.get("content")
            if isinstance(content, list):
                for item in content:
                    if isinstance(item, dict) and add(item.get("text")):
                        break
            elif add(content):
                break
            if size >= chars:
                break
    else:
        field = "prompt" if endpoint == "completions" else "input"
        value = body.get(field)
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, list):  # token ids
            value = ",".join(str(t) for t in value[: chars // CHARS_PER_TOKEN])
        add(value)
    return "\x1e".join(parts)[:chars]


def affinity_key(scope_salt: str, model: str, prefix: str, block_chars: int) -> bytes | None:
    """The key of a request's prefix within its scope, or None when the prompt is shorter than one block."""
    whole = len(prefix) - len(prefix) % block_chars
    if whole == 0:
        return None
    material = "\x1f".join((scope_salt, model, prefix[:whole])).encode("utf-8", "surrogatepass")
    return hashlib.blake2b(material, digest_size=16).digest()


def rank(key: bytes, endpoints: Iterable[str]) -> list[str]:
    """The endpoints in this key's order of preference (rendezvous hashing)."""
    return sorted(endpoints, key=lambda e: hashlib.blake2b(key + e.encode(), digest_size=8).digest(), reverse=True)
