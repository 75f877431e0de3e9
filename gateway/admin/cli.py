"""`gateway tenants ...` and `gateway keys ...`: the admin API from a terminal.

Reads `GATEWAY_URL` (default http://127.0.0.1:8080) and `GATEWAY_ADMIN_KEY`. Prints readable tables, or
the API's JSON with `--json`. Errors print the API's message and exit 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import httpx

__all__ = ["add_commands"]


def _client(args: argparse.Namespace) -> httpx.Client:
    url = (args.url or os.environ.get("GATEWAY_URL") or "http://127.0.0.1:8080").rstrip("/")
    key = os.environ.get("GATEWAY_ADMIN_KEY", "")
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def _call(args: argparse.Namespace, method: str, path: str, body: Any = None, params: Any = None) -> Any:
    with _client(args) as client:
        try:
            resp = client.request(method, path, json=body, params=params)
        except httpx.HTTPError as exc:
            raise SystemExit(f"gateway: cannot reach {client.base_url}: {exc}") from None
    if resp.status_code >= 400:
        try:
            message = resp.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = resp.text[:500]
        raise SystemExit(f"gateway: {resp.status_code}: {message}")
    return None if resp.status_code == 204 else resp.json()


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items() if v is not None) or "-"
    if isinstance(value, list | tuple):
        return ",".join(map(str, value))
    return str(value)


def _out(args: argparse.Namespace, data: Any, columns: list[str]) -> int:
    if args.json:
        print(json.dumps(data, indent=2))
    elif data is not None:
        print(_table(data if isinstance(data, list) else [data], columns))
    return 0


_TENANT_COLS = ["id", "name", "weight", "priority", "models", "limits", "cache_scope", "config_managed"]
_KEY_COLS = ["id", "tenant_id", "name", "prefix", "revoked", "disabled", "expires_at"]


def _limits(args: argparse.Namespace) -> dict[str, int]:
    return {k: v for k in ("rpm", "tpm", "max_concurrency") if (v := getattr(args, k, None)) is not None}


def _tenant_fields(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {}
    for field in ("name", "weight", "priority", "cache_scope"):
        if getattr(args, field) is not None:
            body[field] = getattr(args, field)
    if args.models is not None:
        body["models"] = args.models.split(",")
    if limits := _limits(args):
        body["limits"] = limits
    return body


def tenants_list(args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = []
    after = None
    while True:
        page = _call(args, "GET", "/admin/tenants", params={"limit": 1000, **({"after": after} if after else {})})
        rows += page["data"]
        if not page["has_more"]:
            break
        after = page["next_after"]
    return _out(args, rows, _TENANT_COLS)


def tenants_create(args: argparse.Namespace) -> int:
    return _out(args, _call(args, "POST", "/admin/tenants", {"id": args.id, **_tenant_fields(args)}), _TENANT_COLS)


def tenants_update(args: argparse.Namespace) -> int:
    return _out(args, _call(args, "PATCH", f"/admin/tenants/{args.id}", _tenant_fields(args)), _TENANT_COLS)


def tenants_delete(args: argparse.Namespace) -> int:
    _call(args, "DELETE", f"/admin/tenants/{args.id}")
    if not args.json:
        print(f"deleted tenant {args.id} and its keys")
    return 0


def keys_create(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"name": args.name}
    if args.models:
        body["models"] = args.models.split(",")
    created = _call(args, "POST", f"/admin/tenants/{args.tenant}/keys", body)
    if args.json:
        print(json.dumps(created, indent=2))
    else:
        print(f"key id: {created['id']}\nsecret: {created['key']}\n(the secret is shown only now)")
    return 0


def keys_list(args: argparse.Namespace) -> int:
    return _out(args, _call(args, "GET", f"/admin/tenants/{args.tenant}/keys"), _KEY_COLS)


def keys_revoke(args: argparse.Namespace) -> int:
    return _out(args, _call(args, "POST", f"/admin/keys/{args.key_id}/revoke"), _KEY_COLS)


def keys_rotate(args: argparse.Namespace) -> int:
    created = _call(args, "POST", f"/admin/keys/{args.key_id}/rotate", {"grace_period_s": args.grace})
    if args.json:
        print(json.dumps(created, indent=2))
    else:
        print(
            f"new key id: {created['id']}\nsecret: {created['key']}\n"
            f"(the old key keeps working for {args.grace:g} s; the secret is shown only now)"
        )
    return 0


def add_commands(sub: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print the API's JSON")
    common.add_argument("--url", help="gateway URL (default $GATEWAY_URL or http://127.0.0.1:8080)")

    def tenant_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--name")
        p.add_argument("--weight", type=float)
        p.add_argument("--priority", type=int)
        p.add_argument("--models", help="comma-separated patterns, e.g. 'llama-*,gpt-4o'")
        p.add_argument("--cache-scope", dest="cache_scope", help="tenant | group:<name> | global | key")
        p.add_argument("--rpm", type=int)
        p.add_argument("--tpm", type=int)
        p.add_argument("--max-concurrency", dest="max_concurrency", type=int)

    tenants = sub.add_parser("tenants", help="manage tenants over the admin API").add_subparsers(
        dest="action", required=True
    )
    tenants.add_parser("list", parents=[common]).set_defaults(func=tenants_list)
    p = tenants.add_parser("create", parents=[common])
    p.add_argument("id")
    tenant_options(p)
    p.set_defaults(func=tenants_create)
    p = tenants.add_parser("update", parents=[common])
    p.add_argument("id")
    tenant_options(p)
    p.set_defaults(func=tenants_update)
    p = tenants.add_parser("delete", parents=[common])
    p.add_argument("id")
    p.set_defaults(func=tenants_delete)

    keys = sub.add_parser("keys", help="manage virtual keys over the admin API").add_subparsers(
        dest="action", required=True
    )
    p = keys.add_parser("create", parents=[common])
    p.add_argument("tenant")
    p.add_argument("--name")
    p.add_argument("--models")
    p.set_defaults(func=keys_create)
    p = keys.add_parser("list", parents=[common])
    p.add_argument("tenant")
    p.set_defaults(func=keys_list)
    p = keys.add_parser("revoke", parents=[common])
    p.add_argument("key_id")
    p.set_defaults(func=keys_revoke)
    p = keys.add_parser("rotate", parents=[common])
    p.add_argument("key_id")
    p.add_argument("--grace", type=float, default=3600, help="seconds the old key keeps working (default 3600)")
    p.set_defaults(func=keys_rotate)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use the `gateway` command")
