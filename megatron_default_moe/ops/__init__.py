"""Custom ops (``torch.library``) with their torch references and CPU fallback; ``kernels/``: their
Triton kernels, launched by ``launch.py``."""
