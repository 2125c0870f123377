"""Reliability: every configuration Default MoE cannot run with fails when the layer is built,
with a ``ValueError`` that names the Megatron flag."""

import pytest
import torch
from helpers import moe_config, moe_submodules

pytestmark = pytest.mark.usefixtures("megatron_cpu")

# One unsupported value per entry of ``unsupported.REJECTED`` (several where the predicate has cases).
UNSUPPORTED = {
    "num_moe_experts": [None, 0],
    "moe_router_load_balancing_type": ["sinkhorn", ["aux_loss", "sinkhorn"]],
    "moe_apply_probs_on_input": [True],
    "moe_token_dispatcher_type": ["flex"],
    "overlap_moe_expert_parallel_comm": [True],
    "delay_wgrad_compute": [True],
    "overlap_dispatch_backward_with_experts_wgrad": [True],
    "moe_latent_size": [8],
    "transformer_impl": ["inference_optimized"],
    "moe_enable_routing_replay": [True],
}

# Values the same fields may take.
SUPPORTED = {
    "moe_router_score_function": ["softmax", "sigmoid", "sqrtsoftplus"],
    "moe_router_pre_softmax": [True, False],
    "moe_router_topk_scaling_factor": [None, 1.0, 2.5],
    "moe_router_load_balancing_type": [
        "aux_loss", "seq_aux_loss", "global_aux_loss", "none", "quantile_balancing", ["aux_loss", "seq_aux_loss"]
    ],
    "moe_token_dispatcher_type": ["allgather", "alltoall"],
    "transformer_impl": ["local", "transformer_engine"],
}


def _rejected():
    from megatron_default_moe.unsupported import REJECTED

    return {field: flag for field, flag, _, _ in REJECTED}


def _build(config):
    from megatron_default_moe import DefaultMoELayer

    return DefaultMoELayer(config, moe_submodules(4))


def _with(field, value):
    """A valid config with ``field`` set afterwards: Megatron's own ``__post_init__`` checks
    would otherwise stop some values (or need GPU-only packages) before ours run."""
    config = moe_config()
    setattr(config, field, value)
    return config


def test_every_rejected_entry_is_tested_and_names_a_real_field():
    from megatron.core.transformer.transformer_config import TransformerConfig

    rejected = _rejected()
    assert set(rejected) == set(UNSUPPORTED)
    fields = TransformerConfig.__dataclass_fields__
    for field, flag in rejected.items():
        assert field in fields, f"{field} is not a TransformerConfig field: its check never fires"
        assert flag == "--" + field.replace("_", "-") or field == "num_moe_experts"


@pytest.mark.parametrize(
    "field,value", [(f, v) for f, values in UNSUPPORTED.items() for v in values], ids=str
)
def test_unsupported_option_fails_at_construction_naming_the_flag(field, value):
    flag = _rejected()[field]
    with pytest.raises(ValueError, match=flag):
        _build(_with(field, value))


@pytest.mark.parametrize(
    "field,value", [(f, v) for f, values in SUPPORTED.items() for v in values], ids=str
)
def test_supported_values_pass_validation(field, value):
    from megatron_default_moe import DefaultMoEConfig

    DefaultMoEConfig().validate(_with(field, value))


def test_base_config_builds():
    layer = _build(moe_config())
    assert layer.default_vectors.dtype == torch.float32


@pytest.mark.parametrize(
    "impl,modules",
    [
        ("local", []),  # whole layer
        ("local", ["moe"]),
        ("local", ["moe_router"]),
        ("transformer_engine", ["attn", "moe_router", "moe_preprocess"]),
        ("transformer_engine", ["mlp"]),
        ("transformer_engine", "full"),
        ("full_iteration", []),
    ],
    ids=str,
)
def test_cuda_graphs_beyond_attention_fail_at_construction(impl, modules):
    from megatron.core.transformer.enums import CudaGraphModule

    config = _with("cuda_graph_impl", impl)
    config.cuda_graph_modules = modules
    with pytest.raises(ValueError, match="--cuda-graph-modules"):
        _build(config)
    if isinstance(modules, list) and modules:  # Megatron's enum form, as after its __post_init__
        config.cuda_graph_modules = [CudaGraphModule[m] for m in modules]
        with pytest.raises(ValueError, match="--cuda-graph-impl"):
            _build(config)


@pytest.mark.parametrize("modules", [["attn"], "attn", ["ATTN_ENUM"]], ids=str)
@pytest.mark.parametrize("impl", ["local", "transformer_engine"])
def test_attention_only_cuda_graphs_are_supported(impl, modules):
    from megatron.core.transformer.enums import CudaGraphModule

    from megatron_default_moe import DefaultMoEConfig

    config = _with("cuda_graph_impl", impl)
    config.cuda_graph_modules = [CudaGraphModule.attn] if modules == ["ATTN_ENUM"] else modules
    DefaultMoEConfig().validate(config)


def test_no_cuda_graphs_is_supported_whatever_the_modules():
    from megatron_default_moe import DefaultMoEConfig

    config = _with("cuda_graph_impl", "none")
    config.cuda_graph_modules = ["moe"]
    DefaultMoEConfig().validate(config)
