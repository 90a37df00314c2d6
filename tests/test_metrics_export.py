"""Tests for service.metrics_export: OTLP/HTTP export of the metrics, and the scrape token of GET /metrics."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)

from service.config import Settings
from service.errors import ConfigurationError
from service.metrics_export import load_metrics_token, metrics_export_from_env

from .observability import Scrape


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    request: ExportMetricsServiceRequest


class MetricsReceiver(ThreadingHTTPServer):
    """A minimal OTLP/HTTP collector that decodes every metrics export it is sent."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.received: list[Received] = []

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: MetricsReceiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        request = ExportMetricsServiceRequest.FromString(body)
        self.server.received.append(Received(self.path, {k.lower(): v for k, v in self.headers.items()}, request))
        reply = ExportMetricsServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(autouse=True)
def _no_otel_in_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # The SDK reads os.environ whatever mapping it is given; a developer's OTEL_* must not leak in.
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)


@pytest.fixture
def receiver() -> Iterator[MetricsReceiver]:
    server = MetricsReceiver()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _metric_names(received: list[Received]) -> set[str]:
    return {
        metric.name
        for export in received
        for resource in export.request.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
    }


def test_metrics_go_over_otlp_to_the_configured_endpoint(receiver: MetricsReceiver) -> None:
    """With an OTLP endpoint the instruments are exported to its /v1/metrics with the configured headers and service name, and nothing is rendered for Prometheus."""
    export = metrics_export_from_env(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.base + "/collector",
            "OTEL_EXPORTER_OTLP_HEADERS": "x-tenant=ops%20team",
            "OTEL_SERVICE_NAME": "custody-metrics-test",
        },
        prometheus=False,
    )
    export.metrics.turn_finished("patient-intake", "completed", 0.25, "ten_x")
    export.metrics.auth_failure("unauthenticated")
    export.shutdown()  # exports what the periodic reader holds
    assert not export.prometheus
    assert "exported over OTLP/HTTP to " + receiver.base + "/collector/v1/metrics" in export.description
    assert {r.path for r in receiver.received} == {"/collector/v1/metrics"}
    assert receiver.received[0].headers["x-tenant"] == "ops team"
    assert {"custody.turns", "custody.turn.duration", "custody.auth.failures"} <= _metric_names(receiver.received)
    resource = receiver.received[0].request.resource_metrics[0].resource
    assert {kv.key: kv.value.string_value for kv in resource.attributes}["service.name"] == "custody-metrics-test"


def test_the_metrics_endpoint_variable_is_used_as_given(receiver: MetricsReceiver) -> None:
    """OTEL_EXPORTER_OTLP_METRICS_ENDPOINT wins over the base endpoint and gets no path appended."""
    export = metrics_export_from_env(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9",
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": receiver.base + "/m",
        },
        prometheus=True,
    )
    export.metrics.upstream_failed("upstream_timeout")
    scrape = Scrape(export.prometheus_text().decode())
    export.shutdown()
    assert {r.path for r in receiver.received} == {"/m"}
    assert scrape.value("custody_upstream_failures_total", reason="upstream_timeout") == 1


def test_without_a_reader_the_instruments_record_nothing(receiver: MetricsReceiver) -> None:
    """With neither the scrape token nor an OTLP endpoint there is no meter provider: recording is a no-op and the banner says how to turn metrics on."""
    export = metrics_export_from_env({"OTEL_TRACES_EXPORTER": "none"}, prometheus=False)
    export.metrics.turn_finished("patient-intake", "completed", 0.1, "ten_x")
    export.shutdown()
    assert receiver.received == []
    assert "CUSTODY_METRICS_TOKEN_FILE" in export.description
    with pytest.raises(RuntimeError):
        export.prometheus_text()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"OTEL_METRICS_EXPORTER": "prometheus"}, "OTEL_METRICS_EXPORTER=prometheus is not supported"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "not supported"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_METRIC_EXPORT_INTERVAL": "soon"}, "INTERVAL"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_METRIC_EXPORT_TIMEOUT": "0"}, "TIMEOUT"),
    ],
)
def test_metric_export_settings_that_cannot_work_stop_startup(env: dict[str, str], message: str) -> None:
    """An exporter Custody does not have, a gRPC protocol or a bad export interval is refused at startup."""
    with pytest.raises(ConfigurationError, match=message):
        metrics_export_from_env(env, prometheus=False)


def _settings(tmp_path: Path, **env: str) -> Settings:
    return Settings.from_env({"CUSTODY_DATA_DIR": str(tmp_path / "data"), **env})


def test_a_deployment_serves_metrics_only_with_a_token_file(tmp_path: Path) -> None:
    """A deployment without CUSTODY_METRICS_TOKEN_FILE has no /metrics (and says so); with one it reads the token, whitespace stripped."""
    announce: list[str] = []
    assert load_metrics_token(_settings(tmp_path, DATABASE_URL="postgresql://db/c"), announce) is None
    assert "GET /metrics is off" in announce[0]
    token_file = tmp_path / "token"
    token_file.write_text("a" * 40 + "\n")
    token_file.chmod(0o600)
    settings = _settings(tmp_path, DATABASE_URL="postgresql://db/c", CUSTODY_METRICS_TOKEN_FILE=str(token_file))
    assert load_metrics_token(settings, []) == b"a" * 40
    assert not (tmp_path / "data").exists()  # a deployment never generates one


def test_the_zero_config_run_generates_a_private_token_once(tmp_path: Path) -> None:
    """The zero-config run generates a random token (mode 0600) in its data dir, announces it, and reuses it next time."""
    announce: list[str] = []
    first = load_metrics_token(_settings(tmp_path), announce)
    path = tmp_path / "data" / "metrics-token"
    assert first is not None
    assert len(first) == 64
    assert path.stat().st_mode & 0o777 == 0o600
    assert any("EMBEDDED DEFAULT" in line and str(path) in line for line in announce)
    again: list[str] = []
    assert load_metrics_token(_settings(tmp_path), again) == first
    assert again == []


@pytest.mark.parametrize(
    ("content", "mode", "message"),
    [
        ("b" * 40, 0o644, "readable by group or others"),
        ("short", 0o600, "shorter than 16 bytes"),
        (None, 0o600, "does not exist"),
    ],
)
def test_a_token_file_that_is_unsafe_or_unusable_stops_startup(
    tmp_path: Path, content: str | None, mode: int, message: str
) -> None:
    """A token file others can read, a token too short to resist guessing, or a missing file is refused naming the problem."""
    token_file = tmp_path / "token"
    if content is not None:
        token_file.write_text(content)
        token_file.chmod(mode)
    with pytest.raises(ConfigurationError, match=message):
        load_metrics_token(_settings(tmp_path, CUSTODY_METRICS_TOKEN_FILE=str(token_file)), [])
