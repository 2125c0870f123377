"""Default-vector statistics (a pure function of the model), writers, and GPU telemetry."""

import math
import sys
import types

import pytest
import torch
from helpers import build_layers, moe_config

from megatron_default_moe import DefaultMoEConfig, gpu_telemetry, metrics

pytestmark = pytest.mark.usefixtures("megatron_cpu")


def layer_with(vectors_EH, layer_number=None, **dm):
    _, layer = build_layers(moe_config(num_moe_experts=vectors_EH.shape[0], hidden_size=vectors_EH.shape[1]),
                            DefaultMoEConfig(**dm))
    layer.default_vectors.copy_(vectors_EH)
    if layer_number is not None:
        layer.set_layer_number(layer_number)
    return layer


def test_layer_stats_by_hand():
    vectors = torch.zeros(4, 16)
    vectors[0, 0] = 3.0  # e0
    vectors[1, 1] = 4.0  # e1 ⟂ e0
    vectors[2, :2] = 1.0  # 45° to both
    # expert 3 never updated: zero, left out of the cosine
    layer = layer_with(vectors)
    layer.experts_updated = torch.tensor([True, True, False, True])
    layer.nonfinite_skips += torch.tensor([0, 2, 0, 1])
    stats = metrics.layer_stats(layer)
    assert stats["vector_norm"] == pytest.approx((3 + 4 + math.sqrt(2) + 0) / 4)
    assert stats["pairwise_cosine"] == pytest.approx((0 + 2 * math.sqrt(0.5)) / 3)
    assert stats["experts_updated"] == 3
    assert stats["nonfinite_skips"] == 3
    assert "term_norm_ratio" not in stats  # no tracked forward yet


def test_cosine_of_fewer_than_two_vectors_is_zero():
    assert metrics._mean_pairwise_cosine(torch.zeros(4, 8)) == 0.0
    assert metrics._mean_pairwise_cosine(torch.eye(4, 8)[:1]) == 0.0
    same = torch.ones(3, 8)
    assert metrics._mean_pairwise_cosine(same) == pytest.approx(1.0)


def test_term_norm_ratio_from_a_tracked_forward():
    """‖default term‖ / ‖MoE output‖, checked against a stock TopK layer with the same weights."""
    stock, layer = build_layers(moe_config(), DefaultMoEConfig())
    torch.manual_seed(0)
    layer.default_vectors.copy_(0.01 * torch.randn(4, 16))
    layer.track_metrics = True
    stock.eval(), layer.eval()  # frozen vectors
    x = torch.randn(8, 2, 16)
    with torch.no_grad():
        topk, _ = stock(x)
        out, _ = layer(x)
    expected = (out - topk).norm() / topk.norm()
    assert metrics.layer_stats(layer)["term_norm_ratio"] == pytest.approx(float(expected), rel=1e-4)


def test_stats_keys_use_global_layer_numbers_and_means():
    a = layer_with(torch.ones(4, 16), layer_number=2)
    b = layer_with(2 * torch.ones(4, 16), layer_number=5)
    model = torch.nn.ModuleList([a, b])
    stats = metrics.default_moe_stats(model)
    assert stats["default_moe/vector_norm/layer_2"] == pytest.approx(4.0)
    assert stats["default_moe/vector_norm/layer_5"] == pytest.approx(8.0)
    assert stats["default_moe/vector_norm/mean"] == pytest.approx(6.0)
    assert stats["default_moe/pairwise_cosine/mean"] == pytest.approx(1.0)
    assert metrics.default_moe_stats([model]) == stats  # a list of model chunks
    assert metrics.default_moe_stats(torch.nn.Linear(2, 2)) == {}


def test_log_writes_through_both_writers_at_the_interval():
    layer = layer_with(torch.ones(4, 16), layer_number=1)
    model = torch.nn.ModuleList([layer])
    tb, wandb = [], []

    class TB:
        def add_scalar(self, name, value, step):
            tb.append((name, value, step))

    class WandB:
        def log(self, values, step):
            wandb.append((dict(values), step))

    config = types.SimpleNamespace(finalize_model_grads_func=lambda chunks, *a, **k: None)
    steps = iter(range(1, 7))
    metrics.install_training_hooks(model, log_interval=3, config=config, writers=lambda: (TB(), WandB()),
                                   iteration=lambda: next(steps))
    metrics.install_training_hooks(model, log_interval=3, config=config)  # idempotent
    tracked = []
    for _ in range(6):
        config.finalize_model_grads_func([model])
        tracked.append(layer.track_metrics)
    assert sorted({step for _, _, step in tb}) == [3, 6]
    assert [step for _, step in wandb] == [3, 6]
    assert ("default_moe/vector_norm/layer_1", pytest.approx(4.0), 3) in tb
    assert tracked == [False, True, False, False, True, False]  # on just before each logged step


def test_no_gpu_no_telemetry():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert gpu_telemetry.gpu_telemetry() == {}


def test_telemetry_through_nvml(monkeypatch):
    """A stand-in ``pynvml``: readings converted; an unsupported reading is left out."""

    class NVMLError(Exception):
        pass

    fake = types.ModuleType("pynvml")
    fake.nvmlInit = lambda: None
    fake.nvmlDeviceGetHandleByIndex = lambda index: ("handle", index)
    fake.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=87, memory=41)
    fake.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=3 * 2**30, total=80 * 2**30)
    fake.nvmlDeviceGetPowerUsage = lambda h: 412_500  # mW
    fake.nvmlDeviceGetEnforcedPowerLimit = lambda h: (_ for _ in ()).throw(NVMLError("not supported"))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setitem(gpu_telemetry._NVML, "ready", None)
    out = gpu_telemetry.gpu_telemetry(device=0)
    assert out == {
        "gpu/utilization_percent": 87.0,
        "gpu/memory_bandwidth_utilization_percent": 41.0,
        "gpu/memory_used_gib": 3.0,
        "gpu/memory_total_gib": 80.0,
        "gpu/power_w": 412.5,
    }


def test_telemetry_silent_without_driver_or_package(monkeypatch):
    fake = types.ModuleType("pynvml")

    def no_driver():
        raise RuntimeError("NVML Shared Library Not Found")

    fake.nvmlInit = no_driver
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setitem(gpu_telemetry._NVML, "ready", None)
    assert gpu_telemetry.gpu_telemetry(device=0) == {}
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    monkeypatch.setitem(gpu_telemetry._NVML, "ready", None)
    assert gpu_telemetry.gpu_telemetry(device=0) == {}


GATHER_WORKER = r"""
import torch
from megatron_default_moe.analysis.metrics import flatten_stats, gather_over_pipeline

torch.distributed.init_process_group("gloo")
rank = torch.distributed.get_rank()
mine = {rank + 1: {"vector_norm": float(10 * (rank + 1))}}  # stage r holds layer r + 1
merged = gather_over_pipeline(mine, group=torch.distributed.group.WORLD)
assert merged == {1: {"vector_norm": 10.0}, 2: {"vector_norm": 20.0}}, merged
assert flatten_stats(merged)["default_moe/vector_norm/mean"] == 15.0
print("GATHER-OK", rank)
"""


@pytest.mark.distributed
def test_pipeline_stages_are_gathered_for_the_logging_rank(tmp_path):
    """Megatron's writers live on the last rank: the stats of every stage must reach it."""
    import subprocess

    worker = tmp_path / "gather_worker.py"
    worker.write_text(GATHER_WORKER)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", str(worker)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.stdout.count("GATHER-OK") == 2, result.stdout[-2000:] + result.stderr[-2000:]
