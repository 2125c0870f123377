"""The Default MoE math, free of Megatron (paper arXiv 2504.12463, Eq. 11 and §3).

Shapes are in the names: ``T`` tokens, ``E`` experts, ``H`` hidden, ``R`` rows the local experts
processed (token-expert pairs, padding rows included).

One rule covers every Megatron router (``DESIGN.md`` §1.6). Megatron gives a selected expert the
prob ``p_i = c·f_i/N`` and every other pair 0, with ``f`` the router score (full softmax, or the
*unbiased* sigmoid / sqrt-softplus score), ``N = 1`` or the sum ``S_A`` of ``f`` over the token's
pre-drop top-K, and ``c`` the top-k scaling factor. Forward of one layer, as the glue wires it:

1. ``default_weights_TE``: ``w = c·f / sg(N)`` on every pair whose prob is zero (not routed,
   dropped by a capacity factor, padding). Gradient flows into ``f``.
2. ``statistics.expert_output_stats_EH1``: per expert, the sum of unweighted outputs
   ``o = out / p`` and a count (``uniform``), or the sum of router-weighted outputs ``p * o = out``
   and ``Σ p`` (``router``), in one op over the expert output (one read of it).
3. ``ema_update_``: ``Ê_i ← β Ê_i + (1-β) sum_i / count_i`` for experts with ``count_i > 0`` and
   finite statistics.
4. ``add_default_term``: ``w @ sg(Ê)`` added to the TopK output in one ``addmm`` (``forward`` mode:
   only where the mixture mass stays ``c``, softmax with pre-softmax), or only its gradient
   (``backward-only``: the forward is the stock layer's, bit for bit). In the layer ``dL/dw``
   reaches the logits in the same pass as Megatron's own logits gradient (``router``).
"""

from typing import NamedTuple, Optional

import torch

EMA_WEIGHTINGS = ("uniform", "router")
MODES = ("auto", "forward", "backward-only")
NORMALISERS = ("selected", "all")  # N of a renormalised router: S_A (DenseMixer) or the sum over all
SCORE_FUNCTIONS = ("softmax", "sigmoid", "sqrtsoftplus")
SIGMOID_EPS = 1e-20  # Megatron's epsilon in the sigmoid / sqrt-softplus normaliser


_MM_OUT_DTYPE = [True]  # torch.mm(..., out_dtype=) exists (torch >= 2.8); set False by its first TypeError


def mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` accumulated and returned in fp32, reading both in their own dtype where the backend
    has such a kernel (CUDA: ``aten::mm.dtype``); elsewhere via fp32 copies. Torch < 2.8 has no
    ``out_dtype`` keyword (a ``TypeError``): decided once per process; a backend without the kernel
    (the CPU) raises ``NotImplementedError`` per call, so a dispatch mode may still count one."""
    if a.dtype == b.dtype == torch.float32:
        return a @ b
    if _MM_OUT_DTYPE[0]:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except torch.OutOfMemoryError:
            raise
        except TypeError:
            _MM_OUT_DTYPE[0] = False
        except (NotImplementedError, RuntimeError):
            pass
    return a.float() @ b.float()


class Coordinates(NamedTuple):
    """The ``shared-1`` term's ``s = x · d`` kept as its factors (``d`` in ``x``'s dtype), formed
    where it is read: in backward-only mode with a grad sink, inside the router's one backward op,
    from the ``x`` Megatron's router GEMM keeps for its own backward anyway (no pass over ``x`` in
    the forward, no ``[T, 1]`` kept); ``s_T1`` once formed here (forward mode, metrics)."""

    x_TH: torch.Tensor
    d_H: torch.Tensor
    s_T1: Optional[torch.Tensor] = None

    def formed(self) -> "Coordinates":
        """With ``s_T1`` (fp32 ``[T, 1]``, one GEMV)."""
        if self.s_T1 is not None:
            return self
        return self._replace(s_T1=mm_fp32(self.x_TH.reshape(-1, self.x_TH.shape[-1]), self.d_H[:, None]))


def renormalises(score_function: str, pre_softmax: bool, topk: int) -> bool:
    """Whether Megatron divides the selected scores by their sum ``S_A`` (``N = S_A``).

    Softmax with pre-softmax keeps the raw full-softmax values; softmax after top-k is a softmax
    over the selected logits, i.e. ``π_i / S_A``; sigmoid and sqrt-softplus renormalise for K > 1.
    """
    if score_function == "softmax":
        return not pre_softmax
    return topk > 1


def forward_mode_allowed(score_function: str, pre_softmax: bool) -> bool:
    """The default term may enter the forward only where the mixture mass stays ``c``.

    With a renormalised router the selected probs already sum to ``c`` and the term would inflate
    the mass to ``c / S_A``; sigmoid top-1 has an unbounded default mass ``c·Σ s``.
    """
    return score_function == "softmax" and bool(pre_softmax)


def router_scores_TE(logits_TE: torch.Tensor, score_function: str) -> torch.Tensor:
    """Megatron's unbiased router score ``f`` of every pair, fp32 (differentiable in the logits)."""
    if score_function == "softmax":
        return torch.softmax(logits_TE, dim=-1, dtype=torch.float32)
    z_TE = logits_TE.float()
    if score_function == "sigmoid":
        return torch.sigmoid(z_TE)
    if score_function == "sqrtsoftplus":
        return torch.nn.functional.softplus(z_TE).sqrt()
    raise ValueError(f"score function must be one of {SCORE_FUNCTIONS}, got {score_function!r}")


def default_weights_TE(
    scores_TE: torch.Tensor,
    probs_TE: torch.Tensor,
    selected_TE: torch.Tensor = None,
    scale: float = 1.0,
    renormalise: bool = False,
    eps: float = 0.0,
    normaliser: str = "selected",
) -> torch.Tensor:
    """``w = c·f / sg(N)`` where the TopK probs are 0, else 0 (fp32, differentiable in ``f``).

    ``N`` is 1, or (``renormalise``) ``Σ f + eps`` over ``selected_TE``, the pre-drop top-K set:
    a dropped pair so gets exactly the prob it lost. ``N`` is detached (DenseMixer's rule), so
    selected experts' router gradients keep their stock form. ``normaliser="all"`` sums ``f`` over
    all experts instead (smaller weights by ``S_A / S_all``: the remedy for many unselected sigmoid
    experts swamping the stock router gradient; dropped pairs then get less than they lost).
    """
    c_over_n = default_scale_T1(scores_TE, selected_TE, scale, renormalise, eps, normaliser)
    weights_TE = scores_TE * c_over_n if renormalise or scale != 1.0 else scores_TE
    return weights_TE.masked_fill(probs_TE.detach() != 0, 0.0)


def default_scale_T1(scores_TE, selected_TE, scale: float, renormalise: bool, eps: float, normaliser: str):
    """``c / sg(N)`` of ``default_weights_TE``: per token ``[T, 1]`` (detached) when ``renormalise``,
    else the float ``c``."""
    if not renormalise:
        return scale
    kept_TE = scores_TE.detach() if normaliser == "all" else scores_TE.detach() * selected_TE
    return scale / kept_TE.sum(dim=-1, keepdim=True).add_(eps)


def ema_update_(defaults_EH: torch.Tensor, stats_EH1: torch.Tensor, beta: float):
    """In place ``Ê ← β Ê + (1-β) mean`` for experts with tokens and finite statistics.

    Returns ``(updated_E, nonfinite_E)`` boolean masks. Experts with no tokens, or whose statistics
    hold a NaN/Inf (a loss spike), keep their vector (bit for bit: their lerp adds zero).
    """
    updated_E1, nonfinite_E1 = ema_masks_E1(stats_EH1)
    means_EH = torch.where(updated_E1, stats_EH1[:, :-1] / stats_EH1[:, -1:], defaults_EH)
    defaults_EH.lerp_(means_EH, 1.0 - beta)
    return updated_E1.squeeze(-1), nonfinite_E1.squeeze(-1)


def ema_masks_E1(stats_EW1: torch.Tensor):
    """``(updated_E1, nonfinite_E1)`` of the EMA rule over statistics whose last column counts: an
    expert moves only with tokens and no NaN/Inf anywhere in its row (a skip counts when it had
    tokens but not finite statistics)."""
    row_sums_E1 = stats_EW1.sum(dim=-1, keepdim=True)  # a NaN/Inf anywhere in the row shows here
    finite_E1 = (row_sums_E1 - row_sums_E1) == 0
    has_tokens_E1 = stats_EW1[:, -1:] > 0
    return has_tokens_E1 & finite_E1, has_tokens_E1 > finite_E1  # > : tokens, not finite


def default_term_TH(weights_TE, defaults_snapshot_EH, coordinates: Optional[Coordinates] = None) -> torch.Tensor:
    """``Σ_{i∈D_t} w_{t,i} sg(V_{t,i})``, ``V = Ê``, or with ``coordinates`` (``shared_fit``)
    ``A + s_t B`` from the stacked table ``[A; B]``, on its own (metrics and references; the layer
    fuses it)."""
    table_KH = defaults_snapshot_EH.detach().to(weights_TE.dtype)
    if coordinates is None:
        return weights_TE @ table_KH
    experts, s_T1 = weights_TE.shape[1], coordinates.formed().s_T1
    return weights_TE @ table_KH[:experts] + s_T1.to(weights_TE.dtype) * (weights_TE @ table_KH[experts:])


class _DefaultTerm(torch.autograd.Function):
    """``y + w @ Ê`` in one ``addmm`` (forward mode) or ``y`` itself (backward-only); either way the
    backward passes ``dL/dy`` through and forms ``dL/dw = dL/dy @ Êᵀ`` (fp32), nothing to ``Ê``.
    With slopes ``B`` and coordinates ``s = x · d`` (``shared_fit``) the vectors are ``Ê + s_t B``,
    and the table is ``[Ê; B]`` (``2E`` rows): forward ``[w | s·w] @ [Ê; B]``, backward ``dL/dw =
    g_Ê + s·g_B``. ``dL/dw`` is ``w``'s gradient, or ``grad_sink`` (the layer) is handed ``dL/dy``,
    the table and the coordinates and forms it all in one op (``router.DefaultLogitGradient``: in
    the router's own backward pass, beside Megatron's logits gradient); ``after`` is an input only
    so that pass runs after this one."""

    @staticmethod
    def forward(ctx, y_TH, weights_TE, table_KH, add_to_forward, grad_sink, after, coordinates):
        ctx.save_for_backward(table_KH, *(coordinates or ()))  # x is Megatron's router's saved input
        ctx.line = coordinates is not None
        ctx.grad_sink = grad_sink
        ctx.weights_dtype = None if weights_TE is None else weights_TE.dtype
        if add_to_forward:
            w_TK = weights_TE.to(y_TH.dtype)
            if coordinates is not None:
                w_TK = torch.cat([w_TK, w_TK * coordinates.s_T1.to(y_TH.dtype)], dim=1)
            return torch.addmm(y_TH, w_TK, table_KH)
        return y_TH  # returned as is, like Megatron's MoEAuxLossAutoScaler: no kernel

    @staticmethod
    def backward(ctx, grad_TH):
        table_KH, *line = ctx.saved_tensors
        coordinates = Coordinates(*line) if ctx.line else None
        none = (None,) * 6
        if ctx.grad_sink is not None:
            # dL/dy is read there, once: it is the tensor autograd holds for the residual branch
            # until the MoE branch's gradient joins it (Megatron's bias-dropout-add hands both the
            # same one, at --hidden-dropout 0), so keeping it until the router's backward costs no memory
            ctx.grad_sink(grad_TH, table_KH, coordinates)
            return grad_TH, *none
        grad_w_TE = None
        if ctx.needs_input_grad[1]:
            grad_w_TE = mm_fp32(grad_TH, table_KH.t())
            if coordinates is not None:
                experts, s_T1 = grad_w_TE.shape[1] // 2, coordinates.formed().s_T1
                grad_w_TE = torch.addcmul(grad_w_TE[:, :experts], s_T1, grad_w_TE[:, experts:])
            grad_w_TE = grad_w_TE.to(ctx.weights_dtype)
        return grad_TH, grad_w_TE, *none[1:]


def add_default_term(y_TH, weights_TE, defaults_EH, mode: str, grad_sink=None, after=None,
                     coordinates: Optional[Coordinates] = None):  # fmt: skip
    """``y`` plus the default term ``w @ sg(Ê)`` (``forward``), or plus only its gradient
    (``backward-only``; the forward value is ``y`` bit for bit, and ``w`` may be None with a
    ``grad_sink``). ``defaults_EH`` should already be in ``y``'s dtype (the layer casts its fp32
    snapshot once per pass), ``w`` too (then no cast). With ``coordinates`` (``shared_fit``)
    ``defaults`` is the stacked ``[A; B]`` ``[2E, H]`` of the vectors ``A + s_t B``; ``s`` is formed
    here only in forward mode (backward-only: by the sink, or in the backward without one)."""
    if mode not in ("forward", "backward-only"):
        raise ValueError(f"mode must be 'forward' or 'backward-only' here, got {mode!r}")
    if weights_TE is None and (mode == "forward" or grad_sink is None):
        raise ValueError("the default term needs its weights in forward mode or without a grad_sink")
    table_KH = defaults_EH.detach().to(y_TH.dtype)
    if coordinates is not None:
        x_TH, d_H, s_T1 = coordinates
        coordinates = Coordinates(x_TH.detach(), d_H.detach(), None if s_T1 is None else s_T1.detach().float())
        coordinates = coordinates.formed() if mode == "forward" else coordinates
    return _DefaultTerm.apply(y_TH, weights_TE, table_KH, mode == "forward", grad_sink, after, coordinates)
