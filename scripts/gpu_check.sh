#!/usr/bin/env bash
# Check a GPU machine in one command (see scripts/gpu_check.py for the sections and tolerances):
#
#   bash scripts/gpu_check.sh [--out report.json] [--only SECTION ...]
#   GPU_CHECK_FAKE_CUDA=1 bash scripts/gpu_check.sh     # the same sections on the host, small shapes (CI runs this)
#
# Uses the image's own torch (never installs one). On a machine without network, bring the wheels LMFusion needs
# beyond a CUDA PyTorch image with ../shared/gpukit/fetch_wheels.sh (-> ./.whl) and copy them along: a ./.whl folder
# (or $WHL_DIR) is installed here offline (--no-index --no-deps) into a private target on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
WHL_DIR=${WHL_DIR:-.whl}
if compgen -G "${WHL_DIR}/*.whl" >/dev/null; then
  SITE=${GPU_CHECK_SITE:-/tmp/lmfusion_gpu_check_site}
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "${WHL_DIR}"/*.whl
  export PYTHONPATH="$SITE:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
exec "$PY" scripts/gpu_check.py "$@"
