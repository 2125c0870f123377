#!/usr/bin/env python
"""Megatron-LM hybrid (``HybridModel``) pretraining with Default MoE: one flag, ``--moe-default-vectors``.

    export MEGATRON_LM_DIR=/path/to/Megatron-LM      # git clone --branch core_v0.19.0
    torchrun --nproc-per-node 8 examples/pretrain_hybrid_default_moe.py \\
        <the usual pretrain_hybrid.py flags, e.g. --hybrid-layer-pattern "M*EME*E"> \\
        --num-experts 8 --moe-router-topk 1 --moe-router-score-function softmax \\
        --moe-router-pre-softmax --moe-default-vectors [--moe-default-ema-beta 0.9] \\
        [--moe-default-update microbatch] [--spec MODULE NAME]

This is ``pretrain_hybrid.py`` of the checkout in ``MEGATRON_LM_DIR`` (its forward step and
dataset provider are imported from it) plus the Default MoE flags. Without
``--moe-default-vectors`` it runs exactly what ``pretrain_hybrid.py`` runs. With it, the
``HybridModelConfig``'s stack spec (``--spec``, else Megatron's ``hybrid_stack_spec``) has its
``moe_layer`` made Default MoE (the MTP depths of a ``"main/mtp"`` pattern reuse it), with the
flags' settings, and the same hooks, logging and TopK-checkpoint loading as
``pretrain_gpt_default_moe.py``. Without the entry script, ``pretrain_hybrid.py --spec
megatron_default_moe.megatron_lm.hybrid_spec hybrid_stack_spec`` builds Default MoE with paper defaults.
"""

import time

_PROGRAM_START_TIME = time.time()


def import_pretrain_hybrid():
    """``pretrain_hybrid`` of the checkout, imported the way running it as a script would see it."""
    from megatron_default_moe.megatron_lm.model_config import import_megatron_lm_script

    return import_megatron_lm_script("pretrain_hybrid", "pretrain_hybrid_default_moe.py")


def parse_and_configure(base):
    """Megatron's flags plus ours, parsed and validated; the ``HybridModelConfig`` to train.

    Returns ``(args, model_cfg, dm_config)``; ``dm_config`` is ``None`` without the flag.
    """
    from megatron.training.argument_utils import hybrid_config_from_args

    from megatron_default_moe.megatron_lm.model_config import configure_hybrid_model_config
    from megatron_default_moe.megatron_lm.entry import parse_and_configure as parse

    return parse(base, hybrid_config_from_args, "ModelOptHybridModelConfig", configure_hybrid_model_config)


def main() -> None:
    from megatron_default_moe.megatron_lm.entry import run_pretrain

    base = import_pretrain_hybrid()
    run_pretrain(base, parse_and_configure, _PROGRAM_START_TIME)


if __name__ == "__main__":
    main()
