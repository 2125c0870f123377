"""Triton kernels of the custom ops (they import only Triton and each other)."""
