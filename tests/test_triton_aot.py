"""Every Triton kernel compiled to a cubin for sm_80, sm_90 and sm_100 on this CPU machine
(``triton.compile`` of an ``ASTSource`` for a ``GPUTarget``: TTIR, TTGIR, LLVM IR, PTX, ptxas), so
a kernel that cannot compile for a GPU fails here, without one.

The launches are built by the launchers' own functions (``triton_launch.LAUNCHES``) from small CPU
tensors, and each launch's signature (``*bf16``, ``i32``, ``fp32``, ...), constexprs and alignment
attributes come from Triton's own binder, the code ``kernel[grid](...)`` runs before it compiles:
what is compiled here is what the launchers launch.

Cases, for each of sm_80, sm_90 and sm_100: the full cross product of every constexpr combination
(``UNIFORM``, ``COUNT_ROWS``, ``SCORE`` 0/1/2, ``RENORM``, ``ALL``, ``HAS_BASE``, ``HAS_S``, ``X_DOT``)
with every dtype (bf16, fp16, fp32) of the expert output / the probs / the router logits / the
written weights / the snapshot, and ``TABLE`` (``IEEE``) with every dtype of the term's ``dL/dy``; the other inputs' dtypes (probs or routing map beside the logits, ``BLOCK_L``) and the
integer specialisations (1, multiples of 16, others) take turns over the cases. Identical
specialisations compile once: 1341 (447 per architecture), in two worker processes (before
``HAS_S``, 666 of them took 62 s wall, 70 s of CPU in the workers, on an otherwise idle 2-core
machine).
"""

import concurrent.futures
import functools
import itertools
import multiprocessing
import os

import pytest
import torch

triton = pytest.importorskip("triton")

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SCORE_FUNCTIONS = ("softmax", "sigmoid", "sqrtsoftplus")
NORMALISERS = ((False, False), (True, False), (True, True), (False, True))  # (RENORM, ALL)


def _expert_stats(out_dtype, p_dtype, uniform, count_rows, turn):
    local, stride, offset, hidden = ((1, 1, 0, 1024), (16, 3, 1, 1000), (200, 2, 0, 64))[turn % 3]
    rows = 64 * stride + offset
    counts = torch.full((local,), 64 // local + 1)
    out = torch.zeros(rows, hidden, dtype=out_dtype)[offset::stride]
    return (out, torch.ones(rows, dtype=p_dtype), counts, offset, stride, 1, local + 3, uniform, count_rows)


def _ema(snapshot_dtype, turn):
    hidden = (1024, 1000)[turn % 2]
    return (torch.zeros(8, hidden), torch.zeros(8, hidden + 1), 0.9, torch.zeros(8, dtype=torch.long), snapshot_dtype)


def _chosen(logits, turn):
    """What the router hands the op as ``probs_TE``: the routing map, fp32 probs, probs in the logits' dtype."""
    return (torch.zeros(logits.shape, dtype=torch.bool), torch.zeros(logits.shape), torch.zeros_like(logits))[turn % 3]


def _weights(logits_dtype, out_dtype, score, renorm_all, turn):
    logits = torch.zeros(16, (8, 128, 160)[turn % 3], dtype=logits_dtype)
    sel = torch.zeros(logits.shape, dtype=torch.bool)
    out = None if out_dtype == torch.float32 and turn % 2 else out_dtype
    return (logits, _chosen(logits, turn), sel, score, *renorm_all, 2.5, 1e-20, out)


def _weights_backward(logits_dtype, score, renorm_all, has_base, line, turn, dy_dtype=None):
    """``line``: None, ``s`` (``HAS_S``: s given) or ``x`` (``X_DOT``: s = x·d formed in the kernel);
    with ``dy_dtype`` (``TABLE``) the grad is the term's ``dL/dy`` in that dtype and a table is
    given (``[E, H]`` without a line, ``[2E, H]`` with one)."""
    logits = torch.zeros(16, (8, 128, 160)[turn % 3], dtype=logits_dtype)
    sel = torch.zeros(logits.shape, dtype=torch.bool)
    base = torch.zeros_like(logits) if has_base else None
    grad = torch.zeros(16, 2 * logits.shape[1]) if line else torch.zeros(logits.shape)
    hidden = (2048, 1000)[turn % 2]
    table = None
    if dy_dtype is not None:
        grad = torch.zeros(16, hidden, dtype=dy_dtype)
        table = torch.zeros((2 if line else 1) * logits.shape[1], hidden, dtype=dy_dtype)
    s = torch.zeros(16, 1) if line == "s" else None
    xd = (torch.zeros(16, hidden, dtype=dy_dtype or DTYPES[turn % 3]),) if line == "x" else ()
    xd += (torch.zeros(hidden, dtype=xd[0].dtype),) if xd else ()
    xd += (None,) * (2 - len(xd)) + (table,) if table is not None else ()
    return (grad, logits, _chosen(logits, turn), sel, score, *renorm_all, 1.0, 0.0, base, s, *xd)


def _probe_draw(weights_dtype, weighted, turn):
    tokens, experts = ((64, 8), (300, 128), (40, 160))[turn % 3]
    weights = torch.zeros(tokens, experts, dtype=weights_dtype if weighted else torch.bool)  # uniform: blocked pairs
    seed = (3, 2**63 - 1, 2**40 + 17)[turn % 3]  # one compiled kernel whatever the seed's size
    strata = torch.zeros(min(tokens, 37), 4, dtype=torch.int64)  # (id, base, lo, hi)
    m, stride = ((1, 1), (8, 4), (2, 1))[turn % 3]  # one compiled kernel whatever the stratum's size
    return (weights, torch.zeros(tokens, experts, dtype=torch.bool), strata, m, stride, seed, weighted)


def _probe_add(probs_dtype, weighted, turn):
    draw = _probe_draw(probs_dtype, weighted, turn)
    tokens, experts = draw[0].shape
    return (torch.zeros(tokens, experts, dtype=probs_dtype), draw[1], *draw[:1], *draw[2:])


def _probe_exclude(out_dtype, count_rows, line, turn):
    local, hidden = ((1, 1024), (16, 1000), (128, 2048))[turn % 3]
    out = torch.zeros(64, hidden, dtype=out_dtype)
    rows = torch.zeros(24, dtype=torch.long)
    extra = (torch.zeros(24), torch.zeros(64, hidden, dtype=out_dtype)) if line else ()  # shared-1: s_B, in_RH
    return (out, rows, torch.zeros(24), torch.ones(local, dtype=torch.long), 0, local + 8, count_rows, *extra)


def _probe_coordinates(in_dtype, turn):
    hidden = (1024, 1000, 2048)[turn % 3]
    x = torch.zeros(64, hidden, dtype=in_dtype)
    return (x, torch.zeros(24, dtype=torch.long), torch.zeros(24), torch.zeros(hidden, dtype=in_dtype))


def _fit_update(table_dtype, turn):
    experts, hidden = ((8, 1024), (128, 1000), (1, 2048))[turn % 3]
    zeros = torch.zeros
    return (zeros(experts, hidden), zeros(experts, 2 * hidden + 3), zeros(hidden), zeros(hidden),
            zeros(experts + 1, 2 * hidden + 3), 0.9, 0.99, zeros(experts, dtype=torch.long), table_dtype)  # fmt: skip


def _probe_zero(x_dtype, turn):
    hidden = (1024, 1000, 2048)[turn % 3]
    return (torch.zeros(64, hidden, dtype=x_dtype), torch.zeros(24, dtype=torch.long), torch.zeros(24))


def full_cases():
    """``(op, args)``: every constexpr combination with every dtype (see the module docstring)."""
    cases = []
    for turn, (o, p, u, c) in enumerate(itertools.product(DTYPES, DTYPES, (True, False), (True, False))):
        cases.append(("expert_stats", _expert_stats(o, p, u, c, turn)))
    cases += [("ema_update", _ema(d, turn)) for turn, d in enumerate(DTYPES)]
    for turn, (z, w, s, n) in enumerate(itertools.product(DTYPES, DTYPES, SCORE_FUNCTIONS, NORMALISERS)):
        cases.append(("default_weights", _weights(z, w, s, n, turn)))
    flags = (True, False)
    lines = (None, "s", "x")
    for turn, (z, s, n, b, c) in enumerate(itertools.product(DTYPES, SCORE_FUNCTIONS, NORMALISERS, flags, lines)):
        cases.append(("default_weights_backward", _weights_backward(z, s, n, b, c, turn)))
    for turn, (y, s, b, c) in enumerate(itertools.product(DTYPES, SCORE_FUNCTIONS, flags, lines)):  # TABLE
        z, n = DTYPES[turn % 3], NORMALISERS[turn % 4]
        cases.append(("default_weights_backward", _weights_backward(z, s, n, b, c, turn, dy_dtype=y)))
    for turn, (w, weighted) in enumerate(itertools.product(DTYPES, (True, False))):
        cases.append(("probe_draw", _probe_draw(w, weighted, turn)))
        cases.append(("probe_add", _probe_add(w, weighted, turn)))
    for turn, (o, c, line) in enumerate(itertools.product(DTYPES, (True, False), (False, True))):
        cases.append(("probe_exclude", _probe_exclude(o, c, line, turn)))
    cases += [("fit_update", _fit_update(d, turn)) for turn, d in enumerate(DTYPES)]
    cases += [("probe_zero", _probe_zero(d, turn)) for turn, d in enumerate(DTYPES)]
    cases += [("probe_coordinates", _probe_coordinates(d, turn)) for turn, d in enumerate(DTYPES)]
    return cases


@functools.cache
def _binder(fn, capability):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", capability, 32))
    return backend, create_function_from_signature(fn.signature, fn.params, backend)


def specialisation(launch, capability):
    """The kernel's signature, constexprs and attributes as Triton's launcher derives them for ``launch``."""
    fn = launch.kernel
    backend, binder = _binder(fn, capability)
    bound, spec, options = binder(*launch.args, **launch.constexprs)
    options, signature, constexprs, attrs = fn._pack_args(backend, launch.constexprs, bound, spec, options)
    constexprs = {k: v for k, v in constexprs.items() if k != "num_warps"}  # a launch option, kept in attrs' stead
    key = repr((fn.__name__, sorted(signature.items()), sorted(constexprs.items()), sorted(attrs.items()),
                options.num_warps))  # fmt: skip
    return key, fn, signature, constexprs, (attrs, options.num_warps)


KERNEL_FILES = ("ema.py", "probes.py", "fit.py")  # in megatron_default_moe/ops/kernels/


@functools.cache
def _kernels_module(filename):
    """One kernels file alone (it imports only Triton): a worker need not import Megatron."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "megatron_default_moe", "ops",
                        "kernels", filename)
    spec = importlib.util.spec_from_file_location("default_moe_kernels_" + filename[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def _kernel_file(name):
    """The kernels file defining ``name``."""
    return next(f for f in KERNEL_FILES if hasattr(_kernels_module(f), name))


def compile_one(job):
    """Compile one specialisation (in a worker process); returns the cubin's size and CPU seconds."""
    import time

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name, signature, constexprs, (attrs, num_warps), capability = job
    start = time.process_time()
    kernel = triton.compile(ASTSource(getattr(_kernels_module(_kernel_file(name)), name), signature, constexprs, attrs),
                            target=GPUTarget("cuda", capability, 32), options=dict(num_warps=num_warps))  # fmt: skip
    return len(kernel.asm["cubin"]), time.process_time() - start


def jobs_for(cases, capability):
    from megatron_default_moe.ops.launch import LAUNCHES

    jobs, kernels = {}, set()
    for op, args in cases:
        _, launches = LAUNCHES[op](*args)
        assert launches, op
        for launch in launches:
            key, fn, signature, constexprs, attrs = specialisation(launch, capability)
            jobs[key + str(capability)] = (fn.__name__, signature, constexprs, attrs, capability)
            kernels.add(fn.__name__)
    return list(jobs.values()), kernels


def test_every_kernel_compiles_for_sm80_sm90_sm100(tmp_path, monkeypatch):
    from megatron_default_moe.ops.kernels import fit as KF
    from megatron_default_moe.ops.kernels import ema as K
    from megatron_default_moe.ops.kernels import probes as KP

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # compile, never reuse a cached cubin
    jobs, kernels = jobs_for(full_cases(), 90)
    assert kernels == {n for m in (K, KP, KF) for n, v in vars(m).items() if isinstance(v, triton.runtime.jit.JITFunction)
                       and n.endswith("_kernel")}, kernels  # fmt: skip
    for capability in (80, 100):
        more, seen = jobs_for(full_cases(), capability)
        assert seen == kernels, (capability, seen)
        jobs += more
    workers = min(2, os.cpu_count() or 1)
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(compile_one, jobs))
    for job, (size, _) in zip(jobs, results):
        assert size > 0, job
    by_arch = {c: sum(1 for j in jobs if j[-1] == c) for c in (80, 90, 100)}
    print(f"compiled {len(jobs)} specialisations {by_arch}: {sum(t for _, t in results):.0f} CPU s in the workers")
