"""The fused ops on CUDA: each op's Triton kernel, with its torch reference as the fallback.

A kernel that fails to compile or launch on this GPU (an unsupported architecture, a Triton or
driver bug) must not stop training: the op then runs its reference, the same math in several
torch kernels, and says so once, naming the op and the error. ``DEFAULT_MOE_TRITON=0`` in the
environment makes every op take its reference on CUDA (A/B runs, debugging); it is read per call.
"""

import os
import warnings

ENV = "DEFAULT_MOE_TRITON"
FAILED = {}  # op name -> the error that made it fall back, for the rest of the process


def triton_enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "off", "no")


def guarded(name: str, kernel, reference, passthrough=()):
    """``kernel`` unless disabled or failed once, else ``reference``. ``passthrough`` errors
    (the caller's fault, e.g. a non-contiguous in-place buffer) are raised, not hidden."""

    def run(*args, **kwargs):
        if name not in FAILED and triton_enabled():
            try:
                return kernel(*args, **kwargs)
            except passthrough:
                raise
            except Exception as err:  # compile or launch failure: nothing was written yet
                FAILED[name] = err
                warnings.warn(f"Default MoE: the Triton kernel of {name} failed ({type(err).__name__}: {err}); "
                              f"{name} runs its torch reference from now on", RuntimeWarning, stacklevel=2)  # fmt: skip
        return reference(*args, **kwargs)

    run.__name__ = f"{name}_cuda"
    return run


def register(ops: dict, device: str = "cuda") -> bool:
    """Register ``{name: (custom op, reference)}`` for ``device``: the guarded Triton kernels. False
    (the references run, said once) where Triton is not importable."""
    try:
        from megatron_default_moe.ops import launch as triton_launch
    except ImportError as err:
        warnings.warn(f"Default MoE: Triton is not importable ({err}); the fused ops run as several torch kernels",
                      RuntimeWarning, stacklevel=2)  # fmt: skip
        return False
    for name, (op, reference) in ops.items():
        kernel = triton_launch.launcher(name)
        op.register_kernel(device)(guarded(name, kernel, reference, (triton_launch.LayoutError,)))
    return True
