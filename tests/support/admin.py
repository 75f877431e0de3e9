"""Provisioning over the real admin API, as an operator would."""

from __future__ import annotations

from typing import Any

import httpx


def create_tenant(base_url: str, admin_key: str, tenant_id: str, **fields: Any) -> dict[str, Any]:
    resp = httpx.post(
        f"{base_url}/admin/tenants",
        json={"id": tenant_id, **fields},
        headers={"Authorization": f"Bearer {admin_key}"},
    )
    assert resp.status_code == 201, resp.text
    body: dict[str, Any] = resp.json()
    return body


def create_key(base_url: str, admin_key: str, tenant_id: str, **fields: Any) -> str:
    resp = httpx.post(
        f"{base_url}/admin/tenants/{tenant_id}/keys",
        json=fields,
        headers={"Authorization": f"Bearer {admin_key}"},
    )
    assert resp.status_code == 201, resp.text
    key: str = resp.json()["key"]
    return key


def tenant_with_key(base_url: str, admin_key: str, tenant_id: str, **fields: Any) -> str:
    create_tenant(base_url, admin_key, tenant_id, **fields)
    return create_key(base_url, admin_key, tenant_id, name="test")
