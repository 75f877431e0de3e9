"""`gateway tenants ...`, `gateway keys ...` and `gateway audit`: the admin API from a terminal.

Reads `GATEWAY_URL` (default http://127.0.0.1:8080) and `GATEWAY_ADMIN_KEY`. Every field the API takes has an
option, named after it (`--max-concurrency` sets `limits.max_concurrency`). An update sends only the options
given, as a JSON merge patch, so nothing else changes; `--unset FIELD` removes a field (back to its default:
`--unset limits.tpm` lifts the tpm limit, `--unset budget` removes the budget). Output is readable text
with times in ISO 8601 (UTC), or the API's own JSON with `--json`. Errors print the API's message and exit 1.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

__all__ = ["add_commands"]


# --- talking to the API ---------------------------------------------------------------------------------


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


def _pages(args: argparse.Namespace, path: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    query: dict[str, Any] = {"limit": 1000, **(params or {})}
    while True:
        page = _call(args, "GET", path, params=query)
        rows += page["data"]
        if not page["has_more"]:
            return rows
        query["after"] = page["next_after"]


# --- the options: one per field of the API --------------------------------------------------------------


@dataclass(frozen=True)
class _Option:
    flag: str
    path: str  # where the value goes in the API's body: "limits.rpm"
    type: Callable[[str], Any]
    metavar: str | None
    help: str
    choices: tuple[str, ...] | None = None


def _patterns(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def _instant(text: str) -> float:
    """A Unix time, or an ISO 8601 date or date-time (UTC unless it names an offset)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 date-time or a Unix time: {text!r}") from None
    return (when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)).timestamp()


_LIMITS = (
    _Option("--rpm", "limits.rpm", int, "N", "requests per minute"),
    _Option("--tpm", "limits.tpm", int, "N", "tokens per minute (prompt + completion)"),
    _Option("--max-concurrency", "limits.max_concurrency", int, "N", "requests in flight at once"),
    _Option(
        "--max-inflight-tokens", "limits.max_inflight_tokens", int, "N", "prompt + max_tokens of the requests in flight"
    ),
    _Option("--max-queue-wait-ms", "limits.max_queue_wait_ms", int, "MS", "longest wait for a backend slot, then 429"),
    _Option("--max-queue-depth", "limits.max_queue_depth", int, "N", "requests waiting for a backend slot at once"),
)
_TENANT = (
    _Option("--name", "name", str, "TEXT", "display name"),
    _Option("--weight", "weight", float, "W", "share of capacity when backends are saturated (default 1)"),
    _Option("--priority", "priority", int, "P", "-100 to 100; higher bands are served first (default 0)"),
    _Option("--models", "models", _patterns, "PATTERNS", "comma-separated, e.g. 'llama-*,gpt-4o' (default *)"),
    *_LIMITS,
    _Option("--budget", "budget.amount", float, "AMOUNT", "spend allowed per budget period"),
    _Option("--budget-period", "budget.period", str, None, "budget period (default month)", ("day", "week", "month")),
    _Option("--cache-scope", "cache_scope", str, "SCOPE", "prefix-cache scope: tenant | key | group:<name> | global"),
    _Option(
        "--user-field", "user_field", str, None, "the OpenAI user field: forward, replace or remove it",
        ("passthrough", "tenant", "strip"),
    ),
)  # fmt: skip
_KEY = (
    _Option("--name", "name", str, "TEXT", "what uses the key, e.g. ci"),
    _Option("--models", "models", _patterns, "PATTERNS", "comma-separated (default: the tenant's models)"),
    *_LIMITS,
    _Option("--expires", "expires_at", _instant, "WHEN", "ISO 8601 date-time (UTC unless given) or Unix time"),
)
_ON_LIMIT = ("rpm", "tpm", "concurrency", "inflight_tokens", "budget", "queue")


def _add_options(p: argparse.ArgumentParser, options: Sequence[_Option], *, unset: str | None) -> None:
    """One option per field; with `unset` (examples of fields), also `--unset` for an update."""
    for o in options:
        p.add_argument(o.flag, dest=o.path, type=o.type, choices=o.choices, help=o.help, metavar=o.metavar)
    if unset is not None:
        p.add_argument(
            "--unset",
            action="append",
            default=[],
            metavar="FIELD",
            help=f"remove a field, back to its default (repeatable), e.g. {unset}",
        )


def _add_tenant_options(p: argparse.ArgumentParser, *, update: bool) -> None:
    _add_options(p, _TENANT, unset="limits.tpm, budget, on_limit.rpm, name" if update else None)
    p.add_argument(
        "--allow-client-salt",
        dest="allow_client_salt",
        action=argparse.BooleanOptionalAction,
        help="let clients split the tenant's cache scope with their own cache_salt",
    )
    p.add_argument(
        "--on-limit",
        dest="on_limit",
        action="append",
        default=[],
        metavar="LIMIT=ACTION",
        help=f"what a refusal does (repeatable): LIMIT is one of {', '.join(_ON_LIMIT)}; ACTION is reject, "
        "downgrade:<model>, or (for queue) fallback",
    )


def _body(args: argparse.Namespace, options: Sequence[_Option]) -> dict[str, Any]:
    """The API body of the options given, and only those: a nested object for dotted paths, `null` for
    each `--unset`."""
    body: dict[str, Any] = {}
    values: list[tuple[str, Any]] = [(o.path, getattr(args, o.path)) for o in options]
    # The on/off flags of some commands: --[no-]allow-client-salt, --disable/--enable.
    values += [(name, getattr(args, name, None)) for name in ("allow_client_salt", "disabled")]
    for spec in getattr(args, "on_limit", []):
        limit, sep, action = spec.partition("=")
        if not sep or not limit or not action:
            raise SystemExit(f"gateway: --on-limit takes LIMIT=ACTION, e.g. rpm=downgrade:small, not {spec!r}")
        values.append((f"on_limit.{limit}", action))
    given = {path for path, value in values if value is not None}
    for path in getattr(args, "unset", []):
        if path in given or any(g.startswith(path + ".") for g in given):
            raise SystemExit(f"gateway: {path} is both set and unset")
        values.append((path, None))
        given.add(path)
    for path, value in values:
        if path not in given:
            continue
        *parents, last = path.split(".")
        node = body
        for name in parents:
            child = node.setdefault(name, {})
            if not isinstance(child, dict):
                raise SystemExit(f"gateway: {name} is unset, so {path} cannot be set")
            node = child
        node[last] = value
    return body


# --- output ---------------------------------------------------------------------------------------------


def _iso(unix: float | None) -> str:
    if unix is None:
        return "-"
    return dt.datetime.fromtimestamp(unix, dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict):
        return ",".join(f"{k}={_text(v)}" for k, v in value.items() if v is not None) or "-"
    if isinstance(value, list | tuple):
        return ",".join(map(str, value)) or "-"
    return str(value)


def _budget(budget: dict[str, Any] | None) -> str:
    return "-" if budget is None else f"{budget['amount']:g} per {budget['period']}"


def _key_status(key: dict[str, Any], now: float) -> str:
    if key["revoked"]:
        return "revoked"
    if key["expires_at"] is not None and key["expires_at"] <= now:
        return "expired"
    return "disabled" if key["disabled"] else "active"


def _table(rows: list[list[str]], columns: list[str]) -> str:
    widths = [max([len(c)] + [len(row[i]) for row in rows]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def _fields(pairs: list[tuple[str, str]]) -> str:
    width = max(len(name) for name, _ in pairs)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in pairs)


def _tenant_row(t: dict[str, Any]) -> list[str]:
    return [
        t["id"],
        _text(t["name"]),
        _text(t["weight"]),
        _text(t["priority"]),
        _text(t["models"]),
        _text(t["limits"]),
        _budget(t["budget"]),
        t["cache_scope"],
        _text(t["config_managed"]),
    ]


_TENANT_COLUMNS = ["id", "name", "weight", "priority", "models", "limits", "budget", "cache_scope", "config_managed"]


def _tenant_text(t: dict[str, Any]) -> str:
    return _fields(
        [
            ("id", t["id"]),
            ("name", _text(t["name"])),
            ("weight", _text(t["weight"])),
            ("priority", _text(t["priority"])),
            ("models", _text(t["models"])),
            ("limits", _text(t["limits"])),
            ("budget", _budget(t["budget"])),
            ("cache_scope", t["cache_scope"]),
            ("allow_client_salt", _text(t["allow_client_salt"])),
            ("user_field", t["user_field"]),
            ("on_limit", _text(t["on_limit"])),
            ("config_managed", _text(t["config_managed"])),
        ]
    )


def _key_row(k: dict[str, Any], now: float) -> list[str]:
    return [
        k["id"],
        _text(k["name"]),
        k["prefix"],
        _key_status(k, now),
        _iso(k["created_at"]),
        _iso(k["expires_at"]),
        _text(k["models"]) if k["models"] is not None else "(tenant's)",
        _text(k["limits"]),
    ]


_KEY_COLUMNS = ["id", "name", "prefix", "status", "created", "expires", "models", "limits"]


def _key_text(k: dict[str, Any]) -> str:
    return _fields(
        [
            ("id", k["id"]),
            ("tenant_id", k["tenant_id"]),
            ("name", _text(k["name"])),
            ("prefix", k["prefix"]),
            ("status", _key_status(k, dt.datetime.now(dt.UTC).timestamp())),
            ("created_at", _iso(k["created_at"])),
            ("expires_at", _iso(k["expires_at"])),
            ("disabled", _text(k["disabled"])),
            ("revoked", _text(k["revoked"])),
            ("models", _text(k["models"]) if k["models"] is not None else "(the tenant's)"),
            ("limits", _text(k["limits"])),
            ("config_managed", _text(k["config_managed"])),
        ]
    )


def _print(args: argparse.Namespace, data: Any, text: Callable[[Any], str]) -> int:
    print(json.dumps(data, indent=2) if args.json else text(data))
    return 0


def _secret_text(created: dict[str, Any], first_line: str, note: str) -> str:
    return f"{first_line}: {created['id']}\nsecret: {created['key']}\n({note})"


# --- commands -------------------------------------------------------------------------------------------


def tenants_list(args: argparse.Namespace) -> int:
    rows = _pages(args, "/admin/tenants")
    return _print(args, rows, lambda ts: _table([_tenant_row(t) for t in ts], _TENANT_COLUMNS))


def tenants_get(args: argparse.Namespace) -> int:
    return _print(args, _call(args, "GET", f"/admin/tenants/{args.id}"), _tenant_text)


def tenants_create(args: argparse.Namespace) -> int:
    body = {"id": args.id, **_body(args, _TENANT)}
    return _print(args, _call(args, "POST", "/admin/tenants", body), _tenant_text)


def tenants_update(args: argparse.Namespace) -> int:
    body = _body(args, _TENANT)
    if not body:
        raise SystemExit("gateway: nothing to change: give the options to change (see --help)")
    return _print(args, _call(args, "PATCH", f"/admin/tenants/{args.id}", body), _tenant_text)


def tenants_delete(args: argparse.Namespace) -> int:
    _call(args, "DELETE", f"/admin/tenants/{args.id}")
    return _print(args, {"id": args.id, "deleted": True}, lambda _: f"deleted tenant {args.id} and its keys")


def _usage_text(report: dict[str, Any]) -> str:
    def spend(totals: dict[str, Any]) -> str:
        return ", ".join(f"{amount:g} {currency}" for currency, amount in totals["spend"].items()) or "0"

    head = _fields(
        [
            ("tenant", report["tenant"]),
            ("since", _iso(report["since"])),
            ("until", _iso(report["until"])),
            ("requests", str(report["requests"])),
            ("tokens", _text(report["tokens"])),
            ("spend", spend(report)),
        ]
    )
    if not report["by_key"]:
        return head
    rows = [[k["key_id"], str(k["requests"]), _text(k["tokens"]), spend(k)] for k in report["by_key"]]
    return head + "\n\n" + _table(rows, ["key", "requests", "tokens", "spend"])


def _range(args: argparse.Namespace) -> dict[str, str]:
    return {name: value for name in ("since", "until") if (value := getattr(args, name)) is not None}


def tenants_usage(args: argparse.Namespace) -> int:
    report = _call(args, "GET", f"/admin/tenants/{args.id}/usage", params=_range(args))
    return _print(args, report, _usage_text)


def keys_list(args: argparse.Namespace) -> int:
    rows = _call(args, "GET", f"/admin/tenants/{args.tenant}/keys")
    now = dt.datetime.now(dt.UTC).timestamp()
    return _print(args, rows, lambda ks: _table([_key_row(k, now) for k in ks], _KEY_COLUMNS))


def keys_get(args: argparse.Namespace) -> int:
    return _print(args, _call(args, "GET", f"/admin/keys/{args.key_id}"), _key_text)


def keys_create(args: argparse.Namespace) -> int:
    created = _call(args, "POST", f"/admin/tenants/{args.tenant}/keys", _body(args, _KEY))
    return _print(args, created, lambda c: _secret_text(c, "key id", "the secret is shown only now"))


def keys_update(args: argparse.Namespace) -> int:
    body = _body(args, _KEY)
    if not body:
        raise SystemExit("gateway: nothing to change: give the options to change (see --help)")
    return _print(args, _call(args, "PATCH", f"/admin/keys/{args.key_id}", body), _key_text)


def keys_revoke(args: argparse.Namespace) -> int:
    return _print(args, _call(args, "POST", f"/admin/keys/{args.key_id}/revoke"), _key_text)


def keys_rotate(args: argparse.Namespace) -> int:
    created = _call(args, "POST", f"/admin/keys/{args.key_id}/rotate", {"grace_period_s": args.grace})
    note = f"the old key keeps working for {args.grace:g} s; the secret is shown only now"
    return _print(args, created, lambda c: _secret_text(c, "new key id", note))


def keys_usage(args: argparse.Namespace) -> int:
    return _print(args, _call(args, "GET", f"/admin/keys/{args.key_id}/usage", params=_range(args)), _usage_text)


def audit_list(args: argparse.Namespace) -> int:
    rows = _pages(args, "/admin/audit")
    if args.last is not None:
        rows = rows[-args.last :] if args.last > 0 else []

    def text(entries: list[dict[str, Any]]) -> str:
        cells = [
            [str(e["seq"]), _iso(e["time"]), e["actor"], e["action"], e["target"], json.dumps(e["details"])]
            for e in entries
        ]
        return _table(cells, ["seq", "time", "actor", "action", "target", "details"])

    return _print(args, rows, text)


def add_commands(sub: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print the API's JSON")
    common.add_argument("--url", help="gateway URL (default $GATEWAY_URL or http://127.0.0.1:8080)")
    time_range = argparse.ArgumentParser(add_help=False)
    time_range.add_argument("--since", help="ISO 8601 date-time (UTC unless given) or Unix time; default 30 days ago")
    time_range.add_argument("--until", help="ISO 8601 date-time (UTC unless given) or Unix time; default now")

    tenants = sub.add_parser("tenants", help="manage tenants over the admin API").add_subparsers(
        dest="action", required=True
    )
    tenants.add_parser("list", parents=[common], help="every tenant").set_defaults(func=tenants_list)
    p = tenants.add_parser("get", parents=[common], help="one tenant")
    p.add_argument("id")
    p.set_defaults(func=tenants_get)
    p = tenants.add_parser("create", parents=[common], help="a new tenant")
    p.add_argument("id")
    _add_tenant_options(p, update=False)
    p.set_defaults(func=tenants_create)
    p = tenants.add_parser("update", parents=[common], help="change the fields given; the others stay")
    p.add_argument("id")
    _add_tenant_options(p, update=True)
    p.set_defaults(func=tenants_update)
    p = tenants.add_parser("delete", parents=[common], help="a tenant and its keys")
    p.add_argument("id")
    p.set_defaults(func=tenants_delete)
    p = tenants.add_parser("usage", parents=[common, time_range], help="requests, tokens and spend, by key")
    p.add_argument("id")
    p.set_defaults(func=tenants_usage)

    keys = sub.add_parser("keys", help="manage virtual keys over the admin API").add_subparsers(
        dest="action", required=True
    )
    p = keys.add_parser("list", parents=[common], help="a tenant's keys (never their secrets)")
    p.add_argument("tenant")
    p.set_defaults(func=keys_list)
    p = keys.add_parser("get", parents=[common], help="one key")
    p.add_argument("key_id")
    p.set_defaults(func=keys_get)
    p = keys.add_parser("create", parents=[common], help="a new key; prints its secret once")
    p.add_argument("tenant")
    _add_options(p, _KEY, unset=None)
    p.set_defaults(func=keys_create)
    p = keys.add_parser("update", parents=[common], help="change the fields given; the others stay")
    p.add_argument("key_id")
    _add_options(p, _KEY, unset="limits.rpm, expires_at, models")
    state = p.add_mutually_exclusive_group()
    state.add_argument("--disable", dest="disabled", action="store_const", const=True, help="refuse the key")
    state.add_argument("--enable", dest="disabled", action="store_const", const=False, help="accept it again")
    p.set_defaults(func=keys_update)
    p = keys.add_parser("revoke", parents=[common], help="refuse a key for good")
    p.add_argument("key_id")
    p.set_defaults(func=keys_revoke)
    p = keys.add_parser("rotate", parents=[common], help="a new secret; the old one works for a grace period")
    p.add_argument("key_id")
    p.add_argument("--grace", type=float, default=3600, help="seconds the old key keeps working (default 3600)")
    p.set_defaults(func=keys_rotate)
    p = keys.add_parser("usage", parents=[common, time_range], help="one key's requests, tokens and spend")
    p.add_argument("key_id")
    p.set_defaults(func=keys_usage)

    p = sub.add_parser("audit", parents=[common], help="the log of admin changes, oldest first")
    p.add_argument("--last", type=int, help="only the last N entries")
    p.set_defaults(func=audit_list)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use the `gateway` command")
