"""fastbp's math layer: numpy reference, numba CPU kernels, Triton GPU kernels.

Installed as ``fastbp.kernels``; it imports nothing of fastbp, and no torch
except in gpu.py (Triton launches on torch tensors; imported only on demand), and
compiles nothing at import (each kernel compiles, or loads from numba's cache,
on its first call).
"""
