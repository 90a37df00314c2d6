"""Detectors under policy: the policy names the detectors and the class each raises, and every
deployment pattern is checked (RE2, its examples) before the service starts."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.detectors import turn_text
from service.errors import ConfigurationError, DataClassBlocked
from service.policy import Policy, PolicyError, check_blocked, load_policy, parse_policy

EXAMPLE = Path(__file__).resolve().parents[1] / "ops" / "policy.example.yaml"
MRN = {
    "pattern": r"\bMRN-[0-9]{8}\b",
    "data_class": "phi",
    "must_match": ["patient MRN-00412345"],
    "must_not_match": ["MRN-0042"],
}

Document = dict[str, Any]


@pytest.fixture(scope="module")
def example_document() -> Document:
    doc: Document = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    return doc


def with_detectors(document: Document, detectors: dict[str, Any] | None) -> Document:
    changed = copy.deepcopy(document)
    if detectors is None:
        changed.pop("detectors", None)
    else:
        changed["detectors"] = detectors
    return changed


def load(tmp_path: Path, document: Document) -> Policy:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return load_policy(path)


def test_the_example_declares_every_builtin_and_a_pattern_of_its_own() -> None:
    """The example policy runs all six built-ins and the hospital's MRN pattern, and its patient-intake route blocks card and bank data."""
    policy = load_policy(EXAMPLE)
    chosen = {d.name: (d.builtin, d.data_class) for d in policy.detectors.detectors}
    assert chosen == {
        "pan": ("pan", "pan"),
        "card_security_code": ("card_security_code", "pan"),
        "us_ssn": ("us_ssn", "pii"),
        "email": ("email", "pii"),
        "phone": ("phone", "pii"),
        "iban": ("iban", "financial"),
        "mrn": (None, "phi"),
    }
    assert policy.routes["patient-intake"].blocked_classes == {"pan", "financial"}
    assert policy.routes["billing-support"].blocked_classes == frozenset()
    assert policy.detectors.scan(turn_text("mrn 00412345")).classes == {"phi"}


def test_without_a_detectors_section_the_classes_found_are_todays(example_document: Document) -> None:
    """A policy with no `detectors` section finds card numbers (pan), SSNs and e-mail (pii) as before, and nothing more."""
    policy = parse_policy(with_detectors(example_document, None), source="p")
    text = "4111111111111111 cvv 123, 123-45-6789, a@b.co, +44 20 7946 0958, DE89370400440532013000, MRN-00412345"
    findings = policy.detectors.scan(turn_text(text))
    assert findings.classes == {"pan", "pii"}
    assert findings.refused_by == frozenset()


def test_a_detector_section_replaces_the_defaults(example_document: Document) -> None:
    """Only the detectors the policy names run: with just an e-mail detector raising `financial`, a card number finds nothing."""
    document = with_detectors(example_document, {"mail": {"builtin": "email", "data_class": "financial"}})
    policy = parse_policy(document, source="p")
    assert policy.detectors.scan(turn_text("4111111111111111 to a@b.co")).classes == {"financial"}


@pytest.mark.parametrize(
    ("detector", "field", "problem"),
    [
        (MRN | {"must_match": ["patient MRN-0041234"]}, "detectors.mrn.must_match[0]", "detector mrn does not match"),
        (MRN | {"must_not_match": ["x", "MRN-12345678"]}, "detectors.mrn.must_not_match[1]", "detector mrn matches"),
        (MRN | {"pattern": r"(?<!\d)MRN-[0-9]{8}"}, "detectors.mrn.pattern", "cannot be compiled by RE2"),
        (MRN | {"pattern": r"(MRN)-\1"}, "detectors.mrn.pattern", "cannot be compiled by RE2"),
        (MRN | {"data_class": "secret"}, "detectors.mrn.data_class", "'secret' is not a declared data class"),
        ({k: v for k, v in MRN.items() if k != "must_match"}, "detectors.mrn", "'must_match' is a dependency"),
        (MRN | {"builtin": "pan"}, "detectors.mrn", "set exactly one of builtin or pattern"),
        ({"builtin": "passport", "data_class": "pii"}, "detectors.mrn.builtin", "'passport' is not one of"),
        (
            {"builtin": "iban", "data_class": "financial", "must_match": ["DE88370400440532013000"]},
            "detectors.mrn.must_match[0]",
            "detector mrn does not match",
        ),
    ],
    ids=[
        "must-match-fails",
        "must-not-match-matches",
        "lookbehind",
        "backreference",
        "undeclared-class",
        "pattern-without-examples",
        "builtin-and-pattern",
        "unknown-builtin",
        "builtin-example-fails",
    ],
)
def test_a_bad_detector_refuses_the_policy_naming_it(
    tmp_path: Path, example_document: Document, detector: dict[str, Any], field: str, problem: str
) -> None:
    """A detector whose pattern RE2 refuses (backtracking), whose examples fail, or whose class is undeclared stops the policy from loading, with its path and name; the examples are never quoted."""
    with pytest.raises(PolicyError) as info:
        load(tmp_path, with_detectors(example_document, {"mrn": detector}))
    assert isinstance(info.value, ConfigurationError)
    assert info.value.path == field
    assert problem in info.value.problem
    for example in (*detector.get("must_match", ()), *detector.get("must_not_match", ())):
        if example != "x":
            assert example not in str(info.value)


def test_on_detect_names_a_declared_class(example_document: Document) -> None:
    """`on_detect` on a route may name only declared classes, and only raise or block."""
    document = copy.deepcopy(example_document)
    document["routes"]["public-faq"]["on_detect"] = {"secret": "block"}
    with pytest.raises(PolicyError) as info:
        parse_policy(document, source="p")
    assert info.value.path == "routes.public-faq.on_detect.secret"
    document["routes"]["public-faq"]["on_detect"] = {"pii": "ignore"}
    with pytest.raises(PolicyError) as info:
        parse_policy(document, source="p")
    assert info.value.path == "routes.public-faq.on_detect.pii"


def test_block_and_raise_per_route(example_document: Document) -> None:
    """`block` refuses a detected class on its route only; `raise` (the default) lets the claim add it."""
    document = copy.deepcopy(example_document)
    document["routes"]["billing-support"]["on_detect"] = {"pan": "raise", "pii": "block"}
    policy = parse_policy(document, source="p")
    billing = policy.routes["billing-support"]
    assert billing.blocked_classes == {"pii"}
    check_blocked(billing, {"pan", "financial"})
    with pytest.raises(DataClassBlocked) as info:
        check_blocked(billing, {"pan", "pii"})
    assert info.value.classes == ("pii",)
    check_blocked(policy.routes["public-faq"], {"pii"})
