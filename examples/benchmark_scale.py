#!/usr/bin/env python
"""What the Default MoE statistics all-reduce costs at 64 to 16,384 GPUs: an alpha-beta model.

    python examples/benchmark_scale.py                       # the three shapes, stated defaults
    python examples/benchmark_scale.py --cost-json out/cost.json --micro-batches 16 --json out/scale.json

Per MoE layer and micro-batch, ``update=microbatch`` all-reduces an fp32 ``[E, H+1]`` table over
every rank of the pipeline stage (``tp_dp_cp``: GPUs / PP ranks). It is launched right after the
experts and waited for after the combine, so the layer's combine all-to-all is its overlap window.

Model (NCCL's algorithms, alpha-beta; ``S`` bytes, ``n`` ranks, ``g`` GPUs per node):

* ring, one node: ``2 (n-1) a_nvl + 2 (n-1)/n S / B_nvl``; across nodes every step waits for the
  slowest hop and the bandwidth is a GPU's NIC: ``2 (n-1) a_ib + 2 (n-1)/n S / B_ib``.
* tree (NCCL's double binary tree between nodes, a chain inside each): ``2 (ceil(log2 nodes) a_ib +
  (g-1) a_nvl) + 2 S / B_ib`` (reduce up, broadcast down, pipelined); one node: the ring.
* NCCL picks the faster; every collective also pays ``--base-us`` (launch and setup).
* Overlap window: the combine all-to-all, ``T K H 2 (EP-1)/EP / B + a`` (bf16 rows, NVLink when the
  EP group fits in a node, else IB). Exposed = ``max(0, all-reduce - window)``; when both cross
  the same links (EP spans nodes and the stage does too) the all-reduce's bandwidth time is added
  as contention, since it delays the all-to-all by that much.
* ``update=step``: one bucketed ``[L, E, H+1]`` all-reduce per optimizer step over the stage,
  nothing overlapped, spread over the ``L x micro-batches`` layer passes of the step.
* hierarchical (proposed): per micro-batch over the EP group only (the statistics of the EP group's
  tokens; overlapped like ``microbatch``), plus the full stage once per step (``[L, E, H]``, like
  ``step``) so the vectors are bit-identical on every rank at every step boundary.

Costs are given as % of the layer's forward + backward time (``--cost-json``: the TopK roofline
time from ``examples/benchmark_cost.py``; otherwise the H100 figures that script printed, below).
Not modelled: SM contention of NCCL kernels, NCCL's protocol switches (LL/LL128/Simple), PP > 1
shrinking the stage (``--pp``), network congestion.
"""

import argparse
import json
import math
import os

# Per shape: E, H, top-K, MoE layers of the model, EP, TopK layer time (µs, H100 roofline of
# benchmark_cost.py at 16,384 tokens, fwd+bwd, grouped experts; refreshed by --cost-json).
SHAPES = {
    "paper-8c1": dict(experts=8, hidden=1024, topk=1, layers=24, ep=8, layer_us=1535.4),
    "qwen3-30b-a3b": dict(experts=128, hidden=2048, topk=8, layers=48, ep=8, layer_us=9864.8),
    "deepseek-v3": dict(experts=256, hidden=7168, topk=8, layers=58, ep=64, layer_us=41000.0),
}
GPU_COUNTS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--gpus", default=",".join(map(str, GPU_COUNTS)))
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--pp", type=int, default=1, help="pipeline stages: the stage has GPUs / PP ranks")
    p.add_argument("--ep", type=int, default=None, help="expert-parallel size for every shape (default: 8, 8, 64)")
    p.add_argument("--micro-batches", type=int, default=8, help="micro-batches per optimizer step")
    p.add_argument("--tokens", type=int, default=16384, help="tokens per micro-batch per GPU")
    p.add_argument("--nvlink-gbps", type=float, default=360.0, help="NVLink bus bandwidth per GPU, GB/s")
    p.add_argument("--ib-gbps", type=float, default=45.0, help="IB bandwidth per GPU (one 400G NIC), GB/s")
    p.add_argument("--nvlink-us", type=float, default=1.0, help="latency per NVLink step, µs")
    p.add_argument("--ib-us", type=float, default=5.0, help="latency per IB hop, µs")
    p.add_argument("--base-us", type=float, default=10.0, help="launch + setup per collective, µs")
    p.add_argument("--cost-json", default=None, help="benchmark_cost.py --json output: its layer times")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def net(args):
    return dict(g=args.gpus_per_node, b_nvl=args.nvlink_gbps * 1e9, b_ib=args.ib_gbps * 1e9,
                a_nvl=args.nvlink_us * 1e-6, a_ib=args.ib_us * 1e-6, base=args.base_us * 1e-6)  # fmt: skip


def ring_s(size, n, nw):
    """NCCL ring all-reduce of ``size`` bytes over ``n`` ranks, seconds."""
    if n <= 1:
        return 0.0
    a, b = (nw["a_nvl"], nw["b_nvl"]) if n <= nw["g"] else (nw["a_ib"], nw["b_ib"])
    return nw["base"] + 2 * (n - 1) * a + 2 * (n - 1) / n * size / b


def tree_s(size, n, nw):
    """NCCL tree all-reduce (double binary tree across nodes, chain inside): seconds."""
    if n <= nw["g"]:
        return ring_s(size, n, nw)
    nodes = math.ceil(n / nw["g"])
    latency = 2 * (math.ceil(math.log2(nodes)) * nw["a_ib"] + (nw["g"] - 1) * nw["a_nvl"])
    return nw["base"] + latency + 2 * size / nw["b_ib"]


def allreduce_s(size, n, nw):
    """What NCCL would take: the faster of ring and tree."""
    return min(ring_s(size, n, nw), tree_s(size, n, nw))


def combine_window_s(shape, tokens, nw):
    """Forward combine all-to-all of the layer: bf16 ``[T K, H]`` rows, (EP-1)/EP leave the GPU."""
    ep = shape["ep"]
    if ep <= 1:
        return 0.0
    a, b = (nw["a_nvl"], nw["b_nvl"]) if ep <= nw["g"] else (nw["a_ib"], nw["b_ib"])
    return a + tokens * shape["topk"] * shape["hidden"] * 2 * (ep - 1) / ep / b


def table_bytes(shape, count_column=True):
    return shape["experts"] * (shape["hidden"] + int(count_column)) * 4


def overlapped_s(ar_s, window_s, size, shares_links, nw):
    """Exposed time of an all-reduce hidden behind a window; plus contention if they share links."""
    contention = 2 * size / nw["b_ib"] if shares_links else 0.0
    return max(0.0, ar_s - window_s) + contention


def model_shape(name, shape, gpus, args, nw):
    rows = []
    layer_s = shape["layer_us"] * 1e-6
    window = combine_window_s(shape, args.tokens, nw)
    size = table_bytes(shape)
    for n_gpus in gpus:
        n = max(1, n_gpus // args.pp)
        layers = max(1, shape["layers"] // args.pp)
        cross_node_ep = shape["ep"] > nw["g"]
        ring, tree = ring_s(size, n, nw), tree_s(size, n, nw)
        micro = overlapped_s(min(ring, tree), window, size, cross_node_ep and n > nw["g"], nw)
        step = allreduce_s(layers * size, n, nw) / (layers * args.micro_batches)
        ep_ar = allreduce_s(size, min(shape["ep"], n), nw)
        final = allreduce_s(layers * table_bytes(shape, count_column=False), n, nw) / (layers * args.micro_batches)
        hier = overlapped_s(ep_ar, window, size, cross_node_ep, nw) + final
        rows.append(dict(
            gpus=n_gpus, stage_ranks=n, ring_us=ring * 1e6, tree_us=tree * 1e6, window_us=window * 1e6,
            microbatch_pct=100 * micro / layer_s, step_pct=100 * step / layer_s,
            hierarchical_pct=100 * hier / layer_s,
        ))  # fmt: skip
    return dict(shape=name, **shape, table_bytes=size, window_us=window * 1e6, rows=rows,
                verdict=verdict(name, rows, shape["ep"] > nw["g"]))  # fmt: skip


def verdict(name, rows, ep_crosses_nodes):
    """When is each update mode the right default for this shape (the 1% line)."""
    ok = [r["gpus"] for r in rows if r["microbatch_pct"] <= 1.0]
    at_1024 = next((r for r in rows if r["gpus"] == 1024), None)
    first_bad = next((r["gpus"] for r in rows if r["microbatch_pct"] > 1.0), None)
    text = (f"{name}: microbatch stays <= 1% up to {max(ok) if ok else 'no'} GPUs"
            + (f" (exceeds it from {first_bad})" if first_bad else " (all counts modelled)"))
    if at_1024 is not None:
        text += (f"; at 1,024 GPUs microbatch {at_1024['microbatch_pct']:.2f}%, step {at_1024['step_pct']:.3f}%, "
                 f"hierarchical {at_1024['hierarchical_pct']:.3f}%")
    hier_ok = all(r["hierarchical_pct"] <= 1.0 for r in rows)
    text += "; hierarchical stays <= 1% at every count" if hier_ok else "; hierarchical exceeds 1% somewhere"
    if at_1024 is not None:
        better = at_1024["hierarchical_pct"] < at_1024["microbatch_pct"]
        why = "its EP group crosses nodes too" if ep_crosses_nodes else "microbatch is hidden behind the combine"
        text += " and beats microbatch at 1,024" if better else f", no better than microbatch at 1,024 ({why})"
    return dict(text=text, microbatch_ok_up_to=max(ok) if ok else None,
                microbatch_over_1pct_at_1024=bool(at_1024 and at_1024["microbatch_pct"] > 1.0),
                hierarchical_ok=hier_ok)  # fmt: skip


def load_layer_times(path, shapes):
    """TopK roofline layer times (µs) from a ``benchmark_cost.py --json`` report (its EP changes
    only the experts' weight traffic, compute-bound in their matmuls, so the EP here may differ)."""
    with open(path) as f:
        report = json.load(f)
    for r in report["shapes"]:
        if r["shape"] in shapes:
            shapes[r["shape"]] = dict(shapes[r["shape"]], layer_us=r["topk"]["time_s"] * 1e6)
    return report["gpu"]["name"]


def main(argv=None):
    args = parse_args(argv)
    nw = net(args)
    shapes = {k: dict(SHAPES[k], **({"ep": args.ep} if args.ep else {})) for k in args.shapes.split(",")}
    source = "stated H100 roofline estimates (benchmark_cost.py today)"
    if args.cost_json:
        source = f"{load_layer_times(args.cost_json, shapes)} roofline from {args.cost_json}"
    gpus = [int(g) for g in args.gpus.split(",")]
    print(f"alpha-beta model: NVLink {args.nvlink_gbps:.0f} GB/s, {args.nvlink_us} µs/step; IB {args.ib_gbps:.0f} GB/s "
          f"per GPU, {args.ib_us} µs/hop; {args.base_us} µs per collective; {args.gpus_per_node} GPUs/node; "
          f"PP={args.pp}; {args.micro_batches} micro-batches/step; {args.tokens} tokens/micro-batch/GPU; "
          f"layer time: {source}")
    results = []
    for name, shape in shapes.items():
        r = model_shape(name, shape, gpus, args, nw)
        results.append(r)
        print(f"\n== {name}: E={shape['experts']} H={shape['hidden']} top-{shape['topk']}, {shape['layers']} MoE layers, "
              f"EP={shape['ep']}; table {r['table_bytes'] / 2**20:.3f} MiB; combine window {r['window_us']:.0f} µs; "
              f"layer fwd+bwd {shape['layer_us']:.0f} µs")
        print(f"   {'GPUs':>6} {'ring µs':>10} {'tree µs':>9} | {'microbatch':>10} {'step':>8} {'hierarch.':>9}  "
              f"(% of layer time)")
        for row in r["rows"]:
            print(f"   {row['gpus']:>6} {row['ring_us']:>10.1f} {row['tree_us']:>9.1f} | {row['microbatch_pct']:>9.3f}% "
                  f"{row['step_pct']:>7.3f}% {row['hierarchical_pct']:>8.3f}%")
        print(f"   {r['verdict']['text']}")
    report = dict(args=vars(args), layer_time_source=source, shapes=results)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
