"""Default MoE through Megatron-Bridge: HF Qwen3-MoE -> Megatron (Default MoE) -> train -> save both ways.

Runs on CPU end-to-end (gloo, one process) on a tiny Qwen3-MoE that it makes locally (the
architecture of Qwen3-30B-A3B, random weights, no download), or on ``--hf-path DIR`` (a local HF
checkpoint small enough for the CPU). Steps: ``AutoBridge.from_hf_pretrained`` ->
``to_megatron_provider()`` -> ``enable_default_moe(provider, ...)`` (the one added line) -> build
with the HF weights -> a few training steps in a plain loop that fires Bridge's callback events
(``pretrain()`` itself hard-codes NCCL) -> ``save_megatron_model`` (keeps the default vectors) and
``save_hf_pretrained`` (HF has no slot for them). For GPU training use a Bridge recipe; the README's
"Megatron-Bridge" section has the lines to add.

    python examples/bridge_qwen3_moe.py [--steps 5] [--update step|microbatch] [--out out/bridge_qwen3_moe]
"""

import argparse
import functools
import os
import time


def tiny_qwen3_moe(path: str):
    """Save a tiny Qwen3-MoE HF checkpoint (transformers config, random weights) under ``path``."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    config = Qwen3MoeConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=64,
        tie_word_embeddings=False, architectures=["Qwen3MoeForCausalLM"],
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    return model.eval()


def local_choices(provider) -> None:
    """Without Transformer Engine (CPU): Bridge's choices that need it or CUDA kernels, in local
    form. The spec keeps its kind (a function stays a function, a partial a partial)."""
    from megatron.bridge.models.gpt_provider import local_layer_spec

    spec = provider.transformer_layer_spec
    if isinstance(spec, functools.partial) and "use_transformer_engine" in spec.keywords:
        provider.transformer_layer_spec = functools.partial(spec, use_transformer_engine=False)
    else:
        provider.transformer_layer_spec = local_layer_spec
    provider.transformer_impl = "local"
    for flag in ("moe_permute_fusion", "moe_grouped_gemm", "gradient_accumulation_fusion", "apply_rope_fusion",
                 "bias_activation_fusion", "masked_softmax_fusion", "cross_entropy_loss_fusion", "persist_layer_norm"):
        setattr(provider, flag, False)  # fmt: skip


def train(model, steps, seq_len, vocab, callback, lr=3e-3):
    """A plain loop that fires Bridge's callback events as Bridge's ``train()`` does."""
    import torch
    from megatron.bridge.training.callbacks import CallbackContext, CallbackManager
    from megatron.bridge.training.state import GlobalState

    manager = CallbackManager()
    manager.add(callback)
    state = GlobalState()
    context = CallbackContext(state=state, model=model, user_state=manager.user_state)
    optimizer = torch.optim.AdamW([p for chunk in model for p in chunk.parameters()], lr=lr)
    data = torch.Generator().manual_seed(0)
    position_ids = torch.arange(seq_len).unsqueeze(0)
    for chunk in model:
        chunk.train()
    manager.fire("on_train_start", context)
    for step in range(steps):
        manager.fire("on_train_step_start", context)
        offsets = torch.randint(0, vocab, (4, 1), generator=data)  # learnable: next = this + 1
        tokens = (offsets + torch.arange(seq_len + 1)) % vocab
        loss = model[0](tokens[:, :-1], position_ids, None, labels=tokens[:, 1:]).float().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        manager.fire("on_train_step_end", context)
        state.train_state.step += 1
        print(f"step {step + 1}: loss {loss.item():.4f}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-path", help="local HF Qwen3-MoE checkpoint (default: make a tiny one)")
    parser.add_argument("--out", default="out/bridge_qwen3_moe")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--update", choices=("microbatch", "step"), default="step")
    parser.add_argument("--beta", type=float, default=0.9)
    args = parser.parse_args()
    start = time.time()

    from megatron_default_moe.testing import cpu

    cpu.init_parallel(seed=1234)  # gloo, world size 1; CUDA calls served on the CPU
    from megatron_default_moe.bridge.cpu import import_megatron_bridge

    import_megatron_bridge()  # stands in for Bridge's one unconditional TE import, if TE is absent
    from megatron.bridge import AutoBridge

    from megatron_default_moe import DefaultMoEConfig, default_moe_layers
    from megatron_default_moe.bridge import enable_default_moe

    hf_path = args.hf_path or os.path.join(args.out, "hf_tiny")
    if not args.hf_path:
        tiny_qwen3_moe(hf_path)
    bridge = AutoBridge.from_hf_pretrained(hf_path)
    provider = bridge.to_megatron_provider()  # loads the HF weights when the model is built
    local_choices(provider)
    callback = enable_default_moe(provider, DefaultMoEConfig(beta=args.beta, update=args.update))
    callback.log_interval = 0  # no TensorBoard / W&B here; the step update still runs
    provider.finalize()
    model = provider.provide_distributed_model(wrap_with_ddp=False, use_cpu_initialization=True)
    layers = default_moe_layers(model)
    print(f"{len(layers)} Default MoE layers ({layers[0].mode}); built in {time.time() - start:.0f}s")

    train(model, args.steps, seq_len=16, vocab=provider.vocab_size, callback=callback)
    norms = [f"{float(layer.default_vectors.norm(dim=1).mean()):.4f}" for layer in layers]
    print(f"mean default-vector norm per layer: {norms}")

    bridge.save_megatron_model(model, os.path.join(args.out, "megatron"))  # keeps default_vectors
    bridge.save_hf_pretrained(model, os.path.join(args.out, "hf_export"), show_progress=False)
    print(f"saved {args.out}/megatron and {args.out}/hf_export in {time.time() - start:.0f}s")


if __name__ == "__main__":  # save_megatron_model spawns its writer process
    main()
