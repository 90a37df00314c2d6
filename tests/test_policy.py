"""Unit tests for service.policy: loading, validation, versioning and the storage decision."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from service.policy import (
    POLICY_SCHEMA_PATH,
    DataClass,
    DataClassNotAllowedError,
    Policy,
    PolicyError,
    PolicyViolation,
    Route,
    UnknownDataClassError,
    UnknownRouteError,
    check_data_classes,
    decide_storage,
    load_policy,
    parse_policy,
)

EXAMPLE = Path(__file__).resolve().parents[1] / "ops" / "policy.example.yaml"
UPSTREAM_KEYS = (
    "model",
    "agent",
    "agent_config",
    "system_instruction",
    "tools",
    "generation_config",
    "response_format",
)

Document = dict[str, Any]


@pytest.fixture(scope="module")
def example_document() -> Document:
    doc: Document = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    return doc


@pytest.fixture(scope="module")
def example() -> Policy:
    return load_policy(EXAMPLE)


def write(tmp_path: Path, document: Any) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return path


# --- the example file -------------------------------------------------------------------------


def test_example_policy_loads(example: Policy) -> None:
    """The shipped example declares the five data classes and the three routes ops expect."""
    assert set(example.data_classes) == {"phi", "pii", "pan", "financial", "public"}
    assert [c for c, d in example.data_classes.items() if d.provider_storage] == ["public"]
    assert set(example.routes) == {"patient-intake", "billing-support", "public-faq"}
    assert example.route("patient-intake").data_classes == {"phi", "pii"}
    assert example.route("billing-support").data_classes == {"pan", "financial", "pii"}
    assert example.route("public-faq").provider_storage is True
    assert example.route("billing-support").provider_storage is False


def test_example_matches_schema_file(example_document: Document) -> None:
    """The schema file is valid draft 2020-12 and accepts the example on its own, without Python."""
    schema = json.loads(POLICY_SCHEMA_PATH.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(schema).validate(example_document)


@pytest.mark.parametrize("name", ["patient-intake", "billing-support", "public-faq"])
def test_upstream_settings_resend_route_settings(example: Policy, example_document: Document, name: str) -> None:
    """Each route's upstream_settings holds exactly the interaction-scoped settings it declares."""
    raw = example_document["routes"][name]
    expected = {key: raw[key] for key in UPSTREAM_KEYS if key in raw}
    assert example.route(name).upstream_settings() == expected
    assert "system_instruction" in expected
    assert "tools" in expected


def test_upstream_settings_for_agent_route() -> None:
    """An agent route sends agent and agent_config and no model, and omits unset settings."""
    route = Route(
        name="research",
        description="d",
        agent="deep-research-pro-preview-12-2025",
        agent_config={"type": "deep-research", "thinking_summaries": "auto"},
        data_classes=frozenset({"public"}),
    )
    assert route.upstream_settings() == {
        "agent": "deep-research-pro-preview-12-2025",
        "agent_config": {"type": "deep-research", "thinking_summaries": "auto"},
    }


def test_upstream_settings_returns_copies(example: Policy) -> None:
    """Mutating what upstream_settings returned does not change what the next turn sends."""
    route = example.route("public-faq")
    before = route.upstream_settings()
    settings = route.upstream_settings()
    settings["tools"].append({"type": "google_search"})
    settings["generation_config"]["temperature"] = 2.0
    settings["response_format"]["schema"]["required"].clear()
    del settings["system_instruction"]
    assert route.upstream_settings() == before


def test_route_settings_are_read_only(example: Policy) -> None:
    """The route's own settings cannot be mutated in place by a caller holding the route."""
    route = example.route("patient-intake")
    with pytest.raises(TypeError):
        route.generation_config["temperature"] = 1.5  # type: ignore[index]  # the point: mypy refuses it too
    with pytest.raises(TypeError):
        route.tools[0]["parameters"]["required"] = []


def test_route_needs_exactly_one_of_model_and_agent() -> None:
    """A Route built in code with neither model nor agent is refused."""
    with pytest.raises(ValueError, match="exactly one of model or agent"):
        Route(name="r", description="d", data_classes=frozenset({"public"}))


def test_unknown_route(example: Policy) -> None:
    """Asking for an undeclared route raises UnknownRouteError, a PolicyViolation."""
    with pytest.raises(UnknownRouteError, match="'radiology'") as info:
        example.route("radiology")
    assert isinstance(info.value, PolicyViolation)
    assert info.value.route == "radiology"


# --- version ----------------------------------------------------------------------------------


def reorder(value: Any) -> Any:
    """Return value with every mapping's keys in reverse order."""
    if isinstance(value, dict):
        return {key: reorder(value[key]) for key in reversed(list(value))}
    if isinstance(value, list):
        return [reorder(item) for item in value]
    return value


def test_version_is_prefixed_sha256(example: Policy) -> None:
    """The version is 'sha256:' followed by 64 hex digits."""
    prefix, _, digest = example.version.partition(":")
    assert prefix == "sha256"
    assert len(digest) == 64
    int(digest, 16)


def test_version_stable_under_reformat_and_reorder(tmp_path: Path, example: Policy, example_document: Document) -> None:
    """Re-serializing the YAML in another style with keys reordered keeps the version."""
    path = tmp_path / "reformatted.yaml"
    text = yaml.safe_dump(reorder(example_document), default_flow_style=True, width=60)
    path.write_text("# reformatted\n" + text, encoding="utf-8")
    assert path.read_text(encoding="utf-8") != EXAMPLE.read_text(encoding="utf-8")
    assert load_policy(path).version == example.version
    assert parse_policy(reorder(example_document), source="x").version == example.version


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d["routes"]["patient-intake"]["generation_config"].update(temperature=0.25),
        lambda d: d["data_classes"]["pii"].update(description="Personal data."),
        lambda d: d["routes"]["public-faq"]["data_classes"].append("pii"),
    ],
    ids=["temperature", "description", "data_classes"],
)
def test_version_changes_with_value_change(
    example: Policy, example_document: Document, change: Callable[[Document], None]
) -> None:
    """Any change of a value gives a different version."""
    document = copy.deepcopy(example_document)
    change(document)
    assert parse_policy(document, source="x").version != example.version


# --- invalid files ----------------------------------------------------------------------------


def set_in(path: tuple[Any, ...], value: Any) -> Callable[[Document], None]:
    def change(document: Document) -> None:
        target = document
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return change


def drop(path: tuple[Any, ...]) -> Callable[[Document], None]:
    def change(document: Document) -> None:
        target = document
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return change


def make_agent_route(name: str) -> Callable[[Document], None]:
    def change(document: Document) -> None:
        spec = document["routes"][name]
        del spec["model"]
        spec["agent"] = "deep-research-pro-preview-12-2025"

    return change


INVALID = [
    ("unknown-top-level-key", set_in(("owner",), "ops"), "owner", "unknown field 'owner'"),
    (
        "bad-type-deep-in-route",
        set_in(("routes", "patient-intake", "generation_config", "temperature"), "low"),
        "routes.patient-intake.generation_config.temperature",
        "'low' is not of type 'number'",
    ),
    (
        "function-tool-without-name",
        drop(("routes", "billing-support", "tools", 1, "name")),
        "routes.billing-support.tools[1]",
        "'name' is a required property",
    ),
    (
        "undeclared-data-class",
        set_in(("routes", "patient-intake", "data_classes"), ["phi", "phl"]),
        "routes.patient-intake.data_classes[1]",
        "'phl' is not a declared data class",
    ),
    (
        "both-model-and-agent",
        set_in(("routes", "public-faq", "agent"), "deep-research-pro-preview-12-2025"),
        "routes.public-faq",
        "set exactly one of model or agent (found model and agent)",
    ),
    (
        "neither-model-nor-agent",
        drop(("routes", "public-faq", "model")),
        "routes.public-faq",
        "set exactly one of model or agent (found none)",
    ),
    (
        "unknown-route-field",
        set_in(("routes", "public-faq", "store"), True),
        "routes.public-faq.store",
        "unknown field 'store'",
    ),
    (
        "bad-route-name",
        set_in(("routes", "Patient_Intake"), {"description": "x"}),
        "routes.Patient_Intake",
        "is not a valid name",
    ),
    (
        "data-class-without-storage-flag",
        drop(("data_classes", "pan", "provider_storage")),
        "data_classes.pan",
        "'provider_storage' is a required property",
    ),
    (
        "empty-route-data-classes",
        set_in(("routes", "public-faq", "data_classes"), []),
        "routes.public-faq.data_classes",
        "should be non-empty",
    ),
    (
        "agent-with-generation-config",
        make_agent_route("patient-intake"),
        "routes.patient-intake.generation_config",
        "not allowed on an agent route",
    ),
    (
        "agent-config-on-model-route",
        set_in(("routes", "public-faq", "agent_config"), {"type": "deep-research"}),
        "routes.public-faq.agent_config",
        "only allowed on a route that sets agent",
    ),
    (
        "duplicate-function-name",
        lambda d: d["routes"]["billing-support"]["tools"].append({"type": "function", "name": "open_dispute"}),
        "routes.billing-support.tools[2].name",
        "duplicate function name 'open_dispute'",
    ),
    (
        "wrong-format-version",
        set_in(("version",), 2),
        "version",
        "1 was expected",
    ),
]


@pytest.mark.parametrize(
    ("change", "field", "problem"),
    [case[1:] for case in INVALID],
    ids=[case[0] for case in INVALID],
)
def test_invalid_policy_names_field(
    tmp_path: Path,
    example_document: Document,
    change: Callable[[Document], None],
    field: str,
    problem: str,
) -> None:
    """An invalid policy file raises PolicyError naming the file and the offending field's path."""
    document = copy.deepcopy(example_document)
    change(document)
    path = write(tmp_path, document)
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert info.value.source == str(path)
    assert info.value.path == field
    assert problem in info.value.problem
    assert str(info.value).startswith(f"{path}: {field}: ")


def test_undeclared_class_message_format(example_document: Document) -> None:
    """The full message reads 'file: field.path[i]: problem' for an undeclared class."""
    document = copy.deepcopy(example_document)
    document["routes"]["patient-intake"]["data_classes"] = ["phi", "phl"]
    with pytest.raises(PolicyError) as info:
        parse_policy(document, source="ops/policy.yaml")
    assert str(info.value) == (
        "ops/policy.yaml: routes.patient-intake.data_classes[1]: 'phl' is not a declared data class"
    )


@pytest.mark.parametrize(
    ("text", "field", "problem"),
    [
        ("version: 1\nroutes: [unclosed\n", "line 3, column 1", "invalid YAML"),
        (
            "version: 1\ndata_classes:\n  a: {description: x}\n  a: {description: y}\n",
            "line 4, column 3",
            "duplicate key 'a'",
        ),
        ("", "", "None is not of type 'object'"),
    ],
    ids=["bad-yaml", "duplicate-key", "empty-file"],
)
def test_unparseable_file(tmp_path: Path, text: str, field: str, problem: str) -> None:
    """Malformed YAML, duplicate keys and an empty file raise PolicyError with a location."""
    path = tmp_path / "policy.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert info.value.path == field
    assert problem in info.value.problem
    assert str(path) in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    """A policy path that does not exist raises PolicyError, not OSError."""
    with pytest.raises(PolicyError, match="cannot read policy file"):
        load_policy(tmp_path / "absent.yaml")


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("2025-01-01", "date value"),
        (".inf", "is not a JSON number"),
        ("123456789012345678901234567890", "too large for JSON"),
    ],
    ids=["date", "infinity", "huge-integer"],
)
def test_yaml_values_json_cannot_hold(tmp_path: Path, value: str, problem: str) -> None:
    """YAML-only values inside free-form settings are refused with their field path."""
    text = EXAMPLE.read_text(encoding="utf-8").replace(
        "max_output_tokens: 1024", f"max_output_tokens: 1024\n      seed_note: {value}"
    )
    path = tmp_path / "policy.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert info.value.path == "routes.patient-intake.generation_config.seed_note"
    assert problem in info.value.problem


def test_non_string_key_refused(example_document: Document) -> None:
    """A non-string mapping key (YAML allows them, JSON does not) is refused at its parent."""
    document = copy.deepcopy(example_document)
    document["routes"]["public-faq"]["generation_config"][1] = "x"
    with pytest.raises(PolicyError, match=r"routes\.public-faq\.generation_config: key 1"):
        parse_policy(document, source="x")


def test_uncanonicalizable_string_refused(example_document: Document) -> None:
    """A string RFC 8785 cannot encode (a lone surrogate) raises PolicyError, not a crash."""
    document = copy.deepcopy(example_document)
    document["data_classes"]["pii"]["description"] = "\ud800"
    with pytest.raises(PolicyError, match="cannot canonicalize"):
        parse_policy(document, source="x")


# --- storage decision -------------------------------------------------------------------------

CATALOGUE = {
    "phi": DataClass("phi", "health", provider_storage=False),
    "pii": DataClass("pii", "personal", provider_storage=False),
    "public": DataClass("public", "public", provider_storage=True),
    "open_data": DataClass("open_data", "open data", provider_storage=True),
}


def route(*, provider_storage: bool, classes: set[str]) -> Route:
    return Route(
        name="r1",
        description="d",
        model="gemini-3-flash-preview",
        data_classes=frozenset(classes),
        provider_storage=provider_storage,
    )


@pytest.mark.parametrize(
    ("route_allows", "classes", "permitted", "code", "named"),
    [
        (False, {"public"}, False, "route_denies", "r1"),
        (False, {"phi"}, False, "route_denies", "r1"),
        (True, {"public", "phi"}, False, "data_class_denies", "phi"),
        (True, {"public", "open_data"}, True, "permitted", "open_data, public"),
        (True, set(), False, "unclassified", ""),
        (True, {"public", "gone"}, False, "unknown_data_class", "gone"),
        (True, {"public", "pii"}, False, "data_class_not_allowed", "pii"),
    ],
    ids=[
        "route-denies",
        "route-and-class-deny",
        "one-class-denies",
        "all-permit",
        "no-classes",
        "undeclared-class",
        "class-not-on-route",
    ],
)
def test_decide_storage(route_allows: bool, classes: set[str], permitted: bool, code: str, named: str) -> None:
    """Provider storage is permitted only if the route and every carried data class allow it."""
    r = route(provider_storage=route_allows, classes={"public", "open_data", "phi"})
    decision = decide_storage(r, classes, CATALOGUE)
    assert decision.provider_storage is permitted
    assert decision.code == code
    assert decision.reason.startswith(f"{code}: ")
    assert named in decision.reason


def test_decide_storage_names_only_denying_classes() -> None:
    """The data_class_denies reason names the classes that deny and not those that permit."""
    r = route(provider_storage=True, classes={"public", "phi", "pii"})
    decision = decide_storage(r, ["public", "phi", "pii"], CATALOGUE)
    assert decision.reason == ("data_class_denies: data classes that do not permit provider storage: phi, pii")


def test_decide_storage_on_example_routes(example: Policy) -> None:
    """In the example only public-faq with public data may be stored by the provider."""
    catalogue = example.data_classes
    assert decide_storage(example.route("public-faq"), ["public"], catalogue).provider_storage
    intake = decide_storage(example.route("patient-intake"), ["phi"], catalogue)
    assert intake.reason == "route_denies: route patient-intake does not permit provider storage"


# --- data classes on a route ------------------------------------------------------------------


def test_check_data_classes_accepts_allowed_subset() -> None:
    """Requesting a subset of the route's classes passes."""
    check_data_classes(route(provider_storage=False, classes={"phi", "pii"}), ["phi"], CATALOGUE)


def test_check_data_classes_not_allowed() -> None:
    """Declared classes the route does not allow raise DataClassNotAllowedError naming them."""
    r = route(provider_storage=False, classes={"phi"})
    with pytest.raises(DataClassNotAllowedError) as info:
        check_data_classes(r, ["phi", "public", "pii"], CATALOGUE)
    assert isinstance(info.value, PolicyViolation)
    assert info.value.route == "r1"
    assert info.value.classes == ("pii", "public")
    assert str(info.value) == "route r1 does not allow data classes: pii, public"


def test_check_data_classes_unknown_first() -> None:
    """Undeclared classes raise UnknownDataClassError even when others are also not allowed."""
    r = route(provider_storage=False, classes={"phi"})
    with pytest.raises(UnknownDataClassError) as info:
        check_data_classes(r, ["phl", "pii"], CATALOGUE)
    assert isinstance(info.value, PolicyViolation)
    assert info.value.classes == ("phl",)


# --- retention rules --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "name", "rule", "field", "named"),
    [
        (
            "data_classes",
            "phi",
            {"delete_after": "P30D", "keep_at_least": "P60D"},
            "data_classes.phi.retention",
            ("delete_after P30D", "keep_at_least P60D"),
        ),
        (
            "routes",
            "patient-intake",
            {"delete_after": "P5Y", "keep_at_least": "P6Y"},
            "routes.patient-intake.retention",
            ("delete_after P5Y", "keep_at_least P6Y"),
        ),
        (
            "routes",
            "public-faq",
            {"delete_after": "P1M", "keep_at_least": "P31D"},
            "routes.public-faq.retention",
            ("delete_after P1M", "keep_at_least P31D"),
        ),
    ],
    ids=["on-a-class", "on-a-route", "a-month-is-30.44-days"],
)
def test_delete_after_shorter_than_keep_at_least_is_refused(
    tmp_path: Path,
    example_document: Document,
    kind: str,
    name: str,
    rule: dict[str, str],
    field: str,
    named: tuple[str, str],
) -> None:
    """A delete_after shorter than the keep_at_least beside it is refused when the policy loads, naming the rule and both durations."""
    document = copy.deepcopy(example_document)
    document[kind][name]["retention"] = rule
    path = write(tmp_path, document)
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert info.value.path == field
    assert all(part in info.value.problem for part in named), info.value.problem
    assert "shorter than" in info.value.problem


def test_contradicting_rules_on_different_sources_load(example_document: Document) -> None:
    """A route's delete_after shorter than a class's keep_at_least is no contradiction: the strictest-rule table settles it."""
    document = copy.deepcopy(example_document)
    document["routes"]["billing-support"]["retention"] = {"delete_after": "P90D"}
    document["data_classes"]["financial"]["retention"] = {"keep_at_least": "P5Y"}
    governing = parse_policy(document, source="x").retention_for("billing-support", ["financial"])
    assert (str(governing.delete_after), str(governing.keep_at_least)) == ("P5Y", "P5Y")


@pytest.mark.parametrize(
    ("kind", "name", "key", "value"),
    [
        ("routes", "public-faq", "delete_after", "30 days"),
        ("routes", "public-faq", "provider_ttl", "P1.5D"),
        ("data_classes", "pii", "keep_at_least", "PT"),
        ("data_classes", "phi", "delete_after", "P"),
        ("data_classes", "pan", "delete_after", "p30d"),
        ("routes", "patient-intake", "keep_at_least", "P99999Y"),
        ("data_classes", "public", "delete_after", 30),
    ],
    ids=["words", "fraction", "empty-time-part", "nothing", "lower-case", "too-many-years", "a-number"],
)
def test_malformed_duration_is_refused_naming_the_field(
    tmp_path: Path, example_document: Document, kind: str, name: str, key: str, value: Any
) -> None:
    """A retention duration that is not an ISO 8601 duration of whole units is refused at load, naming its field."""
    document = copy.deepcopy(example_document)
    document[kind][name]["retention"] = {key: value}
    path = write(tmp_path, document)
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert info.value.path == f"{kind}.{name}.retention.{key}"
    assert str(value) in info.value.problem


def test_retention_rules_change_the_policy_version(example: Policy, example_document: Document) -> None:
    """Adding a retention rule gives a new policy version, which is how stored deadlines know they are stale."""
    document = copy.deepcopy(example_document)
    document["data_classes"]["public"]["retention"] = {"delete_after": "P7D"}
    assert parse_policy(document, source="x").version != example.version
