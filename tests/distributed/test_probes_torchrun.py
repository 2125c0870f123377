"""Probes under torchrun (gloo, CPU): EP=4, DP=2×EP=2, TP=2+SP×EP=2, ETP=2×EP=2, both dispatchers
(``probes_worker.py``): no trace in outputs, gradients or losses, vectors bit-identical on all ranks."""

import os
import re

import pytest
from helpers import run_isolated, torchrun

WORKER = os.path.join(os.path.dirname(__file__), "probes_worker.py")
LAYOUTS = ["ep4", "dp2xep2", "tp2sp-ep2", "etp2-ep2"]


@pytest.mark.distributed
def test_probes_leave_no_trace_under_every_layout():
    out = run_isolated(torchrun(4, WORKER, *LAYOUTS), 420)
    passed = re.findall(r"^ok +(\S+)", out, flags=re.MULTILINE)
    assert sorted(passed) == sorted(f"{name}/{d}" for name in LAYOUTS for d in ("allgather", "alltoall")), out[-4000:]
    assert f"PASSED: {len(LAYOUTS)} layouts" in out
