"""The gateway's one error tree, and how each error becomes an OpenAI-shaped body.

    GatewayError                      (500 server_error)
    ├── BadRequestError               (400 invalid_request_error; `param` names the field)
    │   └── PayloadTooLargeError      (413 invalid_request_error)
    ├── AuthenticationError           (401 invalid_request_error / invalid_api_key)
    ├── PermissionDeniedError         (403 invalid_request_error / model_not_allowed, ...)
    ├── NotFoundError                 (404 invalid_request_error / model_not_found, not_found)
    ├── MethodNotAllowedError         (405 invalid_request_error / method_not_allowed; allow)
    ├── ConflictError                 (409 invalid_request_error / conflict)
    ├── UnprocessableError            (422 invalid_request_error / validation_error)
    ├── RateLimitError                (429 requests|tokens / rate_limit_exceeded; retry-after)
    │   └── QuotaExceededError        (429 insufficient_quota; x-should-retry: false)
    ├── UpstreamError                 (502 server_error / upstream_error)
    └── ServiceUnavailableError       (503 server_error / no_backend_available, ...)

Errors of the layers below (aiohttp, sqlite, redis) are translated into this tree where they are caught,
so the client never sees a backend address, a stack trace or a secret.
"""

from __future__ import annotations

import orjson

__all__ = [
    "AuthenticationError",
    "BadRequestError",
    "ConflictError",
    "GatewayError",
    "MethodNotAllowedError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "QuotaExceededError",
    "RateLimitError",
    "ServiceUnavailableError",
    "UnprocessableError",
    "UpstreamError",
]


class GatewayError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str | None = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers: dict[str, str] = headers or {}

    def body(self) -> bytes:
        return orjson.dumps(
            {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        )


class BadRequestError(GatewayError):
    status = 400
    type = "invalid_request_error"
    code: str | None = None


class PayloadTooLargeError(BadRequestError):
    status = 413
    code = "request_too_large"


class AuthenticationError(GatewayError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDeniedError(GatewayError):
    status = 403
    type = "invalid_request_error"
    code = "model_not_allowed"


class NotFoundError(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class MethodNotAllowedError(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class ConflictError(GatewayError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


class UnprocessableError(GatewayError):
    status = 422
    type = "invalid_request_error"
    code = "validation_error"


class RateLimitError(GatewayError):
    status = 429
    type = "requests"
    code = "rate_limit_exceeded"
    # Which limit refused: rpm, tpm, concurrency, inflight_tokens, budget, queue_full, queue_timeout.
    reason: str | None = None


class QuotaExceededError(RateLimitError):
    type = "insufficient_quota"
    code = "insufficient_quota"


class UpstreamError(GatewayError):
    status = 502
    type = "server_error"
    code = "upstream_error"


class ServiceUnavailableError(GatewayError):
    status = 503
    type = "server_error"
    code = "no_backend_available"
