"""Megatron-LM glue: the ``--moe-default-*`` flags, the entry scripts' helpers, ``megatron.training``
model configs and the hybrid stack spec."""
