"""How Default MoE reaches a ``megatron.training`` model config.

``configure_gpt_model_config`` / ``configure_hybrid_model_config`` make a ``GPTModelConfig`` /
``HybridModelConfig`` build Default MoE layers (MTP layers included) and install the training hooks
after the model is wrapped (``post_wrap_hooks``): the step-mode update and the metrics at
``--log-interval``. ``import_megatron_lm_script`` finds ``pretrain_gpt.py`` / ``pretrain_hybrid.py``
for the entry scripts in ``examples/``. The flags themselves: ``arguments.py``.
"""

import inspect
import os
import sys

from megatron.training.models.gpt import GPTModelBuilder

from megatron_default_moe.compat import gpt_builder_mtp_spec
from megatron_default_moe.config import DefaultMoEConfig


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
        from megatron_default_moe.analysis.metrics import install_training_hooks

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
