"""The simulator's one error type and its body, in the shape vLLM's OpenAI server answers with.

vLLM (>= 0.9) answers `{"error": {"message", "type", "param", "code"}}` where `type` is the name of the
HTTP status ("BadRequestError") and `code` is the status number; the simulator copies that exactly so a
gateway's error translation is tested against what it will really see.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SimError", "error_body"]

_TYPES = {
    400: "BadRequestError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestEntityTooLargeError",
    429: "TooManyRequestsError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _TYPES.get(status, "Error"), "param": param, "code": status}}


class SimError(Exception):
    """A request the simulator answers with an error status instead of a completion."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param)
