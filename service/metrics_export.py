"""Where Custody's metrics go: Prometheus text at `GET /metrics`, and OTLP/HTTP when an endpoint is set.

The composition root builds one MeterProvider beside its tracer provider (never the global one),
with a reader for each way the metrics leave:

- a `PrometheusMetricReader` (opentelemetry-exporter-prometheus) over a prometheus-client registry
  of its own, which `GET /metrics` renders, when the scrape token is configured (the endpoint
  needs it: see service/api/metrics.py);
- a periodic reader with the OTLP/HTTP metric exporter, when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
  `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT`) is set, with the same `OTEL_*` settings as the spans.

With neither there is no provider at all and the instruments record nothing.
"""

from __future__ import annotations

import math
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field

from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from prometheus_client import CollectorRegistry, generate_latest

from .config import Settings
from .errors import ConfigurationError
from .metrics import Metrics
from .telemetry import otlp_endpoint, otlp_exporter_options, resource_from_env, without_userinfo

__all__ = ["PROMETHEUS_TEXT", "MetricsExport", "load_metrics_token", "metrics_export_from_env"]

# The content type of the text exposition format prometheus-client writes.
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"
# OTEL_METRIC_EXPORT_INTERVAL and _TIMEOUT, in milliseconds: the spec's defaults.
_DEFAULT_INTERVAL_MILLIS = 60_000.0
_DEFAULT_TIMEOUT_MILLIS = 30_000.0
_TOKEN_FILE = "metrics-token"  # noqa: S105 - the file's name in the data dir, not a token
_MIN_TOKEN_BYTES = 16


@dataclass
class MetricsExport:
    """The instruments and the readers behind them."""

    metrics: Metrics
    # One line for the startup banner: where the metrics go.
    description: str
    _provider: MeterProvider | None = field(default=None, repr=False)
    _registry: CollectorRegistry | None = field(default=None, repr=False)

    @property
    def prometheus(self) -> bool:
        """Whether `prometheus_text` has anything to render."""
        return self._registry is not None

    def prometheus_text(self) -> bytes:
        """Every instrument in the Prometheus text format, collected now."""
        if self._registry is None:
            raise RuntimeError("metrics were built without the Prometheus reader")
        return generate_latest(self._registry)

    def shutdown(self) -> None:
        """Export what the OTLP reader still holds, and stop its thread."""
        if self._provider is not None:
            self._provider.shutdown()


def metrics_export_from_env(
    env: Mapping[str, str] | None = None,
    *,
    prometheus: bool,
    tenant_labels: bool = False,
    service_name: str = "custody",
) -> MetricsExport:
    """Custody's metrics, read by Prometheus (when `prometheus`) and exported over OTLP/HTTP
    (when the environment names an endpoint); every OTEL_* setting is read from `env`."""
    env = os.environ if env is None else env
    readers: list[MetricReader] = []
    where: list[str] = []
    # Not auto-described: that would collect from the reader before it has a provider.
    registry = CollectorRegistry() if prometheus else None
    if registry is not None:
        # Scope labels (otel_scope_name...) would repeat "custody" on every series.
        readers.append(PrometheusMetricReader(scope_info_enabled=False, registry=registry))
        where.append("scraped at GET /metrics")
    endpoint = otlp_endpoint(env, "metrics")
    if endpoint is not None:
        exporter = OTLPMetricExporter(endpoint=endpoint, **otlp_exporter_options(env, "metrics"))
        readers.append(
            PeriodicExportingMetricReader(
                exporter,
                export_interval_millis=_millis(env, "OTEL_METRIC_EXPORT_INTERVAL", _DEFAULT_INTERVAL_MILLIS),
                export_timeout_millis=_millis(env, "OTEL_METRIC_EXPORT_TIMEOUT", _DEFAULT_TIMEOUT_MILLIS),
            )
        )
        where.append(f"exported over OTLP/HTTP to {without_userinfo(endpoint)}")
    if not readers:
        return MetricsExport(
            Metrics.disabled(), "metrics not recorded (set CUSTODY_METRICS_TOKEN_FILE or OTEL_EXPORTER_OTLP_ENDPOINT)"
        )
    provider = MeterProvider(
        metric_readers=readers,
        resource=resource_from_env(env, service_name),
        # Exemplars would keep trace ids beside histogram buckets: a cost on every measurement
        # for something the text format does not even carry.
        exemplar_filter=AlwaysOffExemplarFilter(),
    )
    metrics = Metrics(provider.get_meter("custody"), tenant_labels=tenant_labels)
    labels = "; with a tenant label (CUSTODY_METRICS_TENANT_LABELS)" if tenant_labels else ""
    return MetricsExport(metrics, "metrics " + " and ".join(where) + labels, provider, registry)


def load_metrics_token(settings: Settings, announce: list[str]) -> bytes | None:
    """The bearer token a scraper must send to `GET /metrics`, or None when the endpoint is off.

    A deployment serves /metrics only when `CUSTODY_METRICS_TOKEN_FILE` names the token (read
    once, at startup); the zero-config run generates one in its data dir. Like the pepper, the
    file must not be readable by group or others.
    """
    path = settings.metrics_token_path
    if path is None:
        if settings.deployment:
            announce.append("GET /metrics is off (set CUSTODY_METRICS_TOKEN_FILE to serve it to a scraper)")
            return None
        path = settings.data_dir / _TOKEN_FILE
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            # O_EXCL and 0600 at creation: the token never sits in a file others could open.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_hex(32) + "\n")
            announce.append(f"EMBEDDED DEFAULT: generated the /metrics bearer token at {path}")
    elif not path.exists():
        raise ConfigurationError(f"CUSTODY_METRICS_TOKEN_FILE={path} does not exist")
    if path.stat().st_mode & 0o077:
        raise ConfigurationError(f"{path} is readable by group or others: run chmod 600 {path}")
    # Surrounding whitespace is not part of it (a secret made with `echo` ends in a newline).
    token = path.read_bytes().strip()
    if len(token) < _MIN_TOKEN_BYTES:
        raise ConfigurationError(
            f"the metrics token in {path} is shorter than {_MIN_TOKEN_BYTES} bytes "
            "(make one with: openssl rand -hex 32)"
        )
    return token


def _millis(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    try:
        value = default if not raw else float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ConfigurationError(f"{name} must be a positive number of milliseconds, not {raw[:40]!r}")
    return value
