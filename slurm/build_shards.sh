#!/bin/bash
# Build latent shards on a SLURM cluster. Arguments are passed to data_tools/build_shards.py unchanged:
#
#   sbatch --array=0-15 --gpus-per-node=1 slurm/build_shards.sh /data/images --output /data/shards --vae /models/vae
#       one process (one GPU) per array task: --rank = task id - first task id, --world-size = task count
#   sbatch --nodes=2 slurm/build_shards.sh /data/images --output /data/shards --vae /models/vae
#       srun starts one torchrun per node, GPUS_PER_NODE ranks each (ranks from torchrun's RANK/WORLD_SIZE)
#
# Shards are named by global index and split by input position, so any rank count gives the same files; resubmit
# the same command to resume (complete shards are skipped). The last rank to finish writes manifest.json.
# DRY_RUN=1 prints the launch command instead of running it. Create logs/ before submitting (SBATCH --output).
#SBATCH --job-name=build_shards
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%A_%a.out
#SBATCH --requeue

set -euo pipefail

REPO_DIR="${REPO_DIR:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}"
PYTHON="${PYTHON:-python}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
SCRIPT="${REPO_DIR}/data_tools/build_shards.py"

if [[ -n "${SLURM_ARRAY_TASK_ID:-}" ]]; then
    RANK=$(( SLURM_ARRAY_TASK_ID - ${SLURM_ARRAY_TASK_MIN:-0} ))
    WORLD="${SLURM_ARRAY_TASK_COUNT:?SLURM_ARRAY_TASK_COUNT unset in an array job}"
    CMD=("${PYTHON}" "${SCRIPT}" "$@" --rank "${RANK}" --world-size "${WORLD}")
else
    NNODES="${SLURM_NNODES:-1}"
    MASTER_ADDR="${MASTER_ADDR:-$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" 2>/dev/null | head -n 1 || echo localhost)}"
    CMD=(srun --kill-on-bad-exit=1 "${PYTHON}" -m torch.distributed.run --nnodes "${NNODES}"
         --nproc_per_node "${GPUS_PER_NODE}" --rdzv_backend c10d --rdzv_endpoint "${MASTER_ADDR}:29500"
         --rdzv_id "${SLURM_JOB_ID:-build_shards}" "${SCRIPT}" "$@")
fi

if [[ "${DRY_RUN:-0}" == "1" ]]; then
    printf '%q ' "${CMD[@]}"
    echo
    exit 0
fi
cd "${REPO_DIR}"
mkdir -p logs
exec "${CMD[@]}"
