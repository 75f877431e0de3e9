"""The admin REST API: a FastAPI app mounted under `/admin`, with its OpenAPI document at `/openapi.json`.

Where things are (the document is rendered for people at `/console/api.html`):

    api.py          create_admin_app(): the app, its error handlers, the routers mounted behind the key check
    context.py      AdminContext, the admin-key check, 404/409 lookups, the audit write
    schemas.py      request and response bodies (the OpenAPI document's schemas)
    patch.py        updates as JSON merge patches (RFC 7396), validated as a whole
    errors.py       every refusal in OpenAI's error shape; `param` names the field
    routes/         one module per resource: tenants, keys, usage, stats, audit

Authenticated with the admin key; a tenant's virtual key gets 403, anything else 401. Every change is
written to the audit log. Objects declared in the config file are config-managed: the API shows them
(`config_managed: true`) and refuses to change them with 409 `config_managed`, so the file stays the one
source of truth for them (GitOps); reads, key creation under them and usage still work.
"""

from __future__ import annotations

from fastapi import Depends, FastAPI
from fastapi.responses import RedirectResponse

from gateway.admin.context import AdminContext, require_admin
from gateway.admin.errors import install_error_handlers
from gateway.admin.routes import audit, keys, stats, tenants, usage
from gateway.admin.schemas import ERROR_RESPONSES

__all__ = ["AdminContext", "create_admin_app"]


def create_admin_app(ctx: AdminContext) -> FastAPI:
    app = FastAPI(
        title="Gateway admin API",
        version="1",
        description="Tenants, virtual keys, usage and audit. Authenticate with `Authorization: Bearer <admin key>`.",
        # FastAPI's own pages load Swagger UI and ReDoc from a CDN; the console renders the same document
        # from files inside the package.
        docs_url=None,
        redoc_url=None,
    )
    app.state.admin = ctx
    for old in ("/docs", "/redoc"):
        app.add_api_route(old, _reference, methods=["GET", "HEAD"], include_in_schema=False)
    install_error_handlers(app)
    for routes in (tenants, keys, usage, stats, audit):
        app.include_router(
            routes.router, prefix="/admin", dependencies=[Depends(require_admin)], responses=ERROR_RESPONSES
        )
    return app


async def _reference() -> RedirectResponse:
    return RedirectResponse("/console/api.html", status_code=308)
