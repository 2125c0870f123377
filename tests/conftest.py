"""Single-rank Megatron on CPU for in-process tests (multi-rank tests launch torchrun)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="session")
def megatron_cpu():
    """gloo world of one process with Megatron's model-parallel groups (all sizes 1)."""
    from megatron_default_moe.testing import cpu

    cpu.init_parallel(seed=1234)
    yield
    cpu.destroy_parallel()
