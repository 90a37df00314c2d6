"""Route policy: the data-class catalogue, the routes, and the provider-storage decision."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import MappingProxyType
from typing import Any

import jsonschema
import rfc8785
import yaml
from jsonschema.exceptions import ValidationError, best_match

from .config import SCHEMAS_DIR
from .detectors import Detector, DetectorSet, PatternRefused, compile_linear, default_detectors
from .errors import (
    DataClassBlocked,
    DataClassNotAllowedError,
    MediaTooLarge,
    MediaTypeNotAllowed,
    MediaUriNotAllowed,
    PolicyError,
    PolicyViolation,
    UnknownDataClassError,
    UnknownRouteError,
)
from .retention_rules import Duration, RetentionRule, combine_rules

__all__ = [
    "FALLBACK_GENERATION_CONFIG",
    "FALLBACK_TOOL_TYPES",
    "POLICY_SCHEMA_PATH",
    "DataClass",
    "DataClassBlocked",
    "DataClassNotAllowedError",
    "MediaBlock",
    "MediaRule",
    "Policy",
    "PolicyError",
    "PolicyViolation",
    "Route",
    "StorageDecision",
    "UnknownDataClassError",
    "UnknownRouteError",
    "check_blocked",
    "check_data_classes",
    "check_media",
    "decide_storage",
    "load_policy",
    "media_body_warnings",
    "parse_policy",
]

POLICY_SCHEMA_PATH = SCHEMAS_DIR / "policy.schema.json"

# Largest integer every JSON implementation holds exactly; RFC 8785 refuses anything larger.
_MAX_SAFE_INTEGER = 2**53 - 1
# Route settings re-sent with every create call besides model/agent, in the SDK's keyword names.
_UPSTREAM_OPTIONAL = (
    "agent_config",
    "system_instruction",
    "tools",
    "generation_config",
    "response_format",
)

# What a route with `fallback: generate_content` may set, because generateContent has a field for
# it (service/generate_content.py maps them): anything else would be dropped silently on a
# fallback turn, so the policy refuses it at load instead.
FALLBACK_TOOL_TYPES = frozenset({"function", "google_search", "url_context"})
FALLBACK_GENERATION_CONFIG = frozenset(
    {"temperature", "top_p", "seed", "stop_sequences", "max_output_tokens", "thinking_level", "thinking_summaries"}
)


@dataclass(frozen=True)
class DataClass:
    """One entry of the catalogue."""

    name: str
    description: str
    provider_storage: bool
    retention: RetentionRule = field(default_factory=RetentionRule)


@dataclass(frozen=True)
class MediaRule:
    """The media a route takes (its `media` section): MIME types, decoded sizes, URI prefixes.
    A route without one takes no media at all."""

    allowed: frozenset[str]
    max_bytes: int
    max_total_bytes: int
    # Empty: a block may not name its content by `uri`, only carry it.
    uri_prefixes: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Route:
    """A route and the interaction-scoped settings it sends upstream on every turn."""

    name: str
    description: str
    model: str | None = None
    agent: str | None = None
    agent_config: Mapping[str, Any] | None = None
    system_instruction: str | None = None
    tools: tuple[Mapping[str, Any], ...] = ()
    generation_config: Mapping[str, Any] | None = None
    response_format: Any | None = None
    data_classes: frozenset[str] = frozenset()
    provider_storage: bool = False
    retention: RetentionRule = field(default_factory=RetentionRule)
    # How long a copy the provider keeps (provider storage) may live before Custody deletes it,
    # even while the conversation goes on; None leaves it to the provider's own expiry.
    provider_ttl: Duration | None = None
    # Classes whose detection refuses the turn on this route (`on_detect: block`) instead of
    # raising the conversation's classification (`raise`, the default).
    blocked_classes: frozenset[str] = frozenset()
    # Whether a client may ask for a background turn (the model runs it while Custody polls);
    # only ever where provider storage is permitted too, which the turn checks at its claim.
    background: bool = False
    # The media blocks a turn's input may carry; None (no `media` section) refuses every one.
    media: MediaRule | None = None
    # `generate_content`: a turn the Interactions surface cannot take (a server error, the surface
    # missing, the breaker open) goes through generateContent instead; None: it fails.
    fallback: str | None = None

    def __post_init__(self) -> None:
        if (self.model is None) == (self.agent is None):
            raise ValueError(f"route {self.name}: set exactly one of model or agent")
        # The settings are re-sent on every turn of every conversation on the route, so they are
        # frozen: a caller that edits what it was handed must not change what later turns send.
        for name in ("agent_config", "tools", "generation_config", "response_format"):
            object.__setattr__(self, name, _freeze(getattr(self, name)))
        object.__setattr__(self, "data_classes", frozenset(self.data_classes))
        object.__setattr__(self, "blocked_classes", frozenset(self.blocked_classes))

    def upstream_settings(self) -> dict[str, Any]:
        """Keyword arguments for `interactions.create` that must accompany every call.

        The API treats these as interaction-scoped: one left out silently resets, even when the
        history is replayed in full. Unset ones are omitted. The result is a fresh mutable copy.
        """
        settings: dict[str, Any] = {"model": self.model} if self.model is not None else {"agent": self.agent}
        for name in _UPSTREAM_OPTIONAL:
            value = getattr(self, name)
            if value is not None and value != ():
                settings[name] = _thaw(value)
        return settings


@dataclass(frozen=True)
class Policy:
    """A loaded policy file; `version` identifies its content for turn records and audits."""

    version: str
    data_classes: Mapping[str, DataClass]
    routes: Mapping[str, Route]
    # The detectors every turn's input goes through; without a `detectors` section in the file,
    # the built-in set of earlier versions (see `service.detectors.default_detectors`).
    detectors: DetectorSet = field(default_factory=DetectorSet)

    def route(self, name: str) -> Route:
        """Return the route called `name`, or raise `UnknownRouteError`."""
        try:
            return self.routes[name]
        except KeyError:
            raise UnknownRouteError(name) from None

    def retention_for(self, route: str, data_classes: Iterable[str]) -> RetentionRule:
        """The rule that governs a conversation on `route` carrying `data_classes`: the strictest
        of what the route and each class state (see service.retention_rules). A route or class that
        has left the policy states nothing."""
        rules = [self.routes[route].retention] if route in self.routes else []
        rules += [self.data_classes[c].retention for c in data_classes if c in self.data_classes]
        return combine_rules(rules)


@dataclass(frozen=True)
class StorageDecision:
    """Whether the provider may keep a copy; `reason` is `code: detail` and never holds content."""

    provider_storage: bool
    reason: str

    @property
    def code(self) -> str:
        """The machine-friendly part of `reason`, e.g. `route_denies`."""
        return self.reason.partition(":")[0]


def decide_storage(route: Route, data_classes: Iterable[str], catalogue: Mapping[str, DataClass]) -> StorageDecision:
    """Decide provider storage for a conversation on `route` carrying `data_classes`.

    Default deny: storage is permitted only when the route allows it and every class is declared,
    allowed on the route and allows it itself. The first failing rule gives the reason.
    """
    classes = frozenset(data_classes)
    if not route.provider_storage:
        return _deny("route_denies", f"route {route.name} does not permit provider storage")
    if not classes:
        # Nothing declared is not the same as "nothing sensitive": storage needs a positive label.
        return _deny("unclassified", "no data class declared for the conversation")
    if unknown := sorted(classes - catalogue.keys()):
        # A class dropped from the catalogue after a conversation carried it must still deny.
        return _deny("unknown_data_class", "undeclared data classes: " + ", ".join(unknown))
    if outside := sorted(classes - route.data_classes):
        return _deny(
            "data_class_not_allowed",
            f"route {route.name} does not allow data classes: " + ", ".join(outside),
        )
    if denying := sorted(c for c in classes if not catalogue[c].provider_storage):
        return _deny(
            "data_class_denies",
            "data classes that do not permit provider storage: " + ", ".join(denying),
        )
    listed = ", ".join(sorted(classes))
    detail = f"route {route.name} and data classes {listed} permit provider storage"
    return StorageDecision(provider_storage=True, reason=f"permitted: {detail}")


def check_data_classes(route: Route, requested: Iterable[str], catalogue: Mapping[str, DataClass]) -> None:
    """Raise unless every requested class is declared and allowed on `route`."""
    wanted = frozenset(requested)
    # Undeclared first: a misspelt class is a different client bug from a forbidden one.
    if unknown := wanted - catalogue.keys():
        raise UnknownDataClassError(unknown)
    if forbidden := wanted - route.data_classes:
        raise DataClassNotAllowedError(route.name, forbidden)


def check_blocked(route: Route, detected: Iterable[str]) -> None:
    """Raise `DataClassBlocked` when the detectors found a class `route` blocks."""
    if blocked := frozenset(detected) & route.blocked_classes:
        raise DataClassBlocked(route.name, blocked)


@dataclass(frozen=True)
class MediaBlock:
    """A media block of a turn's input, as the route's rule sees it: never its content."""

    pointer: str
    kind: str
    # The MIME type's essence, lower case (parameters dropped): checked syntax, not content.
    mime_type: str
    # Decoded size of inline data; None for a block by `uri`.
    size: int | None
    uri: str | None


def check_media(route: Route, blocks: Iterable[MediaBlock]) -> None:
    """Raise unless every media block fits the route's rule: its type allowed (415), each inline
    block and their total within the limits (413), a block by `uri` under an allowed prefix. The
    first misfit in the input's order is named by its pointer; messages never quote the block."""
    rule = route.media
    total = 0
    for block in blocks:
        if rule is None:
            raise MediaTypeNotAllowed(
                f"route {route.name} takes no media (image, audio, video or document blocks); send text only",
                pointer=block.pointer,
            )
        if block.mime_type not in rule.allowed:
            raise MediaTypeNotAllowed(
                f"route {route.name} takes media of types: {', '.join(sorted(rule.allowed))}",
                pointer=f"{block.pointer}/mime_type",
            )
        if block.uri is not None:
            # A dot segment could climb out of the prefix once the fetcher resolves it.
            climbs = any(part in {".", ".."} for part in block.uri.split("?", 1)[0].split("/"))
            if not rule.uri_prefixes or climbs or not block.uri.startswith(rule.uri_prefixes):
                where = "these URI prefixes only" if rule.uri_prefixes else "no media by `uri`, only inline `data`"
                raise MediaUriNotAllowed(f"route {route.name} takes {where}", pointer=f"{block.pointer}/uri")
            continue
        size = block.size or 0
        if size > rule.max_bytes:
            raise MediaTooLarge(
                f"this media block is {size} bytes; route {route.name} takes at most {rule.max_bytes} bytes a block",
                pointer=f"{block.pointer}/data",
            )
        total += size
        if total > rule.max_total_bytes:
            raise MediaTooLarge(
                f"the input's media come to more than the {rule.max_total_bytes} bytes route {route.name} "
                "takes in one turn",
                pointer=f"{block.pointer}/data",
            )


# Room in a request body for what surrounds a turn's media: its text, JSON and the other fields.
MEDIA_BODY_MARGIN = 64_000


def media_body_bytes(rule: MediaRule) -> int:
    """The request body a turn needs to carry `max_total_bytes` of media inline: base64 takes four
    bytes for every three, plus a margin for the rest of the request."""
    return -(-rule.max_total_bytes // 3) * 4 + MEDIA_BODY_MARGIN


def media_body_warnings(policy: Policy, max_body_bytes: int) -> list[str]:
    """A startup warning for each route whose media would not fit in the request body limit: the
    body limit refuses them first (413 payload-too-large), whatever the route says."""
    return [
        f"WARNING: route {route.name} takes up to {route.media.max_total_bytes} bytes of media a turn, which needs "
        f"a request body of about {media_body_bytes(route.media)} bytes; CUSTODY_MAX_BODY_BYTES is {max_body_bytes}"
        ", so larger bodies are refused first (413 payload-too-large)"
        for route in policy.routes.values()
        if route.media is not None and media_body_bytes(route.media) > max_body_bytes
    ]


def load_policy(path: Path) -> Policy:
    """Read, validate and load the policy file at `path`."""
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(source, "", f"cannot read policy file: {exc}") from exc
    try:
        document = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - _StrictLoader is a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise PolicyError(source, where, f"invalid YAML: {problem}") from exc
    return parse_policy(document, source=source)


def parse_policy(document: Any, *, source: str) -> Policy:
    """Validate an already parsed policy document; `source` names it in error messages."""
    _check_json_values(document, (), source)
    error = best_match(_validator().iter_errors(document))
    if error is not None:
        path, problem = _describe(error)
        raise PolicyError(source, path, problem)
    catalogue = {
        name: DataClass(
            name,
            spec["description"],
            spec["provider_storage"],
            _retention(spec.get("retention"), ("data_classes", name, "retention"), source),
        )
        for name, spec in document["data_classes"].items()
    }
    routes = {name: _build_route(name, spec, catalogue, source) for name, spec in document["routes"].items()}
    if "detectors" in document:
        detectors = DetectorSet(
            tuple(_build_detector(name, spec, catalogue, source) for name, spec in document["detectors"].items())
        )
    else:
        detectors = default_detectors(catalogue)
    try:
        # Canonical JSON, so reformatting the YAML or reordering keys keeps the version.
        canonical = rfc8785.dumps(document)
    except rfc8785.CanonicalizationError as exc:
        raise PolicyError(source, "", f"cannot canonicalize policy: {exc}") from exc
    return Policy(
        version="sha256:" + hashlib.sha256(canonical).hexdigest(),
        data_classes=MappingProxyType(catalogue),
        routes=MappingProxyType(routes),
        detectors=detectors,
    )


class _StrictLoader(yaml.SafeLoader):
    """A safe loader that refuses duplicate keys.

    PyYAML silently keeps the last duplicate, so a pasted second copy of a route would quietly
    replace the first one. Keys brought in by a `<<` merge may still be overridden, as YAML intends.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = self.construct_object(key_node)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping",
                        node.start_mark,
                        f"duplicate key {key!r}",
                        key_node.start_mark,
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


@cache
def _validator() -> jsonschema.Draft202012Validator:
    # Read on first use, not at import time; the file never changes while the process runs.
    schema = json.loads(POLICY_SCHEMA_PATH.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _build_route(name: str, spec: Mapping[str, Any], catalogue: Mapping[str, DataClass], source: str) -> Route:
    # The checks JSON Schema cannot express: references into the catalogue and uniqueness of
    # function names, which the turn engine relies on to match function results to their calls.
    for index, cls in enumerate(spec["data_classes"]):
        if cls not in catalogue:
            where = _format_path(("routes", name, "data_classes", index))
            raise PolicyError(source, where, f"{cls!r} is not a declared data class")
    for cls in spec.get("on_detect", {}):
        if cls not in catalogue:
            where = _format_path(("routes", name, "on_detect", cls))
            raise PolicyError(source, where, f"{cls!r} is not a declared data class")
    functions: set[str] = set()
    for index, tool in enumerate(spec.get("tools", ())):
        if tool["type"] == "function":
            if tool["name"] in functions:
                where = _format_path(("routes", name, "tools", index, "name"))
                raise PolicyError(source, where, f"duplicate function name {tool['name']!r}")
            functions.add(tool["name"])
    return Route(
        name=name,
        description=spec["description"],
        model=spec.get("model"),
        agent=spec.get("agent"),
        agent_config=spec.get("agent_config"),
        system_instruction=spec.get("system_instruction"),
        tools=tuple(spec.get("tools", ())),
        generation_config=spec.get("generation_config"),
        response_format=spec.get("response_format"),
        data_classes=frozenset(spec["data_classes"]),
        provider_storage=spec.get("provider_storage", False),
        retention=_retention(spec.get("retention"), ("routes", name, "retention"), source),
        provider_ttl=_duration(spec.get("retention", {}).get("provider_ttl"), ("routes", name, "retention"), source),
        blocked_classes=frozenset(cls for cls, action in spec.get("on_detect", {}).items() if action == "block"),
        background=spec.get("background", False),
        media=_media(spec.get("media"), ("routes", name, "media"), source),
        fallback=_fallback(name, spec, source),
    )


def _fallback(name: str, spec: Mapping[str, Any], source: str) -> str | None:
    """The route's fallback, once its settings are known to fit generateContent (the schema has
    already refused it on an agent route)."""
    fallback: str | None = spec.get("fallback")
    if fallback is None:
        return None
    for index, tool in enumerate(spec.get("tools", ())):
        if tool["type"] not in FALLBACK_TOOL_TYPES or (tool["type"] != "function" and set(tool) != {"type"}):
            raise PolicyError(
                source,
                _format_path(("routes", name, "tools", index)),
                "fallback: generate_content takes function tools and plain google_search or url_context tools only",
            )
    for key in spec.get("generation_config") or {}:
        if key not in FALLBACK_GENERATION_CONFIG:
            raise PolicyError(
                source,
                _format_path(("routes", name, "generation_config", key)),
                f"fallback: generate_content cannot carry generation_config.{key}",
            )
    formats = spec.get("response_format")
    for index, item in enumerate(formats if isinstance(formats, list) else [] if formats is None else [formats]):
        if index or item.get("type", "text") != "text" or set(item) - {"type", "mime_type", "schema"}:
            raise PolicyError(
                source,
                _format_path(("routes", name, "response_format")),
                "fallback: generate_content takes one text response_format (mime_type, schema) only",
            )
    return fallback


def _media(spec: Mapping[str, Any] | None, path: tuple[str | int, ...], source: str) -> MediaRule | None:
    if spec is None:
        return None
    total = spec.get("max_total_bytes", spec["max_bytes"])
    if total < spec["max_bytes"]:
        raise PolicyError(source, _format_path((*path, "max_total_bytes")), "max_total_bytes is smaller than max_bytes")
    return MediaRule(
        allowed=frozenset(spec["allowed"]),
        max_bytes=spec["max_bytes"],
        max_total_bytes=total,
        uri_prefixes=tuple(spec.get("uri_prefixes", ())),
    )


def _build_detector(name: str, spec: Mapping[str, Any], catalogue: Mapping[str, DataClass], source: str) -> Detector:
    """A detector of the policy, checked as the service starts: its class is declared, its pattern
    compiles with RE2 (a pattern that needs backtracking is refused), and it finds each of its
    `must_match` examples and none of its `must_not_match` ones. Error messages name the detector
    and the example's index, never the example itself."""
    if spec["data_class"] not in catalogue:
        where = _format_path(("detectors", name, "data_class"))
        raise PolicyError(source, where, f"{spec['data_class']!r} is not a declared data class")
    if "pattern" in spec:
        try:
            pattern = compile_linear(spec["pattern"])
        except PatternRefused as exc:
            raise PolicyError(source, _format_path(("detectors", name, "pattern")), f"detector {name}: {exc}") from None
        detector = Detector(name, spec["data_class"], pattern=pattern, pattern_text=spec["pattern"])
    else:
        detector = Detector(name, spec["data_class"], builtin=spec["builtin"])
    for index, example in enumerate(spec.get("must_match", ())):
        if not detector.matches(example):
            where = _format_path(("detectors", name, "must_match", index))
            raise PolicyError(source, where, f"detector {name} does not match its must_match example {index}")
    for index, example in enumerate(spec.get("must_not_match", ())):
        if detector.matches(example):
            where = _format_path(("detectors", name, "must_not_match", index))
            raise PolicyError(source, where, f"detector {name} matches its must_not_match example {index}")
    return detector


def _duration(text: str | None, path: tuple[str | int, ...], source: str) -> Duration | None:
    if text is None:
        return None
    try:
        return Duration.parse(text)
    except ValueError as exc:
        raise PolicyError(source, _format_path(path), str(exc)) from None


def _retention(spec: Mapping[str, Any] | None, path: tuple[str | int, ...], source: str) -> RetentionRule:
    """A route's or class's retention rule; one that would delete before it must keep is refused."""
    if not spec:
        return RetentionRule()
    rule = RetentionRule(
        delete_after=_duration(spec.get("delete_after"), (*path, "delete_after"), source),
        keep_at_least=_duration(spec.get("keep_at_least"), (*path, "keep_at_least"), source),
    )
    try:
        rule.check("the rule")
    except ValueError as exc:
        raise PolicyError(source, _format_path(path), str(exc)) from None
    return rule


def _check_json_values(value: Any, path: tuple[str | int, ...], source: str) -> None:
    # YAML has values JSON lacks (dates, non-string keys, .inf/.nan, huge integers). They would
    # break the version hash or reach the API in a form nobody wrote, so refuse them by path.
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise PolicyError(source, _format_path(path), f"key {key!r} must be a string")
            _check_json_values(item, (*path, key), source)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_json_values(item, (*path, index), source)
    elif value is None or isinstance(value, (str, bool)):
        return
    elif isinstance(value, int):
        if abs(value) > _MAX_SAFE_INTEGER:
            raise PolicyError(source, _format_path(path), f"integer {value} is too large for JSON")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise PolicyError(source, _format_path(path), f"{value} is not a JSON number")
    else:
        problem = f"{type(value).__name__} value {value!r} is not JSON; quote it to make a string"
        raise PolicyError(source, _format_path(path), problem)


def _describe(error: ValidationError) -> tuple[str, str]:
    """Turn a schema error into (field path, problem), naming the offending key itself."""
    parts: list[str | int] = list(error.absolute_path)
    schema: Mapping[str, Any] = error.schema if isinstance(error.schema, Mapping) else {}
    instance = error.instance
    if error.validator == "additionalProperties" and isinstance(instance, Mapping):
        known = schema.get("properties", {})
        patterns = list(schema.get("patternProperties", {}))
        extras = [k for k in instance if k not in known and not any(re.search(p, k) for p in patterns)]
        extra = extras[0] if extras else "?"
        if patterns:
            problem = f"{extra!r} is not a valid name (must match {' or '.join(patterns)})"
        else:
            problem = f"unknown field {extra!r} (expected one of: {', '.join(sorted(known))})"
        return _format_path((*parts, extra)), problem
    if error.validator == "oneOf" and isinstance(instance, Mapping):
        # The only oneOf is "exactly one of model / agent"; its stock message dumps the route.
        names = [key for option in schema["oneOf"] for key in option.get("required", ())]
        found = [key for key in names if key in instance]
        problem = f"set exactly one of {' or '.join(names)} (found {' and '.join(found) or 'none'})"
        return _format_path(parts), problem
    if error.validator == "not" and "description" in schema:
        # Rules written as "not: {}" carry their human explanation in the description.
        return _format_path(parts), str(schema["description"])
    return _format_path(parts), error.message


def _format_path(parts: Iterable[str | int]) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return MappingProxyType({key: _freeze(item) for key, item in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(item) for item in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _thaw(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return [_thaw(item) for item in value]
    return value


def _deny(code: str, detail: str) -> StorageDecision:
    return StorageDecision(provider_storage=False, reason=f"{code}: {detail}")
