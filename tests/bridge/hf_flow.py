"""One Megatron-Bridge round trip on CPU (gloo, world size 1), run as its own process.

``python tests/bridge/hf_flow.py OUT_DIR`` makes a tiny Qwen3-MoE HF checkpoint locally
(transformers config, random weights: no download), converts it with the real ``AutoBridge``
into Default MoE layers and records what ``tests/test_bridge.py`` asserts in
``OUT_DIR/result.json`` (then ``api_checks.py`` in the same process: ``api_checks.json``). Saving starts a spawned writer process (torch_dist), hence the
``__main__`` guard. Transformer Engine is absent here: ``megatron_default_moe.bridge.cpu``
stands in for the one unconditional TE import on Bridge's import path (LoRA layers), only while
that module executes; nothing of Megatron or Bridge is replaced.
"""

import json
import logging
import os
import sys
import time

import torch

T0 = time.time()


class Said(logging.Handler):
    """Counts our Default MoE log lines (said once?)."""

    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        if record.getMessage().startswith("Default MoE"):
            self.lines.append(record.getMessage())


def example():
    """``examples/bridge_qwen3_moe.py``: its tiny checkpoint and its CPU choices are what we test."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "bridge_qwen3_moe.py")
    spec = importlib.util.spec_from_file_location("bridge_qwen3_moe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def safetensors_of(directory):
    from safetensors.torch import load_file

    tensors = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(directory, name)))
    return tensors


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def megatron_logits(model, tokens):
    position_ids = torch.arange(tokens.shape[1]).unsqueeze(0)
    with torch.no_grad():
        return model(tokens, position_ids, attention_mask=None)


class Recorder:
    """A TensorBoard / W&B writer that keeps what it is given."""

    def __init__(self):
        self.scalars = {}

    def add_scalar(self, name, value, step):
        self.scalars[name] = value

    def log(self, metrics, step):
        self.scalars.update(metrics)


def train_one_step(model, tokens, callback):
    """One training micro-batch (forward + backward, train mode) and Bridge's step-end event."""
    from megatron.bridge.training.callbacks import CallbackContext, CallbackManager
    from megatron.bridge.training.state import GlobalState

    manager = CallbackManager()
    manager.add(callback)
    state = GlobalState()
    state._tensorboard_logger, state._wandb_logger = Recorder(), Recorder()
    context = CallbackContext(state=state, model=model, user_state=manager.user_state)
    for chunk in model:
        chunk.train()
    manager.fire("on_train_start", context)
    manager.fire("on_train_step_start", context)
    position_ids = torch.arange(tokens.shape[1]).unsqueeze(0)
    loss = model[0](tokens[:, :-1], position_ids[:, :-1], None, labels=tokens[:, 1:])
    loss.float().mean().backward()
    after_backward = [layer.default_vectors.clone() for layer in default_moe_layers(model)]
    manager.fire("on_train_step_end", context)
    for chunk in model:
        chunk.eval()
    return after_backward, state._tensorboard_logger.scalars


def default_moe_layers(model):
    from megatron_default_moe import default_moe_layers as layers

    return layers(model)


def vectors(model):
    return [layer.default_vectors.clone() for layer in default_moe_layers(model)]


def main(out_dir):
    from megatron_default_moe.testing import cpu

    cpu.init_parallel(seed=1234)
    from megatron_default_moe.bridge.cpu import import_megatron_bridge

    import_megatron_bridge()
    from megatron.bridge import AutoBridge
    from megatron.bridge.training.model_load_save import build_and_load_model, load_model_config
    from transformers import AutoModelForCausalLM

    from megatron_default_moe import DefaultMoEConfig, DefaultMoELayer
    from megatron_default_moe.bridge import enable_default_moe

    said = Said()
    logging.getLogger("megatron_default_moe").addHandler(said)
    r = {}
    hf_dir = os.path.join(out_dir, "hf")
    hf_model = example().tiny_qwen3_moe(hf_dir)
    tokens = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(1))

    # HF -> Megatron, Default MoE
    bridge = AutoBridge.from_hf_pretrained(hf_dir)
    provider = bridge.to_megatron_provider()
    r["bridge_spec"] = repr(provider.transformer_layer_spec)
    example().local_choices(provider)
    callback = enable_default_moe(provider, DefaultMoEConfig(beta=0.5, update="step"))
    callback.log_interval = 1
    r["spec_after_enable"] = repr(provider.transformer_layer_spec)
    provider.finalize()
    model = provider.provide_distributed_model(wrap_with_ddp=False, use_cpu_initialization=True)
    moe_mlps = [layer.mlp for layer in model[0].decoder.layers if hasattr(layer.mlp, "router")]
    r["moe_layers"] = len(moe_mlps)
    r["all_moe_default"] = all(isinstance(mlp, DefaultMoELayer) for mlp in moe_mlps)
    r["mode"] = moe_mlps[0].mode
    r["router_score"] = provider.moe_router_score_function
    r["expert_bias"] = bool(getattr(moe_mlps[0].router, "expert_bias", None) is not None)
    r["zero_after_import"] = all(bool((v == 0).all()) for v in vectors(model))
    for chunk in model:
        chunk.eval()
    r["max_logit_diff"] = float((megatron_logits(model[0], tokens) - hf_logits(hf_model, tokens)).abs().max())

    # Megatron -> HF: exact weights, no default-vector tensor
    exported = {name: w.clone() for name, w in bridge.export_hf_weights(model, cpu=True, show_progress=False)}
    reference = safetensors_of(hf_dir)  # on disk, HF keeps one tensor per expert
    r["export_names_equal"] = sorted(exported) == sorted(reference)
    r["export_extra_names"] = sorted(set(exported) - set(reference))
    r["export_missing_names"] = sorted(set(reference) - set(exported))
    r["export_bit_equal"] = all(torch.equal(exported[n], reference[n]) for n in reference if n in exported)
    hf_out = os.path.join(out_dir, "hf_export")
    bridge.save_hf_pretrained(model, hf_out, show_progress=False)
    saved = safetensors_of(hf_out)
    r["saved_names_equal"] = sorted(saved) == sorted(reference)
    r["saved_bit_equal"] = all(torch.equal(saved[n], reference[n]) for n in reference if n in saved)
    r["saved_default_vector_tensors"] = [n for n in saved if "default" in n or "sample_counter" in n]
    reloaded = AutoModelForCausalLM.from_pretrained(hf_out, dtype=torch.float32).eval()
    r["reloaded_hf_logit_diff"] = float((hf_logits(reloaded, tokens) - hf_logits(hf_model, tokens)).abs().max())

    # One training micro-batch + Bridge's step-end callback (update="step")
    after_backward, metrics = train_one_step(model, tokens, callback)
    r["zero_before_step_end"] = all(bool((v == 0).all()) for v in after_backward)
    r["nonzero_after_step"] = [bool((v != 0).any()) for v in vectors(model)]
    r["metrics"] = sorted(k for k in metrics if k.endswith("/mean"))

    # Bridge Megatron checkpoint: save, reload through run_config.yaml, bit for bit
    ckpt = os.path.join(out_dir, "megatron")
    bridge.save_megatron_model(model, ckpt)
    run_config = open(os.path.join(ckpt, "iter_0000000", "run_config.yaml")).read()
    r["run_config_names_spec"] = "megatron_default_moe.bridge.spec.default_moe_layer_spec" in run_config
    loaded = bridge.load_megatron_model(ckpt)
    r["reload_all_default"] = len(default_moe_layers(loaded)) == r["moe_layers"]
    r["reload_bit_equal"] = all(torch.equal(a, b) for a, b in zip(vectors(model), vectors(loaded)))
    r["reload_nonzero"] = all(bool((v != 0).any()) for v in vectors(loaded))

    # A TopK Bridge checkpoint continues as Default MoE
    topk_provider = AutoBridge.from_hf_pretrained(hf_dir).to_megatron_provider()
    example().local_choices(topk_provider)
    topk_provider.finalize()
    topk = topk_provider.provide_distributed_model(wrap_with_ddp=False, use_cpu_initialization=True)
    topk_ckpt = os.path.join(out_dir, "topk")
    bridge.save_megatron_model(topk, topk_ckpt)
    topk_cfg, _ = load_model_config(os.path.join(topk_ckpt, "iter_0000000"))
    enable_default_moe(topk_cfg, DefaultMoEConfig())
    continued = build_and_load_model(os.path.join(topk_ckpt, "iter_0000000"), topk_cfg, use_cpu_init=True,
                                     skip_temp_dist_context=True)
    continued = continued if isinstance(continued, list) else [continued]
    r["topk_continued_default_layers"] = len(default_moe_layers(continued))
    r["topk_continued_zero"] = all(bool((v == 0).all()) for v in vectors(continued))
    before, after = topk[0].state_dict(), continued[0].state_dict()
    r["topk_continued_weights_equal"] = all(
        torch.equal(before[n], after[n]) for n in before if isinstance(before[n], torch.Tensor))
    # A Bridge checkpoint saved by release 0.2 (tests/fixtures/v0_2, made before the package's
    # modules moved into folders): its run_config.yaml names the spec and config by their paths.
    fixture = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "v0_2")
    old = bridge.load_megatron_model(os.path.join(fixture, "bridge_qwen3"))
    saved = torch.load(os.path.join(fixture, "bridge_qwen3.vectors.pt"))
    r["v0_2_reload_all_default"] = len(default_moe_layers(old)) == r["moe_layers"]
    r["v0_2_reload_bit_equal"] = all(torch.equal(a, b) for a, b in zip(vectors(old), saved))
    r["said"] = said.lines
    r["seconds"] = time.time() - T0
    with open(os.path.join(out_dir, "result.json"), "w") as f:
        json.dump(r, f, indent=1)
    print(json.dumps(r, indent=1), flush=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main(sys.argv[1])
    import api_checks  # beside this script: the config-only checks, in this process

    api_checks.main(sys.argv[1])
