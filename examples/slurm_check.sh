#!/usr/bin/env bash
#SBATCH --job-name=default-moe-check
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=00:30:00
#SBATCH --output=%x-%j.out
#
# Default MoE's correctness check on a Slurm allocation: one task per node runs torchrun over the
# node's GPUs, all nodes joined by torchrun's c10d rendezvous on the first node. Every parallel
# layout that fits the world size runs against a one-rank reference that rank 0 computes and
# broadcasts (no shared filesystem needed). The job fails if any layout fails.
#
#   sbatch --nodes 2 examples/slurm_check.sh                   # with the package installed on the nodes
#   IMAGE=registry.example.com/you/megatron-default-moe:latest sbatch examples/slurm_check.sh
#   sbatch examples/slurm_check.sh --layouts ep4 tp2sp-ep2 --routers paper   # flags go to the check
#
# Environment: GPUS_PER_NODE [8], MASTER_PORT [29400], IMAGE (pyxis container image) [none: run on
# the host], MOUNTS (pyxis --container-mounts) [none], PYTHON [python].
set -euo pipefail

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${SLURM_NNODES:-1}
mapfile -t NODES < <(scontrol show hostnames "${SLURM_JOB_NODELIST}")  # no `| head`: SIGPIPE + pipefail
MASTER_ADDR=${NODES[0]}
MASTER_PORT=${MASTER_PORT:-29400}
PYTHON=${PYTHON:-python}

CONTAINER_ARGS=()
if [[ -n "${IMAGE:-}" ]]; then
    CONTAINER_ARGS+=(--container-image "${IMAGE}" --container-workdir /opt/megatron-default-moe)
    if [[ -n "${MOUNTS:-}" ]]; then
        CONTAINER_ARGS+=(--container-mounts "${MOUNTS}")
    fi
fi

echo "Default MoE check: ${NNODES} node(s) x ${GPUS_PER_NODE} GPU(s), rendezvous ${MASTER_ADDR}:${MASTER_PORT}"
srun --ntasks-per-node=1 --kill-on-bad-exit=1 "${CONTAINER_ARGS[@]}" \
    "${PYTHON}" -m torch.distributed.run --nnodes "${NNODES}" --nproc-per-node "${GPUS_PER_NODE}" \
    --rdzv-backend c10d --rdzv-endpoint "${MASTER_ADDR}:${MASTER_PORT}" --rdzv-id "${SLURM_JOB_ID:-check}" \
    -m megatron_default_moe.check "$@"
