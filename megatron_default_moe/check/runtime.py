"""Process groups, devices and the one-rank reference for the check.

CUDA + NCCL when CUDA is available (one GPU per rank, ``LOCAL_RANK``), else gloo with
``megatron_default_moe.testing.cpu``. The reference is computed by a one-process child
(``python -m megatron_default_moe.check --save-reference PATH``, torchrun's variables removed)
that global rank 0 starts before the process group exists, then broadcast as bytes over the
process group, so nodes need no shared filesystem.
"""

import datetime
import io
import os
import subprocess
import sys
import tempfile

import torch

from megatron_default_moe.check.model import Setup

# torchrun / torchelastic variables a child must not inherit (it would join the job's rendezvous)
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                  "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT")  # fmt: skip
TIMEOUT = datetime.timedelta(minutes=30)  # ranks wait in init while rank 0 computes the reference


def world() -> tuple[int, int]:
    """``(rank, world size)`` from torchrun's environment (``(0, 1)`` without a launcher)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init_world(setup: Setup) -> None:
    """The default process group: NCCL on ``cuda:LOCAL_RANK`` or gloo on the CPU (with the shim).

    Without a launcher (one process) the group lives in an in-memory store: no port is taken.
    """
    rank, size = world()
    if setup.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        backend = "nccl"
    else:
        from megatron_default_moe.testing import cpu

        cpu.enable()
        backend = "gloo"
    if "MASTER_ADDR" in os.environ:
        torch.distributed.init_process_group(backend, rank=rank, world_size=size, timeout=TIMEOUT)
    else:
        store = torch.distributed.HashStore()
        torch.distributed.init_process_group(backend, store=store, rank=0, world_size=1, timeout=TIMEOUT)
    if setup.device == "cpu":
        defer_async_all_reduce()


def init_layout(setup: Setup, sizes: dict, seed: int = 0) -> None:
    """Megatron's model-parallel groups for one layout (``destroy_layout`` before the next)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    tp = sizes.get("tp", 1)
    _record_new_groups()
    try:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            expert_model_parallel_size=sizes.get("ep", 1),
            expert_tensor_parallel_size=sizes.get("etp", tp),
            context_parallel_size=sizes.get("cp", 1),
            pipeline_model_parallel_size=sizes.get("pp", 1),
        )
    finally:
        torch.distributed.new_group = _NEW_GROUP[0]
    if setup.device == "cpu":
        model_parallel_cuda_manual_seed(seed, inference_rng_tracker=True, force_reset_rng=True)
    else:
        model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)


_NEW_GROUP = [None]  # torch.distributed.new_group while a layout's groups are recorded
_LAYOUT_GROUPS = []


def _record_new_groups() -> None:
    """Record the groups ``initialize_model_parallel`` creates: Megatron's ``destroy_model_parallel``
    forgets most of them without destroying them, and each gloo group keeps its threads, so a
    launch over many layouts would pile up thousands of threads per rank."""
    new_group = _NEW_GROUP[0] = torch.distributed.new_group

    def recording_new_group(*args, **kwargs):
        group = new_group(*args, **kwargs)
        _LAYOUT_GROUPS.append(group)
        return group

    torch.distributed.new_group = recording_new_group


def destroy_layout() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    while _LAYOUT_GROUPS:
        group = _LAYOUT_GROUPS.pop()
        if group is not None and group != torch.distributed.GroupMember.NON_GROUP_MEMBER:
            try:
                torch.distributed.destroy_process_group(group)
            except (ValueError, RuntimeError):
                pass  # already destroyed (Megatron destroys its gloo groups itself)


# -- async semantics on gloo ----------------------------------------------------------------------
class _DeferredWork:
    """An async all-reduce whose result is written into the caller's tensor only at ``wait()``."""

    def __init__(self, work, result, target):
        self.work, self.result, self.target = work, result, target

    def wait(self, *args, **kwargs):
        self.work.wait()
        self.target.copy_(self.result)
        return True

    def is_completed(self):
        return self.work.is_completed()


def defer_async_all_reduce():
    """Make ``all_reduce(async_op=True)`` deliver at ``wait()`` only (as NCCL's, on its own
    stream, effectively does), not whenever gloo finishes: a missing wait then fails the check
    instead of passing by luck of timing."""
    inner = torch.distributed.all_reduce

    def all_reduce(tensor, op=torch.distributed.ReduceOp.SUM, group=None, async_op=False):
        if not async_op:
            return inner(tensor, op=op, group=group, async_op=False)
        result = tensor.clone()
        return _DeferredWork(inner(result, op=op, group=group, async_op=True), result, tensor)

    torch.distributed.all_reduce = all_reduce


# -- the one-rank reference -----------------------------------------------------------------------
def compute_reference(setup: Setup, routers, updates, te_flag: str, baseline=True, routed_rows=False) -> bytes | None:
    """On global rank 0: run the one-rank reference (with ``baseline``, stock's too) in a child
    process, return its bytes (``None`` on the other ranks). Call before ``init_world``; progress
    goes to stderr."""
    rank, _ = world()
    if rank != 0:
        return None
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS and not k.startswith("TORCHELASTIC")}
    if setup.device == "cuda":  # the child uses this rank's GPU
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        local = int(os.environ.get("LOCAL_RANK", 0))
        env["CUDA_VISIBLE_DEVICES"] = visible.split(",")[local] if visible else str(local)
    with tempfile.TemporaryDirectory(prefix="default_moe_check_") as tmp:
        path = os.path.join(tmp, "reference.pt")
        cmd = [sys.executable, "-m", "megatron_default_moe.check", "--save-reference", path,
               "--batch", str(setup.batch), "--routers", *routers, "--updates", *updates,
               "--dtype", "bf16" if setup.dtype == torch.bfloat16 else "fp32", "--experts", te_flag]  # fmt: skip
        cmd += ([] if baseline else ["--no-baseline"]) + (["--routed-rows"] if routed_rows else [])
        print(f"computing the one-rank reference ({', '.join(routers)}) in a child process", flush=True)
        subprocess.run(cmd, env=env, check=True, stdout=sys.stderr)
        with open(path, "rb") as f:
            return f.read()


def broadcast_reference(setup: Setup, data: bytes | None) -> dict:
    """Rank 0's reference bytes on every rank (two broadcasts: length, then bytes), loaded."""
    device = setup.device if setup.device == "cpu" else torch.device("cuda", torch.cuda.current_device())
    length = torch.tensor([len(data) if data is not None else 0], dtype=torch.long, device=device)
    torch.distributed.broadcast(length, src=0)
    if data is not None:
        buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    else:
        buffer = torch.empty(int(length.item()), dtype=torch.uint8, device=device)
    torch.distributed.broadcast(buffer, src=0)
    return torch.load(io.BytesIO(buffer.cpu().numpy().tobytes()), map_location="cpu", weights_only=False)
