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
    from megatron_default_moe.arguments import import_megatron_lm_script

    return import_megatron_lm_script("pretrain_gpt", "pretrain_gpt_default_moe.py")


def parse_and_configure(base):
    """Megatron's flags plus ours, parsed and validated; the ``GPTModelConfig`` to train.

    Returns ``(args, model_cfg, dm_config)``; ``dm_config`` is ``None`` without the flag.
    """
    from megatron.training.argument_utils import gpt_config_from_args
    from megatron.training.arguments import parse_and_validate_args

    from megatron_default_moe.arguments import (
        add_default_moe_args,
        configure_gpt_model_config,
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
        model_cfg = gpt_config_from_args(args, model_config_cls=base.ModelOptModelConfig)
    else:
        model_cfg = gpt_config_from_args(args)
    dm_config = default_moe_config_from_args(args)
    configure_gpt_model_config(model_cfg, dm_config, log_interval=args.log_interval)
    return args, model_cfg, dm_config


def main() -> None:
    base = import_pretrain_gpt()

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
        get_embedding_ranks=base.get_embedding_ranks,
    )


if __name__ == "__main__":
    main()
