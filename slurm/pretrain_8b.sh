#!/bin/bash
# LMFusion pre-training on Llama-3-8B: 8 nodes x 8 H100 (80 GB), TP 2 + sequence parallel, PP 1, DP 32.
#
#   mkdir -p logs && sbatch slurm/pretrain_8b.sh [key=value ...]        # extra config overrides go to the trainer
#   DRY_RUN=1 bash slurm/pretrain_8b.sh                                  # print the launch commands, run nothing
#   CONFIG=examples/configs/llavafusion_8b.yaml sbatch slurm/pretrain_8b.sh   # LLaVAFusion (LLaVA-NeXT-8B base)
#
# Why this layout: the model holds 2 x 8B weights (frozen text + trainable image twins; 32 GB in bf16) and 8B
# trainable parameters (fp32 gradient buffer 32 GB, Adam state 96 GB sharded over DP by the distributed optimizer).
# TP 2 inside an NVLink domain halves the weights and gradients per GPU (~16 + 16 GB) and, with sequence
# parallelism, the activations of 4096-token sequences; no pipeline bubble is needed at this size. Raise TP to 4 (or
# set RECOMPUTE=full) if activations do not fit; PP only for more than one node per replica.
#
# Pre-emption: SLURM sends SIGUSR1 to every process of the step 5 minutes before the time limit (--signal). torchrun
# would die of it (its default action), so it is started with SIGUSR1 ignored; the trainer's ranks handle it: they
# agree at the next step boundary, save a checkpoint and exit 0. The run then records reason "signal" in
# RUN_DIR/exit_status.json and this script requeues the job, which resumes from RUN_DIR/latest.
#SBATCH --job-name=lmfusion-8b
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out

set -euo pipefail

REPO_DIR="${REPO_DIR:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}"
PYTHON="${PYTHON:-python}"
CONFIG="${CONFIG:-${REPO_DIR}/examples/configs/llama3_8b.yaml}"
# The run directory: RUN_DIR, else the config's checkpoint.save (relative paths under REPO_DIR); a checkpoint.save=
# override among the arguments wins, as it does for the trainer. Any config runs unchanged (llavafusion_8b.yaml too).
if [[ -z "${RUN_DIR:-}" ]]; then
    RUN_DIR="$("${PYTHON}" -c 'import sys, yaml; print(((yaml.safe_load(open(sys.argv[1])) or {}).get("checkpoint") or {}).get("save") or "")' "${CONFIG}")"
fi
for arg in "$@"; do
    if [[ "${arg}" == checkpoint.save=* ]]; then RUN_DIR="${arg#checkpoint.save=}"; fi
done
if [[ -z "${RUN_DIR}" ]]; then
    echo "pretrain_8b.sh: ${CONFIG} sets no checkpoint.save; set RUN_DIR" >&2
    exit 2
fi
[[ "${RUN_DIR}" == /* ]] || RUN_DIR="${REPO_DIR}/${RUN_DIR}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
TP="${TP:-2}"
PP="${PP:-1}"
SP="${SP:-true}"
RECOMPUTE="${RECOMPUTE:-none}"
NNODES="${SLURM_NNODES:-1}"
MASTER_ADDR="${MASTER_ADDR:-$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" 2>/dev/null | head -n 1 || echo localhost)}"
MASTER_PORT="${MASTER_PORT:-29500}"
JOB_ID="${SLURM_JOB_ID:-local}"

# NCCL / CUDA environment for megatron-core on H100 (InfiniBand); override any of them from the submitting shell.
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"   # TP/SP comm-compute ordering (megatron)
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-22}"
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
export PYTHONUNBUFFERED=1

TRAIN_ARGS=(-m lmfusion.train --config "${CONFIG}" "checkpoint.save=${RUN_DIR}"
            "parallel.tensor_model_parallel_size=${TP}" "parallel.pipeline_model_parallel_size=${PP}"
            "parallel.sequence_parallel=${SP}" "train.recompute=${RECOMPUTE}" "$@")
# One torchrun per node (srun --ntasks-per-node=1); c10d rendezvous on the first node. SIGUSR1 ignored by torchrun
# (inherited across exec); the trainer installs its own handler.
CMD=(srun --kill-on-bad-exit=1 --cpu-bind=none bash -c 'trap "" USR1; exec "$@"' torchrun
     "${PYTHON}" -m torch.distributed.run --nnodes "${NNODES}" --nproc_per_node "${GPUS_PER_NODE}"
     --rdzv_backend c10d --rdzv_endpoint "${MASTER_ADDR}:${MASTER_PORT}" --rdzv_id "${JOB_ID}"
     "${TRAIN_ARGS[@]}")
REQUEUE=(scontrol requeue "${JOB_ID}")

if [[ "${DRY_RUN:-0}" == "1" ]]; then
    printf '%q ' "${CMD[@]}"
    echo
    echo "# then, if ${RUN_DIR}/exit_status.json says \"reason\": \"signal\":"
    printf '%q ' "${REQUEUE[@]}"
    echo
    exit 0
fi

cd "${REPO_DIR}"
mkdir -p logs "${RUN_DIR}"
status=0
"${CMD[@]}" || status=$?
if grep -q '"reason": "signal"' "${RUN_DIR}/exit_status.json" 2>/dev/null; then
    echo "lmfusion: stopped by a signal after saving; requeueing job ${JOB_ID}"
    "${REQUEUE[@]}"
    exit 0
fi
exit "${status}"
