"""Custody's OpenTelemetry tracer provider, built from the standard OTEL_* variables.

The OTLP settings are resolved here for every signal (traces, and metrics in service/metrics_export.py)
from the mapping given, since the SDK's exporters read their variables from os.environ only.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from datetime import date, datetime
from enum import Enum
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.util.re import parse_env_headers

from .errors import ConfigurationError

__all__ = [
    "SPAN_ATTRIBUTE_PREFIX",
    "Signal",
    "SpanAttributeValue",
    "describe",
    "otlp_endpoint",
    "otlp_exporter_options",
    "resource_from_env",
    "safe_attributes",
    "tracer_provider_from_env",
    "without_userinfo",
]

SPAN_ATTRIBUTE_PREFIX = "custody."

SpanAttributeValue = str | int | bool | float | list[str]
# An OTLP signal, as its variables spell it (OTEL_TRACES_EXPORTER, OTEL_EXPORTER_OTLP_METRICS_ENDPOINT).
Signal = Literal["traces", "metrics"]

_ATTRIBUTE_KEY = re.compile(r"[a-z][a-z0-9_.]*")
# OTLP carries integers as int64; one outside that range makes the encoder fail the whole batch.
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
# The spec's default; the exporter's own default (10) is in seconds, but we pass seconds explicitly.
_DEFAULT_TIMEOUT_MILLIS = 10_000.0
# What each signal is called in messages.
_SIGNAL_ITEMS: dict[Signal, str] = {"traces": "spans", "metrics": "metrics"}
_COMPRESSIONS = {member.value: member for member in Compression}


def tracer_provider_from_env(env: Mapping[str, str] | None = None, *, service_name: str = "custody") -> TracerProvider:
    """A real SDK tracer provider, exporting over OTLP/HTTP only when an endpoint is configured.

    The provider is always a real one, even when nothing is exported, because Custody writes
    trace and span ids into its audit records. It is not installed as the global provider.
    """
    env = os.environ if env is None else env
    # The SDK reads OTEL_SDK_DISABLED from os.environ itself, whatever mapping we were given, and
    # would then hand out no-op tracers whose spans all carry zero ids: refuse rather than write
    # zero ids into audit records.
    for source in (env, os.environ):
        if (_setting(source, "OTEL_SDK_DISABLED") or "").lower() == "true":
            raise ConfigurationError(
                "OTEL_SDK_DISABLED=true would leave Custody's audit records without trace ids; "
                "set OTEL_TRACES_EXPORTER=none instead to stop exporting spans"
            )
    # Resolve (and validate) the exporter before building the provider: TracerProvider registers
    # an atexit hook, so a provider built and then abandoned by a ConfigurationError would linger.
    exporter = _span_exporter(env)
    provider = TracerProvider(resource=resource_from_env(env, service_name))
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def describe(env: Mapping[str, str] | None = None) -> str:
    """One line for the startup banner saying where spans go."""
    env = os.environ if env is None else env
    endpoint = otlp_endpoint(env, "traces")
    if endpoint is not None:
        return f"traces exported over OTLP/HTTP to {without_userinfo(endpoint)}"
    if "none" in _exporter_names(env, "traces"):
        return "traces not exported (OTEL_TRACES_EXPORTER=none)"
    return "traces not exported (set OTEL_EXPORTER_OTLP_ENDPOINT)"


def safe_attributes(values: Mapping[str, object]) -> dict[str, SpanAttributeValue]:
    """Span attributes under the `custody.` prefix, with None dropped and values made OTel-legal.

    Raises ValueError for a key that does not match ``^[a-z][a-z0-9_.]*$`` or for two keys that
    name the same attribute once prefixed (`x` and `custody.x`).
    """
    attributes: dict[str, SpanAttributeValue] = {}
    for key, value in values.items():
        # fullmatch, not `$`: `$` also matches before a trailing newline.
        if not isinstance(key, str) or not _ATTRIBUTE_KEY.fullmatch(key):
            raise ValueError(f"span attribute key {key!r} does not match ^[a-z][a-z0-9_.]*$")
        name = key if key.startswith(SPAN_ATTRIBUTE_PREFIX) else SPAN_ATTRIBUTE_PREFIX + key
        if name in attributes:
            raise ValueError(f"span attribute {name!r} is given twice")
        if value is not None:
            attributes[name] = _attribute_value(value)
    return attributes


def _setting(env: Mapping[str, str], name: str) -> str | None:
    # The spec treats an empty value as unset.
    return env.get(name, "").strip() or None


def _otlp_setting(env: Mapping[str, str], suffix: str, signal: Signal = "traces") -> str | None:
    # The per-signal variable wins over the generic one.
    specific = _setting(env, f"OTEL_EXPORTER_OTLP_{signal.upper()}_{suffix}")
    return specific or _setting(env, f"OTEL_EXPORTER_OTLP_{suffix}")


def _exporter_names(env: Mapping[str, str], signal: Signal) -> set[str]:
    raw = _setting(env, f"OTEL_{signal.upper()}_EXPORTER") or ""
    return {name.strip().lower() for name in raw.split(",") if name.strip()}


def otlp_endpoint(env: Mapping[str, str], signal: Signal) -> str | None:
    """The URL a signal's data is POSTed to, or None when it is not exported over OTLP."""
    names, items = _exporter_names(env, signal), _SIGNAL_ITEMS[signal]
    if "none" in names:
        return None
    if names - {"otlp"}:
        raise ConfigurationError(
            f"OTEL_{signal.upper()}_EXPORTER={','.join(sorted(names))} is not supported: "
            f"Custody exports {items} over OTLP/HTTP only (use otlp or none)"
        )
    if (endpoint := _setting(env, f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT")) is None:
        base = _setting(env, "OTEL_EXPORTER_OTLP_ENDPOINT")
        if base is None:
            return None
        # Per the spec the base endpoint gets the signal path appended, after any path it has;
        # the per-signal endpoint above is used exactly as given.
        endpoint = base.rstrip("/") + f"/v1/{signal}"
    # Only the HTTP/protobuf exporter is installed; sending it to a gRPC port would fail on
    # every batch, in a background thread, long after startup.
    protocol = _otlp_setting(env, "PROTOCOL", signal)
    if protocol is not None and protocol != "http/protobuf":
        raise ConfigurationError(
            f"OTLP protocol {protocol!r} is not supported: Custody exports {items} over "
            "http/protobuf only (unset OTEL_EXPORTER_OTLP_PROTOCOL or set it to http/protobuf)"
        )
    return endpoint


def otlp_exporter_options(env: Mapping[str, str], signal: Signal) -> dict[str, Any]:
    """The keyword arguments of an OTLP/HTTP exporter for `signal`, every one resolved from `env`.

    The SDK's exporters read their OTEL_* variables from os.environ only, never from a mapping we
    pass, so every setting is resolved here and handed over explicitly.
    """
    return {
        "certificate_file": _otlp_setting(env, "CERTIFICATE", signal),
        "client_key_file": _otlp_setting(env, "CLIENT_KEY", signal),
        "client_certificate_file": _otlp_setting(env, "CLIENT_CERTIFICATE", signal),
        # The same parser the exporter uses: W3C-baggage style, percent-decoded.
        "headers": dict(parse_env_headers(_otlp_setting(env, "HEADERS", signal) or "", liberal=True)),
        "timeout": _timeout_seconds(env, signal),
        "compression": _compression(env, signal),
    }


def _span_exporter(env: Mapping[str, str]) -> OTLPSpanExporter | None:
    endpoint = otlp_endpoint(env, "traces")
    if endpoint is None:
        return None
    return OTLPSpanExporter(endpoint=endpoint, **otlp_exporter_options(env, "traces"))


def _timeout_seconds(env: Mapping[str, str], signal: Signal = "traces") -> float:
    raw = _otlp_setting(env, "TIMEOUT", signal)
    # The spec gives this variable in milliseconds; the Python exporter reads it as seconds
    # (opentelemetry-python#4044), so 10000 would mean almost three hours. We follow the spec.
    try:
        millis = _DEFAULT_TIMEOUT_MILLIS if raw is None else float(raw)
    except ValueError:
        millis = math.nan
    if not (math.isfinite(millis) and millis > 0):
        raise ConfigurationError(
            f"OTLP timeout {raw!r} is not a positive number of milliseconds (OTEL_EXPORTER_OTLP_TIMEOUT, e.g. 10000)"
        )
    return millis / 1000


def _compression(env: Mapping[str, str], signal: Signal) -> Compression:
    raw = (_otlp_setting(env, "COMPRESSION", signal) or "none").lower()
    try:
        return _COMPRESSIONS[raw]
    except KeyError:
        raise ConfigurationError(
            f"OTLP compression {raw!r} is not supported (use one of {', '.join(_COMPRESSIONS)})"
        ) from None


def resource_from_env(env: Mapping[str, str], default_service_name: str = "custody") -> Resource:
    """The resource every signal is described by: OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES."""
    attributes: dict[str, str] = {}
    for item in (_setting(env, "OTEL_RESOURCE_ATTRIBUTES") or "").split(","):
        if not item.strip():
            continue
        key, equals, value = item.partition("=")
        if not equals or not key.strip():
            raise ConfigurationError(f"OTEL_RESOURCE_ATTRIBUTES entry {item!r} is not key=value")
        attributes[key.strip()] = unquote(value.strip())
    # OTEL_SERVICE_NAME beats service.name in OTEL_RESOURCE_ATTRIBUTES (spec), and either beats
    # our default. Resource.create would read both from os.environ, but given explicitly they win
    # over what it reads; it still adds telemetry.sdk.* and service.instance.id.
    attributes[SERVICE_NAME] = (
        _setting(env, "OTEL_SERVICE_NAME") or attributes.get(SERVICE_NAME) or default_service_name
    )
    return Resource.create(attributes)


def without_userinfo(url: str) -> str:
    """The URL without user and password: the banner is logged; credentials must not be."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def _attribute_value(value: object) -> SpanAttributeValue:
    if isinstance(value, Enum):
        # A reader knows an enum by its value; str() of a plain Enum gives `Class.MEMBER`.
        value = value.value
    if isinstance(value, bool | float | str):
        return value
    if isinstance(value, int):
        return value if _INT64_MIN <= value <= _INT64_MAX else str(value)
    if isinstance(value, list | tuple):
        return [_text(item) for item in value if item is not None]
    if isinstance(value, set | frozenset):
        # Sorted so the same set always yields the same attribute.
        return sorted(_text(item) for item in value if item is not None)
    return _text(value)


def _text(value: object) -> str:
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, datetime | date):
        return value.isoformat()
    return str(value)
