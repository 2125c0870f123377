"""What every launcher builds on: a ``Launch`` (kernel, grid, arguments, constexprs), running a
list of them, and the layout rule for buffers a kernel writes in place (``LayoutError``)."""

import os
from typing import NamedTuple

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"  # its bf16 tl.dot is wrong (``kernels.ema._dot``)


class LayoutError(ValueError):
    """An in-place buffer not laid out as the kernel writes it."""


class Launch(NamedTuple):
    kernel: object
    grid: tuple
    args: tuple
    constexprs: dict


def run(launches):
    for k in launches:
        k.kernel[k.grid](*k.args, **k.constexprs)


def in_place(name, t):
    if not t.is_contiguous():
        raise LayoutError(f"Default MoE: {name} is written in place by a Triton kernel and must be contiguous, "
                          f"got shape {tuple(t.shape)} strides {t.stride()}")  # fmt: skip
    return t
