"""Real Megatron-LM ``pretrain_hybrid.py`` iterations with Default MoE on CPU (mock data).

Two routes: the zero-patch one (``pretrain_hybrid.py --spec MODULE NAME``, naming a module-level
Default MoE stack spec) and ``examples/pretrain_hybrid_default_moe.py`` with our flags (step mode,
save, continue). The stack spec is ``test_hybrid``'s local attention / MLP / MoE spec (Mamba
needs CUDA). Needs ``MEGATRON_LM_DIR`` like ``test_megatron_lm_train.py``, whose runner it uses.
"""

import os

import pytest
from test_megatron_lm_train import CHECKOUT, HYBRID_ENTRY, TINY_MODEL, run, scripts_dir  # noqa: F401

pytestmark = pytest.mark.skipif(
    not CHECKOUT or not os.path.isfile(os.path.join(CHECKOUT or "", "pretrain_hybrid.py")),
    reason="needs a Megatron-LM checkout with pretrain_hybrid.py: set MEGATRON_LM_DIR",
)

TINY_HYBRID = ["--hybrid-layer-pattern", "*E-E", *TINY_MODEL]
STOCK_SPEC = ["--spec", "test_hybrid", "LOCAL_HYBRID_STACK_SPEC"]
DEFAULT_MOE_SPEC = ["--spec", "test_hybrid", "LOCAL_DEFAULT_MOE_HYBRID_STACK_SPEC"]


def test_zero_patch_spec_route_trains_default_moe(scripts_dir):
    """``pretrain_hybrid.py`` unchanged: the ``--spec`` object alone makes the MoE layers Default MoE."""
    script = str(scripts_dir / "pretrain_hybrid.py")
    ours, _, _ = run(scripts_dir, script, *DEFAULT_MOE_SPEC, model=TINY_HYBRID)
    theirs, _, _ = run(scripts_dir, script, *STOCK_SPEC, model=TINY_HYBRID)
    assert [i for i, _ in ours] == [i for i, _ in theirs] == [1, 2, 3]
    # The specs differ only in the MoE layers' class; with update before use the first step
    # already has a default term (test_hybrid shows the beta = 1 twin equal bit for bit).
    assert ours[0] != theirs[0]


def test_entry_script_step_mode_saves_and_continues(scripts_dir, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    flags = ["--moe-default-vectors", "--moe-default-update", "step", "--moe-default-ema-beta", "0.5"]
    losses, logged, output = run(
        scripts_dir, HYBRID_ENTRY, *STOCK_SPEC, *flags, "--exit-interval", "2", "--save", ckpt,
        "--save-interval", "2", model=TINY_HYBRID,
    )  # fmt: skip
    assert [i for i, _ in losses] == [1, 2]
    assert "beta=0.5" in output and "update='step'" in output
    norms = [logged[i]["default_moe/vector_norm/layer_2"] for i in (1, 2)]
    assert 0 < norms[0] < norms[1]  # one EMA step per optimizer step, from zero
    assert logged[1]["default_moe/term_norm_ratio/layer_4"] == 0.0

    losses, logged, output = run(scripts_dir, HYBRID_ENTRY, *STOCK_SPEC, *flags, "--load", ckpt, model=TINY_HYBRID)
    assert [i for i, _ in losses] == [3]
    assert "no default vectors" not in output  # the saved tables came back ...
    assert logged[3]["default_moe/term_norm_ratio/layer_4"] > 0.0  # ... and were used at once
