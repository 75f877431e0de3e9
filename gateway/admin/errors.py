"""Every refusal of the admin API in OpenAI's error shape, the same as the client API's.

The gateway's own errors (`gateway.errors.GatewayError`) carry their status and code; FastAPI's refusals (a
body it cannot parse, an unknown path, a wrong method) and pydantic's validation errors are turned into the
same body here, and a validation error's `param` names the field (`limits.rpm`, `models[2]`).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match

from gateway.errors import GatewayError, UnprocessableError

__all__ = ["as_422", "install_error_handlers"]

_HTTP_CODES = {400: "invalid_body", 404: "not_found", 405: "method_not_allowed"}
_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(GatewayError, _gateway_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation)  # type: ignore[arg-type]


def as_422(exc: ValidationError) -> GatewayError:
    """A model that failed validation after the request's own (a merged update, a tenant built from a
    body), as the 422 the request would have got."""
    first = exc.errors()[0]
    where = _loc(tuple(first["loc"]))
    return UnprocessableError(f"{where}: {first['msg'].removeprefix('Value error, ')}", param=where)


async def _gateway_error(_: Request, exc: GatewayError) -> Response:
    return Response(exc.body(), status_code=exc.status, media_type="application/json", headers=exc.headers)


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    kind = "server_error" if exc.status_code >= 500 else "invalid_request_error"
    detail = exc.detail if isinstance(exc.detail, str) else "Request refused."
    error = {"message": detail, "type": kind, "param": None, "code": _HTTP_CODES.get(exc.status_code)}
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        # Starlette names only the methods of the first route that matched the path; a path served by
        # several routes (GET and POST /admin/tenants) must list them all.
        headers = {"allow": ", ".join(_allowed_methods(request.app.router.routes, request.scope))}
    return JSONResponse({"error": error}, status_code=exc.status_code, headers=headers)


async def _validation(_: Request, exc: RequestValidationError) -> Response:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    param = _loc(tuple(first.get("loc", ())))
    message = "; ".join(f"{_loc(tuple(e.get('loc', ())))}: {e.get('msg')}" for e in errors[:10])
    error = {"message": message, "type": "invalid_request_error", "param": param, "code": "validation_error"}
    return JSONResponse({"error": error}, status_code=422)


def _loc(loc: tuple[Any, ...]) -> str:
    parts = [p for p in loc if p not in ("body", "query", "path")]
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def _allowed_methods(routes: list[BaseRoute], scope: Any) -> list[str]:
    # Each method is tried against the routes, because FastAPI resolves included routers lazily: their
    # routes are not listed with their methods in the app's own route list.
    return sorted(m for m in _METHODS if any(r.matches({**scope, "method": m})[0] == Match.FULL for r in routes))
