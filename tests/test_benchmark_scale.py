"""The alpha-beta model of the statistics all-reduce (examples/benchmark_scale.py), by hand."""

import json
import os

import helpers
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "benchmark_scale.py")


@pytest.fixture(scope="module")
def scale():
    return helpers.load_script(SCRIPT, "benchmark_scale")


@pytest.fixture(scope="module")
def nw(scale):
    return scale.net(scale.parse_args([]))  # 8 GPUs/node, NVLink 360 GB/s 1 µs, IB 45 GB/s 5 µs, 10 µs base


def test_ring_and_tree_by_hand(scale, nw):
    s = 1e6
    # one node, 8 ranks: 10 + 2*7*1 µs + 2*(7/8)*1e6/360e9 s
    assert scale.ring_s(s, 8, nw) == pytest.approx(10e-6 + 14e-6 + 1.75e6 / 360e9)
    assert scale.tree_s(s, 8, nw) == scale.ring_s(s, 8, nw)
    # 64 ranks = 8 nodes: ring 10 + 2*63*5 µs + 2*(63/64)*1e6/45e9; tree 10 + 2*(3*5 + 7*1) µs + 2e6/45e9
    assert scale.ring_s(s, 64, nw) == pytest.approx(10e-6 + 630e-6 + 2 * 63 / 64 * 1e6 / 45e9)
    assert scale.tree_s(s, 64, nw) == pytest.approx(10e-6 + 44e-6 + 2e6 / 45e9)
    assert scale.allreduce_s(s, 64, nw) == scale.tree_s(s, 64, nw)
    assert scale.ring_s(s, 1, nw) == 0.0


def test_messages_window_and_overlap(scale, nw):
    ds = scale.SHAPES["deepseek-v3"]
    assert scale.table_bytes(ds) == 256 * 7169 * 4 and scale.table_bytes(ds, count_column=False) == 256 * 7168 * 4
    paper = scale.SHAPES["paper-8c1"]  # EP = 8 inside a node: NVLink
    assert scale.combine_window_s(paper, 16384, nw) == pytest.approx(1e-6 + 16384 * 1024 * 2 * 7 / 8 / 360e9)
    assert scale.overlapped_s(50e-6, 80e-6, 1e6, False, nw) == 0.0
    assert scale.overlapped_s(100e-6, 80e-6, 1e6, False, nw) == pytest.approx(20e-6)
    assert scale.overlapped_s(100e-6, 80e-6, 9e6, True, nw) == pytest.approx(20e-6 + 2 * 9e6 / 45e9)


def test_modes_against_hand_numbers(scale, nw):
    args = scale.parse_args(["--gpus", "1024"])
    shape = dict(scale.SHAPES["paper-8c1"], layer_us=1000.0)
    (row,) = scale.model_shape("paper-8c1", shape, [1024], args, nw)["rows"]
    size = 8 * 1025 * 4
    tree = 10e-6 + 2 * (7 * 5e-6 + 7 * 1e-6) + 2 * size / 45e9  # 128 nodes: log2 = 7
    window = 1e-6 + 16384 * 1024 * 2 * 7 / 8 / 360e9
    assert row["tree_us"] == pytest.approx(tree * 1e6)
    assert row["microbatch_pct"] == pytest.approx(100 * max(0.0, tree - window) / 1e-3)
    step = (10e-6 + 2 * (7 * 5e-6 + 7e-6) + 2 * 24 * size / 45e9) / (24 * 8)
    assert row["step_pct"] == pytest.approx(100 * step / 1e-3)
    ep_ring = 10e-6 + 14e-6 + 2 * 7 / 8 * size / 360e9  # hidden behind the window
    assert ep_ring < window
    final = (10e-6 + 2 * (7 * 5e-6 + 7e-6) + 2 * 24 * 8 * 1024 * 4 / 45e9) / (24 * 8)
    assert row["hierarchical_pct"] == pytest.approx(100 * final / 1e-3)


def test_report(tmp_path, scale):
    cost = tmp_path / "cost.json"
    cost.write_text(json.dumps({"gpu": {"name": "H200 SXM"}, "shapes": [
        {"shape": "qwen3-30b-a3b", "topk": {"time_s": 0.005}}]}))  # fmt: skip
    out = tmp_path / "scale.json"
    report = scale.main(["--shapes", "qwen3-30b-a3b,paper-8c1", "--cost-json", str(cost), "--json", str(out)])
    assert json.loads(out.read_text())["shapes"][0]["layer_us"] == pytest.approx(5000.0)
    assert [r["gpus"] for r in report["shapes"][1]["rows"]] == list(scale.GPU_COUNTS)
    v = report["shapes"][1]["verdict"]
    assert {"text", "microbatch_ok_up_to", "microbatch_over_1pct_at_1024", "hierarchical_ok"} <= set(v)
