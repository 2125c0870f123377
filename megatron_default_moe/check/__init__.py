"""Default MoE's distributed correctness check, for your own cluster and for the test suite.

``torchrun --nproc-per-node 8 -m megatron_default_moe.check`` runs every parallel layout that fits
the world size (TP+SP, EP, expert TP, CP, PP, DP and their combinations), with both dispatchers
(allgather, alltoall), both update modes (microbatch, step) and three router families (paper,
renormalised softmax, DeepSeek-V3-like sigmoid). Each trains a two-layer Default MoE stack for
three optimizer steps of two micro-batches with Megatron's own schedule and compares it, after
every step, with a one-rank run over the same global batch that the check computes itself
(``runtime``); beside it, the stock baseline: a stack of Megatron's own ``MoELayer`` from the same
weights, batches and schedule against its own one-rank run (``--no-baseline`` skips it). Default
vectors bit-identical on every rank, always; Default's deviations (outputs, expert and router
gradients, vectors) within twice stock's plus the dtype's tolerance at every step, and in fp32
within the tolerance alone too; in bf16 up to the first routing flip, which the check detects and
reports (``compare`` measures, ``verdict`` judges: the rule and why). It prints a table (stock and
default columns) and exits non-zero on any failure. Each router family runs the package's
defaults (probes and the ``shared-1`` fit for renormalised and sigmoid routers, whose draw is keyed
by global token position, so the one-rank run draws the same pairs); ``--routed-rows`` adds the
routed-row EMA.

On CUDA it runs NCCL and the package's Triton kernels (TE grouped experts when Transformer Engine
imports), in fp32 or, with ``--dtype bf16``, bf16; on a CPU machine gloo with
``megatron_default_moe.testing.cpu``. Modules:
``model`` (layouts, config, the layer stack, stock or Default), ``train`` (schedule, data shares,
the reference run), ``compare`` (deviations and routing flips), ``verdict`` (the rule, the table),
``runs`` (one layout's runs and baselines), ``runtime`` (process groups, the reference's child
process and broadcast), ``cli``.
"""
