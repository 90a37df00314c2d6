#!/usr/bin/env bash
# Regenerates requirements.lock, the pinned and hash-checked runtime and test dependencies that
# ops/dev.sh (and so CI) installs, from pyproject.toml:
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
  --generate-hashes \
  --universal \
  --python-version 3.11 \
  --custom-compile-command "ops/lock.sh" \
  --output-file requirements.lock \
  "$@"
