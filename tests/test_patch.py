"""patches/: the upstream-style Megatron-LM patch still applies to, and works with, the installed wheel.

The patch is made against a Megatron-LM tag; the part of it under ``megatron/core`` and
``megatron/training`` is applied here to a temporary copy of the installed megatron-core wheel
(which ships both), so a megatron-core upgrade or a change to this package's API that breaks the
patch fails here, with no Megatron-LM checkout. The patched copy is then imported in a
subprocess: the new TransformerConfig fields become Megatron flags, the GPT layer specs build
Default MoE layers, bad combinations are rejected with the flag named.
"""

import glob
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATCHES = sorted(glob.glob(os.path.join(ROOT, "patches", "megatron-lm-*.patch")))
WHEEL_PARTS = ("megatron/core/", "megatron/training/")


def touched_files(patch_text):
    return re.findall(r"^diff --git a/(\S+) b/", patch_text, re.M)


def wheel_megatron_dir():
    import megatron.core

    return os.path.dirname(os.path.dirname(os.path.abspath(megatron.core.__file__)))


@pytest.fixture(scope="module")
def patched_wheel(tmp_path_factory):
    """A copy of the wheel's ``megatron/`` with the patch applied; returns its parent directory."""
    assert len(PATCHES) == 1, PATCHES
    root = tmp_path_factory.mktemp("patched_wheel")
    shutil.copytree(wheel_megatron_dir(), root / "megatron", ignore=shutil.ignore_patterns("__pycache__"))
    apply(PATCHES[0], root, check_only=True)
    apply(PATCHES[0], root, check_only=False)
    return root


def apply(patch, root, check_only):
    includes = [f"--include={part}*" for part in WHEEL_PARTS]
    if shutil.which("git"):
        cmd = ["git", "apply", "-p1", *includes, *(["--check"] if check_only else []), "-v", patch]
    elif shutil.which("patch"):  # GNU patch has no --include: the patch touches only WHEEL_PARTS
        cmd = ["patch", "-p1", "--forward", "-i", patch, *(["--dry-run"] if check_only else [])]
    else:
        pytest.skip("neither git nor patch is installed")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env["GIT_CEILING_DIRECTORIES"] = str(root.parent)  # never treat an enclosing repo as ours
    result = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"


def test_patch_is_format_patch_named_after_a_tag():
    (patch,) = PATCHES
    text = open(patch, encoding="utf-8").read()
    assert re.match(r"From [0-9a-f]{40} ", text)
    assert re.search(r"^Subject: \[PATCH\] ", text, re.M)
    assert re.fullmatch(r"megatron-lm-core_v\d+\.\d+\.\d+-default-moe\.patch", os.path.basename(patch))
    files = touched_files(text)
    assert files and all(f.startswith(WHEEL_PARTS) for f in files), (
        f"files outside {WHEEL_PARTS} are not checked against the wheel: {files}"
    )


def test_patch_tag_matches_installed_major_minor():
    from megatron.core import __version__

    (patch,) = PATCHES
    tag = re.search(r"core_v(\d+\.\d+)\.", os.path.basename(patch)).group(1)
    assert __version__.startswith(tag + "."), f"patch made for {tag}, megatron-core {__version__} installed"


PATCHED_CHECKS = r'''
import sys, functools
import megatron.core, megatron.training
assert megatron.core.__file__.startswith(sys.argv[1]), megatron.core.__file__
from megatron_default_moe.testing import cpu
cpu.init_parallel()
import torch
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.training.arguments import parse_args, core_transformer_config_from_args
from megatron_default_moe import DefaultMoEConfig, DefaultMoELayer

# 1. The TransformerConfig fields are Megatron flags.
sys.argv = ["pretrain_gpt.py", "--num-layers", "2", "--hidden-size", "16", "--num-attention-heads", "4",
            "--num-experts", "4", "--moe-router-pre-softmax", "--moe-default-vectors",
            "--moe-default-ema-beta", "0.95", "--moe-default-update", "step",
            "--moe-default-ema-weighting", "router", "--moe-default-mode", "backward-only"]
args = parse_args()
assert (args.moe_default_vectors, args.moe_default_ema_beta, args.moe_default_update) == (True, 0.95, "step")
assert (args.moe_default_probes, args.moe_default_fit) == (None, None)  # unset: the router family's default
from megatron_default_moe.megatron_lm.arguments import default_moe_config_from_args
sys.argv += ["--moe-default-ema-weighting", "uniform", "--moe-default-probes", "16",
             "--moe-default-fit", "shared-1", "--moe-default-fit-beta", "0.99"]
dm = default_moe_config_from_args(parse_args())
assert (dm.probes, dm.fit, dm.fit_beta, dm.probe_draw) == (16, "shared-1", 0.99, "uniform"), dm
sys.argv[-6:-4] = ["--moe-default-probes", "auto"]
assert default_moe_config_from_args(parse_args()).probes == "auto"
sys.argv[-6:-4] = ["--moe-default-probes", "many"]
try:
    default_moe_config_from_args(parse_args())
except ValueError as e:
    assert "--moe-default-probes" in str(e), e
else:
    raise AssertionError("--moe-default-probes many not rejected")
for bad in (["--moe-default-update", "epoch"], ["--moe-default-mode", "x"]):
    sys.argv = ["pretrain_gpt.py", *bad]
    try:
        parse_args()
    except SystemExit:
        pass
    else:
        raise AssertionError(bad)

# 2. The spec builders make the MoE layers Default MoE; dense layers stay.
base = dict(num_layers=3, hidden_size=16, num_attention_heads=4, num_moe_experts=4, moe_router_topk=1,
            moe_ffn_hidden_size=32, moe_router_pre_softmax=True, moe_layer_freq=[0, 1, 1],
            add_bias_linear=False, use_cpu_initialization=True)
spec = get_gpt_decoder_block_spec(TransformerConfig(**base, moe_default_vectors=True, moe_default_ema_beta=0.8),
                                  use_transformer_engine=False, normalization="LayerNorm")
mlps = [s.submodules.mlp for s in spec.layer_specs]
assert "MoE" not in repr(mlps[0]), mlps[0]  # the dense layer's MLP
assert [m.func for m in mlps[1:]] == [DefaultMoELayer, DefaultMoELayer]
assert mlps[1].keywords["dm_config"] == DefaultMoEConfig(beta=0.8)
off = get_gpt_decoder_block_spec(TransformerConfig(**base), use_transformer_engine=False, normalization="LayerNorm")
assert [m.func.__name__ for m in [s.submodules.mlp for s in off.layer_specs][1:]] == ["MoELayer", "MoELayer"]

# 3. A real GPTModel from the patched spec.
from megatron.core.models.gpt import GPTModel
model = GPTModel(TransformerConfig(**base, moe_default_vectors=True), spec, vocab_size=32, max_sequence_length=8)
assert [type(l.mlp).__name__ for l in model.decoder.layers] == ["MLP", "DefaultMoELayer", "DefaultMoELayer"]

# 4. Unsupported combinations are rejected when the config is made, flag named.
TransformerConfig(**{**base, "moe_router_pre_softmax": False, "moe_router_topk": 2}, moe_default_vectors=True)
try:  # a renormalised router with the default term in the forward
    TransformerConfig(**{**base, "moe_router_pre_softmax": False, "moe_router_topk": 2},
                      moe_default_vectors=True, moe_default_mode="forward")
except ValueError as e:
    assert "--moe-default-mode" in str(e), e
else:
    raise AssertionError("not rejected")

# 5. train() installs the finalize/metrics hooks when the field is on.
import inspect
from megatron.training import training
assert "install_training_hooks(model, log_interval=args.log_interval, config=config)" in inspect.getsource(training.train)
print("PATCHED-OK")
'''


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_patched_wheel_builds_default_moe(patched_wheel):
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    env.update(PYTHONPATH=os.pathsep.join([str(patched_wheel), ROOT]), PYTHONWARNINGS="ignore",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))  # not the port of this process's gloo world
    result = subprocess.run(
        [sys.executable, "-c", PATCHED_CHECKS, str(patched_wheel)],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert "PATCHED-OK" in result.stdout, result.stdout[-3000:] + result.stderr[-5000:]
