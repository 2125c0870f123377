#!/usr/bin/env bash
# Default MoE GPT pretraining with torchrun on one node (examples/train_slurm.sbatch runs it once
# per node, with NNODES / NODE_RANK / MASTER_ADDR set). Model flags come from the arguments:
#
#   MEGATRON_LM_DIR=/path/to/Megatron-LM examples/train_single_node.sh <model and MoE flags>
#   examples/paper_8e_top1.sh                # the paper's 8-expert top-1 flag set through this script
#
# Environment (defaults in brackets):
#   MEGATRON_LM_DIR   Megatron-LM checkout, tag core_v0.19.0 [required; set in the Docker image]
#   GPUS_PER_NODE     processes on this node [number of GPUs nvidia-smi lists, else 1]
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT   torchrun rendezvous [1, 0, localhost, 6000]
#   TP, PP, EP        tensor / pipeline / expert model-parallel sizes [1, 1, 1]
#   DATA_PATH         Megatron-format data prefix(es); unset: --mock-data
#   TOKENIZER_MODEL   HuggingFace tokenizer for DATA_PATH [gpt2]
#   OUTPUT_DIR        checkpoints and TensorBoard logs [./runs/default-moe]
#   LOG_INTERVAL      iterations between log lines and Default MoE metrics [10]
#   SAVE_INTERVAL     iterations between checkpoints [1000]
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
: "${MEGATRON_LM_DIR:?set MEGATRON_LM_DIR to a Megatron-LM checkout (git clone --branch core_v0.19.0 https://github.com/NVIDIA/Megatron-LM)}"
export MEGATRON_LM_DIR
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}

if [[ -z "${GPUS_PER_NODE:-}" ]]; then
    GPUS_PER_NODE=$(nvidia-smi --list-gpus 2>/dev/null | wc -l || true)
    [[ "${GPUS_PER_NODE}" -gt 0 ]] || GPUS_PER_NODE=1
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
OUTPUT_DIR=${OUTPUT_DIR:-./runs/default-moe}

PARALLEL_ARGS=(
    --tensor-model-parallel-size "${TP:-1}"
    --pipeline-model-parallel-size "${PP:-1}"
    --expert-model-parallel-size "${EP:-1}"
)
if [[ "${TP:-1}" -gt 1 ]]; then
    PARALLEL_ARGS+=(--sequence-parallel)
fi

if [[ -n "${DATA_PATH:-}" ]]; then
    read -r -a DATA_PREFIXES <<< "${DATA_PATH}"
    DATA_ARGS=(
        --data-path "${DATA_PREFIXES[@]}"
        --split "98,1,1"
        --tokenizer-type HuggingFaceTokenizer
        --tokenizer-model "${TOKENIZER_MODEL:-gpt2}"
    )
else
    DATA_ARGS=(--mock-data --tokenizer-type NullTokenizer --vocab-size 32000)
fi

OUTPUT_ARGS=(
    --log-interval "${LOG_INTERVAL:-10}"
    --log-throughput
    --tensorboard-dir "${OUTPUT_DIR}/tensorboard"
    --save "${OUTPUT_DIR}/checkpoints"
    --load "${OUTPUT_DIR}/checkpoints"
    --save-interval "${SAVE_INTERVAL:-1000}"
    --eval-interval 1000
    --eval-iters 10
)

exec torchrun \
    --nproc-per-node "${GPUS_PER_NODE}" \
    --nnodes "${NNODES}" \
    --node-rank "${NODE_RANK}" \
    --master-addr "${MASTER_ADDR}" \
    --master-port "${MASTER_PORT}" \
    "${HERE}/pretrain_gpt_default_moe.py" \
    "${PARALLEL_ARGS[@]}" \
    "${DATA_ARGS[@]}" \
    "${OUTPUT_ARGS[@]}" \
    "$@"
