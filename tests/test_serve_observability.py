"""A deployed `custody serve` process: JSON log lines on stdout tied to the spans it exports, and its metrics scraped and pushed."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from .conftest import CANARY, Tenant, deployment_env
from .observability import Scrape

TOKEN = "serve-scrape-token-" + "7" * 32
CALLER_TRACE = "0af7651916cd43dd8448eb211c80319c"


class Collector(ThreadingHTTPServer):
    """A minimal OTLP/HTTP collector keeping every trace and metrics export it is sent."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _CollectorHandler)
        self.spans: list[Span] = []
        self.metric_names: set[str] = set()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _CollectorHandler(BaseHTTPRequestHandler):
    server: Collector

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if self.path == "/v1/traces":
            for resource in ExportTraceServiceRequest.FromString(body).resource_spans:
                for scope in resource.scope_spans:
                    self.server.spans.extend(scope.spans)
        elif self.path == "/v1/metrics":
            for resource_metrics in ExportMetricsServiceRequest.FromString(body).resource_metrics:
                for scope_metrics in resource_metrics.scope_metrics:
                    self.server.metric_names.update(metric.name for metric in scope_metrics.metrics)
        # An empty body is a valid (empty) export response in protobuf.
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[Collector]:
    server = Collector()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _request_id_attribute(span: Span) -> str | None:
    for attribute in span.attributes:
        if attribute.key == "custody.request_id":
            return str(attribute.value.string_value)
    return None


def test_a_served_request_logs_one_json_line_tied_to_the_span_it_exported(
    database_url: str,
    keyring_path: Path,
    signing_key_path: Path,
    pepper_path: Path,
    tenant: Tenant,
    collector: Collector,
    tmp_path: Path,
) -> None:
    """Every line `custody serve` writes on stdout is JSON; each request has one access line whose request, trace and span ids are those of the server span it exported over OTLP; no line, and no scrape of /metrics, holds the canary or a query string; the metrics are also pushed over OTLP."""
    token_file = tmp_path / "metrics-token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    port = _free_port()
    env = {name: value for name, value in os.environ.items() if not name.startswith("OTEL_")}
    env |= deployment_env(database_url, keyring_path, signing_key_path, pepper_path) | {
        "CUSTODY_DATA_DIR": str(tmp_path / "data"),
        "CUSTODY_PORT": str(port),
        "CUSTODY_METRICS_TOKEN_FILE": str(token_file),
        "CUSTODY_RETENTION_INTERVAL_SECONDS": "0",
        "CUSTODY_AUDIT_CHECKPOINT_SECONDS": "0",
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.base,
        "OTEL_METRIC_EXPORT_INTERVAL": "300",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    stdout, stderr = tmp_path / "stdout", tmp_path / "stderr"
    with stdout.open("w") as out, stderr.open("w") as err:
        process = subprocess.Popen([sys.executable, "-m", "service", "serve"], env=env, stdout=out, stderr=err)
    base = f"http://127.0.0.1:{port}"
    responses: list[httpx.Response] = []
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, stderr.read_text()
            try:
                if httpx.get(f"{base}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, stderr.read_text()
            time.sleep(0.1)
        with httpx.Client(base_url=base, headers=tenant.headers(), timeout=30) as client:
            created = client.post(
                "/v1/conversations",
                json={"route": "patient-intake", "data_classes": ["phi"]},
                headers={"traceparent": f"00-{CALLER_TRACE}-b7ad6b7169203331-01"},
            )
            conversation = created.json()["id"]
            responses.append(created)
            responses.append(
                client.post(f"/v1/conversations/{conversation}/turns?note={CANARY}", json={"input": CANARY})
            )
            responses.append(client.get(f"/v1/conversations/{conversation}/steps?cursor=0&limit=5&q={CANARY}"))
            responses.append(client.get(f"/v1/nothing/{CANARY}"))
            responses.append(client.get("/metrics"))
            scraped = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
            responses.append(scraped)
        assert [r.status_code for r in responses] == [201, 200, 200, 404, 401, 200], [r.text for r in responses]
        # The pushed metrics arrive every 300 ms; wait (bounded) for a push that saw the turn.
        deadline = time.monotonic() + 15
        while "custody.turns" not in collector.metric_names and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert process.returncode == 0, stderr.read_text()

    lines = stdout.read_text().splitlines()
    records: list[dict[str, Any]] = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all(isinstance(record, dict) for record in records)
    access = [record for record in records if record["logger"] == "custody.access"]
    assert len(access) >= len(responses)
    servers = {
        rid: span
        for span in collector.spans
        if span.kind == Span.SpanKind.SPAN_KIND_SERVER and (rid := _request_id_attribute(span)) is not None
    }
    for response in responses:
        request_id = response.headers["x-request-id"]
        [line] = [record for record in access if record["request_id"] == request_id]
        span = servers[request_id]
        assert line["trace_id"] == span.trace_id.hex()
        assert line["span_id"] == span.span_id.hex()
        assert line["status"] == response.status_code
        assert line["method"] == response.request.method
    assert servers[responses[0].headers["x-request-id"]].trace_id.hex() == CALLER_TRACE
    output = stdout.read_text() + stderr.read_text()
    assert CANARY not in output
    assert "note=" not in output
    assert "cursor=" not in output
    assert CANARY not in scraped.text
    scrape = Scrape(scraped.text)
    assert scrape.value("custody_turns_total", route="patient-intake", status="completed") == 1
    assert scrape.value("custody_auth_failures_total", reason="metrics_token") == 1
    assert "custody.turns" in collector.metric_names
    assert "custody.db.pool.connections" in collector.metric_names
