"""The Default MoE layer's own buffers through casts and checkpoints (a mixin of the layer).

The tables (``default_vectors``, and with ``--moe-default-fit shared-1`` ``default_fit``,
``default_direction`` and its unit ``default_direction_unit``) stay fp32 whatever
``Float16Module`` or ``.bfloat16()`` do to the model, load as fp32, and start afresh where a
checkpoint lacks them (``checkpoint.py``); the micro-batch counter is saved from its host value
and restored once at load.
"""

import torch

from megatron_default_moe.checkpoint import add_fit_weight, fill_missing_default_vectors, restore_sample_counter

FP32_TABLES = ("default_vectors", "default_fit", "default_direction", "default_direction_unit")


class TableBuffers:
    """Buffer handling of ``DefaultMoELayer`` (before ``MoELayer`` in its bases)."""

    def _fp32_tables(self):
        return [n for n in FP32_TABLES if n in self._buffers]

    def _keep_fp32_on(self, device):
        """Keep the tables fp32 (``Float16Module`` casts float buffers) and beside the activations."""
        for name in (*self._fp32_tables(), "nonfinite_skips"):
            buf = getattr(self, name)
            dtype = torch.long if name == "nonfinite_skips" else torch.float32
            if buf.dtype != dtype or buf.device != device:
                setattr(self, name, buf.to(device=device, dtype=dtype))

    def _apply(self, fn, *args, **kwargs):
        """Apply ``fn`` (``.cuda()``, ``.bfloat16()``, ...) but keep the tables fp32: their fp32
        values are kept aside, so a cast to bf16 and back loses no bits."""
        if "default_vectors" not in self._buffers:
            return super()._apply(fn, *args, **kwargs)
        kept = {name: getattr(self, name) for name in self._fp32_tables()}
        out = super()._apply(fn, *args, **kwargs)
        for name, fp32 in kept.items():
            setattr(self, name, fp32.to(device=self.default_vectors.device))
        self._keep_fp32_on(self.default_vectors.device)
        return out

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, *args):
        """Load the tables as fp32; a checkpoint without them (TopK) leaves a fresh start, said once."""
        for name in self._fp32_tables():
            if prefix + name in state_dict:
                state_dict[prefix + name] = state_dict[prefix + name].to(torch.float32)
        if "default_fit" in self._buffers:
            add_fit_weight(self, state_dict, prefix + "default_fit")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, *args)
        fill_missing_default_vectors(self, prefix, missing_keys)
        self.estimator.loaded(self)
        self._stats_updates = restore_sample_counter(self, prefix + "sample_counter", missing_keys)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self.sample_counter.fill_(self._stats_updates)  # a host value: no sync
        super()._save_to_state_dict(destination, prefix, keep_vars)
