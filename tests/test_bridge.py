"""Megatron-Bridge integration (``megatron_default_moe.bridge``) with the real megatron-bridge 0.6.2.

One process (``tests/bridge/hf_flow.py``, then ``api_checks.py`` in it; about 30 s of CPU)
does the work and records it; each test below asserts one promise. The process makes a tiny
Qwen3-MoE HF checkpoint locally and runs it through ``AutoBridge`` on CPU (gloo, world size 1,
``megatron_default_moe.testing.cpu``). Nothing of Megatron or Bridge is mocked; the one
stand-in is for the unconditional ``import transformer_engine.pytorch`` in Bridge's LoRA layers
module (``megatron_default_moe.bridge.cpu``), visible only while that module executes.

``scripts/bootstrap.sh`` installs Bridge (``make test`` runs it). These tests skip only when
that install failed and bootstrap recorded why; otherwise a missing Bridge fails them.
"""

import json
import os
import sys

import pytest
from helpers import run_isolated

HERE = os.path.dirname(os.path.abspath(__file__))
INSTALL_FAILED = os.path.join(sys.prefix, "megatron-bridge-install-failed")

if os.path.exists(INSTALL_FAILED):
    pytest.skip(
        "scripts/bootstrap.sh could not install megatron-bridge: " + open(INSTALL_FAILED).read().strip(),
        allow_module_level=True,
    )


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    out = tmp_path_factory.mktemp("bridge")
    run_isolated([sys.executable, os.path.join(HERE, "bridge", "hf_flow.py"), str(out)], timeout_s=900)
    with open(out / "result.json") as f, open(out / "api_checks.json") as g:
        return json.load(f) | {"api": json.load(g)}


def test_bridge_model_has_default_moe_layers(flow):
    assert flow["moe_layers"] == 2 and flow["all_moe_default"]
    assert flow["spec_after_enable"].startswith("functools.partial(<function default_moe_layer_spec")
    assert flow["mode"] == "backward-only"  # Qwen3: renormalised top-k, the forward stays stock


def test_hf_import_leaves_vectors_at_zero_and_says_so_once(flow):
    assert flow["zero_after_import"]
    assert sum("HF checkpoints have no default vectors" in line for line in flow["said"]) == 1


def test_logits_equal_hf_within_fp32_rounding(flow):
    assert flow["max_logit_diff"] < 1e-5


def test_export_round_trips_weights_exactly_without_default_vectors(flow):
    assert flow["export_names_equal"], (flow["export_extra_names"], flow["export_missing_names"])
    assert flow["export_bit_equal"]
    assert flow["saved_names_equal"] and flow["saved_bit_equal"]  # save_hf_pretrained's files
    assert flow["saved_default_vector_tensors"] == []
    assert flow["reloaded_hf_logit_diff"] == 0.0
    assert sum("HF export writes no default vectors" in line for line in flow["said"]) == 1


def test_training_micro_batch_and_step_callback_update_vectors(flow):
    assert flow["zero_before_step_end"]  # update="step": nothing moves in the forward
    assert flow["nonzero_after_step"] == [True, True]  # on_train_step_end applied the EMA step
    assert "default_moe/vector_norm/mean" in flow["metrics"]  # written through Bridge's writers


def test_bridge_megatron_checkpoint_reloads_vectors_bit_for_bit(flow):
    assert flow["run_config_names_spec"]  # run_config.yaml names our spec function
    assert flow["reload_all_default"] and flow["reload_nonzero"] and flow["reload_bit_equal"]


def test_bridge_checkpoint_saved_by_release_0_2_loads_bit_for_bit(flow):
    assert flow["v0_2_reload_all_default"] and flow["v0_2_reload_bit_equal"]


def test_topk_bridge_checkpoint_continues_as_default_moe(flow):
    assert flow["topk_continued_default_layers"] == 2
    assert flow["topk_continued_zero"] and flow["topk_continued_weights_equal"]
    assert sum("checkpoint has no default vectors" in line for line in flow["said"]) == 1


def test_rejected_options_fail_in_enable_default_moe(flow):
    api = flow["api"]
    assert "--moe-token-dispatcher-type='flex'" in api["flex_error"]
    assert "--num-experts" in api["no_moe_error"]
    assert "GPTModelProvider or GPTModelConfig" in api["not_a_config_error"]


def test_provider_spec_is_a_serialisable_partial_with_callback(flow):
    api = flow["api"]
    assert api["spec_fn"] == "megatron_default_moe.bridge.spec.default_moe_layer_spec"
    assert api["base_spec"] == "local_layer_spec" and api["beta"] == 0.8  # re-enable: no double wrap
    assert api["spec_mlp"] == "DefaultMoELayer" and api["callback_registered"]


def test_gpt_model_config_builds_default_moe_decoder_and_mtp_layers(flow):
    for label in ("gpt_config", "gpt_config_reloaded"):  # reloaded: after as_dict / from_dict
        built = flow["api"][label]
        assert built["builder"] == "megatron_default_moe.bridge.spec.DefaultMoEGPTModelBuilder"
        assert built["moe_layers"] == 3 and built["all_default"] and built["mtp_default"], built
        assert built["beta"] == 0.6


def test_importing_the_module_imports_no_bridge_code():
    code = ("import sys, megatron_default_moe.bridge as b; "
            "print(sorted(m for m in sys.modules if m.startswith('megatron.bridge')), b.enable_default_moe.__name__)")  # fmt: skip
    out = run_isolated([sys.executable, "-c", code], timeout_s=300)
    assert out.strip().splitlines()[-1] == "[] enable_default_moe"
