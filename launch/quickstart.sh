#!/usr/bin/env bash
# Creates .venv, installs the project, and runs the embedded default experiment end to end:
# pretrain (cached) -> 32 few-shot runs -> fit every simulator -> score on held-out runs ->
# counterfactual retraining -> report. Re-running skips the finished stages.
#
#   bash launch/quickstart.sh                       # the quickstart experiment
#   WORKSPACE=/tmp/ws bash launch/quickstart.sh     # somewhere else
#   bash launch/quickstart.sh --gin_file=local_tiny.gin   # extra flags go to launch/local.py
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e .
WORKSPACE="${WORKSPACE:-workspaces/quickstart}"
exec .venv/bin/python launch/local.py \
  --gin_file=experiments/quickstart.gin "$@" \
  --gin.WORKSPACE="\"${WORKSPACE}\""
