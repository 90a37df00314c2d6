#!/usr/bin/env bash
# Builds the virtual environment the container image runs, at VENV: Custody's own wheel, built
# from this checkout, and the runtime dependencies at the pins and hashes of
# requirements-runtime.lock, every one a prebuilt wheel (no compiler anywhere), nothing else
# (neither pip nor the embedded Postgres). The image's builder stage runs it
# (ops/container/Dockerfile) and so does tests/test_wheel.py, which then runs what it built:
# the same commands either way.
#   ops/container/build-venv.sh VENV [WHEEL_DIR]    (the wheel is left in WHEEL_DIR when given)
set -euo pipefail
cd "$(dirname "$0")/../.."

venv="$1"
python="${PYTHON:-python3}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
wheels="${2:-$work/wheels}"

# Build from a copy of exactly what the wheel is made of: a build/ or *.egg-info left in the
# checkout could slip stale files in, and the build writes both beside its sources.
mkdir "$work/source"
cp -a pyproject.toml README.md service migrations schemas "$work/source/"
mkdir "$work/source/ops" && cp -a ops/policy.example.yaml "$work/source/ops/"
find "$work/source" \( -name __pycache__ -o -name '*.egg-info' \) -prune -exec rm -rf {} +

# The build backend is pinned and hash-checked too: pip's isolated build would fetch it unchecked.
"$python" -m venv "$work/tools"
"$work/tools/bin/python" -m pip install --quiet --disable-pip-version-check --require-hashes \
  --only-binary=:all: -r ops/container/build.lock
"$work/tools/bin/python" -m pip wheel --quiet --disable-pip-version-check --no-deps \
  --no-build-isolation --wheel-dir "$wheels" "$work/source"

"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --require-hashes \
  --only-binary=:all: --no-deps -r requirements-runtime.lock
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --no-index \
  "$wheels"/custody-*.whl
"$venv/bin/python" -m pip check --disable-pip-version-check
# The image installs nothing at run time: the installer goes, and the setuptools that Python 3.11's
# venv seeds (nothing needs it at run time; Python 3.12 no longer seeds it).
"$venv/bin/python" -m pip uninstall --quiet --disable-pip-version-check --yes pip setuptools
