"""Reliability: a job killed between the micro-batches of a step (``update="step"``) and resumed from
its last checkpoint counts nothing twice.

A subprocess trains step 1 in full (``MICRO_BATCHES`` micro-batches, one ``update_default_vectors``),
saves a torch_dist checkpoint (and the optimizer), runs micro-batch 1 of step 2 (its statistics
accumulated, its counter moved) and SIGKILLs itself. This process loads the checkpoint into a fresh
model and runs steps 2 and 3 in full: losses, every fp32 table, the parameters and the micro-batch
counter (``sample_counter``) equal an uninterrupted 3-step run bit for bit. Both the routed rows'
default (paper router) and the renormalised router's default (probes ``auto`` + ``shared-1``, whose
draws are seeded by that counter) are covered.
"""

import os
import signal
import subprocess
import sys

import pytest
import torch
from reliability.gpt import build_gpt, gpt_config, micro_batch, micro_batch_loss, train

pytestmark = pytest.mark.usefixtures("megatron_cpu")

MICRO_BATCHES = 3
TESTS = os.path.dirname(os.path.abspath(__file__))
ROUTERS = {"paper": {}, "renormalised": dict(moe_router_pre_softmax=False)}


def _fresh(router, seed):
    from megatron_default_moe import DefaultMoEConfig

    model = build_gpt(gpt_config(**ROUTERS[router]), DefaultMoEConfig(update="step"), seed=seed)
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def _layers(model):
    from megatron_default_moe import default_moe_layers

    return default_moe_layers(model)


def _saved_counters(model):
    return [int(v) for k, v in model.state_dict().items() if k.endswith("sample_counter")]


def _killed_run(router, directory, threads):
    """The subprocess: step 1, checkpoint, micro-batch 1 of step 2, SIGKILL."""
    from megatron.core import dist_checkpointing

    from megatron_default_moe.testing import cpu

    torch.set_num_threads(threads)
    cpu.init_parallel(seed=1234)
    model, optim = _fresh(router, seed=0)
    losses = train(model, optim, steps=1, micro_batches=MICRO_BATCHES)
    os.mkdir(os.path.join(directory, "ckpt"))
    dist_checkpointing.save(model.sharded_state_dict(), os.path.join(directory, "ckpt"))
    torch.save({"optim": optim.state_dict(), "losses": losses}, os.path.join(directory, "host.pt"))

    optim.zero_grad()
    (micro_batch_loss(model, micro_batch(1000 * 1 + 0)) / MICRO_BATCHES).backward()
    counted = [layer._stats_updates for layer in _layers(model)]
    pending = [layer._step_stats_EH1 is not None for layer in _layers(model)]
    print(f"in flight: counted {counted} pending {pending}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.parametrize("router", list(ROUTERS))
def test_killed_mid_step_resume_counts_nothing_twice(router, tmp_path):
    """Killed after micro-batch 1 of step 2, resumed from step 1's checkpoint == 3 steps straight."""
    from megatron.core import dist_checkpointing

    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}  # fmt: skip
    env.update(PYTHONWARNINGS="ignore", PYTHONPATH=os.pathsep.join([TESTS, env.get("PYTHONPATH", "")]))
    code = (f"import test_reliability_interrupted_step as t; "
            f"t._killed_run({router!r}, {str(tmp_path)!r}, {torch.get_num_threads()})")  # fmt: skip
    out = tmp_path / "child.log"
    with open(out, "w") as log:  # a file, not a pipe: the checkpoint writer's helper outlives the kill
        child = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=TESTS, stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        try:
            child.wait(timeout=120)
        finally:  # as a scheduler would: the job's whole process group goes
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    stdout = out.read_text()
    assert child.returncode == -signal.SIGKILL, stdout[-6000:]
    # The killed micro-batch really ran: counted and accumulated, never applied or saved.
    assert f"in flight: counted {[MICRO_BATCHES + 1] * 2} pending [True, True]" in stdout, stdout[-3000:]

    reference, ref_optim = _fresh(router, seed=0)
    ref_losses = train(reference, ref_optim, steps=3, micro_batches=MICRO_BATCHES)

    resumed, optim = _fresh(router, seed=1)
    resumed.load_state_dict(dist_checkpointing.load(resumed.sharded_state_dict(), str(tmp_path / "ckpt")))
    host = torch.load(tmp_path / "host.pt")
    optim.load_state_dict(host["optim"])
    assert [layer._stats_updates for layer in _layers(resumed)] == [MICRO_BATCHES] * 2  # step 1 only
    losses = host["losses"] + train(resumed, optim, steps=2, first_step=1, micro_batches=MICRO_BATCHES)

    assert torch.equal(torch.stack(losses), torch.stack(ref_losses))
    for got, want in zip(_layers(resumed), _layers(reference)):
        assert (got.fit is not None) == (router == "renormalised")  # probes auto + shared-1 there
        assert got._fp32_tables() == want._fp32_tables()
        for name in got._fp32_tables():
            assert torch.equal(getattr(got, name), getattr(want, name)), name
        assert got._stats_updates == want._stats_updates == 3 * MICRO_BATCHES
    assert _saved_counters(resumed) == _saved_counters(reference) == [3 * MICRO_BATCHES] * 2
    params = dict(reference.named_parameters())
    for name, param in resumed.named_parameters():
        assert torch.equal(param, params[name]), name
