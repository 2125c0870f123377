"""Artefacts saved by release 0.2 keep loading (``tests/fixtures/v0_2``, made with 0.2 before the
package's modules moved into folders): torch_dist checkpoints of a sigmoid router with probes and
the ``shared-1`` fit and of the paper's router, and the ``GPTModelConfig`` builder paths that
``megatron.training`` configs name. The Bridge ``run_config.yaml`` of 0.2: ``test_bridge.py``.
"""

import importlib
import os
import sys

import pytest
import torch
from reliability.gpt import build_gpt, gpt_config

pytestmark = pytest.mark.usefixtures("megatron_cpu")

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "v0_2")
TABLES = ("default_vectors", "sample_counter", "default_fit", "default_direction")


def _load(name, config, dm_config):
    from megatron.core import dist_checkpointing

    from megatron_default_moe import default_moe_layers

    model = build_gpt(config, dm_config, seed=1)  # other weights: the load must bring them
    sharded = model.sharded_state_dict()
    model.load_state_dict(dist_checkpointing.load(sharded, os.path.join(FIXTURES, name)))
    return default_moe_layers(model), torch.load(os.path.join(FIXTURES, name + ".tables.pt"))


def test_sigmoid_probes_shared1_checkpoint_of_0_2_loads_bit_exact():
    from megatron_default_moe import DefaultMoEConfig

    config = gpt_config(moe_router_score_function="sigmoid", moe_router_topk=2)
    layers, saved = _load("gpt_sigmoid_shared1", config, DefaultMoEConfig(probes="auto", fit="shared-1"))
    assert len(layers) == 2 and all(layer.fit is not None for layer in layers)
    for i, layer in enumerate(layers):
        for name in TABLES:
            assert torch.equal(getattr(layer, name), saved[f"{i}.{name}"]), (i, name)
        assert bool(layer.default_vectors.abs().sum() > 0)


def test_paper_router_checkpoint_of_0_2_loads_bit_exact():
    from megatron_default_moe import DefaultMoEConfig

    layers, saved = _load("gpt_paper", gpt_config(), DefaultMoEConfig())
    for i, layer in enumerate(layers):
        assert torch.equal(layer.default_vectors, saved[f"{i}.default_vectors"]) and bool(layer.default_vectors.any())


@pytest.mark.parametrize("module", ["megatron_default_moe.model_config", "megatron_default_moe.arguments"])
def test_gpt_model_config_builder_paths_of_0_1_and_0_2_resolve(module):
    """``GPTModelConfig.get_builder_cls`` imports ``builder.rsplit(".", 1)[0]`` and takes the class."""
    from megatron_default_moe.megatron_lm.model_config import DefaultMoEGPTModelBuilder

    builder = getattr(importlib.import_module(module), "DefaultMoEGPTModelBuilder")
    assert builder is DefaultMoEGPTModelBuilder


def test_every_0_2_module_path_imports_as_its_new_module():
    import warnings

    from megatron_default_moe.moved import MOVED

    for old, new in MOVED.items():
        first_import = f"megatron_default_moe.{old}" not in sys.modules  # a cached module warns no more
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module = importlib.import_module(f"megatron_default_moe.{old}")
        assert module is importlib.import_module(f"megatron_default_moe.{new}"), old
        said = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
        assert not first_import or f"megatron_default_moe.{old} moved to megatron_default_moe.{new}" in said[0], old
