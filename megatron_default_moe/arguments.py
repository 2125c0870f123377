"""Megatron-LM command-line flags for Default MoE, and how they reach a model config.

``add_default_moe_args(parser)`` is an ``extra_args_provider`` for
``megatron.training.arguments.parse_and_validate_args``. ``default_moe_config_from_args(args)``
turns the parsed flags into a ``DefaultMoEConfig`` (``None`` while ``--moe-default-vectors`` is
off). ``configure_gpt_model_config`` / ``configure_hybrid_model_config`` make a
``megatron.training`` ``GPTModelConfig`` / ``HybridModelConfig`` build Default MoE layers (MTP
layers included) and install the training hooks after the model is wrapped
(``post_wrap_hooks``): the step-mode update and the metrics at ``--log-interval``.
``import_megatron_lm_script`` finds ``pretrain_gpt.py`` / ``pretrain_hybrid.py`` for the entry
scripts in ``examples/``.
"""

import argparse
import inspect
import os
import sys
import warnings

from megatron.training.models.gpt import GPTModelBuilder

from megatron_default_moe.compat import escape_stray_help_percents, gpt_builder_mtp_spec
from megatron_default_moe.config import UPDATES, DefaultMoEConfig
from megatron_default_moe.functional import EMA_WEIGHTINGS, MODES, NORMALISERS
from megatron_default_moe.probes import PROBE_DRAWS

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
            default="auto",
            choices=MODES,
            help="'forward' adds the default term to the output; 'backward-only' adds only its gradient; "
            "'auto' (default): forward for softmax with --moe-router-pre-softmax, backward-only for "
            "renormalised and sigmoid routers.",
        ),
    ),
    (
        "--moe-default-normaliser",
        "moe_default_normaliser",
        "normaliser",
        dict(
            type=str,
            default="selected",
            choices=NORMALISERS,
            help="Renormalised routers only: divide the default weights by the selected experts' score "
            "sum ('selected', DenseMixer's rule) or by all experts' ('all': a smaller extra router gradient).",
        ),
    ),
    (
        "--moe-default-stats-stride",
        "moe_default_stats_stride",
        "stats_stride",
        dict(
            type=int,
            default=1,
            help="Statistics of the default vectors from every N-th expert-output row (offset rotating per "
            "update): 1/N of the expert output is read. 1 (default, the paper) takes every row.",
        ),
    ),
    (
        "--moe-default-probes",
        "moe_default_probes",
        "probes",
        dict(
            type=int,
            default=0,
            help="Unchosen (token, expert) pairs each rank sends to the experts per micro-batch for the "
            "default vectors only (excluded from output, losses and gradients): the vectors then average "
            "each expert's output on tokens that did not choose it, where they are used. 0 (default): off.",
        ),
    ),
    (
        "--moe-default-probe-draw",
        "moe_default_probe_draw",
        "probe_draw",
        dict(
            type=str,
            default="uniform",
            choices=PROBE_DRAWS,
            help="How probe pairs are drawn among those with a nonzero default weight: 'uniform', or "
            "'weighted' (proportionally to the weight).",
        ),
    ),
    (
        "--moe-default-probe-seed",
        "moe_default_probe_seed",
        "probe_seed",
        dict(type=int, default=0, help="Seed of the probe draws (with a checkpointed micro-batch counter)."),
    ),
)


def add_default_moe_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the Default MoE flags (an ``extra_args_provider``); returns ``parser``.

    Flags the parser already has (a Megatron-LM patched with ``patches/``, whose
    ``TransformerConfig`` fields generate the same flags) are left as they are. Stray ``%`` in
    any help string is escaped, so ``--help`` works on Megatron-LM core_v0.19.0 (see
    ``compat.escape_stray_help_percents``).
    """
    existing = set(parser._option_string_actions)
    group = parser.add_argument_group(title="Default MoE (arXiv 2504.12463)")
    if "--moe-default-vectors" not in existing:
        group.add_argument(
            "--moe-default-vectors",
            action="store_true",
            default=False,
            help="Use Default MoE: EMA default vectors stand in for unselected experts, "
            "giving the router a dense gradient. Works with every TopK router (softmax, sigmoid, sqrtsoftplus).",
        )
    for flag, dest, _, kwargs in _FLAGS:
        if flag not in existing:
            group.add_argument(flag, dest=dest, **kwargs)
    escape_stray_help_percents(parser)
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


class DefaultMoEGPTModelBuilder(GPTModelBuilder):
    """``GPTModelBuilder`` whose MTP MoE layers are Default MoE as well.

    Megatron builds the MTP block from its own default layer specs, not from
    ``transformer_layer_spec``; this builder rewrites that spec with the model's ``default_moe``.
    """

    def build_model(self, *args, **kwargs):
        from megatron_default_moe.spec import to_default_moe_spec

        dm_config = self._model_config.transformer.default_moe
        with gpt_builder_mtp_spec(lambda spec: to_default_moe_spec(spec, dm_config)):
            return super().build_model(*args, **kwargs)


_GPT_BUILDER = f"{GPTModelBuilder.__module__}.{GPTModelBuilder.__qualname__}"


def _build_mtp_layers_as_default_moe(model_cfg) -> None:
    if not model_cfg.transformer.mtp_num_layers:
        return
    if model_cfg.builder != _GPT_BUILDER:
        raise ValueError(
            f"Default MoE with --mtp-num-layers needs Megatron's {_GPT_BUILDER} (its MTP MoE "
            f"layers are made Default MoE by a subclass), but this config builds with "
            f"{model_cfg.builder}"
        )
    model_cfg.builder = f"{__name__}.{DefaultMoEGPTModelBuilder.__qualname__}"


def _install_hooks_after_wrap(model_cfg, log_interval: int) -> None:
    def install_default_moe_hooks(model):
        from megatron_default_moe.metrics import install_training_hooks

        install_training_hooks(model, log_interval=log_interval)
        return model

    model_cfg.post_wrap_hooks = [*model_cfg.post_wrap_hooks, install_default_moe_hooks]


def configure_gpt_model_config(model_cfg, dm_config: DefaultMoEConfig | None, log_interval: int = 100):
    """Make a ``megatron.training`` ``GPTModelConfig`` build and train Default MoE; returns it.

    - ``model_cfg.transformer.default_moe = dm_config`` (read by ``default_moe_spec``);
    - ``model_cfg.transformer_layer_spec``: ``default_moe_spec``, or a ``--spec`` given by the
      user rewritten by ``to_default_moe_spec``;
    - with ``--mtp-num-layers``: ``DefaultMoEGPTModelBuilder``, so the MTP MoE layers are
      Default MoE too;
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
    _build_mtp_layers_as_default_moe(model_cfg)
    _install_hooks_after_wrap(model_cfg, log_interval)
    return model_cfg


def configure_hybrid_model_config(model_cfg, dm_config: DefaultMoEConfig | None, log_interval: int = 100):
    """Make a ``megatron.training`` ``HybridModelConfig`` build and train Default MoE; returns it.

    ``model_cfg.hybrid_stack_spec`` (``--spec``, or Megatron's default ``hybrid_stack_spec`` when
    unset) gets its ``moe_layer`` rewritten by ``to_default_moe_spec``; ``HybridModel`` builds its
    MTP layers from the same stack submodules. ``transformer.default_moe`` and the post-wrap
    hook as in ``configure_gpt_model_config``. ``dm_config=None`` leaves ``model_cfg`` untouched.
    """
    if dm_config is None:
        return model_cfg
    from megatron_default_moe.spec import to_default_moe_spec

    transformer = model_cfg.transformer
    if transformer.num_moe_experts is None:
        raise ValueError("--moe-default-vectors: --num-experts is not set (no MoE layer to modify)")
    dm_config.validate(transformer)
    transformer.default_moe = dm_config
    spec = model_cfg.hybrid_stack_spec
    if spec is None:
        if model_cfg.restore_modelopt_state:
            raise ValueError(
                "--moe-default-vectors with ModelOpt state restore: pass the ModelOpt hybrid "
                "stack spec with --spec (it is rewritten to Default MoE), not the implicit one"
            )
        from megatron.core.models.hybrid.hybrid_layer_specs import hybrid_stack_spec as spec
    model_cfg.hybrid_stack_spec = to_default_moe_spec(spec, dm_config)
    _install_hooks_after_wrap(model_cfg, log_interval)
    return model_cfg


def import_megatron_lm_script(name: str, program: str):
    """Import ``name`` (e.g. ``"pretrain_gpt"``) from the Megatron-LM checkout in ``MEGATRON_LM_DIR``.

    The checkout's directory goes first on ``sys.path``, as running the script would put it (its
    siblings, e.g. ``gpt_builders.py``, import from there). Exits naming ``program`` and the
    variable when it is unset or has no such script (megatron-core wheels do not ship them).
    """
    import importlib

    path = os.environ.get("MEGATRON_LM_DIR")
    if not path:
        raise SystemExit(
            f"{program}: set MEGATRON_LM_DIR to a Megatron-LM checkout, e.g.\n"
            "  git clone --branch core_v0.19.0 https://github.com/NVIDIA/Megatron-LM && "
            "export MEGATRON_LM_DIR=$PWD/Megatron-LM\n"
            f"({name}.py lives only there; megatron-core wheels do not ship it)."
        )
    if not os.path.isfile(os.path.join(path, f"{name}.py")):
        raise SystemExit(f"{program}: MEGATRON_LM_DIR={path!r} has no {name}.py")
    path = os.path.abspath(path)
    if path not in sys.path:
        sys.path.insert(0, path)
    return importlib.import_module(name)
