"""``--moe-default-fit shared-1``: a default that follows the token, fitted online from the probes.

A constant ``Ê_i`` stands in for ``E_i(x_t)`` on every token that did not choose expert ``i``;
with a renormalised router that misses much of the gradient (docs/evidence.md, "Richer defaults"). Here

    V_{t,i} = a_i + s_t b_i,        s_t = x_t · d

``d`` the leading principal direction of the layer's input (one for all experts: a power step per
update), ``(a_i, b_i)`` the least-squares line of ``E_i(x)`` on ``s`` over the probe rows (unchosen
pairs, weight ``|p|``). Per pass and layer:

- ``route`` (the token's rank): the pass's ``d``; the term's ``s = x · d`` over every token is
  formed in the router's backward op, which reads ``x`` (``functional.Coordinates``);
- expert rank: the probe rows' coordinates (one op, ``ops.probes.probe_coordinates``), then the
  probes' one exclusion op also takes the line's statistics, and the probe tokens' input sums for
  the direction: ``[E + 1, 2H + 3]`` (``ops.probes.probe_exclude_reference``), summed over the stage
  in the layer's one all-reduce;
- ``postprocess``: one op (``ops.fit.fit_update``) moves every table and writes the term's
  ``[A; B]``; the term is ``w @ A + s ⊙ (w @ B)``, its gradient ``dL/dw = G Aᵀ + s ⊙ (G Bᵀ)``
  (``functional.add_default_term``).

State (fp32, identical on every rank): ``default_vectors`` (as for the constant),
``default_fit`` ``[E, 2H + 3]`` and ``default_direction`` ``q`` ``[H]`` (checkpointed), and
``default_direction_unit`` ``d`` (not saved: ``q / ‖q‖``, set again at load); see ``ops/fit.py``.
"""

import logging

import torch

from megatron_default_moe.estimators.probes import ProbeMean
from megatron_default_moe.functional import Coordinates
from megatron_default_moe.ops import ema as fused
from megatron_default_moe.ops.fit import fit_tables, initial_direction_H, unit
from megatron_default_moe.ops.probes import probe_coordinates

FITS = ("constant", "shared-1")
TABLES = ("default_vectors", "default_fit")  # zero both and the term vanishes (TopK)
SLOPE_SAMPLES_PER_DIM = 16  # the fit's window holds about 16 H probes per expert (--moe-default-fit-beta)


def fit_beta(beta: float, hidden: int, probes_per_expert: float) -> float:
    """``β_fit`` when not given: a window ``1 / (1 - β_fit)`` of about ``16 H`` probes per expert,
    so each slope's ``H`` values rest on many more samples than values (never below ``β``)."""
    return max(float(beta), 1.0 - probes_per_expert / (SLOPE_SAMPLES_PER_DIM * hidden))


class SharedLineFit(ProbeMean):
    """A layer's ``shared-1`` estimator: the probes' statistics fit a line per expert. Registers
    its tables on the layer, and carries one pass's input and coordinates from ``route`` to the
    expert statistics and the term."""

    def __init__(self, layer, seed: int, probes):
        super().__init__(probes)
        self.fit = self
        experts, hidden = layer.default_vectors.shape
        device = layer.default_vectors.device
        dm = layer.dm_config
        self.beta = float(dm.fit_beta) if dm.fit_beta is not None else fit_beta(
            dm.beta, hidden, probes.budget * probes.token_sets / experts)
        if dm.fit_beta is None:
            logging.getLogger(__name__).info("Default MoE layer %s: --moe-default-fit-beta %.5f (%d probes x %d "
                                             "token sets / %d experts, H %d)", layer.layer_number, self.beta,
                                             probes.budget, probes.token_sets, experts, hidden)  # fmt: skip
        self.initial_direction = initial_direction_H(hidden, seed, layer.layer_number, device)
        layer.register_buffer("default_fit", torch.zeros(experts, 2 * hidden + 3, dtype=torch.float32, device=device))
        layer.register_buffer("default_direction", self.initial_direction.clone())
        layer.register_buffer("default_direction_unit", self.initial_direction.clone(), persistent=False)
        self._x = self._d_x = self._next_d = None

    def see_input(self, layer, x_TH, takes_stats: bool) -> None:
        """``route``: remember ``x``; a pass that takes statistics fixes its direction for both
        sides (the probe rows' coordinates, and the term's ``s``)."""
        self._x = x_TH
        self._d_x = self.direction_as(layer, x_TH.dtype) if takes_stats else None

    def direction_as(self, layer, dtype):
        """``d`` in the activations' dtype, for both sides of a pass: the last update's table row
        ``2E`` (written by ``fit_update``, no cast of its own) while the buffer is as it left it,
        else a cast (the first pass, after a load)."""
        d_H = layer.default_direction_unit
        if self._next_d is not None and self._next_d[0] == (d_H._version, dtype):
            return self._next_d[1]
        return d_H.to(dtype, copy=True)  # never the buffer itself: this pass's update moves it before s is formed

    def _remember_direction(self, layer, table_KH):
        self._next_d = (layer.default_direction_unit._version, table_KH.dtype), table_KH[-1]

    def coordinates(self, in_RH):
        """``(rows_B, p_B) -> s_B``: the probe rows' coordinates on this pass's direction (set by
        ``see_input``: only passes that take statistics call this), for ``ProbeSampler.exclude``."""
        d_H = self._d_x
        return lambda rows_B, p_B: probe_coordinates(in_RH.detach(), rows_B, p_B, d_H.to(in_RH.dtype))

    def take_stats(self, layer, out_RH, probs_R, tokens_per_expert, in_RH, counter: int):
        return self._exclude(layer, out_RH, probs_R, tokens_per_expert, in_RH=in_RH,
                             coordinates=self.coordinates(in_RH))  # fmt: skip

    def apply(self, layer, stats, beta: float, dtype):
        """``fit_update`` on the layer's tables: ``(([A; B], d)`` of this pass, experts updated``)``."""
        table_KH, d_used, updated_E = fused.fit_update(
            layer.default_vectors, layer.default_fit, layer.default_direction, layer.default_direction_unit, stats,
            beta, self.beta, layer.nonfinite_skips, dtype,
        )  # fmt: skip
        self._remember_direction(layer, table_KH)
        return (table_KH[:-1], d_used), updated_E

    def frozen(self, layer, dtype):
        """``([A; B], d)`` of the current state (evaluation, step mode between updates)."""
        table_KH = fit_tables(layer.default_vectors, layer.default_fit, layer.default_direction_unit, dtype)
        self._remember_direction(layer, table_KH)
        return table_KH[:-1], layer.default_direction_unit.clone()

    def term_args(self, snapshot):
        """``([A; B], {coordinates})`` of ``functional.add_default_term`` for this pass: ``x`` and
        ``d`` (``s`` is formed where it is read; a recomputed pass takes the direction its first
        pass used)."""
        table_KH, d_H = snapshot
        x_TH = self._x.detach()
        d_x = self._d_x if self._d_x is not None else d_H.to(x_TH.dtype)
        self._x = self._d_x = None
        return table_KH, dict(coordinates=Coordinates(x_TH.reshape(-1, x_TH.shape[-1]), d_x))

    def loaded(self, layer) -> None:
        """After a load: ``d = q / ‖q‖``."""
        with torch.no_grad():
            layer.default_direction_unit.copy_(unit(layer.default_direction))

    def stats_shape(self, experts: int, hidden: int):
        return experts + 1, 2 * hidden + 3
