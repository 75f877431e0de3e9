"""Injected faults: which upcoming requests fail, and how (set through POST /sim/faults).

Modes:
    none              serve normally
    error_500         answer 500 with vLLM's error body
    error_503         answer 503 with vLLM's error body
    error_429         answer 429 (a provider's rate limit; Anthropic's body on /v1/messages)
    error_529         answer 529 (Anthropic's "overloaded")
    hang              never answer, until the client goes away
    drop_midstream    close the connection after `after_tokens` streamed tokens (non-streaming: after
                      half of the response body)
    close_connection  close the connection without sending a response
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.sim.errors import SimError

__all__ = ["DEFAULT_FAULT_PATHS", "FAULT_MODES", "Fault", "Faults"]

FAULT_MODES = frozenset(
    {"none", "error_429", "error_500", "error_503", "error_529", "hang", "drop_midstream", "close_connection"}
)

# Health checks and model listings keep working unless a test names them, so a gateway's prober does
# not eat a fault meant for the request under test.
DEFAULT_FAULT_PATHS = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/messages"}
)


@dataclass(frozen=True, slots=True)
class Fault:
    mode: str
    after_tokens: int


class Faults:
    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self._fault: Fault | None = None
        self._remaining: int | None = None
        self._paths: frozenset[str] = DEFAULT_FAULT_PATHS

    def configure(self, body: Any) -> None:
        """Replace the fault plan from a /sim/faults request body."""
        if not isinstance(body, dict):
            raise SimError(400, "the fault plan must be a JSON object")
        mode = body.get("mode", "none")
        if mode not in FAULT_MODES:
            raise SimError(400, f"'mode' must be one of {sorted(FAULT_MODES)}", "mode")
        count = _optional_int(body, "count", minimum=0)
        after = _optional_int(body, "after_tokens", minimum=0)
        paths = body.get("paths")
        if paths is not None and not (isinstance(paths, list) and all(isinstance(p, str) for p in paths)):
            raise SimError(400, "'paths' must be a list of request paths", "paths")
        self.clear()
        if mode != "none" and count != 0:
            self._fault = Fault(mode, 1 if after is None else after)
            self._remaining = count
            if paths is not None:
                self._paths = frozenset(paths)

    def take(self, path: str) -> Fault | None:
        """The fault for this request, if any; each use counts against `count`."""
        fault = self._fault
        if fault is None or path not in self._paths:
            return None
        if self._remaining is not None:
            self._remaining -= 1
            if self._remaining <= 0:
                self._fault = None
        return fault

    def describe(self) -> dict[str, Any]:
        fault = self._fault
        return {
            "mode": "none" if fault is None else fault.mode,
            "remaining": self._remaining if fault is not None else 0,
            "after_tokens": None if fault is None else fault.after_tokens,
            "paths": sorted(self._paths),
        }


def _optional_int(body: dict[str, Any], name: str, *, minimum: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise SimError(400, f"'{name}' must be an integer >= {minimum}", name)
    return value
