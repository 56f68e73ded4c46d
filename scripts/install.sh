#!/usr/bin/env bash
# Creates ./.venv and installs the engine into it (with test tools if "test" is given).
#
# The interpreter: $PYTHON if set, else the distribution's /usr/bin/python3 when it is
# 3.11 or newer and can make a venv, else the first python3 on PATH. Distributions
# build their Python with PGO and LTO and link libpython statically; a default source
# build (pyenv's: --enable-shared, no --enable-optimizations) runs the engine with
# about 10 % more CPU per message (bench/RESULTS.md, issue 21, tenth session).
set -euo pipefail
cd "$(dirname "$0")/.."
usable() { "$1" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; }
if [ ! -x .venv/bin/python ]; then
  python="${PYTHON:-}"
  if [ -z "$python" ]; then
    python=python3
    usable /usr/bin/python3 && python=/usr/bin/python3
  fi
  "$python" -m venv .venv
fi
extra=""
[ "${1:-}" = "test" ] && extra="[test]"
.venv/bin/pip install -q --disable-pip-version-check -e ".${extra}"
