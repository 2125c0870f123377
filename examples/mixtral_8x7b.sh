#!/usr/bin/env bash
# A Mixtral-8x7B-like model with Default MoE, as Megatron-LM flags.
#
#   examples/mixtral_8x7b.sh [more flags]    # train with examples/train_single_node.sh
#   source examples/mixtral_8x7b.sh          # only define the MIXTRAL_8X7B_ARGS array
#
# Routing as Megatron-LM's Mixtral example: Megatron's default softmax router (top-k on the
# logits, softmax over the two chosen: renormalised), 8 experts top-2, aux loss 1e-2, alltoall.
# Default MoE resolves --moe-default-mode auto to backward-only: forward stock, dense router
# gradient through the EMA default vectors. Shapes follow the released model (32 layers, hidden
# 4096, FFN 14336, GQA 32/8, rope base 1e6); optimiser settings are ours.

MIXTRAL_8X7B_ARGS=(
    # Model.
    --num-layers 32
    --hidden-size 4096
    --ffn-hidden-size 14336
    --num-attention-heads 32
    --group-query-attention
    --num-query-groups 8
    --seq-length 4096
    --max-position-embeddings 32768
    --position-embedding-type rope
    --rotary-base 1000000
    --normalization RMSNorm
    --swiglu
    --disable-bias-linear
    --untie-embeddings-and-output-weights
    --init-method-std 0.01
    --attention-dropout 0.0
    --hidden-dropout 0.0
    # MoE: 8 experts top-2, renormalised softmax, aux loss, dropless.
    --num-experts 8
    --moe-router-topk 2
    --moe-router-load-balancing-type aux_loss
    --moe-aux-loss-coeff 1e-2
    --moe-token-dispatcher-type alltoall
    # Default MoE (mode auto = backward-only for this router).
    --moe-default-vectors
    --moe-default-ema-beta 0.9
    # Optimisation (ours; adjust to your run).
    --micro-batch-size 1
    --global-batch-size 512
    --train-iters 20000
    --lr 3.0e-4
    --min-lr 3.0e-5
    --lr-decay-style cosine
    --lr-warmup-iters 1000
    --weight-decay 0.1
    --adam-beta1 0.9
    --adam-beta2 0.95
    --clip-grad 1.0
    --bf16
)

# Run (not sourced): train on this node, or on every node of a Slurm job (train_slurm.sbatch).
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    set -euo pipefail
    HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
    exec "${HERE}/train_single_node.sh" "${MIXTRAL_8X7B_ARGS[@]}" "$@"
fi
