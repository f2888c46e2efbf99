#!/usr/bin/env bash
# Creates .venv, installs the project, and runs the embedded default experiment end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e .
echo "quickstart: nothing to run yet"
