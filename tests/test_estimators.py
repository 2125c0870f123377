"""The estimator interface (``estimators/base.py``): the layer reaches its estimator only through
it, in the documented order per pass, so a new estimator is one subclass. A recording wrapper
around each shipped estimator, and a new one (the routed rows' EMA with every expert's default
halved in the term), run through a real ``DefaultMoELayer``."""

import pytest
import torch
from helpers import moe_config, moe_submodules
from test_probes import ROUTERS

from megatron_default_moe import DefaultMoEConfig, DefaultMoELayer, update_default_vectors
from megatron_default_moe.estimators.base import Estimator
from megatron_default_moe.estimators.probes import ProbeMean
from megatron_default_moe.estimators.routed_rows import RoutedRowEMA
from megatron_default_moe.estimators.shared_fit import SharedLineFit

pytestmark = pytest.mark.usefixtures("megatron_cpu")

METHODS = ("see_input", "route", "take_stats", "stats_shape", "apply", "frozen", "term_args", "loaded")


class Recording:
    """Forwards every interface call to ``inner`` and records its name."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []
        self.probes, self.fit = inner.probes, inner.fit

    def __getattr__(self, name):
        method = getattr(self.inner, name)
        if name not in METHODS:
            return method

        def record(*args, **kwargs):
            self.calls.append(name)
            return method(*args, **kwargs)

        return record


def layer_of(router, dm):
    config = moe_config(**ROUTERS[router])
    torch.manual_seed(0)
    layer = DefaultMoELayer(config, moe_submodules(config.num_moe_experts), dm_config=dm)
    layer.set_layer_number(1)
    return layer


def train_pass(layer, seed):
    torch.manual_seed(seed)
    x = torch.randn(6, 2, 16, requires_grad=True)
    out, _ = layer(x)
    out.backward(torch.randn_like(out))
    return out


@pytest.mark.parametrize("router, dm, kind", [
    ("paper", DefaultMoEConfig(beta=0.5), RoutedRowEMA),
    ("mixtral", DefaultMoEConfig(beta=0.5, fit="constant"), ProbeMean),
    ("mixtral", DefaultMoEConfig(beta=0.5), SharedLineFit),
    ("deepseek_v3", DefaultMoEConfig(beta=0.5, update="step"), SharedLineFit),
])  # fmt: skip
def test_the_layer_calls_its_estimator_in_the_documented_order(router, dm, kind):
    layer = layer_of(router, dm)
    assert type(layer.estimator) is kind and isinstance(layer.estimator, Estimator)
    layer.estimator = recording = Recording(layer.estimator)
    train_pass(layer, 1)
    if dm.update == "microbatch":
        assert recording.calls == ["see_input", "route", "take_stats", "apply", "term_args"]
    else:  # statistics accumulate; the term uses the frozen state until the step's update
        assert recording.calls == ["see_input", "route", "take_stats", "frozen", "term_args"]
        recording.calls.clear()
        update_default_vectors(layer)
        assert recording.calls == ["apply"] and layer.default_vectors.abs().sum() > 0
    recording.calls.clear()
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(6, 2, 16))
    assert recording.calls == ["see_input", "frozen", "term_args"]  # evaluation: nothing taken or moved
    recording.calls.clear()
    layer.load_state_dict(layer.state_dict())
    assert recording.calls == ["loaded"]


class HalvedRoutedRows(RoutedRowEMA):
    """A new estimator in a few lines: the paper's statistics, half the default in the term."""

    def term_args(self, snapshot):
        return snapshot * 0.5, {}


def test_a_new_estimator_is_one_subclass():
    """Its term reaches the output: the forward-mode term is linear in the table, so the new
    estimator's output moves from the stock one by half of what the paper's estimator adds."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    paper, halved = layer_of("paper", DefaultMoEConfig(beta=0.5)), layer_of("paper", DefaultMoEConfig(beta=0.5))
    halved.estimator = HalvedRoutedRows("uniform", 1)
    torch.manual_seed(0)
    stock = MoELayer(paper.config, moe_submodules(paper.config.num_moe_experts))
    stock.load_state_dict(paper.state_dict(), strict=False)
    out_stock, out_paper, out_halved = (train_pass(layer, 3) for layer in (stock, paper, halved))
    assert torch.equal(paper.default_vectors, halved.default_vectors) and paper.default_vectors.abs().sum() > 0
    added = out_paper - out_stock
    assert added.abs().max() > 1e-5
    torch.testing.assert_close(out_halved - out_stock, 0.5 * added, atol=1e-8, rtol=1e-3)
