#!/usr/bin/env bash
# One entry point for a fresh machine: creates .venv, installs Custody into it, then runs
#   ops/dev.sh serve   the service on embedded defaults (embedded Postgres, simulated Gemini)
#   ops/dev.sh test    the test suite (needs Postgres on 127.0.0.1:5432, see README)
#   ops/dev.sh bench   the benchmarks
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# Reinstall only when pyproject.toml or the lock changed since the last install. The runtime and
# test dependencies come from requirements.lock, pinned and hash-checked (ops/lock.sh makes it);
# Custody itself is installed without resolving anything, and `pip check` then fails when the
# lock no longer satisfies pyproject.toml (a dependency added without re-locking).
stamp=.venv/.custody-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ requirements.lock -nt "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet --require-hashes -r requirements.lock
  .venv/bin/python -m pip install --quiet --no-deps -e .
  .venv/bin/python -m pip check
  touch "$stamp"
fi

# The PKCS#11 keyring's tests run against SoftHSM2 (a software HSM, Debian package `softhsm2`).
# Installed here when missing and we may (root, apt-get); otherwise say how, rather than skip them.
ensure_softhsm() {
  if command -v softhsm2-util >/dev/null 2>&1; then
    return
  fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "ops/dev.sh: installing softhsm2 for the PKCS#11 keyring's tests" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq softhsm2 >/dev/null
  else
    echo "ops/dev.sh: the tests need SoftHSM2 (softhsm2-util and libsofthsm2.so), which is not installed;" >&2
    echo "  install it as root (Debian/Ubuntu: sudo apt-get install softhsm2), then run this again" >&2
    exit 2
  fi
}

command="${1:-}"
shift || true
case "$command" in
  serve) exec .venv/bin/custody serve "$@" ;;
  test) ensure_softhsm; exec .venv/bin/python -m pytest "$@" ;;
  bench) exec .venv/bin/python ops/bench/run_all.py "$@" ;;
  *) echo "usage: ops/dev.sh serve|test|bench [args...]" >&2; exit 2 ;;
esac
