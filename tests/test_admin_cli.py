"""`gateway tenants ...`, `gateway keys ...` and `gateway audit` run as real commands against a running
gateway: an option for every field, updates that send only what they are given, `--unset`, readable
output with ISO 8601 times, and `--json` everywhere."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support.gateway import GatewayProc, start_gateway

# Every tenant field through its option, none at its default, and what the API then holds.
TENANT_OPTIONS = [
    "--name", "Acme Research", "--weight", "3", "--priority", "5", "--models", "llama-*,gpt-4o",
    "--rpm", "600", "--tpm", "100000", "--max-concurrency", "4", "--max-inflight-tokens", "5000",
    "--max-queue-wait-ms", "2000", "--max-queue-depth", "10", "--budget", "50", "--budget-period", "day",
    "--cache-scope", "group:research", "--allow-client-salt", "--user-field", "tenant",
    "--on-limit", "budget=downgrade:small", "--on-limit", "queue=fallback",
]  # fmt: skip
TENANT: dict[str, Any] = {
    "name": "Acme Research",
    "weight": 3.0,
    "priority": 5,
    "models": ["llama-*", "gpt-4o"],
    "limits": {
        "rpm": 600,
        "tpm": 100000,
        "max_concurrency": 4,
        "max_inflight_tokens": 5000,
        "max_queue_wait_ms": 2000,
        "max_queue_depth": 10,
    },
    "budget": {"amount": 50.0, "period": "day"},
    "cache_scope": "group:research",
    "allow_client_salt": True,
    "user_field": "tenant",
    "on_limit": {"budget": "downgrade:small", "queue": "fallback"},
}


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProc]:
    proc = start_gateway({}, tmp_path_factory.mktemp("gw-cli"))
    yield proc
    proc.stop()


def cli(gw: GatewayProc, *args: str, admin_key: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GATEWAY_URL": gw.url, "GATEWAY_ADMIN_KEY": admin_key or gw.admin_key}
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, env=env, timeout=60)


def ok(gw: GatewayProc, *args: str) -> str:
    result = cli(gw, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def api(gw: GatewayProc, method: str, path: str, body: Any = None) -> Any:
    resp = httpx.request(method, gw.url + path, json=body, headers={"Authorization": f"Bearer {gw.admin_key}"})
    assert resp.status_code < 300, resp.text
    return resp.json()


def fields(tenant: dict[str, Any]) -> dict[str, Any]:
    return {f: tenant[f] for f in TENANT}


def iso(unix: float) -> str:
    return dt.datetime.fromtimestamp(unix, dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def test_operator_flow(gw: GatewayProc) -> None:
    made = ok(gw, "tenants", "create", "ops", "--weight", "2", "--rpm", "100", "--models", "llama-*,mistral")
    assert "ops" in made and "weight" in made

    rows = json.loads(ok(gw, "tenants", "list", "--json"))
    ops = next(r for r in rows if r["id"] == "ops")
    assert ops["weight"] == 2 and ops["limits"]["rpm"] == 100 and ops["models"] == ["llama-*", "mistral"]
    assert "ops" in ok(gw, "tenants", "list") and "WEIGHT" in ok(gw, "tenants", "list")

    ok(gw, "tenants", "update", "ops", "--weight", "5")
    assert api(gw, "GET", "/admin/tenants/ops")["weight"] == 5

    key = json.loads(ok(gw, "keys", "create", "ops", "--name", "ci", "--json"))
    assert key["key"].startswith("sk-gw-")
    table = ok(gw, "keys", "list", "ops")
    assert key["id"] in table and key["key"] not in table

    rotated = ok(gw, "keys", "rotate", key["id"], "--grace", "0")
    assert "secret: sk-gw-" in rotated
    new_id = rotated.split("new key id: ")[1].split()[0]
    ok(gw, "keys", "revoke", new_id)
    ok(gw, "tenants", "delete", "ops")
    assert "ops" not in [r["id"] for r in json.loads(ok(gw, "tenants", "list", "--json"))]


def test_an_update_sends_only_the_options_given(gw: GatewayProc) -> None:
    """`tenants update acme --rpm 50` used to send every limit, so tpm and max_concurrency were lost."""
    api(gw, "POST", "/admin/tenants", {"id": "only", "limits": {"rpm": 600, "tpm": 100000, "max_concurrency": 4}})
    ok(gw, "tenants", "update", "only", "--rpm", "50")
    limits = api(gw, "GET", "/admin/tenants/only")["limits"]
    assert (limits["rpm"], limits["tpm"], limits["max_concurrency"]) == (50, 100000, 4)


def test_every_tenant_field_has_an_option_and_an_update_of_one_keeps_the_others(gw: GatewayProc) -> None:
    created = json.loads(ok(gw, "tenants", "create", "full", *TENANT_OPTIONS, "--json"))
    assert fields(created) == TENANT
    # One option each: that field changes, every other stays.
    for option, value, field, expected in [
        ("--name", "Renamed", "name", "Renamed"),
        ("--weight", "7", "weight", 7.0),
        ("--priority", "-3", "priority", -3),
        ("--models", "mistral", "models", ["mistral"]),
        ("--cache-scope", "key", "cache_scope", "key"),
        ("--no-allow-client-salt", None, "allow_client_salt", False),
        ("--user-field", "strip", "user_field", "strip"),
    ]:
        before = fields(api(gw, "GET", "/admin/tenants/full"))
        ok(gw, "tenants", "update", "full", option, *([value] if value is not None else []))
        assert fields(api(gw, "GET", "/admin/tenants/full")) == {**before, field: expected}, option
    for option, member in [
        ("--rpm", "rpm"),
        ("--tpm", "tpm"),
        ("--max-concurrency", "max_concurrency"),
        ("--max-inflight-tokens", "max_inflight_tokens"),
        ("--max-queue-wait-ms", "max_queue_wait_ms"),
        ("--max-queue-depth", "max_queue_depth"),
    ]:
        before = fields(api(gw, "GET", "/admin/tenants/full"))
        ok(gw, "tenants", "update", "full", option, "1")
        assert fields(api(gw, "GET", "/admin/tenants/full")) == {**before, "limits": {**before["limits"], member: 1}}
    before = fields(api(gw, "GET", "/admin/tenants/full"))
    ok(gw, "tenants", "update", "full", "--budget-period", "week", "--on-limit", "rpm=reject")
    after = fields(api(gw, "GET", "/admin/tenants/full"))
    assert after == {
        **before,
        "budget": {"amount": 50.0, "period": "week"},
        "on_limit": {**before["on_limit"], "rpm": "reject"},
    }


def test_unset_removes_a_field_back_to_its_default(gw: GatewayProc) -> None:
    ok(gw, "tenants", "create", "unsets", *TENANT_OPTIONS)
    unsets = ["--unset", "limits.tpm", "--unset", "budget", "--unset", "on_limit.queue", "--unset", "name"]
    out = ok(gw, "tenants", "update", "unsets", *unsets, "--rpm", "9", "--json")
    assert fields(json.loads(out)) == {
        **TENANT,
        "name": None,
        "limits": {**TENANT["limits"], "tpm": None, "rpm": 9},
        "budget": None,
        "on_limit": {"budget": "downgrade:small"},
    }
    both = cli(gw, "tenants", "update", "unsets", "--unset", "budget", "--budget", "5")
    assert both.returncode != 0 and "both set and unset" in both.stderr
    nothing = cli(gw, "tenants", "update", "unsets")
    assert nothing.returncode != 0 and "nothing to change" in nothing.stderr
    bad = cli(gw, "tenants", "update", "unsets", "--on-limit", "rpm")
    assert bad.returncode != 0 and "LIMIT=ACTION" in bad.stderr


def test_every_key_field_has_an_option(gw: GatewayProc) -> None:
    api(gw, "POST", "/admin/tenants", {"id": "keyed"})
    expires = "2031-02-03T04:05:06Z"
    options = [
        "--name", "ci", "--models", "llama-*", "--rpm", "30", "--tpm", "3000", "--max-concurrency", "2",
        "--max-inflight-tokens", "900", "--max-queue-wait-ms", "50", "--max-queue-depth", "7", "--expires", expires,
    ]  # fmt: skip
    created = json.loads(ok(gw, "keys", "create", "keyed", *options, "--json"))
    key_id = created["id"]
    assert created["name"] == "ci" and created["models"] == ["llama-*"]
    assert created["limits"] == {
        "rpm": 30,
        "tpm": 3000,
        "max_concurrency": 2,
        "max_inflight_tokens": 900,
        "max_queue_wait_ms": 50,
        "max_queue_depth": 7,
    }
    assert created["expires_at"] == dt.datetime(2031, 2, 3, 4, 5, 6, tzinfo=dt.UTC).timestamp()

    def state() -> dict[str, Any]:
        key = api(gw, "GET", f"/admin/keys/{key_id}")
        return {f: key[f] for f in ("name", "models", "limits", "expires_at", "disabled")}

    before = state()
    ok(gw, "keys", "update", key_id, "--disable")
    assert state() == {**before, "disabled": True}
    ok(gw, "keys", "update", key_id, "--tpm", "10")
    assert state() == {**before, "disabled": True, "limits": {**before["limits"], "tpm": 10}}
    ok(gw, "keys", "update", key_id, "--enable", "--name", "deploy", "--expires", "2032-01-01")
    expected = {**before, "name": "deploy", "limits": {**before["limits"], "tpm": 10}}
    assert state() == {**expected, "expires_at": dt.datetime(2032, 1, 1, tzinfo=dt.UTC).timestamp()}
    ok(gw, "keys", "update", key_id, "--unset", "expires_at", "--unset", "models", "--unset", "limits.rpm")
    assert state() == {**expected, "expires_at": None, "models": None, "limits": {**expected["limits"], "rpm": None}}
    both = cli(gw, "keys", "update", key_id, "--disable", "--enable")
    assert both.returncode != 0
    bad = cli(gw, "keys", "create", "keyed", "--expires", "next tuesday")
    assert bad.returncode != 0 and "ISO 8601" in bad.stderr


def test_human_output_reads_times_in_iso_8601_utc(gw: GatewayProc) -> None:
    api(gw, "POST", "/admin/tenants", {"id": "readable", "budget": {"amount": 5, "period": "week"}})
    key = api(gw, "POST", "/admin/tenants/readable/keys", {"name": "ci", "expires_at": 1924992000.5})
    listed = ok(gw, "keys", "list", "readable")
    assert "2031-01-01T00:00:00Z" in listed and iso(key["created_at"]) in listed
    assert "1924992000" not in listed and str(key["created_at"]) not in listed
    assert "active" in listed and "STATUS" in listed
    one = ok(gw, "keys", "get", key["id"])
    assert "expires_at" in one and "2031-01-01T00:00:00Z" in one and iso(key["created_at"]) in one
    tenant = ok(gw, "tenants", "get", "readable")
    assert "5 per week" in tenant and "passthrough" in tenant
    usage = ok(gw, "tenants", "usage", "readable", "--until", "2030-01-31T00:00:00Z")
    assert "since     2030-01-01T00:00:00Z" in usage and "until     2030-01-31T00:00:00Z" in usage
    log = ok(gw, "audit", "--last", "3").splitlines()
    assert len(log) == 4 and log[0].split()[:3] == ["SEQ", "TIME", "ACTOR"]
    _seq, when, actor, action, target = log[-1].split()[:5]
    assert (actor, action, target) == ("admin", "key.create", f"key:{key['id']}")
    assert when.endswith("Z") and abs(dt.datetime.fromisoformat(when).timestamp() - key["created_at"]) < 2


def test_every_command_prints_json_with_json(gw: GatewayProc) -> None:
    api(gw, "POST", "/admin/tenants", {"id": "jsonly"})
    key = api(gw, "POST", "/admin/tenants/jsonly/keys", {"name": "ci"})
    spare = api(gw, "POST", "/admin/tenants/jsonly/keys", {"name": "spare"})
    commands = [
        ("tenants", "list"),
        ("tenants", "get", "jsonly"),
        ("tenants", "update", "jsonly", "--weight", "2"),
        ("tenants", "usage", "jsonly"),
        ("keys", "list", "jsonly"),
        ("keys", "get", key["id"]),
        ("keys", "update", key["id"], "--name", "ci2"),
        ("keys", "usage", key["id"]),
        ("keys", "rotate", key["id"]),
        ("keys", "revoke", spare["id"]),
        ("audit", "--last", "2"),
        ("tenants", "create", "jsonly-2"),
        ("keys", "create", "jsonly-2"),
        ("tenants", "delete", "jsonly-2"),
    ]
    for command in commands:
        parsed = json.loads(ok(gw, *command, "--json"))
        assert parsed, command
    assert json.loads(ok(gw, "tenants", "delete", "jsonly", "--json")) == {"id": "jsonly", "deleted": True}


def test_errors_are_readable(gw: GatewayProc) -> None:
    result = cli(gw, "tenants", "create", "Bad Id")
    assert result.returncode == 1 and "422" in result.stderr and "id" in result.stderr
    result = cli(gw, "tenants", "create", "fine", "--rpm", "0")
    assert result.returncode == 1 and "422" in result.stderr and "limits.rpm" in result.stderr
    result = cli(gw, "tenants", "list", admin_key="wrong")
    assert result.returncode == 1 and "401" in result.stderr
