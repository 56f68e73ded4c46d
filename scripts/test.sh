#!/usr/bin/env bash
# Installs everything the tests need (system packages, the engine, test tools)
# and runs the whole test suite with ruff first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/system-packages.sh
bash scripts/install.sh test
.venv/bin/ruff check mta bench tests
exec .venv/bin/python -m pytest "$@"
