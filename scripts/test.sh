#!/usr/bin/env bash
# Install what the tests need (Python packages, Debian's Chromium for the browser tests),
# then run the whole suite. Extra arguments go to pytest, e.g. scripts/test.sh -k store
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
if [ ! -x /usr/bin/chromium ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null
fi
.venv/bin/ruff check .
# One test file per worker (module-scoped apps start once), a worker per core up to 4; tests
# use one torch thread each (tests/conftest.py). RLR_TEST_WORKERS=0 runs in this process.
CORES=$(nproc)
exec .venv/bin/python -m pytest -n "${RLR_TEST_WORKERS:-$(( CORES < 4 ? CORES : 4 ))}" --dist loadfile "$@"
