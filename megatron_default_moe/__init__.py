"""Default MoE (dense router gradients with EMA default vectors, arXiv 2504.12463) for Megatron-Core.

Importing this package changes nothing in Megatron; ``megatron_default_moe.testing.cpu`` (CPU
stand-ins for CUDA calls) is applied only when asked for.
"""

from megatron_default_moe import moved
from megatron_default_moe.compat import check_megatron_core_version

check_megatron_core_version()
moved.install()

from megatron_default_moe.config import DefaultMoEConfig  # noqa: E402
from megatron_default_moe.layer import DefaultMoELayer  # noqa: E402
from megatron_default_moe.router import DefaultMoERouter  # noqa: E402
from megatron_default_moe.spec import default_moe_spec, to_default_moe_spec  # noqa: E402
from megatron_default_moe.update import (  # noqa: E402
    default_moe_layers,
    report_nonfinite_skips,
    update_default_vectors,
    wrap_finalize_model_grads,
)

__version__ = "0.3.0"

__all__ = [
    "DefaultMoEConfig",
    "DefaultMoELayer",
    "DefaultMoERouter",
    "default_moe_layers",
    "default_moe_spec",
    "report_nonfinite_skips",
    "to_default_moe_spec",
    "update_default_vectors",
    "wrap_finalize_model_grads",
]
