"""Every flag set in ``examples/`` parses and validates through the entry scripts, against the real
Megatron-LM parser and ``pretrain_gpt.py`` / ``pretrain_hybrid.py`` of ``MEGATRON_LM_DIR``.

A flag set is an ``examples/*.sh`` that defines a bash array ``<STEM>_ARGS`` (``paper_8e_top1.sh``:
``PAPER_8E_TOP1_ARGS``) and only runs something when executed, not when sourced. Every other
``.sh`` there must be a launcher listed in ``LAUNCHERS``, so a new flag set that misses the naming
rule fails here instead of going untested. Flag sets with ``--hybrid-layer-pattern`` go through
``pretrain_hybrid_default_moe.py``, the others through ``pretrain_gpt_default_moe.py``. Data and
tokenizer flags are replaced by mock data, TE-only fusions are turned off (no Transformer Engine on
CPU), and the world size is the smallest the parallel sizes allow.
"""

import argparse
import glob
import importlib.util
import math
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKOUT = os.environ.get("MEGATRON_LM_DIR")
LAUNCHERS = {"train_single_node.sh", "slurm_check.sh"}
# No data, no Transformer Engine here: mock data, and the TE-only fusions off (validate_args asks).
CPU_OVERRIDES = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "32000",
                 "--transformer-impl", "local", "--no-rope-fusion", "--no-persist-layer-norm",
                 "--no-gradient-accumulation-fusion"]  # fmt: skip


def array_name(path) -> str:
    return re.sub(r"\W", "_", os.path.basename(path)[: -len(".sh")]).upper() + "_ARGS"


def flag_set_files():
    files = sorted(glob.glob(os.path.join(ROOT, "examples", "*.sh")))
    return [f for f in files if re.search(rf"^{array_name(f)}=\(", open(f).read(), re.M)]


def flag_set(path) -> list:
    name = array_name(path)
    return subprocess.run(
        ["bash", "-c", f'source "{path}" >/dev/null && printf "%s\\n" "${{{name}[@]}}"'],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout.splitlines()  # fmt: skip


def test_every_example_script_is_a_flag_set_or_a_known_launcher():
    flag_sets = {os.path.basename(f) for f in flag_set_files()}
    assert "paper_8e_top1.sh" in flag_sets
    others = {os.path.basename(f) for f in glob.glob(os.path.join(ROOT, "examples", "*.sh"))} - flag_sets
    assert others <= LAUNCHERS, (
        f"{sorted(others - LAUNCHERS)}: a flag set must define the array <STEM>_ARGS "
        "(e.g. qwen3_30b_a3b.sh: QWEN3_30B_A3B_ARGS=( ... )); a launcher belongs in LAUNCHERS"
    )
    for path in flag_set_files():
        flags = flag_set(path)
        assert flags and all(f.strip() for f in flags), path
        assert "--moe-default-vectors" in flags, f"{path}: a flag set without --moe-default-vectors"


def smallest_world_size(flags) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False)
    for name in ("tensor", "pipeline", "expert", "expert-tensor", "context"):
        p.add_argument(f"--{name}-model-parallel-size" if name != "context" else "--context-parallel-size",
                       type=int, default=None)  # fmt: skip
    known, _ = p.parse_known_args(flags)
    tp, pp = known.tensor_model_parallel_size or 1, known.pipeline_model_parallel_size or 1
    cp, ep = known.context_parallel_size or 1, known.expert_model_parallel_size or 1
    etp = known.expert_tensor_model_parallel_size or tp
    return math.lcm(tp * pp * cp, etp * ep * pp)


@pytest.mark.skipif(
    not CHECKOUT or not os.path.isfile(os.path.join(CHECKOUT or "", "pretrain_gpt.py")),
    reason="needs a Megatron-LM checkout: set MEGATRON_LM_DIR",
)
@pytest.mark.parametrize("path", flag_set_files(), ids=os.path.basename)
def test_flag_set_parses_and_validates_through_the_entry_script(path, monkeypatch):
    from megatron.training.global_vars import unset_global_variables

    flags = flag_set(path)
    hybrid = "--hybrid-layer-pattern" in flags
    entry = os.path.join(ROOT, "examples", f"pretrain_{'hybrid' if hybrid else 'gpt'}_default_moe.py")
    spec = importlib.util.spec_from_file_location("entry_under_test", entry)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    script = "pretrain_hybrid" if hybrid else "pretrain_gpt"
    monkeypatch.setenv("MEGATRON_LM_DIR", CHECKOUT)
    monkeypatch.setenv("WORLD_SIZE", str(smallest_world_size(flags)))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, script, raising=False)
    monkeypatch.setattr(sys, "argv", [entry, *flags, *CPU_OVERRIDES])
    unset_global_variables()
    try:
        base = getattr(module, f"import_{script}")()
        assert os.path.dirname(base.__file__) == os.path.abspath(CHECKOUT)
        args, model_cfg, dm_config = module.parse_and_configure(base)
    finally:
        unset_global_variables()
        sys.modules.pop(script, None)
    assert dm_config is not None and model_cfg.transformer.default_moe is dm_config
    assert args.num_experts and model_cfg.transformer.num_moe_experts == args.num_experts
