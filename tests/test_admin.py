"""The admin API's basic shapes: tenants and keys over HTTP, as an operator provisions them."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.support.gateway import GatewayProc, start_gateway


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProc]:
    proc = start_gateway({}, tmp_path_factory.mktemp("gw-admin"))
    yield proc
    proc.stop()


def admin(gw: GatewayProc) -> dict[str, str]:
    return {"Authorization": f"Bearer {gw.admin_key}"}


def test_a_tenant_and_its_key_are_provisioned(gw: GatewayProc) -> None:
    body = {
        "id": "acme",
        "weight": 2,
        "models": ["*"],
        "limits": {"rpm": 600, "tpm": 100000, "max_concurrency": 8},
        "budget": {"amount": 50, "period": "day"},
        "cache_scope": "tenant",
    }
    resp = httpx.post(gw.url + "/admin/tenants", json=body, headers=admin(gw))
    assert resp.status_code == 201, resp.text
    tenant = resp.json()
    assert tenant["id"] == "acme" and tenant["weight"] == 2 and tenant["limits"]["rpm"] == 600
    assert resp.headers["x-request-id"]

    assert httpx.post(gw.url + "/admin/tenants", json=body, headers=admin(gw)).status_code == 409

    resp = httpx.post(gw.url + "/admin/tenants/acme/keys", json={"name": "ci"}, headers=admin(gw))
    assert resp.status_code == 201
    created = resp.json()
    assert created["key"].startswith("sk-gw-") and created["id"]
    secret = created["key"]

    listed = httpx.get(gw.url + "/admin/tenants/acme/keys", headers=admin(gw))
    assert listed.status_code == 200 and secret not in listed.text
    assert [k["id"] for k in listed.json()] == [created["id"]]
    one = httpx.get(gw.url + f"/admin/keys/{created['id']}", headers=admin(gw))
    assert one.status_code == 200 and "key" not in one.json() and secret not in one.text

    # The new key works at once on the client API.
    models = httpx.get(gw.url + "/v1/models", headers={"Authorization": f"Bearer {secret}"})
    assert models.status_code == 200


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"id": "Bad Id"}, "id"),
        ({"id": "ok1", "weight": 0}, "weight"),
        ({"id": "ok2", "limits": {"rpm": -5}}, "limits.rpm"),
        ({"id": "ok3", "cache_scope": "everyone"}, "cache_scope"),
        ({"id": "ok4", "budget": {"amount": 1, "period": "year"}}, "budget.period"),
        ({"id": "ok5", "unknown": 1}, "unknown"),
    ],
)
def test_422_names_the_field(gw: GatewayProc, body: dict[str, object], param: str) -> None:
    resp = httpx.post(gw.url + "/admin/tenants", json=body, headers=admin(gw))
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


def test_auth(gw: GatewayProc) -> None:
    assert httpx.get(gw.url + "/admin/tenants").status_code == 401
    assert httpx.get(gw.url + "/admin/tenants", headers={"Authorization": "Bearer nope"}).status_code == 401
    httpx.post(gw.url + "/admin/tenants", json={"id": "keyed"}, headers=admin(gw))
    key = httpx.post(gw.url + "/admin/tenants/keyed/keys", json={}, headers=admin(gw)).json()["key"]
    resp = httpx.get(gw.url + "/admin/tenants", headers={"Authorization": f"Bearer {key}"})
    assert resp.status_code == 403


def test_404_and_pagination(gw: GatewayProc) -> None:
    assert httpx.get(gw.url + "/admin/tenants/ghost", headers=admin(gw)).status_code == 404
    assert httpx.post(gw.url + "/admin/tenants/ghost/keys", json={}, headers=admin(gw)).status_code == 404
    for i in range(5):
        httpx.post(gw.url + "/admin/tenants", json={"id": f"page-{i}"}, headers=admin(gw))
    seen: list[str] = []
    after = None
    while True:
        params = {"limit": "2", **({"after": after} if after else {})}
        page = httpx.get(gw.url + "/admin/tenants", params=params, headers=admin(gw)).json()
        seen += [t["id"] for t in page["data"]]
        if not page["has_more"]:
            break
        after = page["next_after"]
    assert [s for s in seen if s.startswith("page-")] == [f"page-{i}" for i in range(5)]
    assert len(seen) == len(set(seen))


def test_openapi_describes_admin(gw: GatewayProc) -> None:
    doc = httpx.get(gw.url + "/openapi.json").json()
    assert "/admin/tenants" in doc["paths"] and "/admin/tenants/{tenant_id}/keys" in doc["paths"]


def test_update_delete_revoke_rotate_and_audit(gw: GatewayProc) -> None:
    h = admin(gw)
    assert httpx.post(gw.url + "/admin/tenants", json={"id": "lifecycle", "weight": 1}, headers=h).status_code == 201
    patched = httpx.patch(gw.url + "/admin/tenants/lifecycle", json={"weight": 3, "limits": {"rpm": 5}}, headers=h)
    assert patched.status_code == 200 and patched.json()["weight"] == 3 and patched.json()["limits"]["rpm"] == 5
    assert patched.json()["cache_scope"] == "tenant"  # untouched fields stay
    bad = httpx.patch(gw.url + "/admin/tenants/lifecycle", json={"cache_scope": "nope"}, headers=h)
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "cache_scope"

    created = httpx.post(gw.url + "/admin/tenants/lifecycle/keys", json={"name": "a"}, headers=h).json()
    key_id, secret = created["id"], created["key"]

    def works(s: str) -> bool:
        return httpx.get(gw.url + "/v1/models", headers={"Authorization": f"Bearer {s}"}).status_code == 200

    assert works(secret)
    # Rotation: the new key works, the old one keeps working for the grace period.
    rotated = httpx.post(gw.url + f"/admin/keys/{key_id}/rotate", json={"grace_period_s": 3600}, headers=h)
    assert rotated.status_code == 201
    new_id, new_secret = rotated.json()["id"], rotated.json()["key"]
    assert works(new_secret) and works(secret)
    # Zero grace: the old one stops at once.
    again = httpx.post(gw.url + f"/admin/keys/{new_id}/rotate", json={"grace_period_s": 0}, headers=h).json()
    assert not works(new_secret) and works(again["key"])

    # Disable, enable, revoke: each takes effect on the next request (same replica).
    assert httpx.patch(gw.url + f"/admin/keys/{again['id']}", json={"disabled": True}, headers=h).status_code == 200
    assert not works(again["key"])
    assert httpx.patch(gw.url + f"/admin/keys/{again['id']}", json={"disabled": False}, headers=h).status_code == 200
    assert works(again["key"])
    revoked = httpx.post(gw.url + f"/admin/keys/{again['id']}/revoke", headers=h)
    assert revoked.status_code == 200 and revoked.json()["revoked"] is True
    assert not works(again["key"])

    assert httpx.delete(gw.url + "/admin/tenants/lifecycle", headers=h).status_code == 204
    assert httpx.get(gw.url + "/admin/tenants/lifecycle", headers=h).status_code == 404
    assert httpx.get(gw.url + f"/admin/keys/{key_id}", headers=h).status_code == 404
    assert not works(secret)

    log = httpx.get(gw.url + "/admin/audit", params={"limit": 1000}, headers=h)
    assert log.status_code == 200
    actions = [(e["action"], e["target"]) for e in log.json()["data"]]
    for expected in [
        ("tenant.create", "tenant:lifecycle"),
        ("tenant.update", "tenant:lifecycle"),
        ("key.rotate", f"key:{key_id}"),
        ("key.revoke", f"key:{again['id']}"),
        ("tenant.delete", "tenant:lifecycle"),
    ]:
        assert expected in actions
    for s in (secret, new_secret, again["key"], gw.admin_key):
        assert s not in log.text


def test_config_managed_objects_are_refused(tmp_path_factory: pytest.TempPathFactory) -> None:
    key = "sk-gw-" + "M" * 43
    config = {"tenants": [{"id": "declared", "keys": [{"name": "ci", "key_env": "DECLARED_KEY"}]}]}
    proc = start_gateway(config, tmp_path_factory.mktemp("gw-managed"), env={"DECLARED_KEY": key})
    try:
        h = admin(proc)
        tenant = httpx.get(proc.url + "/admin/tenants/declared", headers=h).json()
        assert tenant["config_managed"] is True
        resp = httpx.patch(proc.url + "/admin/tenants/declared", json={"weight": 5}, headers=h)
        assert resp.status_code == 409 and resp.json()["error"]["code"] == "config_managed"
        assert httpx.delete(proc.url + "/admin/tenants/declared", headers=h).status_code == 409
        keys = httpx.get(proc.url + "/admin/tenants/declared/keys", headers=h).json()
        assert keys[0]["config_managed"] is True
        assert httpx.post(proc.url + f"/admin/keys/{keys[0]['id']}/revoke", headers=h).status_code == 409
        assert httpx.get(proc.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    finally:
        proc.stop()


def test_metrics_token_protects_tenant_series(tmp_path_factory: pytest.TempPathFactory) -> None:
    proc = start_gateway({}, tmp_path_factory.mktemp("gw-metrics"), env={"GATEWAY_METRICS_TOKEN": "scrape-me-123"})
    try:
        assert httpx.get(proc.url + "/metrics").status_code == 401
        assert httpx.get(proc.url + "/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = httpx.get(proc.url + "/metrics", headers={"Authorization": "Bearer scrape-me-123"})
        assert ok.status_code == 200 and "gateway_requests_total" in ok.text
    finally:
        proc.stop()


def test_a_patch_with_null_for_a_required_field_resets_it_and_the_key_stays_usable(gw: GatewayProc) -> None:
    """Found by schemathesis: `{"disabled": null}` was stored as is, after which every read of the key (and
    the tenant's key list) answered 500. In a merge patch `null` removes the field: back to its default."""
    h = admin(gw)
    httpx.post(gw.url + "/admin/tenants", json={"id": "nulls"}, headers=h)
    created = httpx.post(gw.url + "/admin/tenants/nulls/keys", json={"name": "n"}, headers=h).json()
    assert httpx.patch(gw.url + f"/admin/keys/{created['id']}", json={"disabled": True}, headers=h).status_code == 200
    resp = httpx.patch(
        gw.url + f"/admin/keys/{created['id']}",
        json={"disabled": None, "limits": None, "name": None, "models": None, "expires_at": None},
        headers=h,
    )
    assert resp.status_code == 200, resp.text
    key = resp.json()
    assert key["disabled"] is False and key["name"] is None and key["models"] is None and key["expires_at"] is None
    assert set(key["limits"].values()) == {None}
    assert httpx.get(gw.url + f"/admin/keys/{created['id']}", headers=h).status_code == 200
    assert httpx.get(gw.url + "/admin/tenants/nulls/keys", headers=h).status_code == 200
    models = httpx.get(gw.url + "/v1/models", headers={"Authorization": f"Bearer {created['key']}"})
    assert models.status_code == 200


@pytest.mark.parametrize(
    ("path", "params", "param"),
    [
        ("/admin/tenants/ranges/usage", {"since": "1e308"}, "since"),
        ("/admin/tenants/ranges/usage", {"until": "inf"}, "until"),
        ("/admin/tenants/ranges/usage", {"since": "nan"}, "since"),
        ("/admin/audit", {"after": str(2**70)}, "after"),
    ],
)
def test_out_of_range_numbers_get_422_not_500(gw: GatewayProc, path: str, params: dict[str, str], param: str) -> None:
    """Found by schemathesis: they reached SQLite as integers too large for it (OverflowError, 500)."""
    httpx.post(gw.url + "/admin/tenants", json={"id": "ranges"}, headers=admin(gw))
    resp = httpx.get(gw.url + path, params=params, headers=admin(gw))
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["param"] == param


def test_usage_range_defaults_to_30_days_before_until_and_an_inverted_range_is_empty(gw: GatewayProc) -> None:
    httpx.post(gw.url + "/admin/tenants", json={"id": "ranges"}, headers=admin(gw))
    past = httpx.get(
        gw.url + "/admin/tenants/ranges/usage", params={"until": "2000-01-31T00:00:00Z"}, headers=admin(gw)
    )
    assert past.status_code == 200 and past.json()["until"] - past.json()["since"] == 30 * 86400
    inverted = {"since": "2001-01-01T00:00:00Z", "until": "2000-01-01T00:00:00Z"}
    resp = httpx.get(gw.url + "/admin/tenants/ranges/usage", params=inverted, headers=admin(gw))
    assert resp.status_code == 200 and resp.json()["requests"] == 0


@pytest.mark.parametrize(
    ("method", "path", "content", "status", "code"),
    [
        ("POST", "/admin/tenants", b"{not json", 422, "validation_error"),
        ("POST", "/admin/tenants/x/keys", b"\xff\xfe", 422, "validation_error"),
        ("GET", "/admin/nothing-here", None, 404, "not_found"),
        ("DELETE", "/admin/tenants", None, 405, "method_not_allowed"),
    ],
)
def test_framework_refusals_are_openai_shaped(
    gw: GatewayProc, method: str, path: str, content: bytes | None, status: int, code: str
) -> None:
    headers = {**admin(gw), "content-type": "application/json"}
    resp = httpx.request(method, gw.url + path, content=content, headers=headers)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    assert resp.headers["x-request-id"]


def test_405_lists_every_method_of_the_path(gw: GatewayProc) -> None:
    """Starlette's own 405 named only the first matching route's methods (`Allow: POST` on /admin/tenants)."""
    resp = httpx.request("OPTIONS", gw.url + "/admin/tenants", headers=admin(gw))
    assert resp.status_code == 405
    assert resp.headers["allow"] == "GET, POST"
    resp = httpx.request("PUT", gw.url + "/admin/tenants/x", headers=admin(gw))
    assert resp.headers["allow"] == "DELETE, GET, PATCH"


def test_openapi_documents_the_bearer_scheme_and_the_error_shape(gw: GatewayProc) -> None:
    doc = httpx.get(gw.url + "/openapi.json").json()
    schemes = doc["components"]["securitySchemes"]
    assert [s["scheme"] for s in schemes.values()] == ["bearer"]
    operation = doc["paths"]["/admin/tenants"]["post"]
    assert operation["security"]
    for status in ("401", "404", "409", "422"):
        ref = operation["responses"][status]["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith("/ErrorBody")


def test_two_authorization_headers_are_refused(gw: GatewayProc) -> None:
    headers = [("Authorization", f"Bearer {gw.admin_key}"), ("Authorization", "Bearer sk-gw-" + "x" * 43)]
    resp = httpx.get(gw.url + "/admin/tenants", headers=headers)
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "duplicate_authorization"


@pytest.mark.parametrize(
    ("tenant", "on_limit", "status", "param"),
    [
        ("onlimit-1", {"queue": "fallback", "rpm": "downgrade:small"}, 201, None),
        ("onlimit-2", {"rpm": "fallback"}, 422, "on_limit.rpm"),
        ("onlimit-3", {"nope": "reject"}, 422, "on_limit.nope"),
    ],
)
def test_on_limit_actions_per_limit(
    gw: GatewayProc, tenant: str, on_limit: dict[str, str], status: int, param: str | None
) -> None:
    """The document states which action each limit takes: `fallback` only for a full queue."""
    resp = httpx.post(gw.url + "/admin/tenants", json={"id": tenant, "on_limit": on_limit}, headers=admin(gw))
    assert resp.status_code == status, resp.text
    if param is not None:
        assert resp.json()["error"]["param"] == param
