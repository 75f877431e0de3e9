"""The prefix cache: fixed-size token blocks with chained hashes, LRU eviction, and vLLM's hit counting.

As in vLLM's v1 engine, block i's hash covers block i-1's hash, the block's tokens and, for the first
block only, the request's `cache_salt`. Two prompts therefore share cached blocks only for a common
prefix computed under the same salt, which is exactly the property a gateway relies on to keep tenants
apart. Tokens are the simulator's words; a word stands for its token id (the mapping is injective).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

__all__ = ["PrefixCache"]

# The parent of the first block, so a prompt's first block never collides with a later block.
_ROOT_HASH = hashlib.sha256(b"gateway-sim:root").digest()


class PrefixCache:
    """An LRU set of block hashes plus the two counters vLLM exports (queried and hit tokens)."""

    def __init__(self, block_size: int, capacity: int) -> None:
        self.block_size = block_size
        self.capacity = capacity
        self._blocks: OrderedDict[bytes, None] = OrderedDict()
        self.queries = 0
        self.hits = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def block_hashes(self, tokens: Sequence[str], salt: str | None) -> list[bytes]:
        """Chained hashes of the prompt's full blocks (a trailing partial block is never cached)."""
        size = self.block_size
        hashes: list[bytes] = []
        parent = _ROOT_HASH
        for start in range(0, len(tokens) - size + 1, size):
            h = hashlib.sha256(parent)
            if start == 0 and salt is not None:
                # Length-prefixed so that no salt can be confused with the start of the token text.
                encoded = salt.encode()
                h.update(len(encoded).to_bytes(4, "big"))
                h.update(encoded)
            # Words hold no whitespace, so joining with a space keeps distinct blocks distinct.
            h.update(" ".join(tokens[start : start + size]).encode())
            parent = h.digest()
            hashes.append(parent)
        return hashes

    def lookup(self, hashes: Sequence[bytes], prompt_tokens: int) -> int:
        """Count the cached prefix of a prompt, in tokens, and record the query.

        vLLM always recomputes at least the prompt's last token (it needs its logits), so a prompt that
        is entirely cached reports the largest whole number of blocks strictly shorter than itself.
        """
        usable = min(len(hashes), max(prompt_tokens - 1, 0) // self.block_size)
        hit = 0
        blocks = self._blocks
        while hit < usable and hashes[hit] in blocks:
            blocks.move_to_end(hashes[hit])
            hit += 1
        cached = hit * self.block_size
        self.queries += prompt_tokens
        self.hits += cached
        return cached

    def insert(self, hashes: Sequence[bytes]) -> None:
        """Keep a prefilled prompt's blocks, most recently used last, evicting beyond capacity."""
        if self.capacity == 0:
            return
        blocks = self._blocks
        for h in hashes:
            if h in blocks:
                blocks.move_to_end(h)
            else:
                blocks[h] = None
        while len(blocks) > self.capacity:
            blocks.popitem(last=False)

    def clear(self) -> None:
        self._blocks.clear()
        self.queries = 0
        self.hits = 0
