#!/usr/bin/env bash
# A Qwen3-30B-A3B-like model with Default MoE, as Megatron-LM flags.
#
#   examples/qwen3_30b_a3b.sh [more flags]    # train with examples/train_single_node.sh
#   source examples/qwen3_30b_a3b.sh          # only define the QWEN3_30B_A3B_ARGS array
#
# Routing as Qwen3-MoE (HF norm_topk_prob=True) maps to Megatron: softmax after top-k, i.e. the
# selected weights renormalised (no --moe-router-pre-softmax), 128 experts top-8, global aux
# loss 1e-3, fp32 router. Default MoE resolves --moe-default-mode auto to backward-only here: the
# forward stays the stock model's, the router gets the dense (DenseMixer-like) gradient with EMA
# default vectors standing in for the unselected experts. Shapes follow the released model
# (48 layers, hidden 2048, GQA 32/4, expert FFN 768); optimiser settings are ours.

QWEN3_30B_A3B_ARGS=(
    # Model.
    --num-layers 48
    --hidden-size 2048
    --ffn-hidden-size 6144
    --num-attention-heads 32
    --group-query-attention
    --num-query-groups 4
    --kv-channels 128
    --qk-layernorm
    --seq-length 4096
    --max-position-embeddings 40960
    --position-embedding-type rope
    --rotary-base 1000000
    --normalization RMSNorm
    --norm-epsilon 1e-6
    --swiglu
    --disable-bias-linear
    --untie-embeddings-and-output-weights
    --init-method-std 0.02
    --attention-dropout 0.0
    --hidden-dropout 0.0
    # MoE: 128 experts top-8, renormalised softmax, global aux loss, dropless.
    --num-experts 128
    --moe-router-topk 8
    --moe-ffn-hidden-size 768
    --moe-router-score-function softmax
    --moe-router-load-balancing-type global_aux_loss
    --moe-aux-loss-coeff 1e-3
    --moe-router-dtype fp32
    --moe-token-dispatcher-type alltoall
    # Default MoE at the package's defaults for this router: backward-only, probes auto (~16 unchosen
    # pairs per expert and micro-batch over the stage) and the shared-1 fit (docs/evidence.md).
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
    exec "${HERE}/train_single_node.sh" "${QWEN3_30B_A3B_ARGS[@]}" "$@"
fi
