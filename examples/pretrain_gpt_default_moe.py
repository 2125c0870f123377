#!/usr/bin/env python
"""Megatron-LM GPT pretraining with Default MoE (arXiv 2504.12463): one flag, ``--moe-default-vectors``.

    export MEGATRON_LM_DIR=/path/to/Megatron-LM      # git clone --branch core_v0.19.0
    torchrun --nproc-per-node 8 examples/pretrain_gpt_default_moe.py \\
        <the usual pretrain_gpt.py flags> --num-experts 8 --moe-router-topk 1 \\
        --moe-router-score-function softmax --moe-router-pre-softmax \\
        --moe-default-vectors [--moe-default-ema-beta 0.9] [--moe-default-ema-weighting uniform] \\
        [--moe-default-update microbatch] [--moe-default-mode forward]

This is ``pretrain_gpt.py`` of the checkout in ``MEGATRON_LM_DIR`` (its forward step, dataset
provider and embedding ranks are imported from it) plus the Default MoE flags. Without
``--moe-default-vectors`` it runs exactly what ``pretrain_gpt.py`` runs. With it, the
``GPTModelConfig`` that ``megatron.training`` builds from the flags gets

- ``transformer.default_moe``: the ``DefaultMoEConfig`` of the flags;
- ``transformer_layer_spec``: ``megatron_default_moe.spec.default_moe_spec`` (or the ``--spec``
  you gave, with its MoE layers replaced); MTP MoE layers (``--mtp-num-layers``) too;
- a post-wrap hook that wraps ``config.finalize_model_grads_func`` (``train()`` keeps a hook that
  is already set) for ``--moe-default-update step`` and logs default-vector statistics and GPU
  telemetry to TensorBoard / W&B every ``--log-interval`` iterations.

``--load`` of a TopK checkpoint just works: the default vectors it lacks start at zero (one log
line says so); every other missing key still fails as ``--dist-ckpt-strictness`` decides.
``--help`` lists Megatron's flags and the Default MoE group.
"""

import time

_PROGRAM_START_TIME = time.time()


def import_pretrain_gpt():
    """``pretrain_gpt`` of the checkout, imported the way running it as a script would see it."""
    from megatron_default_moe.megatron_lm.model_config import import_megatron_lm_script

    return import_megatron_lm_script("pretrain_gpt", "pretrain_gpt_default_moe.py")


def parse_and_configure(base):
    """Megatron's flags plus ours, parsed and validated; the ``GPTModelConfig`` to train.

    Returns ``(args, model_cfg, dm_config)``; ``dm_config`` is ``None`` without the flag.
    """
    from megatron.training.argument_utils import gpt_config_from_args

    from megatron_default_moe.megatron_lm.model_config import configure_gpt_model_config
    from megatron_default_moe.megatron_lm.entry import parse_and_configure as parse

    return parse(base, gpt_config_from_args, "ModelOptModelConfig", configure_gpt_model_config)


def main() -> None:
    from megatron_default_moe.megatron_lm.entry import run_pretrain

    base = import_pretrain_gpt()
    run_pretrain(base, parse_and_configure, _PROGRAM_START_TIME, get_embedding_ranks=base.get_embedding_ranks)


if __name__ == "__main__":
    main()
