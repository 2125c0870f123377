"""Reliability: Default MoE in Megatron distributed checkpoints (torch_dist, one rank).

The resharding checks (EP=2 -> EP=4, a TP change) run under torchrun in
``test_reliability_checkpoint_multirank.py``.
"""

import logging

import pytest
import torch
from reliability.gpt import build_gpt, causal_mask, gpt_config, micro_batch, train

pytestmark = pytest.mark.usefixtures("megatron_cpu")

CHECKPOINT_LOGGER = "megatron_default_moe.checkpoint"
TABLE_KEY = "decoder.layers.mlp.default_vectors"  # Megatron's key: layer axis prepended


def _tables(model):
    from megatron_default_moe import default_moe_layers

    return [layer.default_vectors for layer in default_moe_layers(model)]


def _randomize_tables(model, seed):
    gen = torch.Generator().manual_seed(seed)
    for table in _tables(model):
        table.copy_(torch.randn(table.shape, generator=gen))


def _assert_same_parameters(a, b):
    params_b = dict(b.named_parameters())
    for name, param in a.named_parameters():
        assert torch.equal(param, params_b[name]), name


def _checkpoint_records(caplog):
    return [r for r in caplog.records if r.name == CHECKPOINT_LOGGER]


def _eval_logits(model):
    tokens, positions, _ = micro_batch(999)
    model.eval()
    with torch.no_grad():
        logits = model(tokens, positions, causal_mask())
    model.train()
    return logits


def _save(model, path):
    from megatron.core import dist_checkpointing

    path.mkdir()
    dist_checkpointing.save(model.sharded_state_dict(), str(path))
    return path


def _load(model, path, **kwargs):
    from megatron.core import dist_checkpointing

    return model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), str(path), **kwargs))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A Default MoE GPT trained 2 steps (non-zero tables) and its torch_dist checkpoint."""
    model = build_gpt(gpt_config(), seed=0)
    train(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=2)
    return model, _save(model, tmp_path_factory.mktemp("trained") / "ckpt")


def test_sharded_state_dict_exports_the_fp32_table_replicated():
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    model = build_gpt(gpt_config())
    sharded = model.sharded_state_dict()
    for index, table in enumerate(_tables(model)):
        entry = sharded[f"decoder.layers.{index}.mlp.default_vectors"]
        assert isinstance(entry, ShardedTensor)
        assert entry.key == TABLE_KEY
        assert entry.dtype == torch.float32 and entry.data.dtype == torch.float32
        assert entry.data is table  # the live buffer, not a copy
        assert entry.global_shape == (2, 4, 16) and entry.global_offset == (index, 0, 0)
        assert entry.local_shape == (4, 16)  # whole [E, H] table on every rank: replicated
        assert entry.replica_id == (0, 0, 0)  # this (only) rank is the main replica
    assert not any("nonfinite_skips" in key for key in sharded)  # a counter, not state


def test_round_trip_restores_tables_and_weights_bit_exact(trained, tmp_path):
    from megatron_default_moe.checkpoint import drop_absent_default_vectors

    source, ckpt = trained
    assert all(table.abs().sum() > 0 for table in _tables(source))
    target = build_gpt(gpt_config(), seed=1)
    _randomize_tables(target, seed=5)
    sharded = drop_absent_default_vectors(target.sharded_state_dict(), ckpt)
    assert sum(key.endswith("default_vectors") for key in sharded) == 2  # present: kept
    from megatron.core import dist_checkpointing

    target.load_state_dict(dist_checkpointing.load(sharded, str(ckpt)))
    for loaded, saved in zip(_tables(target), _tables(source)):
        assert loaded.dtype == torch.float32 and torch.equal(loaded, saved)
    _assert_same_parameters(target, source)
    assert torch.equal(_eval_logits(target), _eval_logits(source))


RENORMALISED = dict(moe_router_pre_softmax=False)  # Mixtral / Qwen3 routing: the family default probes


@pytest.mark.parametrize("update, fit, router", [
    ("microbatch", "constant", {}), ("step", "constant", {}), ("microbatch", "shared-1", {}),
    ("microbatch", None, RENORMALISED), ("step", None, RENORMALISED),
])  # fmt: skip
def test_resume_is_bit_exact(tmp_path, update, fit, router):
    """2 steps, save, load into a fresh model, 2 steps == 4 steps uninterrupted (``shared-1``: with
    probes, its tables and direction through ``dist_checkpointing`` too; ``None``: a renormalised
    router's default, probes ``auto`` and ``shared-1``, in both update modes)."""
    from megatron_default_moe import DefaultMoEConfig
    from megatron_default_moe.update import default_moe_layers

    def fresh(seed):
        probes = None if fit is None else (4 if fit != "constant" else 0)
        dm = DefaultMoEConfig(update=update, fit=fit, probes=probes)
        model = build_gpt(gpt_config(**router), dm, seed=seed)
        return model, torch.optim.Adam(model.parameters(), lr=1e-2)

    reference, ref_optim = fresh(0)
    ref_losses = train(reference, ref_optim, steps=4)

    first, optim = fresh(0)
    losses = train(first, optim, steps=2)
    ckpt = _save(first, tmp_path / "ckpt")
    torch.save(optim.state_dict(), tmp_path / "optim.pt")

    resumed, optim = fresh(1)
    _load(resumed, ckpt)
    optim.load_state_dict(torch.load(tmp_path / "optim.pt"))
    losses += train(resumed, optim, steps=2, first_step=2)

    assert torch.equal(torch.stack(losses), torch.stack(ref_losses))
    for got, want in zip(_tables(resumed), _tables(reference)):
        assert torch.equal(got, want)
    for got, want in zip(default_moe_layers(resumed), default_moe_layers(reference)):
        for name in got._fp32_tables():
            assert torch.equal(getattr(got, name), getattr(want, name)), name
        assert (fit != "constant") == ("default_fit" in got._fp32_tables())
        assert (got.probes is not None) == (fit != "constant")
    _assert_same_parameters(resumed, reference)
    assert torch.equal(_eval_logits(resumed), _eval_logits(reference))


@pytest.fixture(scope="module")
def topk_checkpoint(tmp_path_factory):
    """A stock TopK GPT (same architecture) and its torch_dist checkpoint."""
    model = build_gpt(gpt_config(), seed=3, default_moe=False)
    return model, _save(model, tmp_path_factory.mktemp("topk") / "ckpt")


def test_module_load_of_a_topk_state_dict_fills_zeros_and_logs_once(topk_checkpoint, caplog):
    topk, _ = topk_checkpoint
    model = build_gpt(gpt_config(), seed=1)
    _randomize_tables(model, seed=2)
    with caplog.at_level(logging.INFO, logger=CHECKPOINT_LOGGER):
        result = model.load_state_dict(topk.state_dict())  # strict, Megatron's default
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert all(torch.equal(table, torch.zeros(4, 16)) for table in _tables(model))
    _assert_same_parameters(model, topk)
    [record] = _checkpoint_records(caplog)  # one line for both layers
    assert record.levelno == logging.WARNING
    assert "no default vectors" in record.getMessage() and "zeros" in record.getMessage()

    caplog.clear()
    with caplog.at_level(logging.INFO, logger=CHECKPOINT_LOGGER):
        model.load_state_dict(topk.state_dict(), strict=False)
    assert len(_checkpoint_records(caplog)) == 1  # again one line for the next load


def test_dist_load_of_a_topk_checkpoint(topk_checkpoint, caplog):
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling
    from torch.distributed.checkpoint.api import CheckpointException

    from megatron_default_moe.checkpoint import drop_absent_default_vectors

    topk, ckpt = topk_checkpoint
    model = build_gpt(gpt_config(), seed=1)

    # Megatron itself: under the default strictness a requested key the checkpoint lacks raises.
    with pytest.raises(CheckpointException, match="default_vectors"):
        _load(model, ckpt)

    # Ours: drop the absent tables from the request, then the default strictness loads.
    _randomize_tables(model, seed=2)
    with caplog.at_level(logging.INFO, logger=CHECKPOINT_LOGGER):
        sharded = drop_absent_default_vectors(model.sharded_state_dict(), ckpt)
        model.load_state_dict(dist_checkpointing.load(sharded, str(ckpt)))
    assert all(torch.equal(table, torch.zeros(4, 16)) for table in _tables(model))
    _assert_same_parameters(model, topk)
    assert len(_checkpoint_records(caplog)) == 1

    # Megatron-LM's flag route: --dist-ckpt-strictness log_unexpected.
    _randomize_tables(model, seed=2)
    _load(model, ckpt, strict=StrictHandling.LOG_UNEXPECTED)
    assert all(torch.equal(table, torch.zeros(4, 16)) for table in _tables(model))


def test_default_moe_checkpoint_into_a_stock_topk_model(trained, caplog):
    """What Megatron does with the extra key (documented in the README)."""
    from megatron.core.dist_checkpointing.validation import StrictHandling

    source, ckpt = trained
    topk = build_gpt(gpt_config(), seed=4, default_moe=False)

    with caplog.at_level(logging.WARNING):
        _load(topk, ckpt)  # default strictness: the table is ignored, silently
    assert not any("default_vectors" in r.getMessage() for r in caplog.records)
    _assert_same_parameters(topk, source)

    with caplog.at_level(logging.WARNING):
        _load(topk, ckpt, strict=StrictHandling.LOG_ALL)
    assert any(TABLE_KEY in r.getMessage() for r in caplog.records)

    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*default_vectors"):
        topk.load_state_dict(source.state_dict())  # plain torch state dict, strict
    result = topk.load_state_dict(source.state_dict(), strict=False)
    expected = [f"decoder.layers.{i}.mlp.{name}" for i in (0, 1) for name in ("default_vectors", "sample_counter")]
    assert sorted(result.unexpected_keys) == expected
