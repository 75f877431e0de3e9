"""Partial updates as JSON merge patches (RFC 7396), for tenants and keys alike.

A field left out is unchanged; `null` removes it, so it takes its default again (no limit, no budget,
weight 1, the tenant's models); an object (`limits`, `budget`, `on_limit`) merges member by member at any
depth; a list (`models`) is replaced whole. The merged object is validated as a whole before it is stored,
so no patch can leave a record that later reads would refuse.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from gateway.admin.errors import as_422

__all__ = ["apply", "changes", "merge"]

_Record = TypeVar("_Record", bound=BaseModel)


def merge(target: Any, patch: Any) -> Any:
    """RFC 7396 section 2, `MergePatch(target, patch)`, on plain JSON-like values."""
    if not isinstance(patch, dict):
        return patch
    merged = dict(target) if isinstance(target, dict) else {}
    for name, value in patch.items():
        if value is None:
            merged.pop(name, None)
        else:
            merged[name] = merge(merged.get(name), value)
    return merged


def changes(body: BaseModel) -> dict[str, Any]:
    """The merge patch a validated request body carried: the members it sent, `null`s included."""
    return body.model_dump(exclude_unset=True)


def apply(record: _Record, patch: dict[str, Any]) -> _Record:
    """`record` with `patch` merged in, validated again as a whole (422 naming the field if it fails)."""
    try:
        return type(record).model_validate(merge(record.model_dump(), patch))
    except ValidationError as exc:
        raise as_422(exc) from None
