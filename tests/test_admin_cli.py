"""`gateway tenants ...` / `gateway keys ...` run as real commands against a running gateway."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from tests.support.gateway import GatewayProc, start_gateway


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProc]:
    proc = start_gateway({}, tmp_path_factory.mktemp("gw-cli"))
    yield proc
    proc.stop()


def cli(gw: GatewayProc, *args: str, admin_key: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GATEWAY_URL": gw.url, "GATEWAY_ADMIN_KEY": admin_key or gw.admin_key}
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, env=env, timeout=60)


def test_operator_flow(gw: GatewayProc) -> None:
    made = cli(gw, "tenants", "create", "ops", "--weight", "2", "--rpm", "100", "--models", "llama-*,mistral")
    assert made.returncode == 0, made.stderr
    assert "ops" in made.stdout and "WEIGHT" in made.stdout

    listed = cli(gw, "tenants", "list", "--json")
    rows = json.loads(listed.stdout)
    ops = next(r for r in rows if r["id"] == "ops")
    assert ops["weight"] == 2 and ops["limits"]["rpm"] == 100 and ops["models"] == ["llama-*", "mistral"]

    assert cli(gw, "tenants", "update", "ops", "--weight", "5").returncode == 0
    assert (
        httpx.get(gw.url + "/admin/tenants/ops", headers={"Authorization": f"Bearer {gw.admin_key}"}).json()["weight"]
        == 5
    )

    key = json.loads(cli(gw, "keys", "create", "ops", "--name", "ci", "--json").stdout)
    assert key["key"].startswith("sk-gw-")
    table = cli(gw, "keys", "list", "ops").stdout
    assert key["id"] in table and key["key"] not in table

    rotated = cli(gw, "keys", "rotate", key["id"], "--grace", "0")
    assert rotated.returncode == 0 and "secret: sk-gw-" in rotated.stdout
    new_id = rotated.stdout.split("new key id: ")[1].split()[0]
    assert cli(gw, "keys", "revoke", new_id).returncode == 0
    assert cli(gw, "tenants", "delete", "ops").returncode == 0
    assert "ops" not in [r["id"] for r in json.loads(cli(gw, "tenants", "list", "--json").stdout)]


def test_errors_are_readable(gw: GatewayProc) -> None:
    result = cli(gw, "tenants", "create", "Bad Id")
    assert result.returncode == 1 and "422" in result.stderr and "id" in result.stderr
    result = cli(gw, "tenants", "list", admin_key="wrong")
    assert result.returncode == 1 and "401" in result.stderr
