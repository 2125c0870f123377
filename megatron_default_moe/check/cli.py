"""``python -m megatron_default_moe.check``: the command line, the layout loop and the report."""

import argparse
import importlib.util
import sys
import time

import torch

from megatron_default_moe.check import runtime, verdict
from megatron_default_moe.check.model import DISPATCHERS, LAYOUTS, ROUTERS, UPDATES, Setup, fits
from megatron_default_moe.check.runs import check_layout, log
from megatron_default_moe.check.train import run_reference


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m megatron_default_moe.check",
        description="Default MoE under every parallel layout that fits the world size, against a "
        "one-rank run over the same global batch (run it with torchrun).",
    )
    specs = list(LAYOUTS) + [f"{name}:{router}" for name in LAYOUTS for router in ROUTERS]
    parser.add_argument("--layouts", nargs="+", choices=specs, metavar="LAYOUT[:ROUTER]",
                        help=f"layouts to run (default: every one that fits); names: {', '.join(LAYOUTS)}")
    parser.add_argument("--routers", nargs="+", choices=list(ROUTERS), default=list(ROUTERS),
                        help="router families for a LAYOUT given without one (default: all)")
    parser.add_argument("--dispatchers", nargs="+", choices=DISPATCHERS, default=list(DISPATCHERS))
    parser.add_argument("--updates", nargs="+", choices=UPDATES, default=list(UPDATES))
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                        help="params and activations; bf16 is judged against the stock baseline at every "
                        "step (see docs/check.md)")
    parser.add_argument("--no-baseline", dest="baseline", action="store_false",
                        help="skip the stock baseline (Megatron's MoELayer against its own one-rank run); "
                        "every dtype is then judged by the tolerance alone")
    parser.add_argument("--experts", choices=("auto", "te", "sequential"), default="auto",
                        help="TE grouped GEMM experts (auto: on CUDA when transformer_engine imports) "
                        "or Megatron's SequentialMLP")
    parser.add_argument("--routed-rows", action="store_true",
                        help="also run each with the routed-row EMA (--moe-default-probes 0) where the router "
                        "family's default is probes and shared-1 (renormalised and sigmoid routers)")
    parser.add_argument("--probes", action="store_true", help=argparse.SUPPRESS)  # the earlier opt-in: now the default
    parser.add_argument("--tolerance", type=float, help="relative tolerance, also added to the baseline's "
                        "bound (default: fp32 1e-5 on CPU, 1e-4 on CUDA; bf16 3e-2)")
    parser.add_argument("--list", action="store_true", help="print the layouts that fit and exit")
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)  # the parent's global batch
    parser.add_argument("--save-reference", metavar="PATH", help=argparse.SUPPRESS)  # the child's job
    return parser.parse_args(argv)  # fmt: skip


def make_setup(args, world_size) -> Setup:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    te = args.experts == "te" or (
        args.experts == "auto" and device == "cuda" and importlib.util.find_spec("transformer_engine") is not None
    )
    if te and device != "cuda":
        raise SystemExit("--experts te needs CUDA")
    batch = args.batch or world_size * -(-4 // world_size)  # divisible by any data-parallel size
    return Setup(device=device, dtype=dtype, te=te, batch=batch)


def selected(args, world_size, batch) -> list[tuple[str, str]]:
    """``(layout, router)`` pairs to run; by default every layout that fits (one per distinct
    set of sizes), each with every router of ``--routers``."""
    if args.layouts:
        names = args.layouts
    else:
        names, seen = [], []
        for name, sizes in LAYOUTS.items():
            if fits(sizes, world_size, batch) and sizes not in seen:
                names.append(name)
                seen.append(sizes)
    pairs = []
    for spec in names:
        name, _, router = spec.partition(":")
        if not fits(LAYOUTS[name], world_size, batch):
            raise SystemExit(f"layout {name} {LAYOUTS[name]} does not fit {world_size} ranks")
        pairs += [(name, router)] if router else [(name, r) for r in args.routers]
    return pairs


def save_reference(args, setup):
    runtime.init_world(setup)
    runtime.init_layout(setup, {})
    start = time.time()
    torch.save(run_reference(setup, args.routers, args.updates, args.baseline, args.routed_rows), args.save_reference)
    runtime.destroy_layout()
    torch.distributed.destroy_process_group()
    print(f"one-rank reference ({', '.join(args.routers)}) in {time.time() - start:.1f}s", flush=True)


def main(argv=None):
    args = parse_args(argv)
    if args.probes and not args.save_reference:
        print("note: --probes is the default now (each router family runs the package's defaults: probes and "
              "shared-1 for renormalised and sigmoid routers); --routed-rows adds the routed-row EMA", flush=True)
    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # ranks share the CPU cores
    rank, world_size = runtime.world()
    setup = make_setup(args, world_size)
    if args.save_reference:
        return save_reference(args, setup)
    pairs = selected(args, world_size, setup.batch)
    if args.list:
        return print("\n".join(f"{n}:{r} {LAYOUTS[n]}" for n, r in pairs)) if rank == 0 else None
    routers = sorted({r for _, r in pairs}, key=list(ROUTERS).index)
    experts = "te" if setup.te else "sequential"
    data = runtime.compute_reference(setup, routers, args.updates, experts, args.baseline, args.routed_rows)  # rank 0
    runtime.init_world(setup)
    ref = runtime.broadcast_reference(setup, data)
    tolerance = args.tolerance or verdict.TOLERANCE[setup.device, setup.dtype]
    log(f"Default MoE check: {world_size} ranks, {setup.device}, {str(setup.dtype).split('.')[-1]}, "
        f"experts {experts}, global batch {setup.batch}, {len(pairs)} layout/router pairs, "
        + (f"against the stock baseline (factor {verdict.FACTOR:g}, tolerance {tolerance:.0e})" if args.baseline
           else f"no baseline (tolerance {tolerance:.0e})"))  # fmt: skip
    rows, failures = [], []
    for name, router in pairs:
        layout_rows, layout_failures = check_layout(setup, ref, name, router, args, tolerance)
        rows, failures = rows + layout_rows, failures + layout_failures
    for msg in failures[:8]:
        print("FAILED", msg, flush=True)
    log(verdict.table(rows))
    ok = all(row[4] for row in rows)
    log(f"{'PASSED' if ok else 'FAILED'}: {len(pairs)} layout/router pairs, {len(rows)} runs, on {world_size} ranks")
    torch.distributed.destroy_process_group()
    sys.exit(0 if ok else 1)
