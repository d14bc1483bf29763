#!/usr/bin/env bash
# Install what the app needs (first run only) and start it on the built-in model.
# Extra arguments go to app.py, e.g. scripts/app.sh --port 7861
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python app.py "$@"
