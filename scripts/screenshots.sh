#!/usr/bin/env bash
# Refresh the README's tour pictures (docs/images) from the browser tests' screenshots.
# Test runs write them to an ignored folder; only this script changes tracked files.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
RLR_SCREENSHOTS=docs/images .venv/bin/python -m pytest -q tests/test_browser.py
git status --short docs/images
