"""Prices of hosted models from litellm's bundled price map, read from the package's file, offline.

A model's `price` in the config always wins; this fills in the price of a `kind: litellm` backend whose
model has none, keyed by the backend's `provider_model` ("anthropic/claude-haiku-4-5"). The file
(`model_prices_and_context_window_backup.json`, about 3 MB) is read once, at start-up, and only when such a
backend exists; litellm itself is not imported for it. Prices are USD per token in the file.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import orjson

from gateway.config import Price
from gateway.upstream.providers._offline import litellm_dir

__all__ = ["bundled_prices"]

log = logging.getLogger("gateway.upstream.providers")

_PRICE_MAP = "model_prices_and_context_window_backup.json"


def bundled_prices(provider_models: Iterable[str]) -> dict[str, Price]:
    """The bundled price of each provider model that the map knows (the others are left out)."""
    wanted = set(provider_models)
    root = litellm_dir()
    if not wanted or root is None:
        return {}
    try:
        table = orjson.loads((root / _PRICE_MAP).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        log.warning("litellm's bundled price map is unreadable; hosted models without a price cost 0")
        return {}
    prices: dict[str, Price] = {}
    for name in wanted:
        entry = _lookup(table, name)
        if entry is None:
            log.warning("no bundled price for %s; give its model a price in the config", name)
            continue
        per_in, per_out = entry.get("input_cost_per_token"), entry.get("output_cost_per_token")
        if not isinstance(per_in, int | float) or not isinstance(per_out, int | float):
            continue
        prices[name] = Price(input_per_1k=per_in * 1000, output_per_1k=per_out * 1000, currency="USD")
    return prices


def _lookup(table: object, name: str) -> dict[str, object] | None:
    """litellm's keys are bare ("claude-haiku-4-5") or prefixed ("openrouter/..."); try both ways."""
    if not isinstance(table, dict):
        return None
    candidates = [name]
    provider, sep, bare = name.partition("/")
    if sep:
        candidates.append(bare)
    for key in candidates:
        entry = table.get(key)
        if isinstance(entry, dict) and (not sep or key == name or entry.get("litellm_provider") == provider):
            return entry
    return None
