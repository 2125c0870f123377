"""Megatron-LM integration: flags, the spec hook on a GPTModelConfig, training hooks, entry script.

Everything here needs only the megatron-core wheel (it ships ``megatron.training``); the real
training runs against a Megatron-LM checkout are in ``test_megatron_lm_train.py``.
"""

import argparse
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from megatron_default_moe import DefaultMoEConfig, DefaultMoELayer, DefaultMoERouter
from megatron_default_moe.megatron_lm.arguments import add_default_moe_args, default_moe_config_from_args
from megatron_default_moe.megatron_lm.model_config import configure_gpt_model_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY = os.path.join(ROOT, "examples", "pretrain_gpt_default_moe.py")

# A 3-layer GPT, first layer dense (--moe-layer-freq), 4 experts top-1, paper routing, CPU-friendly.
TINY_GPT = [
    "--num-layers", "3", "--hidden-size", "32", "--num-attention-heads", "4",
    "--seq-length", "16", "--max-position-embeddings", "16",
    "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "2", "--lr", "1e-3",
    "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "64",
    "--num-experts", "4", "--moe-router-topk", "1", "--moe-layer-freq", "([0]+[1]*2)",
    "--moe-router-score-function", "softmax", "--moe-router-pre-softmax",
    "--moe-token-dispatcher-type", "alltoall",
    "--transformer-impl", "local", "--no-persist-layer-norm", "--no-gradient-accumulation-fusion",
    "--no-bias-gelu-fusion", "--disable-bias-linear", "--no-masked-softmax-fusion",
    "--no-bias-dropout-fusion", "--no-rope-fusion",
]  # fmt: skip


def parser():
    return add_default_moe_args(argparse.ArgumentParser(allow_abbrev=False))


# -- flags -----------------------------------------------------------------------------------
def test_flag_off_gives_none():
    args = parser().parse_args([])
    assert args.moe_default_vectors is False
    assert default_moe_config_from_args(args) is None


def test_flags_map_onto_config():
    args = parser().parse_args(
        [
            "--moe-default-vectors",
            "--moe-default-ema-beta", "0.65",
            "--moe-default-ema-weighting", "router",
            "--moe-default-update", "step",
            "--moe-default-mode", "backward-only",
        ]  # fmt: skip
    )
    assert default_moe_config_from_args(args) == DefaultMoEConfig(
        beta=0.65, ema_weighting="router", update="step", mode="backward-only"
    )
    assert default_moe_config_from_args(parser().parse_args(["--moe-default-vectors"])) == DefaultMoEConfig()


@pytest.mark.parametrize("flag,value", [("--moe-default-ema-weighting", "mean"), ("--moe-default-update", "epoch")])
def test_argparse_rejects_bad_choices(flag, value, capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["--moe-default-vectors", flag, value])
    assert flag in capsys.readouterr().err


@pytest.mark.parametrize(
    "field,value,flag",
    [
        ("moe_default_ema_beta", 1.5, "--moe-default-ema-beta"),
        ("moe_default_ema_beta", "high", "--moe-default-ema-beta"),
        ("moe_default_ema_weighting", "mean", "--moe-default-ema-weighting"),
        ("moe_default_update", "epoch", "--moe-default-update"),
        ("moe_default_mode", "backward", "--moe-default-mode"),
    ],
)
def test_bad_values_name_the_flag(field, value, flag):
    args = parser().parse_args(["--moe-default-vectors"])
    setattr(args, field, value)  # as a YAML config or code would set it
    with pytest.raises(ValueError, match=flag):
        default_moe_config_from_args(args)


def test_options_without_the_flag_warn():
    with pytest.warns(UserWarning, match="--moe-default-ema-beta"):
        assert default_moe_config_from_args(parser().parse_args(["--moe-default-ema-beta", "0.5"])) is None


def test_flags_already_defined_are_kept():
    """A Megatron-LM patched with patches/ defines the flags itself: no argparse conflict."""
    p = argparse.ArgumentParser()
    p.add_argument("--moe-default-vectors", action="store_true")
    p.add_argument("--moe-default-update", type=str, default="microbatch")
    args = add_default_moe_args(p).parse_args(["--moe-default-vectors", "--moe-default-update", "step"])
    assert default_moe_config_from_args(args).update == "step"


# -- megatron.training ----------------------------------------------------------------------
@pytest.fixture
def megatron_args(monkeypatch):
    """``parse_and_validate_args`` as Megatron-LM runs it, global state reset afterwards."""
    from megatron.training.arguments import parse_and_validate_args
    from megatron.training.global_vars import unset_global_variables

    def parse(*extra):
        monkeypatch.setattr(sys, "argv", ["pretrain_gpt_default_moe.py", *TINY_GPT, *extra])
        unset_global_variables()
        return parse_and_validate_args(extra_args_provider=add_default_moe_args)

    yield parse
    unset_global_variables()


def build_gpt(model_cfg):
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.training.models.gpt import GPTModelBuilder

    torch.manual_seed(0)
    return GPTModelBuilder(model_cfg).build_model(ProcessGroupCollection.use_mpu_process_groups())


def mlp_kinds(model):
    return [type(layer.mlp).__name__ for layer in model.decoder.layers]


def train_forward_backward(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 64, (2, 16), generator=generator)
    position_ids = torch.arange(16).expand(2, 16)
    model.train()
    loss = model(tokens, position_ids, None, labels=tokens).float().mean()
    loss.backward()


@pytest.mark.usefixtures("megatron_cpu")
def test_parse_and_validate_args_and_spec_hook_build_default_moe_gpt(megatron_args):
    """Flags through Megatron's own parser, GPTModelConfig as megatron.training builds it, real GPTModel."""
    from megatron.training.argument_utils import gpt_config_from_args

    args = megatron_args("--moe-default-vectors", "--moe-default-ema-beta", "0.8", "--moe-default-update", "step")
    dm = default_moe_config_from_args(args)
    assert dm == DefaultMoEConfig(beta=0.8, update="step")
    model_cfg = configure_gpt_model_config(gpt_config_from_args(args), dm, log_interval=args.log_interval)
    assert model_cfg.transformer.default_moe is dm

    model = build_gpt(model_cfg)
    assert mlp_kinds(model) == ["MLP", "DefaultMoELayer", "DefaultMoELayer"]
    for layer in model.decoder.layers[1:]:
        assert layer.mlp.dm_config is dm
        assert isinstance(layer.mlp.router, DefaultMoERouter)
        assert layer.mlp.default_vectors.dtype == torch.float32

    # The post-wrap hook (run by build_distributed_models) wraps the finalize hook: step update + logs.
    calls, written = [], []
    config = model.config
    config.finalize_model_grads_func = lambda chunks, *a, **k: calls.append(len(chunks))
    from megatron_default_moe.analysis import metrics as metrics

    metrics.install_training_hooks(
        [model], log_interval=1, writers=lambda: (FakeWriter(written), None), iteration=lambda: 1
    )
    assert model_cfg.post_wrap_hooks[-1]([model]) == [model]  # idempotent re-install
    train_forward_backward(model)
    assert all(float(layer.mlp.default_vectors.abs().sum()) == 0 for layer in model.decoder.layers[1:])
    config.finalize_model_grads_func([model])
    assert calls == [1]
    for layer in model.decoder.layers[1:]:
        assert float(layer.mlp.default_vectors.abs().sum()) > 0  # one EMA step per optimizer step
    names = {name for name, _, step in written if step == 1}
    assert {"default_moe/vector_norm/layer_2", "default_moe/vector_norm/layer_3"} <= names


@pytest.mark.usefixtures("megatron_cpu")
def test_zero_patch_spec_route(megatron_args):
    """``--spec megatron_default_moe.spec default_moe_spec`` alone: paper defaults, dense layers untouched."""
    from megatron.training.argument_utils import gpt_config_from_args

    from megatron_default_moe.spec import default_moe_spec

    args = megatron_args("--spec", "megatron_default_moe.spec", "default_moe_spec")
    assert default_moe_config_from_args(args) is None
    model_cfg = gpt_config_from_args(args)
    assert model_cfg.transformer_layer_spec is default_moe_spec
    model = build_gpt(model_cfg)
    assert mlp_kinds(model) == ["MLP", "DefaultMoELayer", "DefaultMoELayer"]
    assert model.decoder.layers[1].mlp.dm_config == DefaultMoEConfig()
    train_forward_backward(model)
    assert float(model.decoder.layers[1].mlp.default_vectors.abs().sum()) > 0  # microbatch update


@pytest.mark.usefixtures("megatron_cpu")
def test_flag_off_leaves_megatron_alone(megatron_args):
    from megatron.training.argument_utils import gpt_config_from_args

    args = megatron_args()
    model_cfg = gpt_config_from_args(args)
    before = (model_cfg.transformer_layer_spec, list(model_cfg.post_wrap_hooks))
    assert configure_gpt_model_config(model_cfg, default_moe_config_from_args(args)) is model_cfg
    assert (model_cfg.transformer_layer_spec, model_cfg.post_wrap_hooks) == before
    assert not hasattr(model_cfg.transformer, "default_moe")
    assert mlp_kinds(build_gpt(model_cfg)) == ["MLP", "MoELayer", "MoELayer"]


def test_user_spec_is_rewritten():
    """A ``--spec`` of the user's keeps its layers, with the MoE ones made Default MoE."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_default_moe.megatron_lm.model_config import _spec_with_default_moe

    dm = DefaultMoEConfig(beta=0.7)
    spec = _spec_with_default_moe(get_gpt_layer_local_spec(num_experts=4), dm)
    assert spec.submodules.mlp.func is DefaultMoELayer and spec.submodules.mlp.keywords["dm_config"] is dm

    def user_spec(model_config, vp_stage=None):
        return get_gpt_layer_local_spec(num_experts=4)

    built = _spec_with_default_moe(user_spec, dm)(object(), vp_stage=0)
    assert built.submodules.mlp.func is DefaultMoELayer


def test_unsupported_options_fail_before_megatron_starts():
    from helpers import moe_config
    from megatron.training.models.gpt import GPTModelConfig

    model_cfg = GPTModelConfig(transformer=moe_config(moe_apply_probs_on_input=True, moe_router_topk=1), vocab_size=64)
    with pytest.raises(ValueError, match="--moe-apply-probs-on-input"):
        configure_gpt_model_config(model_cfg, DefaultMoEConfig())


def test_megatron_keeps_a_builder_installed_finalize_hook():
    """The post-wrap route relies on ``train()`` keeping ``finalize_model_grads_func`` if set."""
    import inspect

    from megatron.training import training
    from megatron.training.models.base import ModelConfig

    source = inspect.getsource(training.train)
    assert "if config.finalize_model_grads_func is None:" in source
    assert "post_wrap_hooks" in {f.name for f in __import__("dataclasses").fields(ModelConfig)}


class FakeWriter:
    def __init__(self, sink):
        self.sink = sink

    def add_scalar(self, name, value, step):
        self.sink.append((name, value, step))


# -- entry script ----------------------------------------------------------------------------
def run_entry(env_dir, *argv):
    env = {k: v for k, v in os.environ.items() if k != "MEGATRON_LM_DIR"}
    if env_dir is not None:
        env["MEGATRON_LM_DIR"] = env_dir
    return subprocess.run(
        [sys.executable, ENTRY, *argv], env=env, capture_output=True, text=True, timeout=60
    )


def test_entry_script_names_megatron_lm_dir_when_missing(tmp_path, monkeypatch):
    """The entry script exits naming the variable (a real run), and a checkout without the script
    is named too (the same function, in this process: a second interpreter costs ~20 s)."""
    from megatron_default_moe.megatron_lm.model_config import import_megatron_lm_script

    result = run_entry(None, "--moe-default-vectors")
    assert result.returncode != 0 and "MEGATRON_LM_DIR" in result.stderr
    monkeypatch.setenv("MEGATRON_LM_DIR", str(tmp_path))
    with pytest.raises(SystemExit, match="MEGATRON_LM_DIR=.* has no pretrain_gpt.py"):
        import_megatron_lm_script("pretrain_gpt", "pretrain_gpt_default_moe.py")


STUB_PRETRAIN_GPT = '''
"""Stand-in for Megatron-LM's pretrain_gpt.py (the wheel does not ship it)."""
has_nvidia_modelopt = False
mcore_version = "stub"
def get_torch_version(): return "stub"
def get_te_version(): return "stub"
def forward_step(data_iterator, model, return_schedule_plan=False): raise AssertionError("not run")
def train_valid_test_datasets_provider(num_samples, vp_stage=None): raise AssertionError("not run")
def get_embedding_ranks(pp_ranks): return pp_ranks[:1]
'''


def load_entry_module():
    spec = importlib.util.spec_from_file_location("pretrain_gpt_default_moe", ENTRY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("flag_on", [True, False])
def test_entry_script_wiring_with_stub_checkout(tmp_path, monkeypatch, flag_on):
    """main() with a stub pretrain_gpt: what reaches ``pretrain`` (no Megatron-LM checkout needed)."""
    import megatron.training
    from megatron.training.global_vars import unset_global_variables

    from megatron_default_moe.spec import default_moe_spec

    (tmp_path / "pretrain_gpt.py").write_text(STUB_PRETRAIN_GPT)
    monkeypatch.setenv("MEGATRON_LM_DIR", str(tmp_path))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "pretrain_gpt", raising=False)
    captured = {}
    monkeypatch.setattr(megatron.training, "pretrain", lambda *a, **k: captured.update(args=a, kwargs=k))
    flags = ["--moe-default-vectors", "--moe-default-update", "step"] if flag_on else []
    monkeypatch.setattr(sys, "argv", [ENTRY, *TINY_GPT, *flags])
    from megatron.core import dist_checkpointing

    # main() wraps dist_checkpointing.load for TopK warm starts: undo it after this test
    monkeypatch.setattr(dist_checkpointing, "load", dist_checkpointing.load)
    unset_global_variables()
    try:
        load_entry_module().main()
    finally:
        unset_global_variables()
        stub = sys.modules.pop("pretrain_gpt", None)

    cfg_container, provider, _, forward_step = captured["args"]
    assert stub.__file__ == str(tmp_path / "pretrain_gpt.py")
    assert forward_step is stub.forward_step and provider is stub.train_valid_test_datasets_provider
    assert captured["kwargs"]["get_embedding_ranks"] is stub.get_embedding_ranks
    model_cfg = cfg_container.model
    if flag_on:
        assert model_cfg.transformer.default_moe == DefaultMoEConfig(update="step")
        assert model_cfg.transformer_layer_spec is default_moe_spec
        assert len(model_cfg.post_wrap_hooks) == 1
    else:
        assert model_cfg.transformer_layer_spec is None and not model_cfg.post_wrap_hooks
        assert not hasattr(model_cfg.transformer, "default_moe")



def test_paper_flag_set_is_valid_for_megatron_and_default_moe(monkeypatch):
    """examples/paper_8e_top1.sh: Megatron's own validation, then Default MoE's (all flags named)."""
    from megatron.training.argument_utils import gpt_config_from_args
    from megatron.training.arguments import parse_and_validate_args
    from megatron.training.global_vars import unset_global_variables

    script = os.path.join(ROOT, "examples", "paper_8e_top1.sh")
    paper = subprocess.run(
        ["bash", "-c", f'source "{script}" && printf "%s\\n" "${{PAPER_8E_TOP1_ARGS[@]}}"'],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout.splitlines()  # fmt: skip
    cpu_overrides = ["--transformer-impl", "local", "--no-rope-fusion", "--no-persist-layer-norm",
                     "--no-gradient-accumulation-fusion", "--mock-data", "--tokenizer-type", "NullTokenizer",
                     "--vocab-size", "32000"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", ["pretrain_gpt_default_moe.py", *paper, *cpu_overrides])
    unset_global_variables()
    try:
        args = parse_and_validate_args(extra_args_provider=add_default_moe_args)
        dm = default_moe_config_from_args(args)
        model_cfg = configure_gpt_model_config(gpt_config_from_args(args), dm)  # validates
    finally:
        unset_global_variables()
    assert dm == DefaultMoEConfig(beta=0.9, ema_weighting="uniform", update="microbatch", mode="auto")
    tc = model_cfg.transformer
    assert dm.resolved_mode(tc) == "forward"  # softmax with pre-softmax: the paper's Eq. 11
    assert (tc.num_moe_experts, tc.moe_router_topk, tc.moe_router_pre_softmax) == (8, 1, True)
    assert tc.moe_router_score_function == "softmax" and tc.moe_expert_capacity_factor is None
    assert tc.moe_layer_freq == [0] + [1] * 15
    assert "global_aux_loss" in str(tc.moe_router_load_balancing_type)
    assert float(tc.moe_aux_loss_coeff if not isinstance(tc.moe_aux_loss_coeff, list) else tc.moe_aux_loss_coeff[0]) == 0.01


# -- MTP, --help -----------------------------------------------------------------------------
@pytest.mark.usefixtures("megatron_cpu")
def test_mtp_moe_layers_are_default_moe_on_the_entry_route(megatron_args):
    """``--mtp-num-layers``: Megatron builds MTP layers from its own specs; ours rewrites them too."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.training.argument_utils import gpt_config_from_args

    from megatron_default_moe.megatron_lm.model_config import DefaultMoEGPTModelBuilder

    mtp = ("--mtp-num-layers", "1", "--position-embedding-type", "rope")
    args = megatron_args(*mtp, "--moe-default-vectors")
    model_cfg = configure_gpt_model_config(gpt_config_from_args(args), default_moe_config_from_args(args))
    assert model_cfg.get_builder_cls() is DefaultMoEGPTModelBuilder
    torch.manual_seed(0)
    model = model_cfg.get_builder_cls()(model_cfg).build_model(ProcessGroupCollection.use_mpu_process_groups())
    mtp_mlps = [layer.mtp_model_layer.mlp for layer in model.mtp.layers]
    assert [type(m).__name__ for m in mtp_mlps] == ["DefaultMoELayer"]
    assert mtp_mlps[0].dm_config is model_cfg.transformer.default_moe
    assert mlp_kinds(model) == ["MLP", "DefaultMoELayer", "DefaultMoELayer"]
    train_forward_backward(model)
    assert mtp_mlps[0].default_vectors.any() and mtp_mlps[0].router.weight.grad is not None

    stock_cfg = gpt_config_from_args(megatron_args(*mtp))
    assert stock_cfg.get_builder_cls().__name__ == "GPTModelBuilder"  # flag off: Megatron's own


def test_mtp_with_another_builder_is_refused_by_name():
    from helpers import moe_config
    from megatron.training.models.gpt import GPTModelConfig

    class OtherConfig(GPTModelConfig):
        builder = "somewhere.OtherBuilder"

    model_cfg = OtherConfig(transformer=moe_config(mtp_num_layers=1, moe_router_topk=1), vocab_size=64)
    with pytest.raises(ValueError, match="--mtp-num-layers.*somewhere.OtherBuilder"):
        configure_gpt_model_config(model_cfg, DefaultMoEConfig())


def test_help_with_a_stray_percent_works_after_our_flags_are_added(capsys):
    """Megatron-LM core_v0.19.0 has a help string ending in ``10%).``: argparse's ``--help`` raises."""
    def megatron_like_parser():
        p = argparse.ArgumentParser(prog="pretrain", allow_abbrev=False)
        p.add_argument("--factor", type=float, default=1.1, help="headroom (e.g. 1.10 = 10%).")
        p.add_argument("--split", default="99,1,0", help="90%% train, default %(default)s")
        return p

    with pytest.raises(ValueError, match="unsupported format character"):
        megatron_like_parser().format_help()
    p = add_default_moe_args(megatron_like_parser())
    with pytest.raises(SystemExit):
        p.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(e.g. 1.10 = 10%)." in out and "90% train, default 99,1,0" in out
    assert "--moe-default-vectors" in out and "Default MoE (arXiv 2504.12463)" in out
    assert p.parse_args(["--factor", "2"]).factor == 2.0  # flags unchanged
