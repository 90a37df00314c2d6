"""Wycheproof test vectors, read from ../shared/testdata/wycheproof beside the repository."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

WYCHEPROOF_DIR = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "wycheproof"


def _path(name: str) -> Path:
    return WYCHEPROOF_DIR / name


def missing_message(name: str) -> str:
    return (
        f"Wycheproof vectors {_path(name)} not found: the crypto tests need ../shared/testdata/wycheproof "
        "beside the repository (CI's clone has it)"
    )


def vector_cases(name: str) -> list[pytest.ParameterSet]:
    """One `(group, case)` parameter set per test vector in the file.

    A missing file gives one case marked `wycheproof_missing`, which tests/conftest.py fails
    instead of running: skipped vectors would let a run pass that checked none of them.
    """
    path = _path(name)
    if not path.is_file():
        return [pytest.param(None, None, id=f"missing-{name}", marks=pytest.mark.wycheproof_missing(name))]
    document: dict[str, Any] = json.loads(path.read_text())
    return [
        pytest.param(group, case, id=f"tc{case['tcId']}") for group in document["testGroups"] for case in group["tests"]
    ]


def declared_count(name: str) -> int:
    """How many vectors the file says it holds; fails the test when the file is missing."""
    path = _path(name)
    if not path.is_file():
        pytest.fail(missing_message(name), pytrace=False)
    count: int = json.loads(path.read_text())["numberOfTests"]
    return count
