"""What the simulator has seen, for tests: request counts, outcomes, the cache salts, the last request bodies."""

from __future__ import annotations

from collections import Counter, deque
from typing import Any

__all__ = ["Stats"]

LAST_REQUESTS = 50


class Stats:
    """Counters of /v1 requests.

    `active` counts requests in flight (queued, running or hung). Each finished request has one outcome:
    `completed` (answered in full), `failed` (answered with an error status, injected or not),
    `cancelled` (the client went away first) or `dropped` (the simulator cut the connection on purpose).
    `faulted` counts requests that met an injected fault, whatever their outcome.
    """

    def __init__(self) -> None:
        self.active = 0
        self.reset()

    def reset(self) -> None:
        # `active` describes requests still in flight, so a reset leaves it alone.
        self.requests = 0
        self.completed = 0
        self.cancelled = 0
        self.failed = 0
        self.dropped = 0
        self.faulted = 0
        self.by_path: Counter[str] = Counter()
        # Requests per `cache_salt`: which cache scopes an engine of a pool served, and how many of each.
        self.by_salt: Counter[str] = Counter()
        self.last_requests: deque[Any] = deque(maxlen=LAST_REQUESTS)

    def received(self, path: str) -> None:
        self.requests += 1
        self.by_path[path] += 1

    def body(self, body: dict[str, Any]) -> None:
        salt = body.get("cache_salt")
        if isinstance(salt, str) and salt:
            self.by_salt[salt] += 1
        self.last_requests.append(body)

    def snapshot(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "active": self.active,
            "completed": self.completed,
            "cancelled": self.cancelled,
            "failed": self.failed,
            "dropped": self.dropped,
            "faulted": self.faulted,
            "requests_by_path": dict(self.by_path),
            "requests_by_cache_salt": dict(self.by_salt),
            "last_requests": list(self.last_requests),
        }
