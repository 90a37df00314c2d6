#!/usr/bin/env bash
# Regenerates the two lock files from pyproject.toml:
# - requirements.lock: the pinned and hash-checked runtime, embedded-Postgres and test
#   dependencies that ops/dev.sh (and so CI) installs;
# - requirements-runtime.lock: the runtime dependencies alone, at the very same pins (compiled
#   with requirements.lock as constraints), which the container image installs
#   (ops/container/build-venv.sh);
# - ops/container/build.lock: the build backend (setuptools, the floor pyproject.toml's
#   build-system names) that builds Custody's own wheel for the image, hash-checked as well.
# Usage:
#   ops/lock.sh                                   re-lock after editing pyproject.toml (keeps the other pins)
#   ops/lock.sh --upgrade-package google-genai    move one package to its newest allowed version
#   ops/lock.sh --upgrade                         move everything
# The lock is universal (markers for other platforms and Python versions) and carries the hashes
# of every file of each pinned version. uv runs from a throwaway virtual environment, at a fixed
# version, so that the same inputs give the same lock.
set -euo pipefail
cd "$(dirname "$0")/.."

UV_VERSION=0.13.9
PYTHON="${PYTHON:-python3}"
tool="$(mktemp -d)"
trap 'rm -rf "$tool"' EXIT
"$PYTHON" -m venv "$tool"
"$tool/bin/python" -m pip install --quiet "uv==$UV_VERSION"
"$tool/bin/uv" pip compile pyproject.toml \
  --extra test \
  --extra embedded \
  --generate-hashes \
  --universal \
  --python-version 3.11 \
  --custom-compile-command "ops/lock.sh" \
  --output-file requirements.lock \
  "$@"
# No upgrade flags here: every pin comes from requirements.lock, so what the image installs is
# what the tests ran against (tests/test_container.py checks the two agree).
"$tool/bin/uv" pip compile pyproject.toml \
  --constraint requirements.lock \
  --generate-hashes \
  --universal \
  --python-version 3.11 \
  --custom-compile-command "ops/lock.sh" \
  --output-file requirements-runtime.lock
sed -n 's/^requires = \["\(.*\)"\]$/\1/p' pyproject.toml | "$tool/bin/uv" pip compile - \
  --generate-hashes \
  --universal \
  --python-version 3.11 \
  --custom-compile-command "ops/lock.sh" \
  --output-file ops/container/build.lock
