"""Every operation in the OpenAPI document, called with every role: only the right role gets in,
auditors and ops never receive content, backends never receive audit records, and no key reaches
another tenant's conversations, subjects, holds or runs."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from service.config import REPO_ROOT

from ..conftest import CANARY, NewTenant, Tenant
from .helpers import PHI_ROUTE, assert_problem, open_conversation, take_turn

DOCUMENT = json.loads((REPO_ROOT / "schemas" / "openapi.json").read_text())
OPERATIONS = [
    (path, method.upper(), spec) for path, methods in DOCUMENT["paths"].items() for method, spec in methods.items()
]
# Which role each tag admits; an operation with a tag missing here fails the test, so a new
# endpoint cannot ship without a decision about who may call it.
ADMITTED: dict[str, set[str | None]] = {
    "conversations": {"backend"},
    "audit": {"auditor"},
    "ops": {"ops"},
    "health": {"backend", "auditor", "ops", None},
}
BODIES = {
    "CreateConversation": {"route": "patient-intake", "data_classes": ["phi"]},
    "CreateTurn": {"input": "hello again"},
    "PlaceHold": {"scope": "tenant", "reason": "role matrix"},
    "StartRetentionRun": {"dry_run": True},
}
# Path parameters other than the conversation: ids of the right shape that name nothing (the
# admitted role gets a 404, which is still in), and a subject.
PATH_VALUES = {
    "{hold_id}": "hold_" + "0" * 30,
    "{run_id}": "run_" + "0" * 30,
    "{turn_id}": "turn_" + "0" * 30,
    "{subject}": "matrix-subject",
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
    for placeholder, value in PATH_VALUES.items():
        url = url.replace(placeholder, value)
    assert "{" not in url, f"no value for a path parameter of {path}"
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


async def test_no_key_reaches_another_tenants_subjects_holds_or_runs(
    api: httpx.AsyncClient, new_tenant: NewTenant
) -> None:
    """Another tenant's ops and backend keys find none of this tenant's runs, holds, conversations or subjects, and change none of them."""
    owner, other = await new_tenant(), await new_tenant()
    subject = "MRN-shared-0042"
    conversation = await open_conversation(api, owner.headers(), {**PHI_ROUTE, "subject": subject})
    await take_turn(api, owner.headers(), conversation, "hello")
    placed = await api.post(
        "/v1/ops/holds",
        json={"scope": "conversation", "conversation_id": conversation, "reason": "case 1"},
        headers=owner.headers("ops"),
    )
    assert placed.status_code == 201, placed.text
    hold = placed.json()["id"]
    started = await api.post("/v1/ops/retention/runs", json={"dry_run": True}, headers=owner.headers("ops"))
    assert started.status_code == 202, started.text
    run = started.json()["id"]

    ops = other.headers("ops")
    assert_problem(await api.get(f"/v1/ops/retention/runs/{run}", headers=ops), 404, "retention-run-not-found")
    assert_problem(await api.delete(f"/v1/ops/holds/{hold}", headers=ops), 404, "hold-not-found")
    assert (await api.get("/v1/ops/holds", headers=ops)).json() == {"holds": []}
    foreign = await api.post(
        "/v1/ops/holds", json={"scope": "conversation", "conversation_id": conversation, "reason": "x"}, headers=ops
    )
    assert_problem(foreign, 422, "invalid-input")
    assert conversation not in (await api.get("/v1/ops/retention/preview", headers=ops)).text
    assert conversation not in (await api.get("/v1/ops/provider-copies", headers=ops)).text

    backend = other.headers()
    assert (await api.get("/v1/conversations", params={"subject": subject}, headers=backend)).json()[
        "conversations"
    ] == []
    assert conversation not in (await api.get("/v1/conversations", headers=backend)).text
    erased = await api.delete(f"/v1/subjects/{subject}", headers=backend)
    assert erased.status_code == 200, erased.text
    assert (erased.json()["payload"]["destroyed"], erased.json()["payload"]["kept"]) == ([], [])

    # The owner's conversation, hold and run are as they were.
    assert (await api.get(f"/v1/conversations/{conversation}", headers=owner.headers())).status_code == 200
    [still] = (await api.get("/v1/ops/holds", params={"active": "true"}, headers=owner.headers("ops"))).json()["holds"]
    assert still["id"] == hold
    assert (await api.get(f"/v1/ops/retention/runs/{run}", headers=owner.headers("ops"))).status_code == 200
    [listed] = (await api.get("/v1/conversations", params={"subject": subject}, headers=owner.headers())).json()[
        "conversations"
    ]
    assert listed["id"] == conversation
