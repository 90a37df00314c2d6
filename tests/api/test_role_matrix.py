"""Every operation in the OpenAPI document, called with every role: only the right role gets in,
auditors and ops never receive content, and backends never receive audit records."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from service.config import REPO_ROOT

from ..conftest import CANARY, Tenant
from .helpers import open_conversation, take_turn

DOCUMENT = json.loads((REPO_ROOT / "schemas" / "openapi.json").read_text())
OPERATIONS = [
    (path, method.upper(), spec) for path, methods in DOCUMENT["paths"].items() for method, spec in methods.items()
]
# Which role each tag admits; an operation with a tag missing here fails the test, so a new
# endpoint cannot ship without a decision about who may call it.
ADMITTED: dict[str, set[str | None]] = {"conversations": {"backend"}, "audit": {"auditor"}, "health": {"backend", "auditor", "ops", None}}
BODIES = {
    "CreateConversation": {"route": "patient-intake", "data_classes": ["phi"]},
    "CreateTurn": {"input": "hello again"},
}
AUDIT_FIELDS = ("prev_hash", "record_hash", '"chain"')


@pytest.mark.parametrize(("path", "method", "spec"), OPERATIONS, ids=[f"{m} {p}" for p, m, _ in OPERATIONS])
@pytest.mark.parametrize("role", ["backend", "auditor", "ops", None])
async def test_role_matrix(
    api: httpx.AsyncClient, tenant: Tenant, path: str, method: str, spec: dict[str, Any], role: str | None
) -> None:
    """Each role reaches exactly the operations its tag admits, and sees nothing it must not."""
    (tag,) = spec["tags"]
    assert tag in ADMITTED, f"no role decision for tag {tag!r}"
    conversation = await open_conversation(api, tenant.headers())
    await take_turn(api, tenant.headers(), conversation, f"content {CANARY}")
    url = path.replace("{conversation_id}", conversation)
    headers = tenant.headers(role) if role else {}
    response = await api.request(method, url, headers=headers, json=BODIES.get(spec["operationId"]))
    if role in ADMITTED[tag]:
        assert response.status_code not in (401, 403), response.text
        assert response.status_code < 500, response.text
    elif role is None:
        assert response.status_code == 401, response.text
    else:
        assert response.status_code == 403, response.text
    if role in ("auditor", "ops", None):
        assert CANARY not in response.text
    if role == "backend":
        assert not any(field in response.text for field in AUDIT_FIELDS), response.text
