"""Default vectors in Megatron checkpoints.

Saving needs no code: ``MegatronModule.sharded_state_dict`` exports the persistent fp32 buffer
``default_vectors`` as one tensor replicated over the ranks of the stage (global ``[E, H]``, plus
the layer axis a ``TransformerBlock`` prepends), so ``dist_checkpointing`` reshards it under any
TP, EP, DP or PP change.

A checkpoint without the table (a TopK run continued with Default MoE) loads with the table at
zero, where a fresh Default MoE run starts, and one log line says so:

* ``module.load_state_dict`` (any ``strict``): ``DefaultMoELayer._load_from_state_dict`` calls
  ``fill_missing_default_vectors``.
* ``dist_checkpointing.load``: with the default ``StrictHandling.ASSUME_OK_UNEXPECTED`` Megatron's
  torch_dist loader raises on any requested key the checkpoint lacks, and a module's
  ``sharded_state_dict`` cannot see the checkpoint. ``drop_absent_default_vectors`` removes those
  requests first. Megatron-LM's ``load_checkpoint`` builds the request and loads in one call, so
  the entry scripts call ``load_checkpoints_without_default_vectors()``: every
  ``dist_checkpointing.load`` then drops the default vectors its checkpoint lacks, and nothing
  else (``--dist-ckpt-strictness`` keeps deciding about every other missing key).
"""

import logging

import torch

logger = logging.getLogger(__name__)

BUFFER = "default_vectors"
FIT_BUFFERS = ("default_fit", "default_direction")  # ``--moe-default-fit shared-1`` (since 0.3)
BUFFERS = (BUFFER, "sample_counter", *FIT_BUFFERS)  # the layer's checkpointed buffers

_logged_for = None  # ``missing_keys`` list of the last load that logged: one line per load


def fill_missing_default_vectors(layer, prefix: str, missing_keys: list) -> None:
    """Start the tables a checkpoint lacks afresh (vectors and fit at zero, the direction at its
    seeded start) and take them out of ``missing_keys`` (strict loads pass).

    Logs once per ``load_state_dict`` call (torch shares ``missing_keys`` across all modules of a
    call), on the first rank of each pipeline stage.
    """
    global _logged_for
    missing = [name for name in (BUFFER, *FIT_BUFFERS) if prefix + name in missing_keys]
    if not missing:
        return
    with torch.no_grad():
        for name in missing:
            missing_keys.remove(prefix + name)
            if name == "default_direction":
                layer.default_direction.copy_(layer.fit.initial_direction)
            else:
                getattr(layer, name).zero_()
    if missing_keys is _logged_for:
        return
    _logged_for = missing_keys
    group = layer.stats_group
    distributed = group is not None and torch.distributed.is_initialized()
    if not distributed or torch.distributed.get_rank(group) == 0:
        logger.warning(
            "Default MoE: the checkpoint has no %s (e.g. '%s'); every Default MoE layer without "
            "them starts from zeros (a fit's direction from its seeded start), like a fresh run (a TopK "
            "checkpoint, or one without the fit?).",
            "default vectors" if BUFFER in missing else "default-vector fit", prefix + missing[0],
        )


def add_fit_weight(layer, state_dict: dict, key: str) -> None:
    """A ``default_fit`` saved before its last column, the moments' weight (``[E, 2H + 2]``, moments
    used as they were), loads with weight 1: the run goes on with the lines it had."""
    fit = state_dict.get(key)
    if fit is not None and fit.shape[-1] + 1 == layer.default_fit.shape[-1]:
        state_dict[key] = torch.cat([fit, fit.new_ones(*fit.shape[:-1], 1)], dim=-1)


def restore_sample_counter(layer, key: str, missing_keys: list) -> int:
    """The loaded ``sample_counter`` as a host int (the one read, at load time); a checkpoint from
    before the counter (0.1, or TopK) starts it at 0, like the vectors."""
    if key in missing_keys:
        missing_keys.remove(key)
        layer.sample_counter.zero_()
    return int(layer.sample_counter.item())


def _is_default_vectors(sharded) -> bool:
    key = getattr(sharded, "key", None)
    return isinstance(key, str) and any(key == name or key.endswith("." + name) for name in BUFFERS)


def drop_absent_default_vectors(sharded_state_dict: dict, checkpoint_dir) -> dict:
    """Remove the default-vector entries that ``checkpoint_dir`` lacks from ``sharded_state_dict``.

    Then ``dist_checkpointing.load`` succeeds under its default strictness, and loading the
    result into the model fills zeros (``fill_missing_default_vectors``). Works on nested dicts
    (Megatron-LM puts the model under ``"model"``). Changes ``sharded_state_dict`` in place and
    returns it.
    """
    from megatron.core import dist_checkpointing

    present = dist_checkpointing.load_tensors_metadata(str(checkpoint_dir))

    def drop(node):
        for name, value in list(node.items()):
            if isinstance(value, dict):
                drop(value)
            elif _is_default_vectors(value) and value.key not in present:
                del node[name]

    drop(sharded_state_dict)
    return sharded_state_dict


def load_checkpoints_without_default_vectors() -> None:
    """Make ``megatron.core.dist_checkpointing.load`` accept checkpoints without default vectors.

    Wraps the function (idempotent) so it first applies ``drop_absent_default_vectors`` to the
    request for that checkpoint: a TopK checkpoint continues as Default MoE with ``--load`` and
    no other flag. Megatron-LM calls it as ``dist_checkpointing.load(...)``, which this reaches.
    """
    from megatron.core import dist_checkpointing

    load = dist_checkpointing.load
    if getattr(load, "drops_absent_default_vectors", False):
        return

    def load_without_absent_default_vectors(sharded_state_dict, checkpoint_dir, *args, **kwargs):
        if _has_default_vectors(sharded_state_dict):
            drop_absent_default_vectors(sharded_state_dict, checkpoint_dir)
        return load(sharded_state_dict, checkpoint_dir, *args, **kwargs)

    load_without_absent_default_vectors.drops_absent_default_vectors = True
    load_without_absent_default_vectors.__wrapped__ = load
    dist_checkpointing.load = load_without_absent_default_vectors


def _has_default_vectors(node) -> bool:
    if isinstance(node, dict):
        return any(_has_default_vectors(value) for value in node.values())
    return _is_default_vectors(node)
