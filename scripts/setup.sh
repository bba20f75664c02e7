#!/usr/bin/env bash
# Set up LMFusion in ./.venv on a CPU machine (Python 3.10+): CPU torch first, so nothing pulls a CUDA build,
# then the project with its pinned dependencies and test extras. Idempotent.
# On a GPU cluster use the container's torch instead: pip install -e '.[test,gpu]'.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch 2.13.0 CPU build (a local wheel on the team's machines; PyPI's CPU index elsewhere).
python -c "import torch" 2>/dev/null || pip install -q torch==2.13.0 || \
  pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
pip install -q -e '.[test,eval]'
python -c "import torch, megatron.core; print('lmfusion set up: torch', torch.__version__, '| megatron-core', megatron.core.__version__)"
