"""The strictest-rule table: how a route's and its classes' retention rules combine into the one that governs a conversation."""

from __future__ import annotations

import copy
import itertools
from typing import Any

import pytest
import yaml

from service.config import EXAMPLE_POLICY
from service.policy import Policy, parse_policy
from service.retention_rules import Duration, RetentionRule, combine_rules


def rule(delete_after: str | None = None, keep_at_least: str | None = None) -> RetentionRule:
    return RetentionRule(
        Duration.parse(delete_after) if delete_after else None,
        Duration.parse(keep_at_least) if keep_at_least else None,
    )


def isos(governing: RetentionRule) -> tuple[str | None, str | None]:
    """(delete_after, keep_at_least) as written in the policy."""
    return (
        governing.delete_after.iso if governing.delete_after else None,
        governing.keep_at_least.iso if governing.keep_at_least else None,
    )


# (case, the rules of the route and the classes, the governing (delete_after, keep_at_least))
TABLE: list[tuple[str, list[RetentionRule], tuple[str | None, str | None]]] = [
    ("one rule governs alone", [rule("P30D")], ("P30D", None)),
    ("the shortest delete_after wins", [rule("P180D"), rule("P30D"), rule("P1Y")], ("P30D", None)),
    ("the longest keep_at_least wins", [rule(keep_at_least="P60D"), rule(keep_at_least="P6Y")], (None, "P6Y")),
    (
        "keep wins over a shorter delete_after, which is passed over for the shortest one that respects it",
        [rule("P30D"), rule("P1Y", "P180D"), rule("P2Y")],
        ("P1Y", "P180D"),
    ),
    (
        "a delete_after as long as the keep respects it",
        [rule("P60D"), rule(keep_at_least="P60D")],
        ("P60D", "P60D"),
    ),
    (
        "when no delete_after respects the keep, the keep counted from last activity governs",
        [rule("P7D"), rule("P30D"), rule(keep_at_least="P90D")],
        ("P90D", "P90D"),
    ),
    (
        "no delete_after anywhere: never purged, however long the keep",
        [rule(keep_at_least="P6Y"), rule()],
        (None, "P6Y"),
    ),
    ("no rule at all: never purged, deletable at once", [rule(), rule()], (None, None)),
    ("nothing stated: never purged", [], (None, None)),
    ("durations compare by length, not by text: P4W is shorter than P1M", [rule("P1M"), rule("P4W")], ("P4W", None)),
    ("hours compare with days", [rule("P1D"), rule("PT23H")], ("PT23H", None)),
    (
        "a month is longer than 30 days, so P1M respects a P30D keep",
        [rule("P1M"), rule(keep_at_least="P30D")],
        ("P1M", "P30D"),
    ),
    (
        "a 31-day keep passes over P1M (30.44 days) for the next delete_after",
        [rule("P1M"), rule("P6W"), rule(keep_at_least="P31D")],
        ("P6W", "P31D"),
    ),
]


@pytest.mark.parametrize(("rules", "expected"), [case[1:] for case in TABLE], ids=[case[0] for case in TABLE])
def test_combine_rules_is_the_strictest_rule_table(
    rules: list[RetentionRule], expected: tuple[str | None, str | None]
) -> None:
    """Each row of the table: the longest keep_at_least, then the shortest delete_after that respects it, else the keep itself."""
    assert isos(combine_rules(rules)) == expected


@pytest.mark.parametrize(("rules", "expected"), [case[1:] for case in TABLE], ids=[case[0] for case in TABLE])
def test_the_order_of_the_rules_does_not_matter(
    rules: list[RetentionRule], expected: tuple[str | None, str | None]
) -> None:
    """A route's rule and its classes' rules give the same governing rule in any order."""
    for order in itertools.permutations(rules):
        assert isos(combine_rules(order)) == expected


def policy_with(routes: dict[str, dict[str, str]], classes: dict[str, dict[str, str]]) -> Policy:
    """The example policy with the given retention rules on routes and data classes."""
    document: dict[str, Any] = copy.deepcopy(yaml.safe_load(EXAMPLE_POLICY.read_text(encoding="utf-8")))
    for name, spec in routes.items():
        document["routes"][name]["retention"] = spec
    for name, spec in classes.items():
        document["data_classes"][name]["retention"] = spec
    return parse_policy(document, source="rules test policy")


ROUTE_VS_CLASS: list[tuple[str, dict[str, dict[str, str]], dict[str, dict[str, str]], str, list[str], Any]] = [
    (
        "a class stricter than its route wins",
        {"patient-intake": {"delete_after": "P180D"}},
        {"pii": {"delete_after": "P30D"}},
        "patient-intake",
        ["pii"],
        ("P30D", None),
    ),
    (
        "a route stricter than its classes wins",
        {"patient-intake": {"delete_after": "P7D"}},
        {"phi": {"delete_after": "P1Y"}},
        "patient-intake",
        ["phi"],
        ("P7D", None),
    ),
    (
        "a class's keep overrides the route's shorter delete_after",
        {"billing-support": {"delete_after": "P90D"}},
        {"financial": {"keep_at_least": "P5Y", "delete_after": "P7Y"}},
        "billing-support",
        ["financial"],
        ("P7Y", "P5Y"),
    ),
    (
        "a route's keep overrides every class's shorter delete_after",
        {"billing-support": {"keep_at_least": "P1Y"}},
        {"pan": {"delete_after": "P90D"}, "pii": {"delete_after": "P30D"}},
        "billing-support",
        ["pan", "pii"],
        ("P1Y", "P1Y"),
    ),
    (
        "every class the conversation carries counts, and only those",
        {},
        {"phi": {"keep_at_least": "P60D", "delete_after": "P1Y"}, "pii": {"delete_after": "P30D"}},
        "patient-intake",
        ["phi", "pii"],
        ("P1Y", "P60D"),
    ),
    (
        "a class the conversation does not carry states nothing",
        {},
        {"phi": {"keep_at_least": "P60D", "delete_after": "P1Y"}, "pii": {"delete_after": "P30D"}},
        "patient-intake",
        ["pii"],
        ("P30D", None),
    ),
    (
        "a route and classes with no delete_after: never purged",
        {"billing-support": {"keep_at_least": "P6Y"}},
        {"financial": {"keep_at_least": "P5Y"}},
        "billing-support",
        ["financial"],
        (None, "P6Y"),
    ),
    (
        "a route that left the policy states nothing; its classes still do",
        {},
        {"public": {"delete_after": "P7D"}},
        "retired-route",
        ["public"],
        ("P7D", None),
    ),
    (
        "a class that left the policy states nothing",
        {"public-faq": {"delete_after": "P7D"}},
        {},
        "public-faq",
        ["retired_class"],
        ("P7D", None),
    ),
]


@pytest.mark.parametrize(
    ("routes", "classes", "route", "carried", "expected"),
    [case[1:] for case in ROUTE_VS_CLASS],
    ids=[case[0] for case in ROUTE_VS_CLASS],
)
def test_policy_retention_for_combines_route_and_classes(
    routes: dict[str, dict[str, str]],
    classes: dict[str, dict[str, str]],
    route: str,
    carried: list[str],
    expected: tuple[str | None, str | None],
) -> None:
    """Policy.retention_for takes the strictest of the route's rule and the rules of the classes the conversation carries."""
    assert isos(policy_with(routes, classes).retention_for(route, carried)) == expected


def test_provider_ttl_is_not_a_conversation_rule() -> None:
    """A route's provider_ttl bounds provider copies only: it never becomes the conversation's delete_after."""
    policy = policy_with({"public-faq": {"provider_ttl": "PT1H"}}, {})
    assert isos(policy.retention_for("public-faq", ["public"])) == (None, None)
    ttl = policy.routes["public-faq"].provider_ttl
    assert ttl is not None
    assert ttl.iso == "PT1H"
