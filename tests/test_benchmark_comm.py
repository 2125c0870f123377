"""``examples/benchmark_comm.py``: its byte counts by hand, its table, and a tiny torchrun run."""

import os
import re

import helpers
import pytest
from helpers import run_isolated, torchrun

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "benchmark_comm.py")


def load_script():
    return helpers.load_script(SCRIPT, "benchmark_comm")


def test_bytes_per_step_by_update_mode():
    bench = load_script()
    args = bench.parse_args(
        ["--hidden", "1024", "--experts", "8", "--topk", "2", "--tokens-per-rank", "4096", "--ep", "4",
         "--stage-ranks", "8", "--layers", "3", "--micro-batches", "5", "--dtype-bytes", "2"]
    )  # fmt: skip
    a2a, microbatch, step = bench.comm_rows(args)
    (_, _, a2a_calls, a2a_call, a2a_sent), (_, _, mb_calls, mb_call, mb_sent) = a2a, microbatch
    _, _, st_calls, st_call, st_sent = step
    # dispatch + combine, forward + backward, per layer per micro-batch; 3/4 of the rows leave the rank
    assert (a2a_calls, a2a_call) == (4 * 3 * 5, 4096 * 2 * 1024 * 2)
    assert a2a_sent == pytest.approx(a2a_calls * a2a_call * 3 / 4)
    # microbatch: one fp32 [E, H+1] per layer per micro-batch; step: one [L, E, H+1] bucket
    assert (mb_calls, mb_call) == (3 * 5, 8 * 1025 * 4)
    assert (st_calls, st_call) == (1, 3 * 8 * 1025 * 4)
    assert mb_sent == pytest.approx(15 * 8 * 1025 * 4 * 2 * 7 / 8)  # ring all-reduce over 8 ranks
    assert st_sent == pytest.approx(mb_sent / 5)


def test_analytic_table_without_torchrun(monkeypatch, capsys):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    load_script().main(["--hidden", "4096", "--experts", "64", "--topk", "8", "--ep", "8", "--layers", "32"])
    out = capsys.readouterr().out
    rows = {line[:28].strip(): line.split() for line in out.splitlines()[2:]}
    assert set(rows) == {"EP all-to-all (TopK)", "Default, update=microbatch", "Default, update=step"}
    assert rows["EP all-to-all (TopK)"][-1] == "100.00%"
    assert float(rows["Default, update=microbatch"][-1].rstrip("%")) < 1.0  # < 1% of the a2a bytes
    assert "Measured" not in out


@pytest.mark.distributed
def test_measured_ratio_under_torchrun():
    out = run_isolated(
        torchrun(2, SCRIPT, "--hidden", "16", "--experts", "4", "--topk", "2", "--tokens-per-rank", "32",
                 "--ep", "2", "--layers", "2", "--micro-batches", "2", "--iters", "2", "--warmup", "1"),
        timeout_s=300,
    )  # fmt: skip
    ratios = re.findall(r"^Default, update=\w+ +[\d.]+ +([\d.]+)$", out, flags=re.MULTILINE)
    assert len(ratios) == 2 and all(float(r) > 0 for r in ratios), out
