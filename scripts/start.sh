#!/usr/bin/env bash
# Installs the engine and starts it on the default config (config/mta.toml):
# SMTP on 127.0.0.1:2525, HTTP on 127.0.0.1:8025, spool under ./var.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/mta serve --config config/mta.toml "$@"
