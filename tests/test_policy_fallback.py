"""`fallback: generate_content` in the policy: off by default, refused where generateContent could
not carry the route's settings (an agent, a tool or a generation setting it has no field for)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from service.config import REPO_ROOT
from service.policy import PolicyError, parse_policy

EXAMPLE = REPO_ROOT / "ops" / "policy.example.yaml"


@pytest.fixture
def document() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    return copy.deepcopy(loaded)


def test_off_by_default_and_taken_where_the_settings_fit(document: dict[str, Any]) -> None:
    """The example's routes leave it off; set on a model route with function tools, or on one with
    url_context and a JSON response schema, it loads."""
    assert {route.fallback for route in parse_policy(document, source="x").routes.values()} == {None}
    for name in ("patient-intake", "public-faq"):
        document["routes"][name]["fallback"] = "generate_content"
    routes = parse_policy(document, source="x").routes
    assert routes["patient-intake"].fallback == routes["public-faq"].fallback == "generate_content"


@pytest.mark.parametrize(
    ("change", "where"),
    [
        (lambda r: r.update(fallback="interactions"), "fallback"),
        (lambda r: [r.pop("model"), r.pop("generation_config"), r.update(agent="deep-research")], "fallback"),
        (lambda r: r["tools"].append({"type": "code_execution"}), "tools"),
        (lambda r: r["tools"].append({"type": "google_search", "search_types": ["web"]}), "tools"),
        (lambda r: r["generation_config"].update(speech_config={"voice": "x"}), "generation_config"),
        (lambda r: r.update(response_format=[{"type": "text"}, {"type": "image"}]), "response_format"),
    ],
)
def test_refused_where_generate_content_cannot_carry_the_route(
    document: dict[str, Any], change: Any, where: str
) -> None:
    route = document["routes"]["patient-intake"]
    route["fallback"] = "generate_content"
    change(route)
    with pytest.raises(PolicyError, match=where):
        parse_policy(document, source="x")
