"""A tiny Default MoE ``GPTModel`` on CPU for the reliability tests, and a plain training loop."""

import torch

VOCAB, SEQ, MICRO_BATCH = 64, 8, 2


def gpt_config(**overrides):
    """Two MoE layers, 4 experts top-2, fp32, paper routing (softmax over all experts)."""
    from helpers import moe_config

    return moe_config(**{"num_layers": 2, **overrides})


def build_gpt(config, dm_config=None, seed=0, default_moe=True):
    """``GPTModel`` from Megatron's local layer spec, in its Default MoE form unless told not to
    (a stock TopK model: same parameters, for the same ``seed``)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel

    from megatron_default_moe import to_default_moe_spec

    spec = get_gpt_layer_local_spec(num_experts=config.num_moe_experts)
    if default_moe:
        spec = to_default_moe_spec(spec, dm_config)
    torch.manual_seed(seed)
    return GPTModel(config, spec, vocab_size=VOCAB, max_sequence_length=SEQ)


def micro_batch(seed):
    """``(tokens, position_ids, labels)`` of one micro-batch, fixed by ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ), generator=gen)
    positions = torch.arange(SEQ).expand(MICRO_BATCH, SEQ)
    return tokens, positions, torch.roll(tokens, -1, dims=1)


def causal_mask():
    """Explicit causal mask: Megatron's default one is built on ``device="cuda"``, and a recompute
    pass runs inside ``Tensor.backward``, where the CPU shim's device mode is not active."""
    return torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), diagonal=1).view(1, 1, SEQ, SEQ)


def micro_batch_loss(model, batch):
    tokens, positions, labels = batch
    return model(tokens, positions, causal_mask(), labels=labels).float().mean()


def train(model, optimizer, steps, first_step=0, micro_batches=2, on_step=None, forwards_first=False):
    """Plain gradient-accumulation loop; returns the summed loss of every step (a list).

    ``forwards_first`` runs all forwards of a step before the backwards (in order), as pipeline
    warm-up does: several micro-batches are in flight at once. Calls ``update_default_vectors``
    once per step (``update="step"`` layers need it), where Megatron's finalize hook would.
    """
    from megatron_default_moe import update_default_vectors

    losses = []
    for step in range(first_step, first_step + steps):
        optimizer.zero_grad()
        in_flight = []
        for mb in range(micro_batches):
            in_flight.append(micro_batch_loss(model, micro_batch(1000 * step + mb)) / micro_batches)
            if not forwards_first:
                in_flight[-1].backward()
        if forwards_first:
            for loss in in_flight:
                loss.backward()
        total = sum(loss.detach() for loss in in_flight)
        update_default_vectors(model)
        if on_step is not None:
            on_step(model)
        optimizer.step()
        losses.append(total)
    return losses
