"""The router family's defaults (``config.probed_by_default``): with ``--moe-default-probes`` and
``--moe-default-fit`` unset, renormalised and sigmoid routers run probes (``auto``) and the
``shared-1`` fit in ``backward-only`` mode, the paper's pre-softmax router the paper's EMA of the
routed rows in ``forward`` mode; explicit settings win, and the default yields (logged, no error)
where probes cannot run or the routed statistics are shaped."""

import argparse
import logging

import pytest
from helpers import moe_config, moe_submodules
from test_probes import ROUTERS

from megatron_default_moe import DefaultMoEConfig, DefaultMoELayer
from megatron_default_moe.megatron_lm.arguments import add_default_moe_args, default_moe_config_from_args

pytestmark = pytest.mark.usefixtures("megatron_cpu")


def layer_of(router, dm=None, **overrides):
    config = moe_config(**ROUTERS[router], **overrides)
    return DefaultMoELayer(config, moe_submodules(config.num_moe_experts), dm_config=dm or DefaultMoEConfig())


@pytest.mark.parametrize("router, family", [("deepseek_v3", "sigmoid"), ("mixtral", "renormalised softmax")])
def test_renormalised_and_sigmoid_routers_default_to_probes_and_the_fit(router, family, caplog):
    from megatron_default_moe.estimators.shared_fit import SharedLineFit

    with caplog.at_level(logging.INFO, logger="megatron_default_moe.estimators.probes"):
        layer = layer_of(router)
    experts = layer.config.num_moe_experts
    assert layer.probes is not None and layer.probes.budget == 8 * experts
    assert isinstance(layer.estimator, SharedLineFit) and layer.fit is layer.estimator
    assert layer.mode == "backward-only"
    assert f"--moe-default-probes unset, auto for {family} routers -> {8 * experts}" in caplog.text


def test_the_papers_router_keeps_the_papers_method():
    from megatron_default_moe.estimators.routed_rows import RoutedRowEMA

    layer = layer_of("paper")
    assert layer.probes is None and layer.fit is None and layer.mode == "forward"
    assert isinstance(layer.estimator, RoutedRowEMA)
    budget, why = DefaultMoEConfig().resolved_probes(moe_config(**ROUTERS["paper"]))
    assert budget == 0 and why == "off: the paper's router (softmax with --moe-router-pre-softmax) keeps its routed-row EMA"


def test_explicit_settings_win_over_the_family_default():
    assert layer_of("deepseek_v3", DefaultMoEConfig(probes=0)).probes is None
    layer = layer_of("deepseek_v3", DefaultMoEConfig(fit="constant"))
    assert layer.probes is not None and layer.fit is None
    layer = layer_of("deepseek_v3", DefaultMoEConfig(probes=5))
    assert layer.probes.budget == 5 and layer.fit is not None  # the sigmoid router's fit, at any budget
    assert layer_of("mixtral", DefaultMoEConfig(probes=0)).probes is None  # the routed-row EMA: one flag away
    layer = layer_of("mixtral", DefaultMoEConfig(fit="constant"))
    assert layer.probes is not None and layer.fit is None  # probes' mean, constant default
    layer = layer_of("paper", DefaultMoEConfig(probes="auto"))
    assert layer.probes is not None and layer.fit is None  # the paper's router: probes as asked, constant fit
    with pytest.raises(ValueError, match="--moe-default-fit shared-1 needs probes, but --moe-default-probes 0"):
        layer_of("paper", DefaultMoEConfig(fit="shared-1"))  # the paper's router: probes off unless asked


def test_the_default_yields_where_probes_cannot_run_or_the_routed_statistics_are_shaped():
    for router in ("deepseek_v3", "mixtral"):
        capped = layer_of(router, moe_expert_capacity_factor=1.0)  # no error: the default steps aside
        assert capped.probes is None and capped.fit is None, router
    every_expert = {**ROUTERS["deepseek_v3"], "moe_router_topk": 16, "moe_router_num_groups": None,
                    "moe_router_group_topk": None}  # fmt: skip
    budget, why = DefaultMoEConfig().resolved_probes(moe_config(**every_expert))
    assert budget == 0 and "--moe-router-topk=16 with --num-experts=16" in why  # K = N: no unchosen pair
    for router in ("deepseek_v3", "mixtral"):
        for dm in (DefaultMoEConfig(stats_stride=4), DefaultMoEConfig(ema_weighting="router")):
            layer = layer_of(router, dm)
            assert layer.probes is None and layer.fit is None, (router, dm)
    with pytest.raises(ValueError, match="--moe-expert-capacity-factor"):  # asked for: rejected by name
        layer_of("deepseek_v3", DefaultMoEConfig(probes=8), moe_expert_capacity_factor=1.0)
    with pytest.raises(ValueError, match="--moe-expert-capacity-factor"):
        DefaultMoEConfig(probes=8).validate(moe_config(**ROUTERS["deepseek_v3"], moe_expert_capacity_factor=1.0))
    with pytest.raises(ValueError, match="--moe-router-topk=16 with --num-experts=16: every expert is selected"):
        DefaultMoEConfig(probes=8).validate(moe_config(**every_expert))


def test_flags_leave_the_family_default_unset():
    parser = add_default_moe_args(argparse.ArgumentParser(allow_abbrev=False))
    dm = default_moe_config_from_args(parser.parse_args(["--moe-default-vectors"]))
    assert dm.probes is None and dm.fit is None
    dm = default_moe_config_from_args(parser.parse_args(["--moe-default-vectors", "--moe-default-probes", "0",
                                                         "--moe-default-fit", "constant"]))  # fmt: skip
    assert dm.probes == 0 and dm.fit == "constant"
