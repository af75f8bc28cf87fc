"""fastbp: hand-derived, accelerated backpropagation for dense MLPs, as a PyTorch extension.

    import fastbp
    # a drop-in for nn.Sequential(nn.Linear(1000, 100), nn.ReLU(), nn.Linear(100, 10))
    model = fastbp.nn.MLP([1000, 100, 10])
    y = fastbp.functional.linear_act(x, w, b, "relu")

Importing fastbp compiles nothing: each kernel compiles (or loads from numba's
on-disk cache) on its first call.
"""

from importlib.metadata import PackageNotFoundError, version

from . import functional, nn, threads

try:
    __version__ = version("fastbp")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["functional", "nn", "threads", "__version__"]
