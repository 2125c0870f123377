"""Megatron's hybrid stack spec in its Default MoE form, for ``pretrain_hybrid.py --spec``.

    python pretrain_hybrid.py ... --spec megatron_default_moe.megatron_lm.hybrid_spec hybrid_stack_spec

Megatron-LM's ``pretrain_hybrid.py`` imports ``--spec MODULE NAME`` as a module-level object (not
a function), so this module builds it on import: ``megatron.core.models.hybrid.hybrid_layer_specs
.hybrid_stack_spec`` (Transformer Engine layers) with its ``moe_layer`` made Default MoE, paper
defaults (``DefaultMoEConfig()``). Its MTP layers are built from the same ``moe_layer``. For other
settings use ``examples/pretrain_hybrid_default_moe.py`` and the ``--moe-default-*`` flags, or
``to_default_moe_spec(your_spec, DefaultMoEConfig(...))`` in a module of your own.
"""

from megatron.core.models.hybrid import hybrid_layer_specs

from megatron_default_moe.config import DefaultMoEConfig
from megatron_default_moe.spec import to_default_moe_spec

hybrid_stack_spec = to_default_moe_spec(hybrid_layer_specs.hybrid_stack_spec, DefaultMoEConfig())
