"""Import Megatron-Bridge on a machine without Transformer Engine (CPU tests, the CPU example).

megatron-bridge 0.6.2 has one unconditional Transformer Engine import on its import path:
``megatron/bridge/peft/lora_layers.py`` runs ``import transformer_engine.pytorch as te`` (LoRA
layers; every other Bridge module guards its TE import). ``import_megatron_bridge()`` lets that
one module, and only while it executes, see a stand-in whose every name is a class nothing is an
instance of (``isinstance(x, te.Linear)`` is False; building one raises ``ImportError``). Every
other ``import transformer_engine`` still fails, so Megatron and Bridge keep seeing no TE. With
Transformer Engine installed nothing is stood in for. Not applied on import.
"""

import importlib
import importlib.abc
import sys
import types

LORA_LAYERS = "megatron.bridge.peft.lora_layers"
_TE_NAMES = ("transformer_engine", "transformer_engine.pytorch")


class _Absent:
    """A Transformer Engine name: nothing is an instance; constructing one says why not."""

    def __init__(self, *args, **kwargs):
        raise ImportError("Transformer Engine is not installed (a CPU stand-in from megatron_default_moe.bridge.cpu)")


def _stand_in_module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__getattr__ = lambda attr: _Absent if attr[:1].isupper() else _stand_in_module(f"{name}.{attr}")
    return module


class _StandInWhileLoraLayersExecutes(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name != LORA_LAYERS:
            return None
        for finder in sys.meta_path:
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    self.real_loader, spec.loader = spec.loader, self
                    return spec
        return None

    def create_module(self, spec):
        return self.real_loader.create_module(spec)

    def exec_module(self, module):
        stand_in = _stand_in_module("transformer_engine")
        stand_in.pytorch = _stand_in_module("transformer_engine.pytorch")
        sys.modules.update({"transformer_engine": stand_in, "transformer_engine.pytorch": stand_in.pytorch})
        try:
            self.real_loader.exec_module(module)
        finally:
            for name in _TE_NAMES:
                sys.modules.pop(name, None)


def has_transformer_engine() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, or TE installed but unusable (e.g. no GPU visible)
        return False
    return True


def import_megatron_bridge():
    """``import megatron.bridge`` (returns the module), standing in for its one TE import if needed."""
    if "megatron.bridge" in sys.modules or has_transformer_engine():
        return importlib.import_module("megatron.bridge")
    import megatron.core.extensions.transformer_engine  # noqa: F401  (HAVE_TE decided before)

    finder = _StandInWhileLoraLayersExecutes()
    sys.meta_path.insert(0, finder)
    try:
        return importlib.import_module("megatron.bridge")
    finally:
        sys.meta_path.remove(finder)
