#!/usr/bin/env bash
# The paper's 8-expert top-1 setting (Default MoE, arXiv 2504.12463) as Megatron-LM flags.
#
#   examples/paper_8e_top1.sh [more flags]    # train with examples/train_single_node.sh
#   source examples/paper_8e_top1.sh          # only define the PAPER_8E_TOP1_ARGS array
#
# From the paper: 8 experts, top-1, beta = 0.9, weights = the full softmax over all experts
# (softmax, --moe-router-pre-softmax, no top-k renormalisation or scaling), global (cross data
# parallel) load-balancing loss 0.01, dropless (no capacity factor), first layer dense, EMA of
# unweighted expert outputs updated before use in every micro-batch. The model size (16 layers,
# hidden 1024, about 1.1B total / 0.25B active parameters) and the optimizer settings are ours:
# the paper's models ran on GPT-NeoX + MegaBlocks. Flags given later override these
# (argparse keeps the last value), e.g. examples/paper_8e_top1.sh --num-layers 8.

PAPER_8E_TOP1_ARGS=(
    # Model.
    --num-layers 16
    --hidden-size 1024
    --num-attention-heads 16
    --ffn-hidden-size 4096
    --seq-length 2048
    --max-position-embeddings 2048
    --position-embedding-type rope
    --normalization RMSNorm
    --swiglu
    --disable-bias-linear
    --untie-embeddings-and-output-weights
    --init-method-std 0.02
    --attention-dropout 0.0
    --hidden-dropout 0.0
    # MoE: 8 experts top-1, paper routing, global aux loss, dropless, first layer dense.
    --num-experts 8
    --moe-router-topk 1
    --moe-ffn-hidden-size 4096
    --moe-layer-freq '([0]+[1]*15)'
    --moe-router-score-function softmax
    --moe-router-pre-softmax
    --moe-router-dtype fp32
    --moe-router-load-balancing-type global_aux_loss
    --moe-aux-loss-coeff 0.01
    --moe-token-dispatcher-type alltoall
    # Default MoE.
    --moe-default-vectors
    --moe-default-ema-beta 0.9
    --moe-default-ema-weighting uniform
    --moe-default-update microbatch
    --moe-default-mode auto  # = forward for this router (softmax with pre-softmax)
    # Optimisation.
    --micro-batch-size 4
    --global-batch-size 256
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
    exec "${HERE}/train_single_node.sh" "${PAPER_8E_TOP1_ARGS[@]}" "$@"
fi
