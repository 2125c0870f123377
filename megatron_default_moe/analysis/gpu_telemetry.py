"""GPU telemetry for the training logs (``metrics.log_default_moe_metrics``): utilisation, memory
and power of this rank's GPU through ``nvidia-ml-py``; ``{}`` without an NVIDIA GPU or without the
package, so logging never fails for it."""

import torch

_NVML = {"ready": None}


def _nvml():
    """The ``pynvml`` module, initialised once, or ``None`` (no package, no driver)."""
    if _NVML["ready"] is None:
        try:
            import pynvml

            pynvml.nvmlInit()
            _NVML["ready"] = pynvml
        except Exception:  # ImportError, NVMLError (no driver / no GPU)
            _NVML["ready"] = False
    return _NVML["ready"] or None


def gpu_telemetry(device=None) -> dict:
    """``gpu/*`` utilisation (%), memory (GiB) and power (W) of a CUDA device; ``{}`` if unknown.

    ``device`` defaults to the current CUDA device; it is mapped to NVML's index the way torch
    maps it (``CUDA_VISIBLE_DEVICES`` aware). Fields the GPU does not report are left out.
    """
    if device is None:
        if not torch.cuda.is_available():
            return {}
        device = torch.cuda.current_device()
    nvml = _nvml()
    if nvml is None:
        return {}
    try:
        to_nvml = getattr(torch.cuda, "_get_nvml_device_index", None)
        index = to_nvml(device) if to_nvml is not None and torch.cuda.is_available() else int(device)
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
    except Exception:
        return {}
    readings = {
        "gpu/utilization_percent": lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu,
        "gpu/memory_bandwidth_utilization_percent": lambda: nvml.nvmlDeviceGetUtilizationRates(handle).memory,
        "gpu/memory_used_gib": lambda: nvml.nvmlDeviceGetMemoryInfo(handle).used / 2**30,
        "gpu/memory_total_gib": lambda: nvml.nvmlDeviceGetMemoryInfo(handle).total / 2**30,
        "gpu/power_w": lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,
        "gpu/power_limit_w": lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000.0,
    }
    out = {}
    for name, read in readings.items():
        try:
            out[name] = float(read())
        except Exception:  # NVMLError_NotSupported and friends
            pass
    return out
