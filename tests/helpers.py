"""Builders shared by the tests: a small MoE TransformerConfig and real Megatron MoE layers."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def moe_config(**overrides):
    """A small fp32 MoE ``TransformerConfig`` in the paper's routing setting (softmax, pre-softmax)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs = dict(
        num_layers=1,
        hidden_size=16,
        num_attention_heads=4,
        num_moe_experts=4,
        moe_router_topk=2,
        moe_ffn_hidden_size=24,
        ffn_hidden_size=24,
        moe_token_dispatcher_type="alltoall",
        moe_router_pre_softmax=True,
        moe_router_score_function="softmax",
        moe_aux_loss_coeff=0.0,
        add_bias_linear=False,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def moe_submodules(num_experts, grouped_gemm=False):
    """``MoESubmodules`` of Megatron's local GPT layer spec (``SequentialMLP`` experts)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(num_experts=num_experts, moe_grouped_gemm=grouped_gemm)
    return spec.submodules.mlp.keywords["submodules"]


def build_layers(config, dm_config=None, seed=0):
    """A stock ``MoELayer`` and a ``DefaultMoELayer`` with identical weights."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_default_moe import DefaultMoELayer

    subs = moe_submodules(config.num_moe_experts)
    torch.manual_seed(seed)
    stock = MoELayer(config, subs)
    torch.manual_seed(seed)
    default = DefaultMoELayer(config, subs, dm_config=dm_config)
    default.load_state_dict(stock.state_dict(), strict=False)
    return stock, default


def free_port() -> int:
    """A free TCP port on the loopback interface, for a torchrun rendezvous."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(nproc: int, script: str, *args) -> list:
    """The command line of ``torchrun --nproc-per-node nproc script args`` on its own port."""
    import sys

    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-port", str(free_port()), script, *map(str, args)]  # fmt: skip


def run_isolated(cmd, timeout_s: int, env=None, cwd=None, stderr_to_stdout=True) -> str:
    """Run ``cmd`` in its own session and return its stdout; fail the test on a timeout (killing
    torchrun *and* its workers, never orphaning them) or a non-zero exit, with the output's tail."""
    import os
    import signal
    import subprocess

    import pytest

    rendezvous = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    env = {k: v for k, v in (os.environ if env is None else env).items() if k not in rendezvous}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")  # no rendezvous of this process's gloo
    stderr = subprocess.STDOUT if stderr_to_stdout else subprocess.PIPE
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env, cwd=cwd,
                            start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout_s}s: {' '.join(cmd)}\n{out[-6000:]}\n{(err or '')[-3000:]}")
    if proc.returncode != 0:
        pytest.fail(f"exit code {proc.returncode}: {' '.join(cmd)}\n{out[-6000:]}\n{(err or '')[-3000:]}")
    return out


def report_case(name: str, failures: list) -> bool:
    """torchrun workers: one case's verdict over every rank (any rank's failure fails it), printed
    by rank 0 and by each failing rank as ``ok NAME`` / ``FAIL NAME reasons``; True if it failed."""
    flag = torch.tensor([float(bool(failures))])
    torch.distributed.all_reduce(flag)
    failed = bool(flag.item())
    if torch.distributed.get_rank() == 0 or failures:
        print(f"{'FAIL' if failed else 'ok'} {name} {'; '.join(failures)}", flush=True)
    return failed


def finish_worker(failed: bool, summary: str):
    """torchrun workers: ``PASSED: summary`` or ``FAILED: summary`` on rank 0, then exit 0 or 1."""
    import sys

    if torch.distributed.get_rank() == 0:
        print(f"{'FAILED' if failed else 'PASSED'}: {summary}", flush=True)
    torch.distributed.destroy_process_group()
    sys.exit(1 if failed else 0)


def load_script(path: str, name: str):
    """Import an example script (not a package module) by path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class OpNames(TorchDispatchMode):
    """Records the name of every aten / custom op that reaches dispatch (what a GPU would launch)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))
