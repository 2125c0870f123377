"""Run megatron-core's MoE path on CPU with gloo (tests, the demo, users' CPU CI).

``enable()`` is explicit and idempotent; importing the package never applies it, and it does
nothing to a process that has CUDA. It installs CPU stand-ins for the CUDA names Megatron calls
(device, streams, events, synchronize), maps ``device="cuda"`` requests to the CPU, and adapts two
collectives to gloo (split sizes as lists; uneven all-gather by pad-gather-trim). The CUDA RNG is
the CPU generator, so Megatron's default RNG tracker (``model_parallel_cuda_manual_seed(seed)``)
keeps its per-region states there and ``fork()`` really switches streams. Without Transformer
Engine, ``HybridStack``'s final norm (hard-coded ``TENorm``) is a torch norm.
``init_parallel(...)`` then sets up gloo and Megatron's model-parallel groups, in one process or
under ``torchrun``.
"""

import contextlib
import logging
import os

import torch
from torch.overrides import TorchFunctionMode

_ENABLED = False


class _FakeEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True


class _FakeStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event or _FakeEvent()

    def synchronize(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _cpu_device(device):
    text = str(device) if not isinstance(device, int) else "cuda"
    return "cpu" if text.startswith("cuda") else device


class _CudaToCpuMode(TorchFunctionMode):
    """Serve ``device="cuda"`` (factories, ``.to``, ``.cuda()``) on the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs and kwargs["device"] is not None:
            kwargs["device"] = _cpu_device(kwargs["device"])
        if func is torch.Tensor.to and len(args) > 1 and isinstance(args[1], (str, torch.device, int)):
            args = (args[0], _cpu_device(args[1]), *args[2:])
        return func(*args, **kwargs)


def _gloo_all_to_all_single(inner):
    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, *a, **k):
        def as_list(sizes):
            return sizes.tolist() if hasattr(sizes, "tolist") else sizes

        return inner(output, input, as_list(output_split_sizes), as_list(input_split_sizes), *a, **k)

    return all_to_all_single


def _gather_along_first_dim_uneven(inner):
    """gloo's all_gather rejects uneven sizes: pad every shard to the largest, gather, trim."""

    def gather(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return inner(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(s) for s in output_split_sizes]
        padded = input_.new_zeros((max(sizes), *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        shards = [torch.empty_like(padded) for _ in sizes]
        torch.distributed.all_gather(shards, padded.contiguous(), group=group)
        return torch.cat([shard[:n] for shard, n in zip(shards, sizes)], dim=0)

    return gather


def _cpu_generator_as_cuda_rng(random):
    """The CUDA RNG names served by the CPU default generator (Megatron's RNG tracker uses them)."""
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    torch.cuda.manual_seed = torch.cuda.manual_seed_all = lambda seed: torch.default_generator.manual_seed(int(seed))
    random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    random._set_cuda_rng_state = lambda new_state, *a, **k: torch.set_rng_state(new_state)

    # ``fork()`` warns when the CPU RNG moved inside a GPU RNG region; here the two are one.
    message = "CPU RNG state changed within GPU RNG context"
    logging.getLogger(random.__name__).addFilter(lambda record: record.getMessage() != message)


def _hybrid_final_norm_without_te():
    from megatron.core.extensions.transformer_engine import HAVE_TE

    if HAVE_TE:
        return
    from megatron.core.models.hybrid import hybrid_block
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    hybrid_block.TENorm = WrappedTorchNorm


def install_cuda_runtime_stand_ins(current_device="cpu") -> None:
    """Only the CUDA runtime names Megatron's MoE path calls (device index, streams, events,
    synchronize, ``record_stream``), no device mapping: also what a fake-CUDA trace
    (``FakeTensorMode``, ``current_device=0``) needs on a machine without a driver."""
    torch.cuda.current_device = lambda: current_device
    torch.cuda.current_stream = lambda *a, **k: _FakeStream()
    torch.cuda.default_stream = lambda *a, **k: _FakeStream()
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    torch.cuda.Stream = _FakeStream
    torch.cuda.Event = _FakeEvent
    torch.cuda.synchronize = lambda *a, **k: None
    torch.Tensor.record_stream = lambda self, stream: None


def enable() -> None:
    """Install the CPU stand-ins (no-op with CUDA present or when already enabled)."""
    global _ENABLED
    if _ENABLED or torch.cuda.is_available():
        return
    install_cuda_runtime_stand_ins(current_device="cpu")
    torch.distributed.all_to_all_single = _gloo_all_to_all_single(torch.distributed.all_to_all_single)

    from megatron.core.tensor_parallel import mappings, random

    mappings._gather_along_first_dim = _gather_along_first_dim_uneven(mappings._gather_along_first_dim)
    # The causal mask is also built inside backward (full recompute), where no TorchFunctionMode
    # is active (a mode is off inside its own handler, and Tensor.backward goes through it).
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils as transformer_utils

    def causal_mask_on_cpu(sq):
        return torch.triu(torch.ones(sq, sq, device="cpu"), diagonal=1).bool()

    transformer_utils.get_default_causal_mask = causal_mask_on_cpu
    fused_softmax.get_default_causal_mask = causal_mask_on_cpu
    _cpu_generator_as_cuda_rng(random)
    _hybrid_final_norm_without_te()
    _CudaToCpuMode().__enter__()  # for the rest of the process
    _ENABLED = True


def init_parallel(seed: int = 1234, **parallel_sizes) -> None:
    """gloo + Megatron model-parallel groups, single process or under ``torchrun``.

    ``parallel_sizes`` go to ``initialize_model_parallel`` (e.g. ``expert_model_parallel_size=2``).
    Call ``destroy_parallel()`` before re-initialising with another layout.
    """
    enable()
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 2000))
        torch.distributed.init_process_group(
            "gloo",
            rank=int(os.environ.get("RANK", 0)),
            world_size=int(os.environ.get("WORLD_SIZE", 1)),
        )
    parallel_state.initialize_model_parallel(**parallel_sizes)
    model_parallel_cuda_manual_seed(seed, inference_rng_tracker=True, force_reset_rng=True)
    torch.manual_seed(seed)


def destroy_parallel() -> None:
    """Tear down Megatron's model-parallel groups (the gloo world stays)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
