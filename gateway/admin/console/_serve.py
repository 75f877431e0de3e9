"""Serving the console's static files under `/console/`: a fixed table of package files, strict headers.

The files ship inside the package (`gateway/admin/console/static/`) and are read once, on the first request, into
a table keyed by their path. A request path is only ever a key into that table, never joined onto a
directory, so no path (`..`, encoded slashes, NUL) can reach another file. Every answer carries a
Content-Security-Policy that allows scripts, styles and requests to this origin only (no inline script, no
framing, no form submission), `nosniff`, and an ETag with `no-cache` so an upgraded gateway's files are
picked up at once while unchanged ones cost a 304.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from importlib.abc import Traversable

from gateway.asgi import Scope, Send, header, send_response
from gateway.errors import MethodNotAllowedError, NotFoundError

__all__ = ["PREFIX", "Console"]

PREFIX = "/console"

_TYPES = {
    ".html": b"text/html; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".svg": b"image/svg+xml",
    ".txt": b"text/plain; charset=utf-8",
}

# form-action 'none': the forms are handled by script; if script fails, a browser must not submit the
# admin key as a query string.
_CSP = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    b"base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_SECURITY_HEADERS = [
    (b"content-security-policy", _CSP),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"cache-control", b"no-cache"),
]


@dataclass(frozen=True, slots=True)
class _Asset:
    body: bytes
    content_type: bytes
    etag: bytes


class Console:
    def __init__(self, root: Traversable | None = None) -> None:
        self._root = root
        self._assets: dict[str, _Asset] | None = None

    def _table(self) -> dict[str, _Asset]:
        if self._assets is None:
            root = self._root or resources.files("gateway.admin.console") / "static"
            self._assets = dict(_walk(root, ""))
        return self._assets

    async def __call__(self, scope: Scope, send: Send, extra: list[tuple[bytes, bytes]]) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        if method not in ("GET", "HEAD"):
            raise MethodNotAllowedError(
                f"The console answers GET and HEAD, not {method}.", headers={"allow": "GET, HEAD"}
            )
        if path == PREFIX:
            # Relative asset URLs in index.html need the trailing slash.
            headers = [(b"location", b"/console/"), *_SECURITY_HEADERS, *extra]
            await send_response(send, 308, b"", headers, content_type=b"text/plain; charset=utf-8")
            return
        name = path.removeprefix(PREFIX + "/") or "index.html"
        asset = self._table().get(name) if path.startswith(PREFIX + "/") else None
        if asset is None:
            raise NotFoundError(f"No console file {path[:200]!r}.", code="not_found")
        headers = [(b"etag", asset.etag), *_SECURITY_HEADERS, *extra]
        if asset.etag in (header(scope, b"if-none-match") or b"").split(b", "):
            await send({"type": "http.response.start", "status": 304, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return
        body = b"" if method == "HEAD" else asset.body
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", asset.content_type),
                    (b"content-length", str(len(asset.body)).encode()),
                    *headers,
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _walk(folder: Traversable, prefix: str) -> list[tuple[str, _Asset]]:
    found = []
    for entry in folder.iterdir():
        name = prefix + entry.name
        if entry.is_dir():
            found += _walk(entry, name + "/")
            continue
        content_type = _TYPES.get("." + entry.name.rsplit(".", 1)[-1])
        if content_type is None:
            continue  # only the kinds of file the console is made of are served
        body = entry.read_bytes()
        etag = b'"' + hashlib.sha256(body).hexdigest()[:20].encode() + b'"'
        found.append((name, _Asset(body, content_type, etag)))
    return found
