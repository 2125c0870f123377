"""Megatron-LM command-line flags for Default MoE, and how they reach a model config.

``add_default_moe_args(parser)`` is an ``extra_args_provider`` for
``megatron.training.arguments.parse_and_validate_args``. ``default_moe_config_from_args(args)``
turns the parsed flags into a ``DefaultMoEConfig`` (``None`` while ``--moe-default-vectors`` is
off); ``model_config.py`` takes it from there to a ``megatron.training`` model config.
"""

import argparse
import warnings

from megatron_default_moe.compat import escape_stray_help_percents
from megatron_default_moe.config import UPDATES, DefaultMoEConfig
from megatron_default_moe.functional import EMA_WEIGHTINGS, MODES, NORMALISERS
from megatron_default_moe.megatron_lm.model_config import DefaultMoEGPTModelBuilder  # noqa: F401  (0.2 configs name it here)
from megatron_default_moe.estimators.probes import PROBE_DRAWS
from megatron_default_moe.estimators.shared_fit import FITS

# (flag, args attribute, DefaultMoEConfig field, argparse kwargs)
def _probes_arg(value: str):
    """``--moe-default-probes``: an integer, or ``auto``."""
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0 or 'auto', got {value!r}") from None


_FLAGS = (
    (
        "--moe-default-ema-beta",
        "moe_default_ema_beta",
        "beta",
        dict(type=float, default=0.9, help="EMA decay β of the default vectors, in [0, 1] (paper: 0.9 for 8 experts)."),
    ),
    (
        "--moe-default-ema-weighting",
        "moe_default_ema_weighting",
        "ema_weighting",
        dict(
            type=str,
            default="uniform",
            choices=EMA_WEIGHTINGS,
            help="'uniform' (paper) averages unweighted expert outputs; 'router' weights them by the routing prob.",
        ),
    ),
    (
        "--moe-default-update",
        "moe_default_update",
        "update",
        dict(
            type=str,
            default="microbatch",
            choices=UPDATES,
            help="'microbatch' (paper) updates before use in every micro-batch; 'step' once per optimizer step.",
        ),
    ),
    (
        "--moe-default-mode",
        "moe_default_mode",
        "mode",
        dict(
            type=str,
            default="auto",
            choices=MODES,
            help="'forward' adds the default term to the output; 'backward-only' adds only its gradient; "
            "'auto' (default): forward for softmax with --moe-router-pre-softmax, backward-only for "
            "renormalised and sigmoid routers.",
        ),
    ),
    (
        "--moe-default-normaliser",
        "moe_default_normaliser",
        "normaliser",
        dict(
            type=str,
            default="selected",
            choices=NORMALISERS,
            help="Renormalised routers only: divide the default weights by the selected experts' score "
            "sum ('selected', DenseMixer's rule) or by all experts' ('all': a smaller extra router gradient).",
        ),
    ),
    (
        "--moe-default-stats-stride",
        "moe_default_stats_stride",
        "stats_stride",
        dict(
            type=int,
            default=1,
            help="Statistics of the default vectors from every N-th expert-output row (offset rotating per "
            "update): 1/N of the expert output is read. 1 (default, the paper) takes every row.",
        ),
    ),
    (
        "--moe-default-probes",
        "moe_default_probes",
        "probes",
        dict(
            type=_probes_arg,
            default=None,
            help="Unchosen (token, expert) pairs each rank sends to the experts per micro-batch for the "
            "default vectors only (excluded from output, losses and gradients): the vectors then average "
            "each expert's output on tokens that did not choose it, where they are used. 0: off; "
            "'auto': ceil(8 x experts / token sets in the stage), off (logged) where probes cannot run. "
            "Default: 'auto' for renormalised and sigmoid routers, 0 (the routed rows' EMA, the paper's "
            "method) for softmax with --moe-router-pre-softmax.",
        ),
    ),
    (
        "--moe-default-probe-draw",
        "moe_default_probe_draw",
        "probe_draw",
        dict(
            type=str,
            default="uniform",
            choices=PROBE_DRAWS,
            help="How probe pairs are drawn among those with a nonzero default weight: 'uniform', or "
            "'weighted' (proportionally to the weight).",
        ),
    ),
    (
        "--moe-default-fit",
        "moe_default_fit",
        "fit",
        dict(
            type=str,
            default=None,
            choices=FITS,
            help="'constant' (paper): one default vector per expert; 'shared-1': each expert's default is "
            "linear in the token's coordinate on one shared input direction, fitted online from the probes "
            "(needs --moe-default-probes). Default: 'shared-1' where the router's default probes run "
            "(renormalised and sigmoid routers), 'constant' otherwise.",
        ),
    ),
    (
        "--moe-default-fit-beta",
        "moe_default_fit_beta",
        "fit_beta",
        dict(type=float, default=None, help="EMA decay of the shared-1 fit (slopes, means, direction); default: a "
             "window of about 16 H probes per expert."),
    ),
    (
        "--moe-default-probe-seed",
        "moe_default_probe_seed",
        "probe_seed",
        dict(type=int, default=0, help="Seed of the probe draws (with a checkpointed micro-batch counter)."),
    ),
)


def add_default_moe_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the Default MoE flags (an ``extra_args_provider``); returns ``parser``.

    Flags the parser already has (a Megatron-LM patched with ``patches/``, whose
    ``TransformerConfig`` fields generate the same flags) are left as they are. Stray ``%`` in
    any help string is escaped, so ``--help`` works on Megatron-LM core_v0.19.0 (see
    ``compat.escape_stray_help_percents``).
    """
    existing = set(parser._option_string_actions)
    group = parser.add_argument_group(title="Default MoE (arXiv 2504.12463)")
    if "--moe-default-vectors" not in existing:
        group.add_argument(
            "--moe-default-vectors",
            action="store_true",
            default=False,
            help="Use Default MoE: EMA default vectors stand in for unselected experts, "
            "giving the router a dense gradient. Works with every TopK router (softmax, sigmoid, sqrtsoftplus).",
        )
    for flag, dest, _, kwargs in _FLAGS:
        if flag not in existing:
            group.add_argument(flag, dest=dest, **kwargs)
    escape_stray_help_percents(parser)
    return parser


def default_moe_config_from_args(args) -> DefaultMoEConfig | None:
    """``DefaultMoEConfig`` from parsed flags, or ``None`` when ``--moe-default-vectors`` is off.

    Raises ``ValueError`` naming the flag of a bad value (these also come from YAML or code,
    not only through argparse's ``choices``).
    """
    if not getattr(args, "moe_default_vectors", False):
        changed = [
            flag
            for flag, dest, _, kwargs in _FLAGS
            if getattr(args, dest, kwargs["default"]) != kwargs["default"]
        ]
        if changed:
            warnings.warn(f"{', '.join(changed)} set without --moe-default-vectors: ignored", stacklevel=2)
        return None
    values = {}
    for flag, dest, field, kwargs in _FLAGS:
        value = getattr(args, dest, kwargs["default"])
        if field == "beta":
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"{flag} must be a number in [0, 1], got {value!r}") from None
        if field == "probes" and isinstance(value, str):  # the patch's TransformerConfig field is a str
            try:
                value = _probes_arg(value)
            except argparse.ArgumentTypeError as err:
                raise ValueError(f"{flag}: {err}") from None
        values[field] = value
    return DefaultMoEConfig(**values)
