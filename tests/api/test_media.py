"""Media blocks under the route policy: allowed types, decoded sizes and URIs per route (415, 413,
422), strict base64, nothing stored or sent on refusal, and media stored and replayed exactly."""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
import os
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import yaml
from sqlalchemy.ext.asyncio import AsyncEngine

from service.api import create_app
from service.auth_failures import AuthFailures
from service.config import REPO_ROOT
from service.context import ServiceContext
from service.conversations import load_cipher, read_steps
from service.models import Conversation
from service.policy import media_body_warnings, parse_policy
from service.simulator import RunningSimulator

from ..conftest import CANARY, Tenant, asgi_transport
from .helpers import assert_problem, open_conversation, row_counts, take_turn

INTAKE = {"route": "patient-intake", "data_classes": ["phi"]}
SMALL = {"route": "intake-small", "data_classes": ["phi"]}
BILLING = {"route": "billing-support", "data_classes": ["pan"]}
# A PNG's signature and some bytes of the canary: content that must never reach a record.
IMAGE = b"\x89PNG\r\n\x1a\n" + CANARY.encode() + os.urandom(2000)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def image(data: bytes = IMAGE, mime_type: str = "image/png") -> dict[str, Any]:
    return {"type": "image", "data": b64(data), "mime_type": mime_type}


async def _turn(api: httpx.AsyncClient, tenant: Tenant, conversation: str, data: Any) -> httpx.Response:
    return await api.post(f"/v1/conversations/{conversation}/turns", json={"input": data}, headers=tenant.headers())


async def _starts(api: httpx.AsyncClient, tenant: Tenant, conversation: str) -> list[dict[str, Any]]:
    response = await api.get(
        "/v1/audit/events", params={"action": "turn.start", "limit": "1000"}, headers=tenant.headers("auditor")
    )
    assert response.status_code == 200, response.text
    return [e for e in response.json()["events"] if e["resource"]["id"] == conversation]


@pytest.fixture
async def small(ctx: ServiceContext, gemini: RunningSimulator) -> AsyncIterator[httpx.AsyncClient]:
    """The example policy plus `intake-small`: patient-intake with small limits, and documents by
    URI from one bucket."""
    gemini.app.reset()
    document = yaml.safe_load((REPO_ROOT / "ops" / "policy.example.yaml").read_text(encoding="utf-8"))
    document["routes"]["intake-small"] = copy.deepcopy(document["routes"]["patient-intake"]) | {
        "media": {
            "allowed": ["image/png", "application/pdf"],
            "max_bytes": 3000,
            "max_total_bytes": 5000,
            "uri_prefixes": ["gs://intake-letters/"],
        }
    }
    own = dataclasses.replace(ctx, policy=parse_policy(document, source="test"), auth_failures=AuthFailures())
    transport = asgi_transport(create_app(own, max_body_bytes=64_000))
    async with httpx.AsyncClient(transport=transport, base_url="http://custody.test") as client:
        yield client


async def test_an_image_is_stored_and_replayed_byte_for_byte(
    api: httpx.AsyncClient, tenant: Tenant, gemini: RunningSimulator, ctx: ServiceContext
) -> None:
    """A turn with an image reaches the model (which reports its type and size), is stored as the bytes sent, and goes back upstream as those bytes on the next turn."""
    conversation = await open_conversation(api, tenant.headers(), INTAKE)
    blocks = [{"type": "text", "text": "this rash, since Monday"}, image()]
    first = await take_turn(api, tenant.headers(), conversation, blocks)
    assert f"Media in this input: image image/png {len(IMAGE)} bytes." in first["output_text"]
    (sent,) = gemini.app.create_requests()
    assert sent.body["input"][-1] == {"type": "user_input", "content": blocks}

    async with ctx.sessions() as session:
        row = await session.get(Conversation, conversation)
        assert row is not None
        stored = [step for _, _, step in await read_steps(session, await load_cipher(session, ctx, row))]
    # The stored input step is the very bytes the first request carried.
    assert stored[0] in sent.raw
    assert base64.b64decode(json.loads(stored[0])["content"][1]["data"]) == IMAGE

    gemini.app.reset()
    second = await take_turn(api, tenant.headers(), conversation, "and now it itches")
    assert f"Media earlier in the history: image image/png {len(IMAGE)} bytes." in second["output_text"]
    (replayed,) = gemini.app.create_requests()
    assert replayed.raw.count(stored[0]) == 1
    assert replayed.body["input"][0] == {"type": "user_input", "content": blocks}


async def test_a_route_without_media_refuses_every_media_block(
    api: httpx.AsyncClient, tenant: Tenant, gemini: RunningSimulator, engine: AsyncEngine
) -> None:
    """billing-support has no `media` section: an image there is refused 415, nothing stored or sent, and the refused turn.start audited by reason, without the block's content."""
    conversation = await open_conversation(api, tenant.headers(), BILLING)
    before = await row_counts(engine)
    response = await _turn(api, tenant, conversation, [{"type": "text", "text": "my statement"}, image()])
    body = assert_problem(response, 415, "media-type-not-allowed")
    assert body["pointer"] == "/input/1"
    assert "takes no media" in body["detail"]
    assert gemini.app.creates() == []
    assert await row_counts(engine) == before
    (start,) = await _starts(api, tenant, conversation)
    assert (start["outcome"], start["reason"]) == ("denied", "media_type_not_allowed")
    assert start["details"]["media"] == {"blocks": 1, "bytes": len(IMAGE)}
    assert CANARY not in json.dumps(start) + response.text
    # Text alone still goes through: the refusal left no lease or turn behind.
    await take_turn(api, tenant.headers(), conversation, "my statement")


@pytest.mark.parametrize(
    ("blocks", "status", "slug", "pointer"),
    [
        # A type the route does not list, of the right kind: 415.
        ([image(mime_type="image/gif")], 415, "media-type-not-allowed", "/input/0/mime_type"),
        # One block over max_bytes (3000): 413.
        ([image(os.urandom(3001))], 413, "media-too-large", "/input/0/data"),
        # Each block within max_bytes, together over max_total_bytes (5000): 413 at the block that tips it.
        ([image(os.urandom(2500)), image(os.urandom(2501))], 413, "media-too-large", "/input/1/data"),
        # A URI outside the route's prefixes, one that climbs out of it, and a look-alike bucket.
        (
            [{"type": "document", "uri": "gs://other/letter.pdf", "mime_type": "application/pdf"}],
            422,
            "media-uri-not-allowed",
            "/input/0/uri",
        ),
        (
            [{"type": "document", "uri": "gs://intake-letters/../x.pdf", "mime_type": "application/pdf"}],
            422,
            "media-uri-not-allowed",
            "/input/0/uri",
        ),
        (
            [{"type": "document", "uri": "gs://intake-letters-evil/x.pdf", "mime_type": "application/pdf"}],
            422,
            "media-uri-not-allowed",
            "/input/0/uri",
        ),
    ],
)
async def test_media_outside_the_route_rule_is_refused(
    small: httpx.AsyncClient,
    tenant: Tenant,
    gemini: RunningSimulator,
    engine: AsyncEngine,
    blocks: list[dict[str, Any]],
    status: int,
    slug: str,
    pointer: str,
) -> None:
    """Disallowed types (415), oversized blocks or turns (413) and URIs the route does not take (422) are refused with nothing stored or sent, and audited."""
    conversation = await open_conversation(small, tenant.headers(), SMALL)
    before = await row_counts(engine)
    response = await _turn(small, tenant, conversation, blocks)
    body = assert_problem(response, status, slug)
    assert body["pointer"] == pointer
    assert gemini.app.creates() == []
    assert await row_counts(engine) == before
    (start,) = await _starts(small, tenant, conversation)
    assert (start["outcome"], start["reason"]) == ("denied", slug.replace("-", "_"))


async def test_media_within_the_route_rule_goes_through(
    small: httpx.AsyncClient, tenant: Tenant, gemini: RunningSimulator
) -> None:
    """At the limits exactly, with a MIME type in another case and with parameters, and a document by an allowed URI: accepted, and the model reports what it got."""
    conversation = await open_conversation(small, tenant.headers(), SMALL)
    blocks = [
        image(os.urandom(3000), "IMAGE/PNG"),
        {"type": "document", "data": b64(os.urandom(2000)), "mime_type": "application/pdf; x=1"},
        {"type": "document", "uri": "gs://intake-letters/referral.pdf", "mime_type": "application/pdf"},
    ]
    answer = await take_turn(small, tenant.headers(), conversation, blocks)
    assert (
        "Media in this input: image IMAGE/PNG 3000 bytes; document application/pdf; x=1 2000 bytes; "
        "document application/pdf by uri." in answer["output_text"]
    )
    (start,) = await _starts(small, tenant, conversation)
    assert start["outcome"] == "success"
    assert start["details"]["media"] == {"blocks": 3, "bytes": 5000}


@pytest.mark.parametrize(
    ("block", "pointer"),
    [
        ({"type": "image", "data": b64(IMAGE)[:-1], "mime_type": "image/png"}, "/input/0/data"),  # length
        ({"type": "image", "data": "QUJD\nRA==", "mime_type": "image/png"}, "/input/0/data"),  # a line break
        ({"type": "image", "data": "QUJD RA==", "mime_type": "image/png"}, "/input/0/data"),  # a space
        ({"type": "image", "data": "QUJDRA", "mime_type": "image/png"}, "/input/0/data"),  # unpadded
        ({"type": "image", "data": "QUJDRB==", "mime_type": "image/png"}, "/input/0/data"),  # stray bits
        ({"type": "image", "data": "QUJD-_==", "mime_type": "image/png"}, "/input/0/data"),  # URL-safe
        ({"type": "image", "data": "QUJDRé==", "mime_type": "image/png"}, "/input/0/data"),  # not ASCII
        ({"type": "image", "data": "", "mime_type": "image/png"}, "/input/0/data"),
        ({"type": "image", "data": "QUJD"}, "/input/0/mime_type"),  # no type
        ({"type": "image", "data": "QUJD", "mime_type": "application/pdf"}, "/input/0/mime_type"),  # wrong kind
        ({"type": "image", "data": "QUJD", "mime_type": "png"}, "/input/0/mime_type"),
        ({"type": "image", "data": "QUJD", "uri": "gs://intake-letters/x", "mime_type": "image/png"}, "/input/0"),
        ({"type": "image", "mime_type": "image/png"}, "/input/0"),
    ],
)
async def test_malformed_media_is_invalid_input(
    small: httpx.AsyncClient,
    tenant: Tenant,
    gemini: RunningSimulator,
    engine: AsyncEngine,
    block: dict[str, Any],
    pointer: str,
) -> None:
    """Inline data must be strict base64 (RFC 4648: standard alphabet, padded, no whitespace, no stray bits), a block carries exactly one of data or uri and a MIME type of its kind: 422 before anything else, like any malformed input."""
    conversation = await open_conversation(small, tenant.headers(), SMALL)
    before = await row_counts(engine)
    response = await _turn(small, tenant, conversation, [block])
    body = assert_problem(response, 422, "invalid-input")
    assert body["pointer"] == pointer
    assert gemini.app.creates() == []
    assert await row_counts(engine) == before


async def test_media_in_a_function_result_is_held_to_the_same_rule(
    small: httpx.AsyncClient, tenant: Tenant, gemini: RunningSimulator
) -> None:
    """A function result's content list may carry media: too large there is refused as in user input."""
    conversation = await open_conversation(small, tenant.headers(), SMALL)
    called = await take_turn(small, tenant.headers(), conversation, "call lookup_appointment_slots")
    call = next(step for step in called["steps"] if step["type"] == "function_call")
    result = {"type": "function_result", "call_id": call["id"], "result": [image(os.urandom(4000))]}
    response = await _turn(small, tenant, conversation, [result])
    body = assert_problem(response, 413, "media-too-large")
    assert body["pointer"] == "/input/0/result/0/data"
    result["result"] = [{"type": "text", "text": "slots"}, image(os.urandom(100), "image/gif")]
    body = assert_problem(await _turn(small, tenant, conversation, [result]), 415, "media-type-not-allowed")
    assert body["pointer"] == "/input/0/result/1/mime_type"
    assert len(gemini.app.creates()) == 1


def test_the_example_policy_fits_the_kubernetes_body_limit() -> None:
    """The base deployment's CUSTODY_MAX_BODY_BYTES leaves room for the largest media its policy takes, and a lower limit is warned about at startup."""
    deployment = yaml.safe_load((REPO_ROOT / "ops" / "k8s" / "base" / "deployment.yaml").read_text())
    (container,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "custody"]
    limit = int(next(e["value"] for e in container["env"] if e["name"] == "CUSTODY_MAX_BODY_BYTES"))
    policy = parse_policy(
        yaml.safe_load((REPO_ROOT / "ops" / "k8s" / "base" / "policy.yaml").read_text()), source="k8s"
    )
    assert media_body_warnings(policy, limit) == []
    (warning,) = media_body_warnings(policy, 1_000_000)
    assert warning.startswith("WARNING: route patient-intake takes up to 5242880 bytes of media")
