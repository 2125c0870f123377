"""What both Megatron-LM entry scripts (``examples/pretrain_{gpt,hybrid}_default_moe.py``) do:
parse Megatron's flags plus ours, build the model config with Default MoE wired in, call
``pretrain`` as the checkout's own script would. They differ only in the model config.
"""

import time


def parse_and_configure(base, config_from_args, modelopt_config_cls, configure):
    """Megatron's flags plus ours, parsed and validated; the model config to train.

    ``base`` is the checkout's script module (``pretrain_gpt`` / ``pretrain_hybrid``);
    ``config_from_args(args[, model_config_cls=...])`` builds its model config (the ModelOpt
    class ``base.<modelopt_config_cls>`` when ModelOpt is on); ``configure(model_cfg, dm_config,
    log_interval=...)`` wires Default MoE into it. Returns ``(args, model_cfg, dm_config)``;
    ``dm_config`` is ``None`` without ``--moe-default-vectors``.
    """
    from megatron.training.arguments import parse_and_validate_args

    from megatron_default_moe.megatron_lm.arguments import add_default_moe_args, default_moe_config_from_args

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
        model_cfg = config_from_args(args, model_config_cls=getattr(base, modelopt_config_cls))
    else:
        model_cfg = config_from_args(args)
    dm_config = default_moe_config_from_args(args)
    configure(model_cfg, dm_config, log_interval=args.log_interval)
    return args, model_cfg, dm_config


def run_pretrain(base, parse_and_configure_fn, program_start: float, **pretrain_kwargs) -> None:
    """The checkout script's ``__main__`` with our parser: version lines, startup timestamps,
    in-process restart, TopK-checkpoint loading when Default MoE is on, then ``pretrain``."""
    from megatron.core.enums import ModelType
    from megatron.training import inprocess_restart, pretrain, print_rank_0, set_startup_timestamps
    from megatron.training.argument_utils import pretrain_cfg_container_from_args

    from megatron_default_moe.checkpoint import load_checkpoints_without_default_vectors

    print_rank_0(f"> PyTorch version ................ {base.get_torch_version()}")
    print_rank_0(f"> Megatron-Core version .......... {base.mcore_version}")
    print_rank_0(f"> Transformer Engine version ... {base.get_te_version()}")
    set_startup_timestamps(program_start=program_start, main_entry=time.time())
    setattr(base.train_valid_test_datasets_provider, "is_distributed", True)
    # Our parser first: Megatron's in-process-restart check parses without our flags and would
    # answer --help (or fail on it) before them.
    args, model_cfg, dm_config = parse_and_configure_fn(base)
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
        **pretrain_kwargs,
    )
