"""``DefaultMoEConfig``: the knobs of Default MoE and the Megatron options it cannot run with."""

from dataclasses import dataclass

from megatron_default_moe.functional import EMA_WEIGHTINGS, MODES

UPDATES = ("microbatch", "step")

# (TransformerConfig field, Megatron-LM flag, predicate meaning "unsupported", why)
_REJECTED = (
    ("num_moe_experts", "--num-experts", lambda v: not v, "Default MoE needs an MoE model"),
    (
        "moe_router_score_function",
        "--moe-router-score-function",
        lambda v: v != "softmax",
        "the default term weights are the full softmax over all experts; use 'softmax'",
    ),
    (
        "moe_router_pre_softmax",
        "--moe-router-pre-softmax",
        lambda v: not v,
        "the selected experts must be weighted by the same full softmax as the defaults "
        "(paper setting); add --moe-router-pre-softmax",
    ),
    (
        "moe_router_topk_scaling_factor",
        "--moe-router-topk-scaling-factor",
        lambda v: v not in (None, 1.0),
        "scaled TopK probs no longer sum with the default weights to 1",
    ),
    (
        "moe_router_load_balancing_type",
        "--moe-router-load-balancing-type",
        lambda v: any(t in ("sinkhorn", "quantile_balancing") for t in _as_list(v)),
        "sinkhorn / quantile balancing do not produce softmax top-k probs",
    ),
    (
        "moe_apply_probs_on_input",
        "--moe-apply-probs-on-input",
        bool,
        "expert outputs must carry the routing prob to recover unweighted outputs",
    ),
    (
        "moe_token_dispatcher_type",
        "--moe-token-dispatcher-type",
        lambda v: v not in ("allgather", "alltoall"),
        "only the 'allgather' and 'alltoall' dispatchers are supported",
    ),
    (
        "overlap_moe_expert_parallel_comm",
        "--overlap-moe-expert-parallel-comm",
        bool,
        "EP-comm overlap splits the layer forward across schedule nodes",
    ),
    ("delay_wgrad_compute", "--delay-wgrad-compute", bool, "used only with EP-comm overlap"),
    (
        "overlap_dispatch_backward_with_experts_wgrad",
        "--overlap-dispatch-backward-with-experts-wgrad",
        bool,
        "not validated with the default-vector statistics",
    ),
    ("moe_latent_size", "--moe-latent-size", bool, "latent MoE projects expert outputs"),
    (
        "transformer_impl",
        "--transformer-impl",
        lambda v: v == "inference_optimized",
        "inference-optimized MoE layers use their own router and dispatcher",
    ),
    (
        "moe_enable_routing_replay",
        "--moe-enable-routing-replay",
        bool,
        "replayed routes bypass the router's full softmax",
    ),
)


def _as_list(value):
    return value if isinstance(value, (list, tuple)) else [value]


def _cuda_graph_moe_scopes(config):
    """CUDA-graph modules that capture more than attention (the MoE forward has a collective)."""
    if getattr(config, "cuda_graph_impl", "none") == "none":
        return []
    if config.cuda_graph_impl == "full_iteration":
        return ["full_iteration"]
    modules = [getattr(m, "name", m) for m in _as_list(getattr(config, "cuda_graph_modules", []))]
    if not modules or modules == ["full"]:  # an empty list (Megatron's "full") is the whole layer
        return ["full layer"]
    return [m for m in modules if m != "attn"]


@dataclass
class DefaultMoEConfig:
    """Default MoE settings (paper defaults: β = 0.9 for 8 experts).

    Args:
        beta: EMA decay of the default vectors, in [0, 1].
        ema_weighting: ``uniform`` (paper) averages unweighted expert outputs; ``router`` weights
            each token's output by its routing prob (paper §4.3).
        update: ``microbatch`` (paper) updates before use in every training micro-batch;
            ``step`` accumulates a global batch and updates once per optimizer step.
        mode: ``forward`` adds the default term; ``backward-only`` adds only its gradient.
    """

    beta: float = 0.9
    ema_weighting: str = "uniform"
    update: str = "microbatch"
    mode: str = "forward"

    def __post_init__(self):
        if not 0.0 <= float(self.beta) <= 1.0:
            raise ValueError(f"--moe-default-ema-beta must lie in [0, 1], got {self.beta}")
        for flag, value, allowed in (
            ("--moe-default-ema-weighting", self.ema_weighting, EMA_WEIGHTINGS),
            ("--moe-default-update", self.update, UPDATES),
            ("--moe-default-mode", self.mode, MODES),
        ):
            if value not in allowed:
                raise ValueError(f"{flag} must be one of {allowed}, got {value!r}")

    def validate(self, config) -> None:
        """Raise ``ValueError`` naming the Megatron flag of any option Default MoE cannot run with."""
        for field, flag, unsupported, why in _REJECTED:
            value = getattr(config, field, None)
            if unsupported(value):
                raise ValueError(
                    f"Default MoE does not support {flag}={value!r} "
                    f"(TransformerConfig.{field}): {why}."
                )
        scopes = _cuda_graph_moe_scopes(config)
        if scopes:
            raise ValueError(
                f"Default MoE does not support --cuda-graph-modules {scopes} with "
                f"--cuda-graph-impl={config.cuda_graph_impl!r} (TransformerConfig.cuda_graph_modules): "
                "only 'attn' may be captured; the MoE forward updates the default vectors."
            )
