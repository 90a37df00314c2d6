"""Content detectors: find data classes a turn's input carries that the client did not declare.

A hit raises the conversation's classification (it never falls: design invariant 1), which can
turn provider storage off for the rest of the conversation, or refuse the turn when the route
does not allow the class. Detectors return class names only; the matched text never leaves here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

__all__ = ["detect_classes"]

# 13 to 19 digits, optionally grouped by single spaces or dashes (how card numbers are typed).
_PAN = re.compile(r"(?<![\d-])(?:\d[ -]?){12,18}\d(?![\d-])")
# US Social Security numbers in their written form, excluding never-issued ranges.
_SSN = re.compile(r"\b(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}\b")
_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")


def _luhn(digits: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char)
        if index % 2 == 1:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def _texts(steps: Iterable[dict[str, Any]]) -> Iterable[str]:
    for step in steps:
        if step.get("type") == "user_input":
            for block in step.get("content", []):
                if isinstance(block, dict) and isinstance(block.get("text"), str):
                    yield block["text"]
        elif step.get("type") == "function_result":
            result = step.get("result")
            yield result if isinstance(result, str) else json.dumps(result)


def detect_classes(steps: Iterable[dict[str, Any]], catalogue: Iterable[str]) -> set[str]:
    """The data classes found in client input, limited to classes the policy declares."""
    declared = set(catalogue)
    found: set[str] = set()
    for text in _texts(steps):
        if "pan" in declared and "pan" not in found:
            for match in _PAN.finditer(text):
                digits = re.sub(r"[ -]", "", match.group())
                if 13 <= len(digits) <= 19 and _luhn(digits):
                    found.add("pan")
                    break
        if "pii" in declared and "pii" not in found and (_SSN.search(text) or _EMAIL.search(text)):
            found.add("pii")
    return found
