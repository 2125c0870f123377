"""Reliability: a Default MoE checkpoint saved at EP=2 loads at EP=4, under a TP change and at EP=1:
a renormalised router at the package's defaults (probes + ``shared-1``), every table bit-exact,
and the resumed layer draws the probe pairs the saving layout would have drawn.

``reliability/ckpt_worker.py`` does the work under ``torchrun`` (4 ranks, gloo, CPU) in one launch.
"""

import os

import pytest
from helpers import run_isolated, torchrun

WORKER = os.path.join(os.path.dirname(__file__), "reliability", "ckpt_worker.py")
LOAD_LAYOUTS = ["ep4", "tp2sp-ep2-etp2", "tp2sp", "ep1"]


@pytest.mark.distributed
def test_checkpoint_reshards_across_layouts(tmp_path):
    out = run_isolated(torchrun(4, WORKER, tmp_path), timeout_s=400)
    assert "saved ep2" in out
    for layout in LOAD_LAYOUTS:
        assert f"ok {layout}\n" in out, out[-6000:]
    assert f"PASSED: saved under ep2, loaded under {len(LOAD_LAYOUTS)} layouts" in out
