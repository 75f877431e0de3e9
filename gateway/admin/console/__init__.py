"""The admin web console: static files served under `/console/`, working only through the admin API.

The page keeps the admin key in memory and sends it as `Authorization: Bearer` to `/admin/...`, exactly as
the CLI does; it has no endpoint of its own (see docs/ARCHITECTURE.md, "The console").
"""

from gateway.admin.console._serve import PREFIX, Console

__all__ = ["PREFIX", "Console"]
