"""Detectors find card numbers and personal identifiers, and nothing else."""

from __future__ import annotations

import pytest

from service.detectors import detect_classes

CATALOGUE = {"pan", "pii", "phi", "public"}


def turn(text: str) -> list[dict[str, object]]:
    return [{"type": "user_input", "content": [{"type": "text", "text": text}]}]


@pytest.mark.parametrize(
    ("text", "classes"),
    [
        ("my card is 4111 1111 1111 1111", {"pan"}),
        ("card 4111-1111-1111-1111 expired", {"pan"}),
        ("number 5500005555555559", {"pan"}),
        ("order 4111 1111 1111 1112 is not a card", set()),  # fails Luhn
        ("call me on 0123456789", set()),  # too short for a card number
        ("my SSN is 123-45-6789", {"pii"}),
        ("000-12-3456 is never issued", set()),
        ("write to jane.doe@example.org", {"pii"}),
        ("both 4111111111111111 and a@b.co", {"pan", "pii"}),
        ("I have a cough", set()),
    ],
)
def test_detects_classes_in_user_text(text: str, classes: set[str]) -> None:
    """Luhn-valid card numbers are pan; SSNs and e-mail addresses are pii; ordinary text is nothing."""
    assert detect_classes(turn(text), CATALOGUE) == classes


def test_function_results_are_scanned() -> None:
    """Tool results (strings or JSON) are scanned like user text."""
    steps = [{"type": "function_result", "call_id": "c", "result": {"card": "4111111111111111"}}]
    assert detect_classes(steps, CATALOGUE) == {"pan"}


def test_only_declared_classes_are_reported() -> None:
    """A class the policy does not declare is never reported."""
    assert detect_classes(turn("4111111111111111 a@b.co"), {"phi"}) == set()
