"""Tests for service.telemetry: the tracer provider, its OTLP/HTTP export and span attributes."""

from __future__ import annotations

import enum
import gzip
import os
import threading
import zlib
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider

from service.errors import ConfigurationError
from service.telemetry import (
    SPAN_ATTRIBUTE_PREFIX,
    _timeout_seconds,
    describe,
    safe_attributes,
    tracer_provider_from_env,
)

# Every wait in these tests is bounded: the exporter gives up after this, and force_flush too.
TIMEOUT_MILLIS = 5_000


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    request: ExportTraceServiceRequest


class OtlpReceiver(ThreadingHTTPServer):
    """A minimal OTLP/HTTP collector that decodes every trace export it is sent."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _OtlpHandler)
        self.received: list[Received] = []

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _OtlpHandler(BaseHTTPRequestHandler):
    server: OtlpReceiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        encoding = self.headers.get("Content-Encoding", "")
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding == "deflate":
            body = zlib.decompress(body)
        if self.headers.get("Content-Type") != "application/x-protobuf":
            self.send_error(415)
            return
        request = ExportTraceServiceRequest.FromString(body)
        self.server.received.append(Received(self.path, {k.lower(): v for k, v in self.headers.items()}, request))
        reply = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep pytest's output to the test's own


@pytest.fixture(autouse=True)
def _no_otel_in_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # The SDK and exporter read os.environ whatever mapping they are given; a developer's own
    # OTEL_* settings must not leak into these tests.
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    server = OtlpReceiver()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@contextmanager
def provider_from(env: Mapping[str, str]) -> Iterator[TracerProvider]:
    provider = tracer_provider_from_env(env)
    try:
        yield provider
    finally:
        provider.shutdown()


def end_one_span(provider: TracerProvider) -> ReadableSpan:
    span = provider.get_tracer("tests.telemetry").start_span("custody.turn.create")
    span.end()
    assert isinstance(span, ReadableSpan)
    return span


def as_dict(attributes: Iterable[KeyValue]) -> dict[str, str]:
    return {kv.key: kv.value.string_value for kv in attributes}


def test_without_an_endpoint_spans_have_real_ids_and_go_nowhere(
    receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no endpoint in the mapping spans get non-zero ids and go nowhere, even if os.environ names one."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.base)
    with provider_from({"OTEL_SERVICE_NAME": "custody-test"}) as provider:
        context = end_one_span(provider).get_span_context()
        assert provider.force_flush(TIMEOUT_MILLIS)
    assert context is not None
    assert context.is_valid
    assert context.trace_id != 0
    assert context.span_id != 0
    assert receiver.received == []


def test_traces_exporter_none_exports_nothing_even_with_an_endpoint(receiver: OtlpReceiver) -> None:
    """OTEL_TRACES_EXPORTER=none turns export off although OTEL_EXPORTER_OTLP_ENDPOINT is set."""
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.base, "OTEL_TRACES_EXPORTER": "none"}
    with provider_from(env) as provider:
        context = end_one_span(provider).get_span_context()
        assert provider.force_flush(TIMEOUT_MILLIS)
    assert context is not None
    assert context.is_valid
    assert receiver.received == []


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_span_round_trips_over_otlp_http(receiver: OtlpReceiver, compression: str) -> None:
    """A span reaches a real OTLP/HTTP receiver intact, sent with the mapping's headers and compression."""
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.base,
        "OTEL_SERVICE_NAME": "custody-test",
        "OTEL_EXPORTER_OTLP_COMPRESSION": compression,
        "OTEL_EXPORTER_OTLP_HEADERS": "x-custody-test=round%20trip",
        "OTEL_EXPORTER_OTLP_TIMEOUT": str(TIMEOUT_MILLIS),
    }
    with provider_from(env) as provider:
        tracer = provider.get_tracer("tests.telemetry")
        with tracer.start_as_current_span(
            "custody.turn.create",
            attributes={"custody.action": "turn.create", "custody.conversation_id": "conv_x"},
        ) as span:
            context = span.get_span_context()
        assert provider.force_flush(TIMEOUT_MILLIS)

    [received] = receiver.received
    assert received.path == "/v1/traces"
    assert received.headers.get("content-encoding", "none") == compression
    assert received.headers["x-custody-test"] == "round trip"
    [resource_spans] = received.request.resource_spans
    assert as_dict(resource_spans.resource.attributes)["service.name"] == "custody-test"
    [exported] = [s for scope in resource_spans.scope_spans for s in scope.spans]
    assert exported.name == "custody.turn.create"
    assert as_dict(exported.attributes) == {
        "custody.action": "turn.create",
        "custody.conversation_id": "conv_x",
    }
    assert exported.trace_id == context.trace_id.to_bytes(16, "big")
    assert exported.span_id == context.span_id.to_bytes(8, "big")


@pytest.mark.parametrize(
    ("variable", "path", "expected_path"),
    [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "/otlp/", "/otlp/v1/traces"),
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "/custom/traces", "/custom/traces"),
    ],
)
def test_spans_are_posted_to_the_spec_path(
    receiver: OtlpReceiver, variable: str, path: str, expected_path: str
) -> None:
    """The base endpoint gets /v1/traces appended to its path; the traces endpoint is used as is."""
    with provider_from({variable: receiver.base + path}) as provider:
        end_one_span(provider)
        assert provider.force_flush(TIMEOUT_MILLIS)
    assert [r.path for r in receiver.received] == [expected_path]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, {"service.name": "custody"}),
        (
            {"OTEL_RESOURCE_ATTRIBUTES": "service.name=from-attrs,deployment.environment=staging"},
            {"service.name": "from-attrs", "deployment.environment": "staging"},
        ),
        (
            {
                "OTEL_RESOURCE_ATTRIBUTES": "service.name=from-attrs,team=a%2Cb",
                "OTEL_SERVICE_NAME": "named",
            },
            {"service.name": "named", "team": "a,b"},
        ),
    ],
)
def test_resource_follows_the_mapping(env: dict[str, str], expected: dict[str, str]) -> None:
    """service.name is OTEL_SERVICE_NAME, else OTEL_RESOURCE_ATTRIBUTES', else the default; others are kept."""
    with provider_from(env) as provider:
        attributes = dict(provider.resource.attributes)
    assert {key: attributes.get(key) for key in expected} == expected


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "traces not exported (set OTEL_EXPORTER_OTLP_ENDPOINT)"),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"},
            "traces exported over OTLP/HTTP to http://collector:4318/v1/traces",
        ),
        (
            {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://user:secret@collector/in"},
            "traces exported over OTLP/HTTP to https://collector/in",
        ),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"},
            "traces not exported (OTEL_TRACES_EXPORTER=none)",
        ),
    ],
)
def test_describe_names_where_spans_go(env: dict[str, str], expected: str) -> None:
    """The banner line names the traces URL (without credentials) or says why nothing is exported."""
    assert describe(env) == expected


@pytest.mark.parametrize(
    "env",
    [
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "console"},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_EXPORTER_OTLP_TIMEOUT": "soon"},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_EXPORTER_OTLP_COMPRESSION": "zstd"},
        {"OTEL_RESOURCE_ATTRIBUTES": "no-equals-sign"},
        {"OTEL_SDK_DISABLED": "true"},
    ],
)
def test_unusable_settings_stop_startup(env: dict[str, str]) -> None:
    """Settings Custody cannot honour raise ConfigurationError rather than silently exporting nowhere."""
    with pytest.raises(ConfigurationError):
        tracer_provider_from_env(env)


def test_sdk_disabled_in_the_process_environment_stops_startup(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """OTEL_SDK_DISABLED in os.environ is refused even with a clean mapping, since the SDK reads it there."""
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    with pytest.raises(ConfigurationError):
        tracer_provider_from_env({})


@pytest.mark.parametrize(("raw", "seconds"), [(None, 10.0), ("2500", 2.5), ("10000", 10.0)])
def test_timeout_is_read_in_milliseconds_as_the_spec_says(raw: str | None, seconds: float) -> None:
    """OTEL_EXPORTER_OTLP_TIMEOUT is read as milliseconds (the spec), not seconds (the exporter's reading)."""
    env = {} if raw is None else {"OTEL_EXPORTER_OTLP_TIMEOUT": raw}
    assert _timeout_seconds(env) == seconds


def test_safe_attributes_prefixes_keys_and_drops_none() -> None:
    """Keys gain the custody. prefix unless they have it, and None values are left out."""
    assert SPAN_ATTRIBUTE_PREFIX == "custody."
    assert safe_attributes({"action": "turn.create", "custody.conversation_id": "conv_x", "model": None}) == {
        "custody.action": "turn.create",
        "custody.conversation_id": "conv_x",
    }


@pytest.mark.parametrize("key", ["Action", "1st", "_x", "turn-id", "turn id", "", "action\n", "custody.ID"])
def test_safe_attributes_rejects_bad_keys(key: str) -> None:
    """A key not matching ^[a-z][a-z0-9_.]*$ raises ValueError, even when its value is None."""
    with pytest.raises(ValueError, match="does not match"):
        safe_attributes({key: None})


def test_safe_attributes_rejects_a_key_given_with_and_without_the_prefix() -> None:
    """`x` and `custody.x` name the same attribute, so giving both raises ValueError."""
    with pytest.raises(ValueError, match="given twice"):
        safe_attributes({"step": 1, "custody.step": 2})


class Role(enum.Enum):
    USER = "user"


def test_safe_attributes_turns_values_into_otel_types() -> None:
    """Scalars pass; enums give their values; collections give lists of str; big ints and others give str."""
    moment = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert safe_attributes(
        {
            "flag": True,
            "count": 3,
            "ratio": 0.5,
            "role": Role.USER,
            "ids": ("a", 1, None, Role.USER),
            "tags": {"b", "a"},
            "huge": 2**64,
            "at": moment,
        }
    ) == {
        "custody.flag": True,
        "custody.count": 3,
        "custody.ratio": 0.5,
        "custody.role": "user",
        "custody.ids": ["a", "1", "user"],
        "custody.tags": ["a", "b"],
        "custody.huge": str(2**64),
        "custody.at": "2025-01-02T03:04:05+00:00",
    }
