"""Multi-rank Default MoE (design §5.3): torchrun + gloo on CPU, every layout against a one-rank run.

``worker.py`` does the work; here we launch it: once in one process to save the one-rank
reference, then once per world size, each launch looping over its layouts (a launch costs about
12 s, a layout about a second).
"""

import os
import re
import sys

import pytest
from helpers import run_isolated, torchrun

WORKER = os.path.join(os.path.dirname(__file__), "worker.py")
LAYOUTS_BY_WORLD_SIZE = {
    2: ["ep2", "tp2sp", "etp2", "cp2", "pp2"],
    4: ["ep4", "dp2xep2", "tp2sp-ep2", "tp2sp-ep2-etp2", "etp2-ep2", "cp2-ep2", "pp2-ep2", "pp2-tp2sp"]
    # renormalised softmax (Mixtral-like) and sigmoid with expert bias, groups, scale (DeepSeek-V3-like)
    + [f"{layout}:{router}" for layout in ("dp2xep2", "tp2sp-ep2-etp2") for router in ("renorm", "sigmoid")],
}
CHECKS_PER_LAYOUT = 4  # dispatchers (allgather, alltoall) x update modes (microbatch, step)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The one-rank run every layout is compared with (one process, all parallel sizes 1)."""
    path = tmp_path_factory.mktemp("default_moe_reference") / "reference.pt"
    run_isolated([sys.executable, WORKER, "--save-reference", str(path)], timeout_s=240)
    return path


@pytest.mark.distributed
@pytest.mark.parametrize("world_size", sorted(LAYOUTS_BY_WORLD_SIZE))
def test_every_layout_matches_one_rank_run(reference, world_size):
    layouts = LAYOUTS_BY_WORLD_SIZE[world_size]
    out = run_isolated(torchrun(world_size, WORKER, "--reference", reference, "--layouts", *layouts), 420)
    passed = re.findall(r"^ok +(\S+) ", out, flags=re.MULTILINE)
    assert len(passed) == len(layouts) * CHECKS_PER_LAYOUT, out[-6000:]
    assert {p.split("/")[0] for p in passed} == set(layouts)
    assert f"PASSED: {len(layouts)} layouts on {world_size} ranks" in out
