"""The Megatron options Default MoE cannot run with, each named by its flag and the reason.

``DefaultMoEConfig.validate`` raises the first one; ``probe_conflict`` also decides where
``--moe-default-probes auto`` turns itself off.
"""

from megatron_default_moe.functional import forward_mode_allowed

# (TransformerConfig field, Megatron-LM flag, predicate meaning "unsupported", why)
REJECTED = (
    ("num_moe_experts", "--num-experts", lambda v: not v, "Default MoE needs an MoE model"),
    (
        "moe_router_load_balancing_type",
        "--moe-router-load-balancing-type",
        lambda v: "sinkhorn" in _as_list(v),
        "Sinkhorn routing weights top-1 tokens by sigmoid(z) and selects on Sinkhorn-normalised "
        "logits, so its probs do not follow the score function (c·f/N) the default weights use",
    ),
    (
        "moe_apply_probs_on_input",
        "--moe-apply-probs-on-input",
        bool,
        "the expert input is scaled by the prob, so out / p is not the unweighted expert output",
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


def cuda_graph_moe_scopes(config):
    """CUDA-graph modules that capture more than attention (the MoE forward has a collective)."""
    if getattr(config, "cuda_graph_impl", "none") == "none":
        return []
    if config.cuda_graph_impl == "full_iteration":
        return ["full_iteration"]
    modules = [getattr(m, "name", m) for m in _as_list(getattr(config, "cuda_graph_modules", []))]
    if not modules or modules == ["full"]:  # an empty list (Megatron's "full") is the whole layer
        return ["full layer"]
    return [m for m in modules if m != "attn"]


def unsupported_option(config):
    """The first ``REJECTED`` option this config sets, as an error message, or None."""
    for field, flag, unsupported, why in REJECTED:
        value = getattr(config, field, None)
        if unsupported(value):
            return f"Default MoE does not support {flag}={value!r} (TransformerConfig.{field}): {why}."
    return None


def forward_mode_conflict(mode: str, config):
    """``--moe-default-mode forward`` on a router whose probs are renormalised (or unbounded)."""
    if mode != "forward" or forward_mode_allowed(config.moe_router_score_function, config.moe_router_pre_softmax):
        return None
    return ("Default MoE does not support --moe-default-mode forward with "
            f"--moe-router-score-function={config.moe_router_score_function!r}"
            f"{'' if config.moe_router_score_function != 'softmax' else ' without --moe-router-pre-softmax'}: "
            "the selected probs are renormalised (or, for sigmoid top-1, unbounded), so adding the "
            "default term to the forward would inflate the mixture mass beyond the scaling factor; "
            "use --moe-default-mode auto or backward-only.")  # fmt: skip


def cuda_graph_conflict(config):
    scopes = cuda_graph_moe_scopes(config)
    if not scopes:
        return None
    return (f"Default MoE does not support --cuda-graph-modules {scopes} with "
            f"--cuda-graph-impl={config.cuda_graph_impl!r} (TransformerConfig.cuda_graph_modules): "
            "only 'attn' may be captured; the MoE forward updates the default vectors.")  # fmt: skip


def probe_conflict(config):
    """Why probes cannot ride this config's dispatch (they are extra routed pairs of Megatron's
    dropless dispatch), or None."""
    for field, flag, unsupported, why in (
        ("moe_expert_capacity_factor", "--moe-expert-capacity-factor", lambda v: v is not None,
         "probe pairs would compete with routed pairs for expert capacity"),
        ("moe_pad_expert_input_to_capacity", "--moe-pad-expert-input-to-capacity", bool,
         "probe pairs would compete with routed pairs for expert capacity"),
        ("moe_token_dispatcher_type", "--moe-token-dispatcher-type", lambda v: v not in ("allgather", "alltoall"),
         "probes are routed through the allgather and alltoall dispatchers only"),
    ):
        value = getattr(config, field, None)
        if unsupported(value):
            return f"--moe-default-probes does not support {flag}={value!r} (TransformerConfig.{field}): {why}."
    if config.num_moe_experts and config.moe_router_topk >= config.num_moe_experts:
        return (f"--moe-default-probes does not support --moe-router-topk={config.moe_router_topk} with "
                f"--num-experts={config.num_moe_experts}: every expert is selected, so there is no unchosen "
                "pair to probe (and the default term is zero).")
    return None
