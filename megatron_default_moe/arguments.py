"""Megatron-LM command-line flags for Default MoE, and how they reach a ``GPTModelConfig``.

``add_default_moe_args(parser)`` is an ``extra_args_provider`` for
``megatron.training.arguments.parse_and_validate_args``. ``default_moe_config_from_args(args)``
turns the parsed flags into a ``DefaultMoEConfig`` (``None`` while ``--moe-default-vectors`` is
off). ``configure_gpt_model_config(model_cfg, dm_config)`` makes a ``megatron.training``
``GPTModelConfig`` build Default MoE layers and installs the training hooks after the model is
wrapped (``post_wrap_hooks``): the step-mode update and the metrics at ``--log-interval``.
"""

import argparse
import inspect
import warnings

from megatron_default_moe.config import UPDATES, DefaultMoEConfig
from megatron_default_moe.functional import EMA_WEIGHTINGS, MODES

# (flag, args attribute, DefaultMoEConfig field, argparse kwargs)
_FLAGS = (
    (
        "--moe-default-ema-beta",
        "moe_default_ema_beta",
        "beta",
        dict(type=float, default=0.9, help="EMA decay β of the default vectors, in [0, 1] (paper: 0.9 for 8 experts)."),
    ),
    (
        "--moe-default-ema-weighting",
        "moe_default_ema_weighting",
        "ema_weighting",
        dict(
            type=str,
            default="uniform",
            choices=EMA_WEIGHTINGS,
            help="'uniform' (paper) averages unweighted expert outputs; 'router' weights them by the routing prob.",
        ),
    ),
    (
        "--moe-default-update",
        "moe_default_update",
        "update",
        dict(
            type=str,
            default="microbatch",
            choices=UPDATES,
            help="'microbatch' (paper) updates before use in every micro-batch; 'step' once per optimizer step.",
        ),
    ),
    (
        "--moe-default-mode",
        "moe_default_mode",
        "mode",
        dict(
            type=str,
            default="forward",
            choices=MODES,
            help="'forward' adds the default term to the output; 'backward-only' adds only its gradient (ablation).",
        ),
    ),
)


def add_default_moe_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the Default MoE flags (an ``extra_args_provider``); returns ``parser``.

    Flags the parser already has (a Megatron-LM patched with ``patches/``, whose
    ``TransformerConfig`` fields generate the same flags) are left as they are.
    """
    existing = set(parser._option_string_actions)
    group = parser.add_argument_group(title="Default MoE (arXiv 2504.12463)")
    if "--moe-default-vectors" not in existing:
        group.add_argument(
            "--moe-default-vectors",
            action="store_true",
            default=False,
            help="Use Default MoE: EMA default vectors stand in for unselected experts, "
            "giving the router a dense gradient. Needs a softmax router (--moe-router-score-function softmax).",
        )
    for flag, dest, _, kwargs in _FLAGS:
        if flag not in existing:
            group.add_argument(flag, dest=dest, **kwargs)
    return parser


def default_moe_config_from_args(args) -> DefaultMoEConfig | None:
    """``DefaultMoEConfig`` from parsed flags, or ``None`` when ``--moe-default-vectors`` is off.

    Raises ``ValueError`` naming the flag of a bad value (these also come from YAML or code,
    not only through argparse's ``choices``).
    """
    if not getattr(args, "moe_default_vectors", False):
        changed = [
            flag
            for flag, dest, _, kwargs in _FLAGS
            if getattr(args, dest, kwargs["default"]) != kwargs["default"]
        ]
        if changed:
            warnings.warn(f"{', '.join(changed)} set without --moe-default-vectors: ignored", stacklevel=2)
        return None
    values = {}
    for flag, dest, field, kwargs in _FLAGS:
        value = getattr(args, dest, kwargs["default"])
        if field == "beta":
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"{flag} must be a number in [0, 1], got {value!r}") from None
        values[field] = value
    return DefaultMoEConfig(**values)


def _spec_with_default_moe(spec, dm_config):
    """``spec`` (a ModuleSpec or a spec function, e.g. from ``--spec``) in its Default MoE form."""
    from megatron_default_moe.spec import default_moe_spec, to_default_moe_spec

    if spec is None or spec is default_moe_spec:
        return default_moe_spec
    if not callable(spec) or hasattr(spec, "module"):
        return to_default_moe_spec(spec, dm_config)

    def spec_fn(model_config, vp_stage=None):
        if "vp_stage" in inspect.signature(spec).parameters:
            return to_default_moe_spec(spec(model_config, vp_stage=vp_stage), dm_config)
        return to_default_moe_spec(spec(model_config), dm_config)

    return spec_fn


def configure_gpt_model_config(model_cfg, dm_config: DefaultMoEConfig | None, log_interval: int = 100):
    """Make a ``megatron.training`` ``GPTModelConfig`` build and train Default MoE; returns it.

    - ``model_cfg.transformer.default_moe = dm_config`` (read by ``default_moe_spec``);
    - ``model_cfg.transformer_layer_spec``: ``default_moe_spec``, or a ``--spec`` given by the
      user rewritten by ``to_default_moe_spec``;
    - a post-wrap hook that wraps ``config.finalize_model_grads_func`` (``update="step"``) and
      logs default-vector statistics every ``log_interval`` iterations.

    ``dm_config=None`` (flag off) leaves ``model_cfg`` untouched. Raises ``ValueError`` early
    (before Megatron initialises) for options Default MoE cannot run with.
    """
    if dm_config is None:
        return model_cfg
    transformer = model_cfg.transformer
    dm_config.validate(transformer)
    transformer.default_moe = dm_config
    model_cfg.transformer_layer_spec = _spec_with_default_moe(model_cfg.transformer_layer_spec, dm_config)

    def install_default_moe_hooks(model):
        from megatron_default_moe.metrics import install_training_hooks

        install_training_hooks(model, log_interval=log_interval)
        return model

    model_cfg.post_wrap_hooks = [*model_cfg.post_wrap_hooks, install_default_moe_hooks]
    return model_cfg
