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
megatron_default_moe.hybrid_spec hybrid_stack_spec`` builds Default MoE with paper defaults.
"""

import time

_PROGRAM_START_TIME = time.time()


def import_pretrain_hybrid():
    """``pretrain_hybrid`` of the checkout, imported the way running it as a script would see it."""
    from megatron_default_moe.arguments import import_megatron_lm_script

    return import_megatron_lm_script("pretrain_hybrid", "pretrain_hybrid_default_moe.py")


def parse_and_configure(base):
    """Megatron's flags plus ours, parsed and validated; the ``HybridModelConfig`` to train.

    Returns ``(args, model_cfg, dm_config)``; ``dm_config`` is ``None`` without the flag.
    """
    from megatron.training.argument_utils import hybrid_config_from_args
    from megatron.training.arguments import parse_and_validate_args

    from megatron_default_moe.arguments import (
        add_default_moe_args,
        configure_hybrid_model_config,
        default_moe_config_from_args,
    )

    def extra_args_provider(parser):
        if base.has_nvidia_modelopt:
            parser = base.add_modelopt_args(parser)
        return add_default_moe_args(parser)

    args = parse_and_validate_args(
        extra_args_provider=extra_args_provider,
        args_defaults={"tokenizer_type": "GPT2BPETokenizer"},
    )
    if base.has_nvidia_modelopt:
        base.maybe_enable_modelopt(args)
    if base.has_nvidia_modelopt and getattr(args, "modelopt_enabled", False):
        model_cfg = hybrid_config_from_args(args, model_config_cls=base.ModelOptHybridModelConfig)
    else:
        model_cfg = hybrid_config_from_args(args)
    dm_config = default_moe_config_from_args(args)
    configure_hybrid_model_config(model_cfg, dm_config, log_interval=args.log_interval)
    return args, model_cfg, dm_config


def main() -> None:
    base = import_pretrain_hybrid()

    from megatron.core.enums import ModelType
    from megatron.training import inprocess_restart, pretrain, print_rank_0, set_startup_timestamps
    from megatron.training.argument_utils import pretrain_cfg_container_from_args

    from megatron_default_moe.checkpoint import load_checkpoints_without_default_vectors

    print_rank_0(f"> PyTorch version ................ {base.get_torch_version()}")
    print_rank_0(f"> Megatron-Core version .......... {base.mcore_version}")
    print_rank_0(f"> Transformer Engine version ... {base.get_te_version()}")
    set_startup_timestamps(program_start=_PROGRAM_START_TIME, main_entry=time.time())
    setattr(base.train_valid_test_datasets_provider, "is_distributed", True)
    # Our parser first: Megatron's in-process-restart check parses without our flags and would
    # answer --help (or fail on it) before them.
    args, model_cfg, dm_config = parse_and_configure(base)
    pretrain_fn, store = inprocess_restart.maybe_wrap_for_inprocess_restart(pretrain)
    if dm_config is not None:
        load_checkpoints_without_default_vectors()
        print_rank_0(f"> Default MoE ..................... {dm_config}")

    full_config = pretrain_cfg_container_from_args(args, model_cfg)
    pretrain_fn(
        full_config,
        base.train_valid_test_datasets_provider,
        ModelType.encoder_or_decoder,
        base.forward_step,
        store=store,
    )


if __name__ == "__main__":
    main()
