"""Invariant 1 and 7: provider storage only where every class allows it; detectors raise the
classification; deletion reaches the provider's copies."""

from __future__ import annotations

import json
from typing import Any

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from service.simulator import RunningSimulator

from ..conftest import Tenant
from .helpers import assert_problem, open_conversation, row_counts, take_turn

FAQ = {"route": "public-faq", "data_classes": ["public"]}
CARD = "4111 1111 1111 1111"


async def _audit(api: httpx.AsyncClient, tenant: Tenant, **params: str) -> list[dict[str, Any]]:
    return list(
        (
            await api.get("/v1/audit/events", params=params | {"limit": "1000"}, headers=tenant.headers("auditor"))
        ).json()["events"]
    )


async def test_permitted_route_stores_with_provider_and_delete_removes_the_copy(
    api: httpx.AsyncClient, tenant: Tenant, gemini: RunningSimulator, engine: AsyncEngine
) -> None:
    """A public route whose classes all allow it calls with store=true, records the copy, and deletion deletes it upstream."""
    conversation = await open_conversation(api, tenant.headers(), FAQ)
    turn = await take_turn(api, tenant.headers(), conversation, "What are your opening hours?")
    assert turn["storage"]["store"] is True
    assert "provider_storage" not in turn["storage"]
    assert turn["storage"]["reason"].startswith("permitted:")
    (create,) = gemini.app.create_requests()
    assert create.body["store"] is True
    interaction_id = create.response["id"]
    assert gemini.app.store.get(interaction_id)  # the provider holds a copy now
    json.loads(turn["output_text"])  # public-faq asks for JSON output
    assert [e["resource"]["id"] for e in await _audit(api, tenant, action="upstream.store")] == [interaction_id]

    assert (await api.delete(f"/v1/conversations/{conversation}", headers=tenant.headers())).status_code == 200
    deletes = [r for r in gemini.app.requests if r.method == "DELETE"]
    assert [r.path for r in deletes] == [f"/v1/interactions/{interaction_id}"]
    async with engine.connect() as connection:
        deleted_at = (
            await connection.execute(
                text("SELECT deleted_at FROM upstream_interactions WHERE id = :i"), {"i": interaction_id}
            )
        ).scalar_one()
    assert deleted_at is not None
    assert [e["outcome"] for e in await _audit(api, tenant, action="upstream.delete")] == ["success"]


async def test_denying_routes_never_store(api: httpx.AsyncClient, tenant: Tenant, gemini: RunningSimulator) -> None:
    """A PHI route sends store=false and never a previous_interaction_id or background flag."""
    conversation = await open_conversation(api, tenant.headers())
    await take_turn(api, tenant.headers(), conversation, "one")
    await take_turn(api, tenant.headers(), conversation, "two")
    for body in gemini.app.creates():
        assert body["store"] is False
        assert "previous_interaction_id" not in body
        assert "background" not in body


async def test_card_number_on_a_public_route_is_refused_before_the_model(
    api: httpx.AsyncClient, tenant: Tenant, gemini: RunningSimulator, engine: AsyncEngine
) -> None:
    """A card number typed into a public (provider-stored) conversation is refused: nothing goes upstream, the hit is audited by class."""
    conversation = await open_conversation(api, tenant.headers(), FAQ)
    before = await row_counts(engine)
    response = await api.post(
        f"/v1/conversations/{conversation}/turns", json={"input": f"my card is {CARD}"}, headers=tenant.headers()
    )
    assert_problem(response, 422, "data-class-not-allowed")
    assert gemini.app.creates() == []
    assert await row_counts(engine) == before
    (hit,) = await _audit(api, tenant, action="detector.hit")
    assert hit["data_classes"] == ["pan"]
    assert hit["resource"]["id"] == conversation
    # The number as typed and as digits (a hash or id may hold "4111" by chance, not 16 digits).
    records = json.dumps(await _audit(api, tenant))
    assert CARD not in records
    assert CARD.replace(" ", "") not in records


async def test_detected_class_raises_classification_for_good(
    api: httpx.AsyncClient, tenant: Tenant, gemini: RunningSimulator
) -> None:
    """An SSN in a PHI conversation adds `pii` to its classes, and the classes never fall back."""
    conversation = await open_conversation(api, tenant.headers(), {"route": "patient-intake", "data_classes": ["phi"]})
    await take_turn(api, tenant.headers(), conversation, "my SSN is 123-45-6789")
    await take_turn(api, tenant.headers(), conversation, "nothing sensitive here")
    view = (await api.get(f"/v1/conversations/{conversation}", headers=tenant.headers())).json()
    assert view["data_classes"] == ["phi", "pii"]
    assert all(body["store"] is False for body in gemini.app.creates())
