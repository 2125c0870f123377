"""Reliability: a Default MoE checkpoint saved at EP=2 loads at EP=4, under a TP change and at EP=1.

``reliability/ckpt_worker.py`` does the work under ``torchrun`` (4 ranks, gloo, CPU) in one launch.
"""

import os
import signal
import socket
import subprocess
import sys

import pytest

WORKER = os.path.join(os.path.dirname(__file__), "reliability", "ckpt_worker.py")
LOAD_LAYOUTS = ["ep4", "tp2sp-ep2-etp2", "tp2sp", "ep1"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.distributed
def test_checkpoint_reshards_across_layouts(tmp_path):
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4",
        "--master-port", str(_free_port()), WORKER, str(tmp_path),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=400)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers
        out, _ = proc.communicate()
        pytest.fail(f"timed out\n{out[-6000:]}")
    assert proc.returncode == 0, out[-6000:]
    assert "saved ep2" in out
    for layout in LOAD_LAYOUTS:
        assert f"ok {layout}\n" in out, out[-6000:]
    assert f"PASSED: saved under ep2, loaded under {len(LOAD_LAYOUTS)} layouts" in out
