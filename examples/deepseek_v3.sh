#!/usr/bin/env bash
# A DeepSeek-V3-like model with Default MoE, as Megatron-LM flags.
#
#   examples/deepseek_v3.sh [more flags]    # train with examples/train_single_node.sh
#   source examples/deepseek_v3.sh          # only define the DEEPSEEK_V3_ARGS array
#
# Routing as Megatron-LM's DeepSeek-V3 / R1 configs: sigmoid scores with a load-balancing expert
# bias (selection only), group-limited top-8 of 256 (8 groups, 4 kept), selected scores
# renormalised and scaled by 2.5, one shared expert (overlapped with the dispatch), sequence aux
# loss 1e-4, fp32 router, first 3 layers dense. Default MoE resolves --moe-default-mode auto to
# backward-only: the forward is the stock model's, the unselected experts' unbiased sigmoid
# scores (divided by the selected sum) get a gradient through the default term. For a sigmoid
# router the package's defaults draw probes (--moe-default-probes auto: ~16 unchosen pairs per
# expert and micro-batch over the stage) and fit each expert's default as a line in one shared
# input coordinate (--moe-default-fit shared-1): above TopK's router gradient in every measured
# layer, ~0.7% of TopK's layer time at this shape (docs/evidence.md). Shapes
# follow the released model (61 layers, hidden 7168, expert FFN 2048) but attention is plain
# multi-head here: add Megatron's --multi-latent-attention flags for MLA. Optimiser ours.

DEEPSEEK_V3_ARGS=(
    # Model.
    --num-layers 61
    --hidden-size 7168
    --ffn-hidden-size 18432
    --num-attention-heads 128
    --seq-length 4096
    --max-position-embeddings 4096
    --position-embedding-type rope
    --normalization RMSNorm
    --norm-epsilon 1e-6
    --swiglu
    --disable-bias-linear
    --untie-embeddings-and-output-weights
    --init-method-std 0.02
    --attention-dropout 0.0
    --hidden-dropout 0.0
    # MoE: 256 experts top-8, sigmoid + expert bias, groups 8/4, scale 2.5, one shared expert.
    --num-experts 256
    --moe-router-topk 8
    --moe-ffn-hidden-size 2048
    --moe-layer-freq '([0]*3+[1]*58)'
    --moe-shared-expert-intermediate-size 2048
    --moe-shared-expert-overlap
    --moe-router-score-function sigmoid
    --moe-router-enable-expert-bias
    --moe-router-bias-update-rate 1e-3
    --moe-router-num-groups 8
    --moe-router-group-topk 4
    --moe-router-topk-scaling-factor 2.5
    --moe-router-load-balancing-type seq_aux_loss
    --moe-aux-loss-coeff 1e-4
    --moe-router-dtype fp32
    --moe-token-dispatcher-type alltoall
    # Default MoE (mode auto = backward-only; probes auto and the shared-1 fit for this router).
    --moe-default-vectors
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
    exec "${HERE}/train_single_node.sh" "${DEEPSEEK_V3_ARGS[@]}" "$@"
fi
