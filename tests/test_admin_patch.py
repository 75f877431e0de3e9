"""PATCH of tenants and keys is a JSON merge patch (RFC 7396) at every depth, against a real gateway.

A field left out is unchanged, `null` removes it (back to its default), objects merge member by member,
lists are replaced whole, and the merged result is validated. Each case starts from a record with every
field set to something other than its default, so a field that a PATCH of another one dropped or reset
shows up as a difference.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support.gateway import GatewayProc, start_gateway

# Every field of a tenant, none at its default.
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
    "on_limit": {"rpm": "reject", "budget": "downgrade:small", "queue": "fallback"},
}
# Another valid value for each.
TENANT_OTHER: dict[str, Any] = {
    "name": "Other name",
    "weight": 7.0,
    "priority": -3,
    "models": ["mistral"],
    "limits": {
        "rpm": 60,
        "tpm": 5000,
        "max_concurrency": 2,
        "max_inflight_tokens": 800,
        "max_queue_wait_ms": 100,
        "max_queue_depth": 1,
    },
    "budget": {"amount": 9.5, "period": "week"},
    "cache_scope": "key",
    "allow_client_salt": False,
    "user_field": "strip",
    "on_limit": {"rpm": "downgrade:tiny", "budget": "reject", "queue": "reject"},
}
# What `null` sets each back to.
TENANT_DEFAULT: dict[str, Any] = {
    "name": None,
    "weight": 1.0,
    "priority": 0,
    "models": ["*"],
    "limits": dict.fromkeys(TENANT["limits"]),
    "budget": None,
    "cache_scope": "tenant",
    "allow_client_salt": False,
    "user_field": "passthrough",
    "on_limit": {},
}

KEY_LIMITS = {"rpm": 30, "tpm": 3000, "max_concurrency": 2, "max_inflight_tokens": 900, "max_queue_wait_ms": 50}
KEY_OTHER_LIMITS = {"rpm": 10, "tpm": 100, "max_concurrency": 1, "max_inflight_tokens": 400, "max_queue_wait_ms": 5}
KEY_OTHER: dict[str, Any] = {
    "name": "renamed",
    "models": ["mistral"],
    "limits": {**KEY_OTHER_LIMITS, "max_queue_depth": 3},
    "expires_at": 4102444800.0,  # 2100-01-01
    "disabled": False,
}
KEY_DEFAULT: dict[str, Any] = {
    "name": None,
    "models": None,
    "limits": dict.fromkeys(TENANT["limits"]),
    "expires_at": None,
    "disabled": False,
}

_ids = itertools.count()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProc]:
    proc = start_gateway({}, tmp_path_factory.mktemp("gw-patch"))
    yield proc
    proc.stop()


@pytest.fixture
def client(gw: GatewayProc) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gw.url, headers={"Authorization": f"Bearer {gw.admin_key}"}) as c:
        yield c


def new_tenant(client: httpx.Client) -> str:
    tenant_id = f"patch-{next(_ids)}"
    resp = client.post("/admin/tenants", json={"id": tenant_id, **TENANT})
    assert resp.status_code == 201, resp.text
    return tenant_id


def new_key(client: httpx.Client) -> tuple[str, dict[str, Any]]:
    """A key with every field off its default (disabled needs a PATCH: a new key is always enabled)."""
    tenant_id = new_tenant(client)
    body = {"name": "ci", "models": ["llama-*"], "limits": {**KEY_LIMITS, "max_queue_depth": 7}}
    created = client.post(f"/admin/tenants/{tenant_id}/keys", json={**body, "expires_at": time.time() + 86400})
    assert created.status_code == 201, created.text
    key = client.patch(f"/admin/keys/{created.json()['id']}", json={"disabled": True}).json()
    assert key["disabled"] is True
    return key["id"], {f: key[f] for f in KEY_DEFAULT}


def tenant_fields(body: dict[str, Any]) -> dict[str, Any]:
    return {f: body[f] for f in TENANT}


def patch_tenant(client: httpx.Client, tenant_id: str, body: dict[str, Any]) -> dict[str, Any]:
    resp = client.patch(f"/admin/tenants/{tenant_id}", json=body)
    assert resp.status_code == 200, resp.text
    stored = client.get(f"/admin/tenants/{tenant_id}").json()
    assert tenant_fields(stored) == tenant_fields(resp.json())
    return tenant_fields(stored)


def patch_key(client: httpx.Client, key_id: str, body: dict[str, Any]) -> dict[str, Any]:
    resp = client.patch(f"/admin/keys/{key_id}", json=body)
    assert resp.status_code == 200, resp.text
    stored = client.get(f"/admin/keys/{key_id}").json()
    assert {f: stored[f] for f in KEY_DEFAULT} == {f: resp.json()[f] for f in KEY_DEFAULT}
    return {f: stored[f] for f in KEY_DEFAULT}


# --- tenants --------------------------------------------------------------------------------------------


def test_the_example_rpm_alone_keeps_tpm_and_concurrency(client: httpx.Client) -> None:
    client.post("/admin/tenants", json={"id": "acme", "limits": {"rpm": 600, "tpm": 100000, "max_concurrency": 4}})
    after = patch_tenant(client, "acme", {"limits": {"rpm": 60}})
    assert after["limits"] == {**TENANT_DEFAULT["limits"], "rpm": 60, "tpm": 100000, "max_concurrency": 4}


@pytest.mark.parametrize("field", list(TENANT))
def test_a_tenant_patch_of_one_field_leaves_every_other_field(client: httpx.Client, field: str) -> None:
    tenant_id = new_tenant(client)
    after = patch_tenant(client, tenant_id, {field: TENANT_OTHER[field]})
    expected = {**TENANT, field: TENANT_OTHER[field]}
    if field == "on_limit":  # an object merges: the sent members win, the others stay
        expected["on_limit"] = {**TENANT["on_limit"], **TENANT_OTHER["on_limit"]}
    assert after == expected


@pytest.mark.parametrize(
    ("field", "member"),
    [("limits", m) for m in TENANT["limits"]]
    + [("budget", m) for m in TENANT["budget"]]
    + [("on_limit", m) for m in TENANT_OTHER["on_limit"]],
)
def test_a_tenant_patch_of_one_member_leaves_the_object_s_other_members(
    client: httpx.Client, field: str, member: str
) -> None:
    tenant_id = new_tenant(client)
    after = patch_tenant(client, tenant_id, {field: {member: TENANT_OTHER[field][member]}})
    assert after == {**TENANT, field: {**TENANT[field], member: TENANT_OTHER[field][member]}}


@pytest.mark.parametrize("field", list(TENANT))
def test_null_resets_a_tenant_field_to_its_default_and_only_that(client: httpx.Client, field: str) -> None:
    tenant_id = new_tenant(client)
    after = patch_tenant(client, tenant_id, {field: None})
    assert after == {**TENANT, field: TENANT_DEFAULT[field]}


@pytest.mark.parametrize(
    ("field", "member", "default"),
    [("limits", m, None) for m in TENANT["limits"]] + [("on_limit", "budget", ...), ("budget", "period", "month")],
)
def test_null_removes_one_member_of_an_object(client: httpx.Client, field: str, member: str, default: Any) -> None:
    tenant_id = new_tenant(client)
    after = patch_tenant(client, tenant_id, {field: {member: None}})
    expected = dict(TENANT[field])
    if default is ...:
        del expected[member]
    else:
        expected[member] = default
    assert after == {**TENANT, field: expected}


def test_a_patch_can_add_change_and_remove_in_one_object(client: httpx.Client) -> None:
    tenant_id = new_tenant(client)
    body = {"limits": {"rpm": None, "tpm": 1}, "on_limit": {"queue": None, "tpm": "downgrade:small"}, "weight": 2}
    after = patch_tenant(client, tenant_id, body)
    assert after["limits"] == {**TENANT["limits"], "rpm": None, "tpm": 1}
    assert after["on_limit"] == {"rpm": "reject", "budget": "downgrade:small", "tpm": "downgrade:small"}
    assert after["weight"] == 2 and after["budget"] == TENANT["budget"]


def test_an_empty_patch_changes_nothing(client: httpx.Client) -> None:
    tenant_id = new_tenant(client)
    assert patch_tenant(client, tenant_id, {}) == TENANT
    assert patch_tenant(client, tenant_id, {"limits": {}, "on_limit": {}, "budget": {}}) == TENANT


def test_a_budget_is_set_with_an_amount_and_its_period_alone_needs_one(client: httpx.Client) -> None:
    client.post("/admin/tenants", json={"id": "nobudget"})
    resp = client.patch("/admin/tenants/nobudget", json={"budget": {"period": "week"}})
    assert resp.status_code == 409, resp.text
    assert resp.json()["error"]["param"] == "budget.amount"
    assert client.get("/admin/tenants/nobudget").json()["budget"] is None
    after = patch_tenant(client, "nobudget", {"budget": {"amount": 5}})
    assert after["budget"] == {"amount": 5.0, "period": "month"}
    after = patch_tenant(client, "nobudget", {"budget": {"period": "week"}})
    assert after["budget"] == {"amount": 5.0, "period": "week"}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"weight": 0}, "weight"),
        ({"limits": {"rpm": 0}}, "limits.rpm"),
        ({"limits": {"burst": 5}}, "limits.burst"),
        ({"budget": {"amount": None}}, "budget.amount"),
        ({"budget": {"amount": -1}}, "budget.amount"),
        ({"on_limit": {"nope": "reject"}}, "on_limit.nope"),
        ({"on_limit": {"rpm": "fallback"}}, "on_limit.rpm"),
        ({"models": ["ok", ""]}, "models[1]"),
        ({"cache_scope": "everyone"}, "cache_scope"),
        ({"id": "renamed"}, "id"),
        ({"config_managed": True}, "config_managed"),
    ],
)
def test_an_invalid_tenant_patch_is_refused_naming_the_field_and_changes_nothing(
    client: httpx.Client, body: dict[str, Any], param: str
) -> None:
    tenant_id = new_tenant(client)
    resp = client.patch(f"/admin/tenants/{tenant_id}", json=body)
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["param"] == param
    assert tenant_fields(client.get(f"/admin/tenants/{tenant_id}").json()) == TENANT


def test_the_merge_patch_media_type_is_accepted(client: httpx.Client) -> None:
    tenant_id = new_tenant(client)
    resp = client.patch(
        f"/admin/tenants/{tenant_id}",
        content=b'{"limits": {"tpm": null}}',
        headers={"Content-Type": "application/merge-patch+json"},
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["limits"] == {**TENANT["limits"], "tpm": None}


def test_the_audit_log_records_the_patch_as_sent(client: httpx.Client) -> None:
    tenant_id = new_tenant(client)
    patch_tenant(client, tenant_id, {"limits": {"tpm": None, "rpm": 5}})
    entries = client.get("/admin/audit", params={"limit": 1000}).json()["data"]
    last = [e for e in entries if e["target"] == f"tenant:{tenant_id}"][-1]
    assert last["action"] == "tenant.update"
    assert last["details"] == {"changes": {"limits": {"tpm": None, "rpm": 5}}}


# --- keys -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", list(KEY_DEFAULT))
def test_a_key_patch_of_one_field_leaves_every_other_field(client: httpx.Client, field: str) -> None:
    key_id, before = new_key(client)
    after = patch_key(client, key_id, {field: KEY_OTHER[field]})
    assert after == {**before, field: KEY_OTHER[field]}


@pytest.mark.parametrize("member", list(TENANT["limits"]))
def test_a_key_patch_of_one_limit_leaves_the_others(client: httpx.Client, member: str) -> None:
    key_id, before = new_key(client)
    after = patch_key(client, key_id, {"limits": {member: KEY_OTHER["limits"][member]}})
    assert after == {**before, "limits": {**before["limits"], member: KEY_OTHER["limits"][member]}}


@pytest.mark.parametrize("field", list(KEY_DEFAULT))
def test_null_resets_a_key_field_to_its_default_and_only_that(client: httpx.Client, field: str) -> None:
    key_id, before = new_key(client)
    after = patch_key(client, key_id, {field: None})
    assert after == {**before, field: KEY_DEFAULT[field]}


def test_null_removes_one_limit_of_a_key(client: httpx.Client) -> None:
    key_id, before = new_key(client)
    after = patch_key(client, key_id, {"limits": {"tpm": None}})
    assert after == {**before, "limits": {**before["limits"], "tpm": None}}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"limits": {"rpm": 0}}, "limits.rpm"),
        ({"revoked": False}, "revoked"),
        ({"tenant_id": "other"}, "tenant_id"),
        ({"models": [""]}, "models[0]"),
    ],
)
def test_an_invalid_key_patch_is_refused_naming_the_field(
    client: httpx.Client, body: dict[str, Any], param: str
) -> None:
    key_id, before = new_key(client)
    resp = client.patch(f"/admin/keys/{key_id}", json=body)
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["param"] == param
    assert {f: client.get(f"/admin/keys/{key_id}").json()[f] for f in KEY_DEFAULT} == before
