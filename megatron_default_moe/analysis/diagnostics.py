"""How close is each router gradient to the dense one? (the measurement of paper Fig. 4)

For a model (or a single MoE layer) and a loss on one batch, ``router_gradient_cosines`` takes
``d loss / d router.weight`` of each MoE layer under three routings of that layer:

- ``topk``: stock TopK (a Default MoE layer with its default vectors set to zero is exactly TopK);
- ``default``: Default MoE with the current default vectors (frozen while measuring);
- ``dense``: every expert on every token. For softmax with pre-softmax (the paper's routing)
  ``y_t = c·Σ_i π_{t,i} E_i(x_t)`` over all N experts: Megatron's own layer with top-k raised to
  N, so it runs through the real dispatcher and expert parallelism. For a renormalised router
  (softmax after top-k, sigmoid, sqrt-softplus) it is DenseMixer's target: the forward stays the
  stock TopK one and the gradient is that of ``Σ_i w_{t,i} E_i(x_t)``, with ``w = p`` on the
  selected experts and ``c·f/sg(S_A)`` on the others (the Default MoE weights with ``E_i(x)`` for
  ``Ê_i``): a second pass of the same layer runs every expert with those weights as its probs.

and returns the cosine similarity of ``topk`` and ``default`` to ``dense``, per layer, and the size
of the extra router gradient, ``‖default − topk‖ / ‖topk‖``. By default
each layer is measured in isolation: only that layer's routing changes, every other layer runs as
built (Default MoE layers with their default term, stock layers as TopK), so the numbers describe
that layer's gradient estimator and not the forward drift of a whole model switched to dense
(``isolate_layers=False`` switches all layers together: 3 passes instead of 2L + 1).

Measurements run in eval mode (no aux losses, no EMA update, no dropout); the model's weights,
``.grad`` and Megatron's ``main_grad`` buffers are left untouched (``torch.autograd.grad``).
Gradients are summed over the router's replicas (``tp_dp_cp``), so every rank reports the same
global numbers; call it on every rank.
"""

import contextlib
import copy
from typing import Callable, Dict, Optional

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer

from megatron_default_moe import functional as F
from megatron_default_moe.layer import DefaultMoELayer, _group_size
from megatron_default_moe.router import default_weights_of
from megatron_default_moe.estimators.shared_fit import TABLES

def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two tensors seen as flat fp64 vectors (0.0 if either is zero)."""
    a, b = a.detach().double().reshape(-1), b.detach().double().reshape(-1)
    denom = a.norm() * b.norm()
    return float(a @ b / denom) if denom > 0 else 0.0


def moe_layers(model) -> list:
    """The Megatron ``MoELayer``s (stock or Default MoE) of ``model``, in module order."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    return [m for chunk in chunks for m in chunk.modules() if isinstance(m, MoELayer)]


def _layer_key(layer, index: int) -> int:
    return layer.layer_number if getattr(layer, "layer_number", None) is not None else index


@contextlib.contextmanager
def _eval_mode(model):
    chunks = model if isinstance(model, (list, tuple)) else [model]
    modules = [m for chunk in chunks for m in chunk.modules()]
    flags = [m.training for m in modules]
    for m in modules:
        m.training = False
    try:
        yield
    finally:
        for m, flag in zip(modules, flags):
            m.training = flag


@contextlib.contextmanager
def _topk_routing(layers):
    """Default MoE layers with zero tables (``shared_fit.TABLES``): the term vanishes (exact TopK)."""
    saved = [getattr(layer, name) for layer in layers if isinstance(layer, DefaultMoELayer)
             for name in TABLES if name in layer._buffers]  # fmt: skip
    saved = [(table, table.clone()) for table in saved]
    try:
        for table, _ in saved:
            table.zero_()
        yield
    finally:
        for table, values in saved:
            table.copy_(values)


def _renormalises(layer) -> bool:
    config = layer.config
    return F.renormalises(layer.router.score_function, config.moe_router_pre_softmax, layer.router.topk)


@contextlib.contextmanager
def _patched(changes):
    """Set ``(object, attribute, value)`` triples for the duration, then restore them."""
    saved = []
    try:
        for obj, attr, value in changes:
            saved.append((obj, attr, obj.__dict__.get(attr, _MISSING)))
            setattr(obj, attr, value)
        yield
    finally:
        for obj, attr, old in reversed(saved):
            if old is _MISSING:
                delattr(obj, attr)
            else:
                setattr(obj, attr, old)


_MISSING = object()


def _all_experts_dispatch(layer):
    """The dispatcher of ``layer`` sends every token to all N experts (its own config copy:
    Megatron reads top-k from the dispatcher's config, and all layers share one config)."""
    n, dispatcher = layer.config.num_moe_experts, layer.token_dispatcher
    config = copy.copy(dispatcher.config)
    config.moe_router_topk = n
    changes = [(dispatcher, "config", config)]
    if hasattr(dispatcher, "router_topk"):
        changes.append((dispatcher, "router_topk", n))
    return changes


def _densemixer_forward(layer):
    """Forward of ``layer`` as DenseMixer's target: the stock value, the dense mixture's gradient."""
    forward, routing = layer.forward, layer.router.routing

    def dense_routing(logits, *args, **kwargs):
        probs_TE, routing_map_TE = routing(logits, *args, **kwargs)
        # DenseMixer's weights, whatever normaliser the layer trains with
        weights_TE = default_weights_of(
            layer.router, logits.view(probs_TE.shape), probs_TE, routing_map_TE, normaliser="selected"
        )
        return probs_TE + weights_TE.to(probs_TE.dtype), torch.ones_like(routing_map_TE)

    def dense_forward(hidden_states, *args, **kwargs):
        with _topk_routing([layer]):
            stock, bias = forward(hidden_states, *args, **kwargs)
            with _patched([(layer.router, "routing", dense_routing), *_all_experts_dispatch(layer)]):
                dense, _ = forward(hidden_states, *args, **kwargs)
        return stock.detach() + (dense - dense.detach()), bias

    return dense_forward


@contextlib.contextmanager
def _dense_routing(layers):
    """Every expert on every token in ``layers`` only (see the module docstring for "dense")."""
    changes = []
    for layer in layers:
        if _renormalises(layer):
            changes.append((layer, "forward", _densemixer_forward(layer)))
        else:  # top-k raised to N: full-softmax probs over all experts
            changes += [(layer.router, "topk", layer.config.num_moe_experts), *_all_experts_dispatch(layer)]
    with _patched(changes):
        yield


def router_gradients(model, loss_fn: Callable, dense=(), topk=()) -> Dict[int, torch.Tensor]:
    """``{layer key: d loss / d router.weight}`` for every MoE layer of ``model``.

    ``loss_fn(model)`` runs the forward and returns a scalar loss. The layers in ``dense`` run all
    experts on every token, those in ``topk`` run as stock TopK, all others as built. Keys are
    Megatron layer numbers (positions for layers without one).
    """
    layers = moe_layers(model)
    if not layers:
        raise ValueError("router_gradients: the model has no MoELayer")
    weights = [layer.router.weight for layer in layers]
    with _eval_mode(model), _dense_routing(list(dense)), _topk_routing(list(topk)), torch.enable_grad():
        loss = loss_fn(model)
        grads = torch.autograd.grad(loss, weights, allow_unused=True)
    out = {}
    for i, (layer, weight, grad) in enumerate(zip(layers, weights, grads)):
        grad = torch.zeros_like(weight) if grad is None else grad.detach().clone()
        group = getattr(layer.router, "tp_dp_cp_group", None)
        if _group_size(group) > 1:
            torch.distributed.all_reduce(grad, group=group)
        out[_layer_key(layer, i)] = grad
    return out


def router_gradient_triples(model, loss_fn: Callable, isolate_layers: bool = True) -> Dict[int, tuple]:
    """``{layer: (topk, default, dense)}`` router-weight gradients; ``default`` is None for stock
    ``MoELayer``s (their as-built gradient is the TopK one)."""
    layers = moe_layers(model)
    keys = [_layer_key(layer, i) for i, layer in enumerate(layers)]
    is_default = [isinstance(layer, DefaultMoELayer) for layer in layers]
    as_built = router_gradients(model, loss_fn)
    if isolate_layers:
        dense = {k: router_gradients(model, loss_fn, dense=[l])[k] for k, l in zip(keys, layers)}
        topk = {
            k: router_gradients(model, loss_fn, topk=[l])[k] if d else as_built[k]
            for k, l, d in zip(keys, layers, is_default)
        }
    else:
        dense = router_gradients(model, loss_fn, dense=layers)
        topk = router_gradients(model, loss_fn, topk=layers) if any(is_default) else as_built
    return {k: (topk[k], as_built[k] if d else None, dense[k]) for k, d in zip(keys, is_default)}


def router_gradient_cosines(model, loss_fn: Callable, isolate_layers: bool = True) -> Dict[int, Dict[str, Optional[float]]]:
    """``{layer: {"topk": cos(TopK, dense), "default": cos(Default MoE, dense) or None,
    "extra_ratio": ‖default − topk‖ / ‖topk‖ or None}}``.

    ``default`` and ``extra_ratio`` are ``None`` for stock ``MoELayer``s (no default vectors). See
    the module docstring for ``isolate_layers``.
    """
    return {
        k: {
            "topk": cosine(t, g),
            "default": cosine(d, g) if d is not None else None,
            "extra_ratio": _relative_norm(d - t, t) if d is not None else None,
        }
        for k, (t, d, g) in router_gradient_triples(model, loss_fn, isolate_layers).items()
    }


def _relative_norm(a: torch.Tensor, b: torch.Tensor) -> float:
    denom = b.double().norm()
    return float(a.double().norm() / denom) if denom > 0 else float("inf")


def plot_router_gradient_cosines(history, path: str, title: Optional[str] = None) -> None:
    """Plot cosine-to-dense against training step, one panel per MoE layer.

    ``history``: ``{run name: {step: router_gradient_cosines(...)}}``. Solid lines: the Default MoE
    gradient; dashed: the TopK gradient of the same weights.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted({layer for run in history.values() for cos in run.values() for layer in cos})
    fig, axes = plt.subplots(1, len(layers), figsize=(4 * len(layers), 3.6), squeeze=False, sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, layer in zip(axes[0], layers):
        for color, (name, run) in zip(colors, history.items()):
            steps = sorted(s for s in run if layer in run[s])
            for variant, style in (("topk", "--"), ("default", "-")):
                values = [run[s][layer][variant] for s in steps]
                if steps and all(v is not None for v in values):
                    ax.plot(steps, values, style, marker=".", color=color, label=f"{name} model: {variant} grad")
        ax.set_title(f"MoE layer {layer}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("cosine to dense router gradient")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(title or "Router gradient vs dense gradient (paper Fig. 4)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
