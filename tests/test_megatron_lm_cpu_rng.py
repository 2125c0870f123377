"""``testing.cpu.enable()`` covers Megatron's default RNG tracker: ``model_parallel_cuda_manual_seed(seed)``
as Megatron's own tests and users' scripts call it (no ``inference_rng_tracker=True``).

Runs in a fresh process: the tracker and the CUDA RNG names are process-wide, and the rest of the
suite keeps the inference tracker that ``init_parallel`` installs.
"""

import subprocess
import sys

SCRIPT = r"""
import torch
from megatron_default_moe.testing import cpu

cpu.enable()
torch.distributed.init_process_group("gloo", rank=0, world_size=1, init_method="tcp://127.0.0.1:0")
from megatron.core import parallel_state, tensor_parallel
from megatron.core.tensor_parallel import random

parallel_state.initialize_model_parallel()
tensor_parallel.model_parallel_cuda_manual_seed(123)
tracker = tensor_parallel.get_cuda_rng_tracker()
assert type(tracker) is random.CudaRNGStatesTracker, type(tracker)  # Megatron's default, not a no-op
assert set(tracker.get_states()) >= {"model-parallel-rng", "expert-parallel-rng", "data-parallel-rng"}

def draws():
    torch.manual_seed(7)
    outside = torch.rand(3)
    with tracker.fork():
        first = torch.nn.functional.dropout(torch.ones(8), 0.5)
    with tracker.fork():
        second = torch.nn.functional.dropout(torch.ones(8), 0.5)
    return outside, first, second, torch.rand(3)

tensor_parallel.model_parallel_cuda_manual_seed(123)
a = draws()
tensor_parallel.model_parallel_cuda_manual_seed(123)
b = draws()
assert all(torch.equal(x, y) for x, y in zip(a, b))  # reseeding reproduces every stream
assert not torch.equal(a[1], a[2])  # the forked stream advances
torch.manual_seed(7)
reference = torch.rand(3), torch.rand(3)
assert torch.equal(a[0], reference[0]) and torch.equal(a[3], reference[1])  # forks leave it alone

# Activation recompute replays the forked dropout: checkpointed grads equal plain ones.
def f(x):
    with tracker.fork():
        return torch.nn.functional.dropout(x * 3, 0.5)
def grad_of(run):
    x = torch.ones(64, requires_grad=True)
    run(x).sum().backward()
    return x.grad
state = {k: v.clone() for k, v in tracker.get_states().items()}
plain = grad_of(f)
tracker.set_states(state)
recomputed = grad_of(lambda x: tensor_parallel.checkpoint(f, False, x))
assert torch.equal(plain, recomputed) and 0 < int((plain == 0).sum()) < 64, (plain, recomputed)
print("RNG_OK")
"""


def test_default_rng_tracker_works_on_cpu_after_enable():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "RNG_OK" in result.stdout, result.stdout[-2000:] + result.stderr[-3000:]
    assert "CPU RNG state changed within GPU RNG context" not in result.stderr  # moot on CPU
