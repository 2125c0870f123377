"""Default MoE traced on fake CUDA tensors, bf16, without a GPU (``tests/fake_cuda_trace.py``).

The CPU shim maps ``cuda`` to the CPU for the whole test session, which hides device mistakes;
this trace runs in its own process without it, on ``FakeTensor``s placed on ``cuda:0``. For each
router family (paper: softmax pre-softmax top-1, both modes; Mixtral-like; DeepSeek-V3-like;
sqrt-softplus; Mixtral-like with probes; paper and DeepSeek-V3-like with the ``shared-1`` fit) a ``DefaultMoELayer``'s forward and backward run twice, the second time as a
logged step (``track_metrics``: the router measures its extra gradient). It fails on a CPU tensor
mixed with CUDA ones, a host read of a CUDA value (a device sync) in the package's code, a custom
op without a fake kernel, and an output or gradient not in the parameters' dtype. The second test
breaks the package in each of those ways on purpose and requires the trace to fail each time.
"""

import os
import re
import sys

from helpers import run_isolated

TRACE = os.path.join(os.path.dirname(__file__), "fake_cuda_trace.py")
CASES = ["paper forward", "paper backward-only", "mixtral backward-only", "deepseek_v3 backward-only",
         "sqrtsoftplus backward-only", "mixtral_probes backward-only", "paper_fit forward",
         "deepseek_v3_fit backward-only"]  # fmt: skip


def _no_shim_env():
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = ""  # fake CUDA only, even on a GPU machine
    return env


def test_layer_traces_on_fake_cuda_in_bf16():
    out = run_isolated([sys.executable, TRACE], timeout_s=300, env=_no_shim_env(), stderr_to_stdout=False)
    assert re.findall(r"^PASS (\S+ \S+)$", out, flags=re.MULTILINE) == CASES, out[-4000:]


def test_each_deliberate_breakage_fails_the_trace():
    out = run_isolated([sys.executable, TRACE, "--breakages"], timeout_s=300, env=_no_shim_env(),
                       stderr_to_stdout=False)  # fmt: skip
    sections = re.split(r"^-- broken: ", out, flags=re.MULTILINE)[1:]
    caught = {}
    for section in sections:
        name, expected = re.match(r"(\S+) \(expect (\S+)\)", section).groups()
        fails = re.findall(r"^FAIL (\S+ \S+): (\w+):", section, flags=re.MULTILINE)
        caught[name] = fails == [("paper forward", expected), ("paper backward-only", expected)]
    assert caught == {"host_sync": True, "cpu_tensor": True, "dtype": True, "no_fake_kernel": True}, out[-4000:]
