"""A rank whose expert emits NaN/Inf under torchrun (gloo, CPU, 2 ranks; ``faults_worker.py``).

DP=2 (only rank 1 poisoned) and EP=2 (the poisoned expert on one rank), NaN and Inf, both update
modes, the routed rows' EMA and the probes with the ``shared-1`` fit: the poisoned expert's vector
keeps its value on every rank, the others move, tables and ``nonfinite_skips`` are bit-identical
across ranks, and the first rank logs one WARNING naming layer and expert."""

import os
import re

import pytest
from helpers import run_isolated, torchrun

WORKER = os.path.join(os.path.dirname(__file__), "faults_worker.py")
CASES = [f"{layout}/{family}/{update}/{poison}" for layout in ("dp2", "ep2") for family in ("routed-rows", "probes")
         for update in ("microbatch", "step") for poison in ("nan", "inf")]  # fmt: skip


@pytest.mark.distributed
def test_a_poisoned_rank_skips_the_same_update_on_every_rank():
    out = run_isolated(torchrun(2, WORKER), 180)
    passed = re.findall(r"^ok +(\S+)", out, flags=re.MULTILINE)
    assert sorted(passed) == sorted(CASES), out[-4000:]
    assert f"PASSED: {len(CASES)} cases" in out
