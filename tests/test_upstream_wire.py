"""On the wire, Upstream.create sends what the SDK's typed `interactions.create` sends, and the steps' own bytes.

Upstream.create builds its request body itself (the history's step bytes spliced in as they are)
and hands it to the SDK's request building and HTTP client, skipping the SDK's typed models. These
tests send the same settings and steps both ways through the same SDK client, to the simulator, and
compare what arrived: method, path, query, every header but content-length, and the body as JSON
values; and the timeout the SDK's HTTP client was given. They run against each way Custody reaches
Gemini: the Gemini API with a key, Vertex AI express mode (a key), and Vertex AI with Application
Default Credentials (a bearer token, and the project and location in the path).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Awaitable, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.genai import _interactions as sdk_errors

from service.config import EXAMPLE_POLICY, UpstreamSettings
from service.policy import load_policy
from service.simulator import FaultSpec, RunningSimulator, SimulatorConfig, start_simulator
from service.upstream import Upstream

ACCESS_TOKEN = "ya29.test-access-token"  # noqa: S105 - what the test's token endpoint hands out for ADC
MODES = ("gemini", "vertex-express", "vertex-adc")
# Every route of the example policy (system instructions, function tools, generation settings),
# plus the settings no example route has: a response format, and an agent instead of a model.
SETTINGS = [
    *(route.upstream_settings() for route in load_policy(EXAMPLE_POLICY).routes.values()),
    {
        "model": "gemini-3-flash-preview",
        "generation_config": {"temperature": 0.2, "thinking_level": "low", "max_output_tokens": 512, "seed": 7},
        "response_format": {"type": "object", "properties": {"answer": {"type": "string"}}},
    },
    {"agent": "deep-research-pro-preview-12-2025", "agent_config": {"type": "deep-research"}},
]


def user_step(text: str) -> dict[str, Any]:
    return {"type": "user_input", "content": [{"type": "text", "text": text}]}


def encode(step: Any) -> bytes:
    return json.dumps(step, ensure_ascii=False, separators=(",", ":")).encode()


# --- the three ways to reach Gemini --------------------------------------------------------------


class _TokenEndpoint(BaseHTTPRequestHandler):
    """OAuth's token endpoint as google-auth calls it for a service account's access token."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        body = json.dumps({"access_token": ACCESS_TOKEN, "expires_in": 3600, "token_type": "Bearer"}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _private_key_pem() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return pem.decode()


@pytest.fixture
def adc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Application Default Credentials for the test: a service-account key file (a key made here)
    whose token endpoint is a local server, named by GOOGLE_APPLICATION_CREDENTIALS as a
    deployment would name its own."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _TokenEndpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    credentials = tmp_path / "adc.json"
    credentials.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": "proj",
                "private_key_id": "test-key-id",
                "private_key": _private_key_pem(),
                "client_email": "custody-test@proj.iam.gserviceaccount.com",
                "client_id": "1",
                "token_uri": f"http://127.0.0.1:{server.server_address[1]}/token",
            }
        )
    )
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(credentials))
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


def make(sim: RunningSimulator, mode: str, request: pytest.FixtureRequest, *, timeout_seconds: float = 7) -> Upstream:
    if mode == "vertex-adc":
        request.getfixturevalue("adc")
    settings = UpstreamSettings(
        api_key=None if mode == "vertex-adc" else "test-key",
        base_url=sim.base_url,
        use_vertexai=mode != "gemini",
        project="proj",
        location="europe-west4",
    )
    return Upstream(settings, attempts=1, timeout_seconds=timeout_seconds)


def typed_create(upstream: Upstream) -> Callable[..., Awaitable[Any]]:
    """The SDK's typed create, on the very client the Upstream sends through."""
    return upstream._client.aio.interactions.create


def without_length(headers: dict[str, str]) -> dict[str, str]:
    """The headers but content-length: the two bodies hold the same values in other bytes."""
    return {name: value for name, value in headers.items() if name != "content-length"}


# --- one create ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_a_create_is_sent_as_the_typed_create_sends_it(
    gemini: RunningSimulator, mode: str, request: pytest.FixtureRequest
) -> None:
    """For every route's settings, the same method, path, query, headers (but content-length) and body values as the typed create."""
    upstream = make(gemini, mode, request)
    steps = [user_step("first"), user_step('héllo \u2028 😀 "quoted" \\ back')]
    for settings in SETTINGS:
        gemini.app.reset()
        for store in (False, True):
            await upstream.create(settings=settings, steps=[encode(s) for s in steps], store=store)
            await typed_create(upstream)(**settings, input=steps, store=store)
        ours_off, typed_off, ours_on, typed_on = gemini.app.create_requests()
        for ours, typed in ((ours_off, typed_off), (ours_on, typed_on)):
            assert (ours.method, ours.path, ours.query) == (typed.method, typed.path, typed.query)
            assert without_length(ours.headers) == without_length(typed.headers)
            assert ours.body == typed.body
            assert ours.status == typed.status == 200
        assert ours_off.body["store"] is False
        assert ours_on.body["store"] is True
    await upstream.aclose()

    # The headers that matter, spelled out (the comparison above covers every header).
    headers = ours_off.headers
    assert headers["content-type"] == "application/json"
    assert headers["accept"] == "application/json"
    assert headers["api-revision"] == "2026-05-20"
    assert headers["user-agent"].startswith("google-genai-sdk/")
    assert headers["x-goog-api-client"].startswith("google-genai-sdk/")
    if mode == "vertex-adc":
        assert headers["authorization"] == f"Bearer {ACCESS_TOKEN}"
        assert "x-goog-api-key" not in headers
        assert ours_off.path == "/v1beta1/projects/proj/locations/europe-west4/interactions"
    else:
        assert headers["x-goog-api-key"] == "test-key"
        assert "authorization" not in headers
        assert ours_off.path == ("/v1/interactions" if mode == "gemini" else "/v1beta1/interactions")


@pytest.mark.parametrize("mode", MODES)
async def test_the_sdk_http_client_gets_the_same_request_and_timeout(
    gemini: RunningSimulator, mode: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SDK's HTTP client is handed the same URL, headers and timeout by both paths (seen by a recorder around its send)."""
    upstream = make(gemini, mode, request, timeout_seconds=3.5)
    http = upstream._client.aio.interactions.sdk_configuration.async_client
    assert http is not None
    sent: list[Any] = []
    send = http.send

    async def recording_send(outgoing: Any, **options: Any) -> Any:
        sent.append(outgoing)
        return await send(outgoing, **options)

    monkeypatch.setattr(http, "send", recording_send)
    steps = [user_step("timeout check")]
    await upstream.create(settings=SETTINGS[0], steps=[encode(s) for s in steps], store=False)
    await typed_create(upstream)(**SETTINGS[0], input=steps, store=False)
    await upstream.aclose()
    ours, typed = sent
    assert ours.extensions["timeout"] == typed.extensions["timeout"]
    assert ours.extensions["timeout"]["read"] == 3.5
    assert (ours.method, str(ours.url)) == (typed.method, str(typed.url))
    assert without_length(dict(ours.headers)) == without_length(dict(typed.headers))
    assert json.loads(ours.content) == json.loads(typed.content)


# --- continued turns ----------------------------------------------------------------------------


def _hop_view(body: dict[str, Any]) -> dict[str, Any]:
    """A hop's body with its one-off values (the token, the previous hop's id) named, not spelled."""
    view = dict(body)
    for name in ("continuation_token", "previous_interaction_id"):
        if name in view:
            view[name] = f"<{name}>"
    return view


@pytest.mark.parametrize("store", [False, True])
@pytest.mark.parametrize("mode", MODES)
async def test_continuation_hops_are_sent_as_the_sdk_continues(
    gemini: RunningSimulator, mode: str, store: bool, request: pytest.FixtureRequest
) -> None:
    """A turn the model answers over three interactions sends the same hops as the SDK's automatic continuation: settings again, and the input again (store=false) or the previous hop's id (store=true)."""
    upstream = make(gemini, mode, request)
    settings = SETTINGS[0]
    steps = [user_step("a long answer please sim:continue 2")]
    gemini.app.reset()
    reply = await upstream.create(settings=settings, steps=[encode(s) for s in steps], store=store)
    ours = gemini.app.create_requests()
    gemini.app.reset()
    typed = await typed_create(upstream)(**settings, input=steps, store=store)
    theirs = gemini.app.create_requests()
    await upstream.aclose()

    assert len(ours) == len(theirs) == 3
    for mine, sdk in zip(ours, theirs, strict=True):
        assert (mine.method, mine.path, mine.query) == (sdk.method, sdk.path, sdk.query)
        assert without_length(mine.headers) == without_length(sdk.headers)
        assert _hop_view(mine.body) == _hop_view(sdk.body)
    assert ours[1].body["continuation_token"] == ours[0].response["continuation_token"]
    if store:
        assert ours[2].body["previous_interaction_id"] == ours[1].response["id"]
        assert "input" not in ours[2].body
    else:
        assert ours[2].raw.endswith(b',"input":[' + encode(steps[0]) + b"]}")
    # The merged reply: each hop's steps in order, a continuation's leading user_input (the turn's
    # input again) dropped, as the SDK merges them; and the step bytes aligned with them.
    expected = [step for index, hop in enumerate(ours) for step in hop.response["steps"][1 if index else 0 :]]
    assert all(hop.response["steps"][0]["type"] == "user_input" for hop in ours[1:])
    assert reply.body["steps"] == expected
    assert len(typed.steps) == len(expected)
    assert [json.loads(raw) for raw in reply.steps] == expected
    assert reply.interaction_ids == [hop.response["id"] for hop in ours]


# --- the steps' own bytes -----------------------------------------------------------------------


async def test_replayed_steps_arrive_byte_for_byte(gemini: RunningSimulator, request: pytest.FixtureRequest) -> None:
    """Steps whose spacing, key order and number spelling a re-serializer would change reach the API exactly as given, and replies' steps come back as the API's own bytes."""
    upstream = make(gemini, "gemini", request)
    gemini.app.reset()
    first = await upstream.create(settings=SETTINGS[0], steps=[encode(user_step("hello"))], store=False)
    # The reply's steps are the bytes the simulator sent, cut from its response body.
    [answer] = gemini.app.create_requests()
    response_bytes = json.dumps(answer.response, separators=(",", ":")).encode()
    assert first.steps
    assert all(raw in response_bytes for raw in first.steps)
    assert [json.loads(raw) for raw in first.steps] == first.body["steps"]

    # The model's steps re-spelled: the same JSON values (the simulator checks the replay against
    # what it produced), in bytes that json.dumps would never write.
    respelled = [_respell(raw) for raw in first.steps]
    assert all(json.loads(a) == json.loads(b) for a, b in zip(respelled, first.steps, strict=True))
    odd_user = b'{ "content" :[ {"text":"again \\u00e9","type":"text"}],\n"type":"user_input"}'
    steps = [encode(user_step("hello")), *respelled, odd_user]
    assert all(encode(json.loads(raw)) != raw for raw in [*respelled, odd_user])
    await upstream.create(settings=SETTINGS[0], steps=steps, store=False)
    await upstream.aclose()
    sent = gemini.app.create_requests()[-1]
    assert sent.status == 200
    assert b'"input":[' + b",".join(steps) + b"]" in sent.raw


def _respell(raw: bytes) -> bytes:
    """`raw`'s JSON value written with spaces, keys in reverse order and numbers as exponents."""

    def write(value: Any) -> str:
        if isinstance(value, dict):
            return "{ " + " ,\n".join(f"{json.dumps(k)} : {write(v)}" for k, v in reversed(value.items())) + " }"
        if isinstance(value, list):
            return "[ " + " , ".join(write(v) for v in value) + " ]"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return f"{value:.2E}"
        return json.dumps(value)

    return write(json.loads(raw)).encode()


async def test_a_step_no_reserializer_would_write_is_sent_as_is() -> None:
    """The step `{"type": "model_output" , "content":[{"text":"x","type":"text","n":1.50E+2}]}` reaches the API byte for byte (a lenient simulator: it was never the model's)."""
    step = b'{"type": "model_output" , "content":[{"text":"x","type":"text","n":1.50E+2}]}'
    steps = [encode(user_step("hi")), step, encode(user_step("and?"))]
    with start_simulator(SimulatorConfig(strict_replay=False)) as lenient:
        settings = UpstreamSettings(
            api_key="k", base_url=lenient.base_url, use_vertexai=False, project=None, location=None
        )
        upstream = Upstream(settings, attempts=1)
        await upstream.create(settings={"model": "gemini-3-flash-preview"}, steps=steps, store=False)
        await upstream.aclose()
        [sent] = lenient.app.create_requests()
    assert sent.status == 200
    assert sent.raw == b'{"model":"gemini-3-flash-preview","store":false,"input":[' + b",".join(steps) + b"]}"
    assert sent.body["input"][1] == json.loads(step)


# --- failures ----------------------------------------------------------------------------------

FAULTS = {
    "400": FaultSpec(status=400),
    "404": FaultSpec(status=404),
    "408": FaultSpec(status=408),
    "429": FaultSpec(status=429, retry_after=0),
    "500": FaultSpec(status=500),
    "503": FaultSpec(status=503),
    "dropped": FaultSpec(drop=True),
    "timeout": FaultSpec(hang_seconds=3),
}


@pytest.mark.parametrize("fault", FAULTS.values(), ids=FAULTS.keys())
async def test_failures_raise_the_error_classes_the_typed_create_raises(
    gemini: RunningSimulator, fault: FaultSpec, request: pytest.FixtureRequest
) -> None:
    """A refused, dropped or timed-out create raises the same SDK error class, with the same status, as the typed create: Custody's retries tell them apart."""
    upstream = make(gemini, "gemini", request, timeout_seconds=0.5)
    steps = [user_step("fail me")]
    gemini.app.reset()
    gemini.app.inject(fault)
    with pytest.raises(sdk_errors.APIError) as ours:
        await upstream._send_create(
            b'{"model":"gemini-3-flash-preview","store":false,"input":[' + encode(steps[0]) + b"]}", None
        )
    gemini.app.inject(fault)
    with pytest.raises(sdk_errors.APIError) as typed:
        await typed_create(upstream)(model="gemini-3-flash-preview", input=steps, store=False)
    await upstream.aclose()
    assert type(ours.value) is type(typed.value)
    assert getattr(ours.value, "status_code", None) == getattr(typed.value, "status_code", None)
    if fault.status is not None:
        assert isinstance(ours.value, sdk_errors.APIStatusError)
        assert ours.value.status_code == fault.status
    elif fault.drop:
        assert type(ours.value) is sdk_errors.APIConnectionError
    else:
        assert isinstance(ours.value, sdk_errors.APITimeoutError)
