"""A ``DefaultMoELayer``'s forward and backward on fake CUDA tensors (``tests/test_fake_cuda.py``).

Run as its own process: the CPU shim (``testing.cpu.enable``) maps ``cuda`` to the CPU for a whole
process and would hide exactly what this trace looks for. Here every tensor is a ``FakeTensor``
on ``cuda:0`` (metadata only; no GPU, no driver), so

- a CPU tensor mixed with CUDA ones raises ``FakeTensorDeviceMismatchError``;
- reading a CUDA tensor's value on the host (``.item()``, ``float()``, ``bool()``, ``.tolist()``:
  a device-to-host sync) from anywhere but Megatron's own code raises
  ``DataDependentOutputException``;
- a custom op without a fake kernel fails;
- dtypes are what a bf16 run on a GPU produces (asserted below).

Narrow stand-ins, each for something Megatron needs under fake mode:

- ``testing.cpu.install_cuda_runtime_stand_ins(0)``: ``torch.cuda.current_device``, streams,
  events, ``synchronize`` (the CUDA runtime, which has no driver here); no device mapping.
- Megatron's allgather dispatcher and ``SequentialMLP`` read the tokens per expert on the host
  (Megatron's own syncs, which its design needs for the split sizes). Host reads issued from
  ``megatron/core`` are answered with a balanced routing (``T·K / E`` per expert, ``T·K`` in all);
  a read of a CPU tensor (no device sync; e.g. our statistics reading the counts Megatron already
  moved to the host) gets the same answers. Likewise the ops whose output shape is the routing
  (``masked_select``, ``nonzero``) get ``T·K`` rows when Megatron calls them. The alltoall dispatcher also reads a permutation on
  the host, which no such rule answers, so the trace uses the allgather one (the package's code
  does not depend on the dispatcher).
- Parameters Megatron leaves on the CPU until a model builder's ``.cuda()`` (the router's) are
  moved as fake CUDA tensors (``Module.cuda`` cannot swap fake parameters).
- The backward runs node by node from Python (``backward`` below): autograd's C++ engine asks
  the CUDA driver for the streams of CUDA tensors, fake ones included.

``python tests/fake_cuda_trace.py`` prints one ``PASS``/``FAIL`` line per case and exits 1 on any
failure; ``--breakages`` breaks the package on purpose in each way of ``BREAKAGES`` in turn (a
host sync, a CPU tensor, a dtype slip, a custom op without a fake kernel) and traces the paper
router's two modes under each: every one must FAIL, with the expected exception.
"""

import argparse
import sys
import traceback

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

S, B = 4, 2  # tokens T = S·B = 8
# name -> (TransformerConfig overrides, Default MoE modes to trace)
FAMILIES = {
    "paper": (dict(num_moe_experts=8, moe_router_topk=1, moe_router_pre_softmax=True), ("forward", "backward-only")),
    "mixtral": (dict(num_moe_experts=8, moe_router_topk=2, moe_router_pre_softmax=False), ("backward-only",)),
    "deepseek_v3": (
        dict(
            num_moe_experts=8,
            moe_router_topk=2,
            moe_router_pre_softmax=False,
            moe_router_score_function="sigmoid",
            moe_router_enable_expert_bias=True,
            moe_router_num_groups=4,
            moe_router_group_topk=2,
            moe_router_topk_scaling_factor=2.5,
        ),
        ("backward-only",),
    ),
    "sqrtsoftplus": (dict(num_moe_experts=8, moe_router_topk=2, moe_router_score_function="sqrtsoftplus",
                          moe_router_pre_softmax=False), ("backward-only",)),  # fmt: skip
    "mixtral_probes": (dict(num_moe_experts=8, moe_router_topk=2, moe_router_pre_softmax=False), ("backward-only",)),
}
FAMILIES["paper_fit"] = (FAMILIES["paper"][0], ("forward",))
FAMILIES["deepseek_v3_fit"] = (FAMILIES["deepseek_v3"][0], ("backward-only",))
# family -> --moe-default-probes (extra rows; a multiple of the experts: balanced)
PROBES = {"mixtral_probes": 8, "paper_fit": 8, "deepseek_v3_fit": 8}
FITS = {"paper_fit": "shared-1", "deepseek_v3_fit": "shared-1"}  # family -> --moe-default-fit


class FakeCuda(FakeTensorMode):
    """``FakeTensorMode`` that answers Megatron's own host reads (see the module docstring)."""

    def __init__(self, routed_rows: int):
        super().__init__(allow_non_fake_inputs=False)
        self.routed_rows = routed_rows

    def dispatch(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default):
            tensor = args[0]
            if tensor.device.type == "cuda" and not _called_from_megatron():
                return super().dispatch(func, types, args, kwargs)  # raises: a device sync of ours
            base = tensor._base
            return self.routed_rows // base.numel() if base is not None and base.dim() == 1 else self.routed_rows
        if func in self.ROUTED_SHAPE and _called_from_megatron():  # shaped by the routing: T·K rows
            source = args[0]
            shape = (self.routed_rows,) if func is torch.ops.aten.masked_select.default else (self.routed_rows, source.dim())
            dtype = source.dtype if func is torch.ops.aten.masked_select.default else torch.long
            return FakeTensor(self, torch.empty(shape, dtype=dtype, device="meta"), source.device)
        return super().dispatch(func, types, args, kwargs)

    ROUTED_SHAPE = (torch.ops.aten.masked_select.default, torch.ops.aten.nonzero.default)


def _called_from_megatron() -> bool:
    frame = sys._getframe(2)
    while frame is not None and ("/torch/" in frame.f_code.co_filename or __file__ == frame.f_code.co_filename):
        frame = frame.f_back
    return frame is not None and "megatron/core/" in frame.f_code.co_filename


def _params_to_fake_cuda(module):
    """What a model builder's ``.cuda()`` does, for the parameters and buffers still on the CPU."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None and param.device.type != "cuda":
                moved = torch.nn.Parameter(param.detach().to("cuda"), requires_grad=param.requires_grad)
                moved.__dict__.update({k: v for k, v in param.__dict__.items() if k not in moved.__dict__})
                sub._parameters[name] = moved
        for name, buf in list(sub._buffers.items()):
            if buf is not None and buf.device.type != "cuda":
                sub._buffers[name] = buf.to("cuda")


def backward(loss):
    """``loss.backward()`` without autograd's C++ engine, which asks the CUDA driver for streams
    of CUDA tensors (fake ones too: "hasPrimaryContext expects a valid device index"). Each node
    of the graph runs as the engine would run it (custom ``Function``s through their
    ``backward``), in dependency order; neither the package nor Megatron's MoE path registers
    tensor hooks, which this skips."""
    import collections

    root = loss.grad_fn
    pending, seen, stack = collections.Counter(), {root}, [root]
    while stack:
        for nxt, _ in stack.pop().next_functions:
            if nxt is not None:
                pending[nxt] += 1
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
    inbox, ready = {root: {0: torch.ones_like(loss)}}, [root]
    while ready:
        node = ready.pop()
        got = inbox.pop(node, {})
        grads = [got.get(i) for i in range(len(node._input_metadata))]
        outs = node.apply(*grads) if hasattr(node, "_forward_cls") else node(*grads)
        for (nxt, index), grad in zip(node.next_functions, outs if isinstance(outs, (tuple, list)) else (outs,)):
            if nxt is None:
                continue
            if grad is not None:
                box = inbox.setdefault(nxt, {})
                box[index] = grad if index not in box else box[index] + grad
            pending[nxt] -= 1
            if pending[nxt] == 0:
                ready.append(nxt)


def trace(family: str, mode: str, dtype=torch.bfloat16):
    """Two training steps (the second logged) of one layer on fake CUDA; asserts devices and dtypes."""
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from helpers import moe_config, moe_submodules

    from megatron_default_moe import DefaultMoEConfig, DefaultMoELayer

    overrides, _ = FAMILIES[family]
    config = moe_config(**overrides, params_dtype=dtype, bf16=dtype == torch.bfloat16, use_cpu_initialization=False,
                        perform_initialization=False, moe_token_dispatcher_type="allgather")  # fmt: skip
    probes = PROBES.get(family, 0)
    with FakeCuda(routed_rows=S * B * config.moe_router_topk + probes):
        dm_config = DefaultMoEConfig(mode=mode, probes=probes, fit=FITS.get(family, "constant"))
        layer = DefaultMoELayer(config, moe_submodules(config.num_moe_experts), dm_config=dm_config)
        _params_to_fake_cuda(layer)
        for step in range(2):
            layer.track_metrics = step == 1  # a logged step: the layer sets router.track_extra_grad
            x = torch.randn(S, B, config.hidden_size, device="cuda", dtype=dtype, requires_grad=True)
            y, _ = layer(x)
            assert y.device.type == "cuda" and y.dtype == dtype, f"output {y.dtype} on {y.device}"
            backward((y.float() * torch.randn_like(y, dtype=torch.float32)).sum())
            assert x.grad.device.type == "cuda" and x.grad.dtype == dtype, f"input grad {x.grad.dtype}"
        for name, param in layer.named_parameters():
            assert param.grad is not None, f"no grad for {name}"
            assert param.grad.device.type == "cuda" and param.grad.dtype == param.dtype, f"{name}: {param.grad.dtype}"
        for name in layer._fp32_tables():  # the vectors, and a fit's tables
            table = getattr(layer, name)
            assert table.device.type == "cuda" and table.dtype == torch.float32, f"{name}: {table.dtype} on {table.device}"
        ratio = layer.router.last_extra_grad_ratio
        assert ratio is not None and ratio.device.type == "cuda", "extra-gradient ratio not kept on the device"
        assert layer.last_term_norm_ratio.device.type == "cuda"


# -- deliberate breakages (``--breakages``): each must make the trace fail ----------------------
def _patch(module, name, value):
    """Set ``module.name`` to ``value``; returns the undo."""
    old = getattr(module, name)
    setattr(module, name, value)
    return lambda: setattr(module, name, old)


def _break_host_sync():
    """A ``float(...)`` of a CUDA value in the backward (what the logged step's ratio once was)."""
    from megatron_default_moe import router

    inner = router.DefaultTermInputs.logits_grad
    return _patch(router.DefaultTermInputs, "logits_grad", lambda self, g: (float(g.norm()), inner(self, g))[1])


def _break_cpu_tensor():
    """A CPU tensor added to the CUDA output in the default term."""
    from megatron_default_moe import functional

    inner = functional.add_default_term
    return _patch(functional, "add_default_term", lambda y, *a, **k: inner(y + torch.zeros(y.shape[-1]), *a, **k))


def _break_dtype():
    """The default term returned in fp32 (a bf16 output upcast)."""
    from megatron_default_moe import functional

    inner = functional.add_default_term
    return _patch(functional, "add_default_term", lambda *a, **k: inner(*a, **k).float())


def _break_no_fake_kernel():
    """The EMA as a custom op with no fake kernel."""
    from megatron_default_moe.ops import ema as fused

    op = torch.library.custom_op("default_moe_test::ema_no_fake", mutates_args=("defaults_EH", "skips_E"))
    return _patch(fused, "ema_update", op(fused.ema_update_reference))


# name -> (breakage, the exception type it must raise)
BREAKAGES = {
    "host_sync": (_break_host_sync, "DataDependentOutputException"),
    "cpu_tensor": (_break_cpu_tensor, "FakeTensorDeviceMismatchError"),
    "dtype": (_break_dtype, "AssertionError"),
    "no_fake_kernel": (_break_no_fake_kernel, "RuntimeError"),
}


def run_cases(cases, dtype) -> int:
    """Trace each ``(family, mode)``; one ``PASS``/``FAIL`` line each; the number that failed."""
    failed = 0
    for family, mode in cases:
        try:
            trace(family, mode, dtype)
            print(f"PASS {family} {mode}", flush=True)
        except Exception as err:  # the finding: report it by type
            failed += 1
            print(f"FAIL {family} {mode}: {type(err).__name__}: {str(err).splitlines()[0][:300]}", flush=True)
            traceback.print_exc(file=sys.stderr)
    return failed


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--breakages", action="store_true", help="break the package on purpose, once per way")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    args = parser.parse_args()
    import megatron.core  # noqa: F401  (before the stand-ins: nothing here maps cuda to cpu)
    from megatron.core import parallel_state

    from megatron_default_moe.testing import cpu

    cpu.install_cuda_runtime_stand_ins(current_device=0)
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    cases = [(family, mode) for family, (_, modes) in FAMILIES.items() for mode in modes]
    if not args.breakages:
        sys.exit(1 if run_cases(cases, dtype) else 0)
    missed = 0
    for name, (breakage, expected) in BREAKAGES.items():
        undo = breakage()
        print(f"-- broken: {name} (expect {expected})", flush=True)
        missed += 2 - run_cases(cases[:2], dtype)  # the paper router, both modes
        undo()
    sys.exit(1 if missed else 0)


if __name__ == "__main__":
    main()
