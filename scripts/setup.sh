#!/usr/bin/env bash
# Create .venv and install the project's requirements (idempotent: re-runs only when the
# requirements files change). Usage: scripts/setup.sh [dev]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
REQ=requirements.txt
[ "${1:-}" = "dev" ] && REQ=requirements-dev.txt
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
STAMP=".venv/.installed-$(cat requirements.txt "$REQ" | sha1sum | cut -c1-12)-$(basename "$REQ")"
if [ ! -f "$STAMP" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  # torch first, on its own: the pin keeps pip from pulling a newer multi-GB build.
  .venv/bin/python -m pip install --quiet "$(grep '^torch==' requirements.txt)"
  .venv/bin/python -m pip install --quiet -r "$REQ"
  touch "$STAMP"
fi
