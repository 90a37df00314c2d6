"""Schemathesis generates requests from the served OpenAPI document and checks every answer against it."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, cast

import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import strategies as st
from schemathesis.python import asgi

from service.api import create_app
from service.auth_failures import AuthFailureLimits, AuthFailures
from service.background import BackgroundTasks
from service.context import ServiceContext
from service.database import make_engine, make_sessions
from service.key_store import ExpiryKeyStore
from service.simulator import RunningSimulator

from ..conftest import Tenant, key_store_of, make_tenant, make_upstream
from .helpers import PHI_ROUTE

if TYPE_CHECKING:
    # Schemathesis names its OpenAPI case type for type checkers only.
    from schemathesis.specs.openapi.schemas import OpenApiCase

# Fuzzing cases per operation; with the examples and the coverage cases (boundary values, missing
# and wrong-typed parameters, unsupported methods) the whole run stays well under a minute.
MAX_EXAMPLES = 100
# Sequences of calls, and calls per sequence, for the stateful test.
STATEFUL_EXAMPLES = 40
STATEFUL_STEPS = 10

# The statuses `positive_data_acceptance` allows by default, plus 422 where a request the schema
# admits can still be refused for what it says, which no schema of the request can express:
# route and data-class names come from the deployment's policy (the document gives examples, not
# an enum, so that it holds for every deployment), and a turn's input is refused when a detector
# finds a data class the route does not allow, or when a function result answers no pending call.
ACCEPTED_OR_REFUSED_BY_POLICY = ["2xx", "3xx", "401", "403", "404", "409", "422", "429", "5xx"]

# Every built-in check is on (the default); the only one left off is `max_response_time`, which
# is off unless given a limit and would be a timed assert. `positive_data_acceptance` is tuned as
# above for the two operations whose answers depend on the policy.
# Placing a conversation hold is likewise refused (422) when the conversation the body names, in
# the shape the schema gives, is not one of the tenant's: whether it exists is no schema's to say.
CONFIG = {
    # The same cases on every run, so that CI does not pass and fail by turns on one commit.
    "seed": 20261124,
    "generation": {"max-examples": MAX_EXAMPLES, "database": "none"},
    "operations": [
        {
            "include-operation-id": operation,
            "checks": {"positive_data_acceptance": {"expected-statuses": ACCEPTED_OR_REFUSED_BY_POLICY}},
        }
        for operation in ("CreateConversation", "CreateTurn", "PlaceHold")
    ],
}

# Schemathesis makes one test per operation of the document the app serves, so the app exists
# when this module is collected; its context is set by the `fuzzed` fixture. (Its lazy loader,
# `schemathesis.pytest.from_fixture`, does not run on pytest 9.2: it reads `Node._nodeid`.)
APP = create_app(None, max_body_bytes=64_000)  # type: ignore[arg-type]
SCHEMA = schemathesis.openapi.from_asgi("/schema/openapi.json", APP, config=schemathesis.Config.from_dict(CONFIG))


@dataclasses.dataclass
class Fuzzed:
    """The tenant whose keys the requests carry, and the conversations path parameters aim at."""

    tenant: Tenant
    # Read, listed and taken turns on (it has steps).
    conversation: str
    # Deleted.
    doomed: str
    # A legal hold (on a conversation of its own) to release, and a retention run (a dry one) to read.
    hold: str
    run: str
    # For making more tenants.
    ctx: ServiceContext
    database_url: str


# Set by the `fuzzed` fixture for the module's tests. Module state, because cases are made at
# collection, before any fixture runs: what only exists later (the keys, the conversations) is
# looked up here when a request is sent.
FUZZED: list[Fuzzed] = []


@pytest.fixture(scope="module")
async def fuzz_tenant(ctx: ServiceContext) -> Tenant:
    """The tenant of the module's requests (made on pytest's loop, like every fixture's)."""
    return await make_tenant(ctx)


def _open(client: requests.Session, headers: dict[str, str]) -> str:
    response = client.post("/v1/conversations", json=PHI_ROUTE, headers=headers)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


class LifespanContext:
    """The app's context, opened and closed with the app's lifespan.

    Schemathesis calls the app on an event loop of its own and ends the app's lifespan after every
    test; an engine, an HTTP client or a task belongs to the loop that first used it, so each
    lifespan gets its own, made and closed on that loop.
    """

    def __init__(self, template: ServiceContext, database_url: str, gemini: RunningSimulator) -> None:
        self.template, self.database_url, self.gemini = template, database_url, gemini

    async def open(self) -> None:
        engine = make_engine(self.database_url)
        self.expiry_keys = ExpiryKeyStore.connect(key_store_of(self.database_url))
        APP.state.ctx = dataclasses.replace(
            self.template,
            sessions=make_sessions(engine),
            expiry_keys=self.expiry_keys,
            upstream=make_upstream(self.gemini, attempts=1, timeout_seconds=10),
            tasks=BackgroundTasks(),
            # The fuzzer is one source sending hundreds of requests, some of them deliberately
            # without a key: at the real limits most of the run would be 429s (the limits have
            # their own tests, in tests/api/test_auth_failures.py).
            auth_failures=AuthFailures(AuthFailureLimits(per_source=1_000_000, per_key=1_000_000)),
        )
        self.engine = engine

    async def close(self) -> None:
        ctx: ServiceContext = APP.state.ctx
        await ctx.tasks.drain(timeout=10)
        await ctx.upstream.aclose()
        await self.engine.dispose()
        await self.expiry_keys.aclose()


@pytest.fixture(scope="module")
def fuzzed(ctx: ServiceContext, database_url: str, gemini: RunningSimulator, fuzz_tenant: Tenant) -> Iterator[Fuzzed]:
    """The app wired to the test database and the simulator, and the seeded conversations."""
    lifespan = LifespanContext(ctx, database_url, gemini)
    # The lifespan that loading the document started, at collection, has no context: end it.
    asgi.shutdown_lifespans()
    APP.on_startup.append(lifespan.open)
    APP.on_shutdown.append(lifespan.close)
    headers, ops = fuzz_tenant.headers("backend"), fuzz_tenant.headers("ops")
    with asgi.get_client(cast(Any, APP)) as client:  # Litestar types its ASGI scope more narrowly
        conversation = _open(client, headers)
        turn = client.post(f"/v1/conversations/{conversation}/turns", json={"input": "hello"}, headers=headers)
        assert turn.status_code == 200, turn.text
        doomed = _open(client, headers)
        held = {"scope": "conversation", "conversation_id": _open(client, headers), "reason": "fuzzing"}
        hold = client.post("/v1/ops/holds", json=held, headers=ops)
        assert hold.status_code == 201, hold.text
        run = client.post("/v1/ops/retention/runs", json={"dry_run": True}, headers=ops)
        assert run.status_code == 202, run.text
    FUZZED.append(Fuzzed(fuzz_tenant, conversation, doomed, hold.json()["id"], run.json()["id"], ctx, database_url))
    yield FUZZED[0]
    FUZZED.clear()
    asgi.shutdown_lifespans()
    APP.on_startup.remove(lifespan.open)
    APP.on_shutdown.remove(lifespan.close)


class ApiKey(requests.auth.AuthBase):
    """The tenant's key of a role, put on each request as it is sent: cases are generated before
    the tenant exists (the examples, at collection)."""

    def __init__(self, role: str) -> None:
        self.role = role

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {FUZZED[0].tenant.keys[self.role]}"
        return request


SCHEMA.auth.set_from_requests(ApiKey("backend")).apply_to(path_regex="^/v1/(conversations|subjects)")
SCHEMA.auth.set_from_requests(ApiKey("auditor")).apply_to(path_regex="^/v1/audit")
SCHEMA.auth.set_from_requests(ApiKey("ops")).apply_to(path_regex="^/v1/ops")


# Cases are generated before the conversations, the hold and the run exist (examples at
# collection), so generation picks this stand-in and the test puts the real id in its place.
SEEDED = "seeded-id"
SEEDED_PARAMETERS = ("conversation_id", "hold_id", "run_id")


@SCHEMA.hook
def flatmap_path_parameters(context: schemathesis.HookContext, path_parameters: dict[str, Any] | None) -> Any:
    """A generated id names nothing, so half the cases aim at a real conversation, hold or run
    instead: the handlers past the 404 get fuzzed too."""
    name = next((name for name in SEEDED_PARAMETERS if name in (path_parameters or {})), None)
    if not path_parameters or name is None:
        return st.just(path_parameters)
    return st.sampled_from([path_parameters, {**path_parameters, name: SEEDED}])


# A route and data classes of the test policy (ops/policy.example.yaml), which the document can
# only give as examples: without them almost every generated conversation would be refused.
OPENABLE = {"route": "patient-intake", "data_classes": ["phi"]}


@SCHEMA.hook
def flatmap_body(context: schemathesis.HookContext, body: Any) -> Any:
    """Half the bodies that open a conversation name a real route and data class, so that the
    conversation opens and the requests that follow have one to work on."""
    if context.operation is None or context.operation.path != "/v1/conversations":
        return st.just(body)
    # Only where both members already have the right types: a negative case stays negative.
    if not isinstance(body, dict) or not isinstance(body.get("route"), str):
        return st.just(body)
    classes = body.get("data_classes")
    if not isinstance(classes, list) or not all(isinstance(name, str) for name in classes):
        return st.just(body)
    return st.sampled_from([body, {**body, **OPENABLE}])


def _aim_at_seeded(case: OpenApiCase) -> None:
    seeded = FUZZED[0]
    parameters = case.path_parameters or {}
    if parameters.get("conversation_id") == SEEDED:
        real = seeded.doomed if case.method.upper() == "DELETE" else seeded.conversation
        parameters["conversation_id"] = real
    if parameters.get("hold_id") == SEEDED:
        parameters["hold_id"] = seeded.hold
    if parameters.get("run_id") == SEEDED:
        parameters["run_id"] = seeded.run


@SCHEMA.parametrize()
def test_api_answers_as_documented(case: OpenApiCase, fuzzed: Fuzzed) -> None:
    """Every generated request gets a documented status, media type, headers and body, with all checks on."""
    _aim_at_seeded(case)
    case.call_and_validate()


class LinkedCalls(SCHEMA.as_state_machine()):  # type: ignore[misc]
    """Sequences of calls that open a conversation and then read, continue and delete it, with the
    ids taken from earlier answers (links inferred from the document). The history lets the checks
    that need one run too: `use_after_free` and `ensure_resource_availability`. The seeded
    conversations stay out of it (the stand-in id answers 404): one deleted by an earlier sequence
    would answer a replayed sequence differently."""

    def setup(self) -> None:
        # Hypothesis replays sequences and expects the same answers: each sequence gets a tenant
        # of its own, so that no earlier one (an Idempotency-Key it used, a conversation it
        # deleted) changes them.
        FUZZED[0].tenant = _new_tenant(FUZZED[0])


def _new_tenant(fuzzed: Fuzzed) -> Tenant:
    async def make() -> Tenant:
        engine = make_engine(fuzzed.database_url)
        try:
            return await make_tenant(dataclasses.replace(fuzzed.ctx, sessions=make_sessions(engine)))
        finally:
            await engine.dispose()

    # On a thread of its own: the app's event loop is schemathesis's, and this test's is pytest's.
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, make()).result()


def test_linked_calls_answer_as_documented(fuzzed: Fuzzed) -> None:
    """Sequences that open a conversation and then use its id get documented answers, and a deleted conversation stays gone."""
    seeded_tenant = fuzzed.tenant
    try:
        LinkedCalls.run(
            settings=hypothesis.settings(
                max_examples=STATEFUL_EXAMPLES,
                stateful_step_count=STATEFUL_STEPS,
                derandomize=True,
                deadline=None,
                database=None,
            )
        )
    finally:
        fuzzed.tenant = seeded_tenant
