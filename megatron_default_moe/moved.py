"""Module paths of releases before 0.3, kept importable: saved artefacts name them (a
``GPTModelConfig``'s ``builder``, Megatron-LM trees patched by 0.2's ``patches/``), and so may
user code. Each old name is the module at its new path (``DeprecationWarning``, once)."""

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

_PACKAGE = "megatron_default_moe."
MOVED = {  # 0.2 module -> 0.3 module, under megatron_default_moe
    "statistics": "estimators.routed_rows",
    "probes": "estimators.probes",
    "shared_fit": "estimators.shared_fit",
    "fused": "ops.ema",
    "fit_ops": "ops.fit",
    "probe_ops": "ops.probes",
    "fallback": "ops.fallback",
    "triton_launch": "ops.launch",
    "triton_kernels": "ops.kernels.ema",
    "triton_fit_kernels": "ops.kernels.fit",
    "triton_probe_kernels": "ops.kernels.probes",
    "arguments": "megatron_lm.arguments",
    "entry": "megatron_lm.entry",
    "model_config": "megatron_lm.model_config",
    "hybrid_spec": "megatron_lm.hybrid_spec",
    "diagnostics": "analysis.diagnostics",
    "vector_quality": "analysis.vector_quality",
    "default_oracles": "analysis.default_oracles",
    "oracle_fits": "analysis.oracle_fits",
    "metrics": "analysis.metrics",
    "gpu_telemetry": "analysis.gpu_telemetry",
    "data": "testing.data",
}


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports ``megatron_default_moe.<old>`` as the module now at ``MOVED[old]``."""

    def find_spec(self, name, path=None, target=None):
        if name.startswith(_PACKAGE) and name[len(_PACKAGE):] in MOVED:
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        new = _PACKAGE + MOVED[spec.name[len(_PACKAGE):]]
        warnings.warn(f"{spec.name} moved to {new} in megatron-default-moe 0.3", DeprecationWarning, stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module):
        pass  # the new module has run


def install() -> None:
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
