"""The check's model: a stack of Default MoE layers under one parallel layout.

Every layout builds the same ``NUM_LAYERS`` layers (Megatron's spec, ``DefaultMoELayer``) and
copies its weights from the one-rank reference, each rank taking its experts and, with expert
tensor parallelism, its shard. The router runs in fp32 (as large MoE runs configure it), the rest
in ``Setup.dtype`` (fp32, or bf16 with ``--dtype bf16``); on CUDA with Transformer Engine's
grouped experts when TE is importable, elsewhere with Megatron's ``SequentialMLP``. The baseline
(``stock``) is the same stack of Megatron's own ``MoELayer``s.
"""

import dataclasses
import re
import types

import torch

S, H, E, TOPK, FFN = 8, 16, 4, 2, 24  # global micro-batch [S, B, H]; experts; expert FFN
NUM_LAYERS, STEPS, MICRO_BATCHES, LR, BETA = 2, 3, 2, 2e-3, 0.7
DISPATCHERS, UPDATES = ("allgather", "alltoall"), ("microbatch", "step")
DISPATCHERS_REFERENCE = "alltoall"  # one rank: the dispatchers differ only in their collectives

# name -> initialize_model_parallel sizes (tp = tensor, sp = sequence parallel, ep = expert,
# etp = expert tensor, cp = context, pp = pipeline); data parallel fills the rest of the world.
LAYOUTS = {
    "dp": dict(),  # every size 1: data parallel over the whole world (one rank: the reference's)
    "ep2": dict(ep=2),
    "ep4": dict(ep=4),
    "dp2xep2": dict(ep=2),  # on 4 ranks: expert-data-parallel 2 (elsewhere the same as ep2)
    "tp2sp": dict(tp=2, sp=True),  # expert TP defaults to TP
    "tp2sp-ep2": dict(tp=2, sp=True, ep=2, etp=1),
    "tp2sp-ep2-etp2": dict(tp=2, sp=True, ep=2, etp=2),
    "etp2": dict(etp=2),
    "etp2-ep2": dict(etp=2, ep=2),
    "cp2": dict(cp=2),
    "cp2-ep2": dict(cp=2, ep=2),
    "pp2": dict(pp=2),
    "pp2-ep2": dict(pp=2, ep=2),
    "pp2-tp2sp": dict(pp=2, tp=2, sp=True),
}
# router family -> TransformerConfig overrides; a layout runs with one as ``LAYOUT:ROUTER``
ROUTERS = {
    "paper": {},  # softmax with pre-softmax: the default term enters the forward
    "renorm": dict(moe_router_pre_softmax=False),  # Mixtral / Qwen3: backward-only
    "sigmoid": dict(  # DeepSeek-V3: expert bias, groups, scaling factor; backward-only
        moe_router_pre_softmax=False,
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_num_groups=2,
        moe_router_group_topk=1,
        moe_router_topk_scaling_factor=2.5,
    ),
}
EXPERT_BIAS = [0.3, -0.2, 0.1, -0.4]  # set once, so the bias moves the selection


@dataclasses.dataclass(frozen=True)
class Setup:
    """What the machine runs: ``device`` ("cpu" or "cuda"), ``dtype`` of params and
    activations, ``te`` (Transformer Engine grouped experts) and the global batch ``B``."""

    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    te: bool = False
    batch: int = 4


def layout_sizes(name: str) -> dict:
    return LAYOUTS[name]


def fits(sizes: dict, world: int, batch: int) -> bool:
    """Whether Megatron can lay ``sizes`` out on ``world`` ranks with the check's shapes."""
    tp, cp, pp = sizes.get("tp", 1), sizes.get("cp", 1), sizes.get("pp", 1)
    ep, etp = sizes.get("ep", 1), sizes.get("etp", tp)
    if world % (tp * cp * pp) or (world // pp) % (ep * etp) or E % ep or NUM_LAYERS % pp:
        return False
    dp = world // (tp * cp * pp)
    return batch % dp == 0 and S % ((2 * cp if cp > 1 else 1) * (tp if sizes.get("sp") else 1)) == 0


def make_config(setup: Setup, dispatcher: str, sizes: dict, router: str = "paper"):
    from megatron.core.transformer.transformer_config import TransformerConfig

    tp = sizes.get("tp", 1)
    kwargs = dict(
        num_layers=NUM_LAYERS,
        hidden_size=H,
        num_attention_heads=4,
        num_moe_experts=E,
        moe_router_topk=TOPK,
        moe_ffn_hidden_size=FFN,
        ffn_hidden_size=FFN,
        moe_token_dispatcher_type=dispatcher,
        moe_router_pre_softmax=True,
        moe_aux_loss_coeff=0.0,
        moe_router_dtype="fp32",  # bf16 logits would let rounding flip near-tied selections
        moe_grouped_gemm=setup.te,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=setup.device == "cpu",
        params_dtype=setup.dtype,
        bf16=setup.dtype == torch.bfloat16,
        pipeline_dtype=setup.dtype,
        init_method_std=0.4,  # outputs of order 1, so the tolerances mean something
        calculate_per_token_loss=True,  # the loss is a plain sum: no schedule rescaling
        tensor_model_parallel_size=tp,
        sequence_parallel=sizes.get("sp", False),
        expert_model_parallel_size=sizes.get("ep", 1),
        expert_tensor_parallel_size=sizes.get("etp", tp),
        context_parallel_size=sizes.get("cp", 1),
        pipeline_model_parallel_size=sizes.get("pp", 1),
    )
    return TransformerConfig(**{**kwargs, **ROUTERS[router]})


def moe_submodules(setup: Setup):
    """``MoESubmodules`` of Megatron's GPT layer spec: TE's (grouped experts) or the local one."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if setup.te:
        spec = specs.get_gpt_layer_with_transformer_engine_spec(num_experts=E, moe_grouped_gemm=True)
    else:
        spec = specs.get_gpt_layer_local_spec(num_experts=E, moe_grouped_gemm=False)
    mlp = spec.submodules.mlp
    return mlp.keywords["submodules"] if hasattr(mlp, "keywords") else mlp.submodules


class Stage(torch.nn.Module):
    """This pipeline stage's MoE layers, applied in turn (the input comes from the previous stage)."""

    def __init__(self, config, layers):
        from megatron.core.enums import ModelType

        super().__init__()
        self.config, self.model_type = config, ModelType.encoder_or_decoder
        self.layers = torch.nn.ModuleList(layers)
        self.input_tensor = None

    def set_input_tensor(self, tensors):
        self.input_tensor = tensors[0] if isinstance(tensors, (list, tuple)) else tensors

    def forward(self, x_SBH):
        h_SBH = x_SBH if self.input_tensor is None else self.input_tensor
        for layer in self.layers:
            h_SBH, _ = layer(h_SBH)
        return h_SBH


def stage_layer_ids():
    from megatron.core import parallel_state as ps

    per_stage = NUM_LAYERS // ps.get_pipeline_model_parallel_world_size()
    first = ps.get_pipeline_model_parallel_rank() * per_stage
    return list(range(first, first + per_stage))


_SEQUENTIAL = re.compile(r"^(experts\.local_experts\.)(\d+)(\..*)$")  # SequentialMLP
_GROUPED = re.compile(r"^(experts\.linear_fc[12]\.(?:weight|bias))(\d+)$")  # TEGroupedMLP


def master_name(layer, name):
    """Name of a local parameter in the one-rank layer (local expert index -> global index)."""
    for pattern, fmt in ((_SEQUENTIAL, "{0}{1}{2}"), (_GROUPED, "{0}{1}")):
        match = pattern.match(name)
        if match:
            parts = list(match.groups())
            parts[1] = str(layer.local_expert_indices[int(parts[1])])
            return fmt.format(*parts)
    return name


def my_shard(param, master_tensor):
    """This rank's piece of a one-rank tensor: its expert-TP shard along the partition dim."""
    from megatron.core import parallel_state as ps

    etp = ps.get_expert_tensor_parallel_world_size()
    if not getattr(param, "tensor_model_parallel", False) or etp == 1:
        return master_tensor
    chunks = torch.chunk(master_tensor, etp, dim=param.partition_dim)
    return chunks[ps.get_expert_tensor_parallel_rank()]


ESTIMATORS = ("default", "routed-rows")  # the family's package default; the routed-row EMA (--routed-rows)


def has_probes_by_default(router: str) -> bool:
    """Whether the package's default for this family is probes (+ ``shared-1``): all but ``paper``."""
    from megatron_default_moe.config import probed_by_default

    family = {"moe_router_score_function": "softmax", "moe_router_pre_softmax": True, **ROUTERS[router]}
    return probed_by_default(types.SimpleNamespace(**family))


def build_stage(setup: Setup, dispatcher, update, sizes, weights=None, router="paper", estimator="default",
                stock=False):  # fmt: skip
    """This stage's Default MoE layers; with ``weights`` (one-rank parameters), copied from them.
    ``estimator``: ``default``, the package's defaults for the router family (probes ``auto`` and
    ``shared-1`` for renormalised and sigmoid routers, the routed-row EMA for ``paper``), or
    ``routed-rows`` (``--moe-default-probes 0``). With ``stock``, Megatron's own ``MoELayer`` from
    the same submodules, config and weights (the baseline: ``update`` and ``estimator`` do not apply)."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_default_moe import DefaultMoEConfig, DefaultMoELayer, wrap_finalize_model_grads

    config = make_config(setup, dispatcher, sizes, router)
    layers = []
    for layer_id in stage_layer_ids():
        torch.manual_seed(100 + layer_id)
        if stock:
            layer = MoELayer(config, moe_submodules(setup), layer_number=layer_id + 1)
        else:
            dm_config = DefaultMoEConfig(beta=BETA, update=update, probes=None if estimator == "default" else 0)
            layer = DefaultMoELayer(config, moe_submodules(setup), layer_number=layer_id + 1, dm_config=dm_config)
        if setup.device == "cuda":
            layer.cuda()
        if weights is not None:
            with torch.no_grad():
                for name, param in layer.named_parameters():
                    param.copy_(my_shard(param, weights[layer_id][master_name(layer, name)]))
        if layer.router.expert_bias is not None:
            layer.router.expert_bias.copy_(torch.tensor(EXPERT_BIAS))
        layers.append(layer)
    if update == "step" and not stock:
        config.finalize_model_grads_func = lambda *args, **kwargs: None
        wrap_finalize_model_grads(config)  # update_default_vectors after the last backward
    return Stage(config, layers)
