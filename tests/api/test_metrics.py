"""GET /metrics: the instruments after real turns, only for the scrape token, without content, ids or tenants."""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from service.api import create_app
from service.api.app import openapi_document
from service.api.metrics import MetricsEndpoint
from service.audit import Auditor
from service.auth_failures import AuthFailures
from service.background import BackgroundTasks
from service.context import ServiceContext
from service.ids import new_id
from service.leases import reap_expired_leases
from service.metrics_export import MetricsExport, metrics_export_from_env
from service.retention import run_retention
from service.simulator import FaultSpec, RunningSimulator

from ..conftest import CANARY, NewTenant, Tenant, asgi_transport, make_upstream, signer_of
from ..observability import Scrape
from ..retention.conftest import RetentionService
from .helpers import assert_problem, open_conversation, take_turn

TOKEN = b"test-scrape-token-0123456789abcdef"
SCRAPER = {"Authorization": f"Bearer {TOKEN.decode()}"}
TURNS = "/v1/conversations/{conversation_id}/turns"
# What an id of Custody's looks like (conv_…, turn_…, key_…, ten_…, req_…), wherever it might leak.
_ID = re.compile(r"\b(conv|turn|key|ten|req|lease|run|hold)_[0-9a-z]{6,}")


@dataclass
class Observed:
    """The service with real instruments read by the Prometheus reader, and GET /metrics served."""

    api: httpx.AsyncClient
    ctx: ServiceContext
    export: MetricsExport

    async def scrape(self) -> Scrape:
        response = await self.api.get("/metrics", headers=SCRAPER)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        return Scrape(response.text)


@asynccontextmanager
async def observed_service(
    ctx: ServiceContext, gemini: RunningSimulator, engine: AsyncEngine, *, tenant_labels: bool = False
) -> AsyncIterator[Observed]:
    """The test context with metrics of its own (so every count starts at zero): the same meter
    behind the upstream client, the audit writer, the turn engine and the HTTP layer."""
    gemini.app.reset()
    export = metrics_export_from_env({}, prometheus=True, tenant_labels=tenant_labels)
    metrics = export.metrics
    metrics.observe_pool(engine.sync_engine)
    upstream = make_upstream(gemini, attempts=3, timeout_seconds=10, metrics=metrics)
    own = dataclasses.replace(
        ctx,
        upstream=upstream,
        auditor=Auditor(ctx.auditor.tracer, signer_of(ctx), metrics=metrics),
        metrics=metrics,
        tasks=BackgroundTasks(),
        auth_failures=AuthFailures(),
    )
    app = create_app(own, max_body_bytes=64_000, metrics_endpoint=MetricsEndpoint(TOKEN, export.prometheus_text))
    try:
        async with httpx.AsyncClient(transport=asgi_transport(app), base_url="http://custody.test") as client:
            yield Observed(client, own, export)
        await own.tasks.drain(timeout=10)
    finally:
        await upstream.aclose()
        export.shutdown()


async def _turn(observed: Observed, tenant: Tenant, conversation: str, words: str) -> httpx.Response:
    return await observed.api.post(
        f"/v1/conversations/{conversation}/turns", json={"input": words}, headers=tenant.headers()
    )


async def test_metrics_count_turns_by_route_and_status_and_time_them(
    ctx: ServiceContext, gemini: RunningSimulator, engine: AsyncEngine, tenant: Tenant
) -> None:
    """After completed, model-failed and upstream-failed turns, /metrics counts each by route and status, times them in histograms, and counts upstream attempts and failures by outcome."""
    async with observed_service(ctx, gemini, engine) as observed:
        conversation = await open_conversation(observed.api, tenant.headers())
        await take_turn(observed.api, tenant.headers(), conversation, "a cough for three days")
        gemini.app.inject(FaultSpec(status=503, retry_after=0, count=1))
        await take_turn(observed.api, tenant.headers(), conversation, "and a fever")  # retried once, then ok
        assert (await take_turn(observed.api, tenant.headers(), conversation, "sim:fail"))["status"] == "failed"
        gemini.app.inject(FaultSpec(status=500, retry_after=0, count=3))
        assert (await _turn(observed, tenant, conversation, "lost")).status_code == 502
        scrape = await observed.scrape()

    route = "patient-intake"
    assert scrape.types["custody_turns"] == "counter"
    assert scrape.value("custody_turns_total", route=route, status="completed") == 2
    assert scrape.value("custody_turns_total", route=route, status="failed") == 2
    assert scrape.types["custody_turn_duration_seconds"] == "histogram"
    assert scrape.value("custody_turn_duration_seconds_count", route=route, status="completed") == 2
    assert scrape.value("custody_turn_duration_seconds_sum", route=route, status="completed") > 0
    buckets = scrape.find("custody_turn_duration_seconds_bucket", route=route, status="completed")
    counts = [s.value for s in sorted(buckets, key=lambda s: float(s.labels["le"]))]
    assert counts == sorted(counts)
    assert counts[-1] == 2
    # Requests to the model: 1 + (503, ok) + sim:fail's 1 + three 500s.
    assert scrape.value("custody_upstream_attempts_total", operation="create", outcome="ok") == 3
    assert scrape.value("custody_upstream_attempts_total", operation="create", outcome="http_503") == 1
    assert scrape.value("custody_upstream_attempts_total", operation="create", outcome="http_500") == 3
    assert scrape.value("custody_upstream_failures_total", reason="upstream_http_500") == 1
    assert scrape.value("custody_upstream_duration_seconds_count", operation="create", outcome="ok") == 3
    assert scrape.value("custody_upstream_duration_seconds_count", operation="create", outcome="error") == 4
    assert scrape.value("custody_audit_append_duration_seconds_count") >= 8  # at least a start and an end per turn
    assert (
        scrape.value(
            "http_server_request_duration_seconds_count",
            http_request_method="POST",
            http_route=TURNS,
            http_response_status_code="200",
        )
        == 3
    )
    assert scrape.value("custody_db_pool_size") >= 1
    assert {s.labels["state"] for s in scrape.find("custody_db_pool_connections")} == {"used", "idle"}


async def test_detector_hits_lease_conflicts_and_auth_failures_are_counted(
    ctx: ServiceContext, gemini: RunningSimulator, engine: AsyncEngine, tenant: Tenant
) -> None:
    """Detector hits by class (a refused turn's too), a 409 for a conversation another turn holds, and failed authentications by reason all show in /metrics."""
    async with observed_service(ctx, gemini, engine) as observed:
        conversation = await open_conversation(observed.api, tenant.headers())
        await take_turn(observed.api, tenant.headers(), conversation, "mail me at jane.doe@example.org")
        card = await _turn(observed, tenant, conversation, "my card is 4556 7352 6790 9704")
        assert card.status_code == 422  # the route does not carry `pan`; the hit is counted all the same
        gemini.app.inject(FaultSpec(latency_ms=2000))
        slow = asyncio.create_task(take_turn(observed.api, tenant.headers(), conversation, "slow"))
        await _wait_for_lease(engine, conversation)
        assert_problem(await _turn(observed, tenant, conversation, "racing"), 409, "turn-in-progress")
        await slow
        assert (
            await observed.api.get("/v1/conversations", headers={"Authorization": "Bearer nope"})
        ).status_code == 401
        assert (await observed.api.get("/v1/conversations", headers=tenant.headers("auditor"))).status_code == 403
        scrape = await observed.scrape()

    # The e-mail address twice: in the input, and in the simulated model's answer, which echoes it.
    assert scrape.value("custody_detector_hits_total", **{"class": "pii"}) == 2
    # The refused card number once: its turn never reached the model.
    assert scrape.value("custody_detector_hits_total", **{"class": "pan"}) == 1
    assert scrape.value("custody_lease_conflicts_total", kind="held") == 1
    assert scrape.value("custody_auth_failures_total", reason="unauthenticated") == 1
    assert scrape.value("custody_auth_failures_total", reason="forbidden") == 1
    assert scrape.value("custody_turns_total", route="patient-intake", status="completed") == 2


async def test_turns_closed_as_abandoned_are_counted_by_who_closed_them(
    ctx: ServiceContext, gemini: RunningSimulator, engine: AsyncEngine, tenant: Tenant
) -> None:
    """A turn whose holder died is counted when the next turn takes the conversation over, and when the reaper closes one, by as many as it closed."""
    async with observed_service(ctx, gemini, engine) as observed:
        taken_over = await open_conversation(observed.api, tenant.headers())
        reaped = await open_conversation(observed.api, tenant.headers())
        for conversation in (taken_over, reaped):
            await _abandon(engine, conversation)
        await take_turn(observed.api, tenant.headers(), taken_over, "anyone there?")
        closed = await reap_expired_leases(observed.ctx, grace_seconds=0)
        scrape = await observed.scrape()
    assert closed >= 1  # this test's, and any other test left in the shared database
    assert scrape.value("custody_lease_abandoned_total", closed_by="takeover") == 1
    assert scrape.value("custody_lease_abandoned_total", closed_by="reaper") == closed


async def test_the_retention_runner_counts_purges_and_pending_provider_deletions(
    ctx: ServiceContext, retention: RetentionService, gemini: RunningSimulator
) -> None:
    """A run that purges a conversation whose provider copy cannot be deleted counts the purge and the failed deletion, and sets the pending gauge; a dry run counts nothing."""
    export = metrics_export_from_env({}, prometheus=True)
    observed = dataclasses.replace(retention.ctx, metrics=export.metrics)
    try:
        conversation = await retention.open("public-faq", ["public"])
        await retention.turn(conversation, "opening hours?")  # public-faq lets the provider keep a copy
        retention.advance_days(8)
        await run_retention(observed, started_by="test", dry_run=True)
        assert Scrape(export.prometheus_text().decode()).value("custody_retention_purges_total", outcome="purged") == 0
        # Both the purge's deletion and the run's retry of it fail.
        gemini.app.inject(FaultSpec(status=500, retry_after=0, count=2))
        summary = await run_retention(observed, started_by="test")
        scrape = Scrape(export.prometheus_text().decode())
    finally:
        export.shutdown()
    assert (summary.purged, summary.provider_failed, summary.provider_pending) == (1, 2, 1)
    assert scrape.value("custody_retention_purges_total", outcome="purged") == 1
    assert scrape.value("custody_retention_provider_deletions_total", outcome="failed") == 2
    assert scrape.value("custody_retention_provider_copies_pending") == 1
    assert scrape.value("custody_retention_oldest_pending_copy_age_seconds") > 0


async def test_tenant_labels_are_added_only_when_the_operator_opts_in(
    ctx: ServiceContext, gemini: RunningSimulator, engine: AsyncEngine, new_tenant: NewTenant
) -> None:
    """By default no series names a tenant; with tenant labels on, the per-tenant counters carry the tenant's id and the histograms still do not."""
    tenant = await new_tenant()
    tenant_id = await _tenant_id(engine, tenant)
    for opted_in in (False, True):
        async with observed_service(ctx, gemini, engine, tenant_labels=opted_in) as observed:
            conversation = await open_conversation(observed.api, tenant.headers())
            await take_turn(observed.api, tenant.headers(), conversation, "hello")
            scrape = await observed.scrape()
        turns = scrape.find("custody_turns_total", route="patient-intake", status="completed")
        assert [s.labels.get("tenant") for s in turns] == [tenant_id if opted_in else None]
        assert all("tenant" not in s.labels for s in scrape.find("custody_turn_duration_seconds_count"))
        assert (tenant_id in scrape.label_values()) is opted_in
        assert tenant.name not in scrape.text


async def test_metrics_answer_only_the_scrape_token(
    ctx: ServiceContext, gemini: RunningSimulator, engine: AsyncEngine, tenant: Tenant, api: httpx.AsyncClient
) -> None:
    """/metrics refuses no token, a wrong one and an API key with a 401 problem (each counted), answers the token, and is not there at all when no token is configured."""
    async with observed_service(ctx, gemini, engine) as observed:
        refused: list[Callable[[], dict[str, str]]] = [
            dict,
            lambda: {"Authorization": "Bearer wrong-token-of-the-same-size-0000"},
            lambda: tenant.headers("ops"),
            lambda: {"Authorization": TOKEN.decode()},  # not as a bearer token
        ]
        for headers in refused:
            assert_problem(await observed.api.get("/metrics", headers=headers()), 401, "unauthenticated")
        scrape = await observed.scrape()
    assert scrape.value("custody_auth_failures_total", reason="metrics_token") == len(refused)
    assert (await api.get("/metrics")).status_code == 404
    assert (await api.get("/metrics", headers=SCRAPER)).status_code == 404


def test_metrics_are_left_out_of_the_openapi_document_on_purpose() -> None:
    """The API document, for the API's clients, does not list the operator's /metrics endpoint."""
    assert "/metrics" not in openapi_document()


async def test_no_content_id_or_tenant_reaches_the_metrics(
    ctx: ServiceContext, gemini: RunningSimulator, engine: AsyncEngine, tenant: Tenant
) -> None:
    """The canary sent as input, in paths, query strings, headers, route and class names and an idempotency key reaches no line of /metrics, nor does any id."""
    async with observed_service(ctx, gemini, engine) as observed:
        headers = tenant.headers()
        conversation = await open_conversation(observed.api, headers)
        await take_turn(
            observed.api, headers, conversation, f"{CANARY} jane@example.org", **{"Idempotency-Key": CANARY}
        )
        await observed.api.post(
            f"/v1/conversations/{conversation}/turns?note={CANARY}",
            json={"input": [{"type": "text", "text": CANARY}]},
            headers=headers | {"X-Request-Id": "id-4556735267909704", "User-Agent": CANARY},
        )
        await observed.api.get(f"/v1/{CANARY}", headers=headers)
        await observed.api.get(f"/v1/conversations/conv_{CANARY}/steps?cursor=0&q={CANARY}", headers=headers)
        await observed.api.post("/v1/conversations", json={"route": CANARY, "data_classes": [CANARY]}, headers=headers)
        await observed.api.request(CANARY.replace("-", ""), "/v1/conversations", headers=headers)
        gemini.app.inject(FaultSpec(status=500, retry_after=0, count=3))
        await _turn(observed, tenant, conversation, CANARY)
        text_ = (await observed.api.get("/metrics", headers=SCRAPER)).text
    assert CANARY not in text_
    assert CANARY.replace("-", "") not in text_
    assert tenant.name not in text_
    assert not _ID.search(text_), _ID.search(text_)
    scrape = Scrape(text_)
    routes = {s.labels["http_route"] for s in scrape.find("http_server_request_duration_seconds_count")}
    assert "unrouted" in routes
    assert all(route == "unrouted" or route.startswith("/") for route in routes)
    assert {s.labels["http_request_method"] for s in scrape.find("http_server_request_duration_seconds_count")} >= {
        "_OTHER"
    }


async def _wait_for_lease(engine: AsyncEngine, conversation: str) -> None:
    """Until a turn holds the conversation (bounded: the slow turn takes it within a second or two)."""
    for _ in range(200):
        async with engine.connect() as connection:
            held = await connection.scalar(
                text("SELECT lease_token IS NOT NULL FROM conversations WHERE id = :c"), {"c": conversation}
            )
        if held:
            return
        await asyncio.sleep(0.025)
    raise AssertionError("the slow turn never took the conversation")


async def _abandon(engine: AsyncEngine, conversation: str) -> None:
    """Leave what a replica killed mid-turn leaves: an expired lease and a turn in progress."""
    async with engine.begin() as connection:
        number = (
            await connection.execute(
                text(
                    "UPDATE conversations SET lease_token = 'lease_dead', lease_expires_at = now() - interval '5 s', "
                    "turn_count = turn_count + 1 WHERE id = :c RETURNING turn_count"
                ),
                {"c": conversation},
            )
        ).scalar_one()
        await connection.execute(
            text(
                "INSERT INTO turns (id, conversation_id, number, status, provider_storage, storage_reason, "
                "policy_version, upstream_attempts, step_count) VALUES "
                "(:t, :c, :n, 'in_progress', false, 'test', 'v', 0, 0)"
            ),
            {"t": new_id("turn"), "c": conversation, "n": number},
        )


async def _tenant_id(engine: AsyncEngine, tenant: Tenant) -> str:
    async with engine.connect() as connection:
        found = await connection.scalar(text("SELECT id FROM tenants WHERE name = :n"), {"n": tenant.name})
    return str(found)
