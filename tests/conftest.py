"""Shared helpers: seeded networks and the error measure the accuracy tests use."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import fastbp

# Without a GPU, the Triton kernels run on CPU tensors in Triton's interpreter,
# which is chosen when triton is first imported: set it before anything does.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_sessionstart(session):
    # Tests that call fastbp.kernels directly run under the thread policy users
    # get (torch's BLAS, numba at torch's thread count), not scipy's fallback.
    fastbp.threads.ensure_policy()


def pytest_addoption(parser):
    parser.addoption(
        "--run-slow", action="store_true", help="also run long property runs (marker 'slow')"
    )


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="long run: opt in with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def make_network(sizes, batch, bias=True, dtype=torch.float64, seed=0, scale=1.0):
    """Seeded (x, weights, biases, grad_output) for an MLP of widths ``sizes``.

    Weights follow nn.Linear's init scale, so activations stay O(1) at any width.
    """
    generator = torch.Generator().manual_seed(seed)

    def uniform(*shape, bound):
        return (torch.rand(*shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound

    x = torch.randn(batch, sizes[0], generator=generator, dtype=torch.float64) * scale
    weights, biases = [], []
    flags = bias if isinstance(bias, (list, tuple)) else [bias] * (len(sizes) - 1)
    for fan_in, fan_out, has_bias in zip(sizes[:-1], sizes[1:], flags, strict=True):
        bound = 1 / math.sqrt(fan_in)
        weights.append(uniform(fan_out, fan_in, bound=bound))
        biases.append(uniform(fan_out, bound=bound) if has_bias else None)
    grad_output = torch.randn(batch, sizes[-1], generator=generator, dtype=torch.float64)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(x), [cast(w) for w in weights], [cast(b) for b in biases], cast(grad_output)


def max_abs_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest absolute difference, NaN-aware: a NaN where the reference has none is infinite."""
    value, reference = value.double().cpu(), reference.double().cpu()
    mismatch = torch.isnan(value) != torch.isnan(reference)
    if mismatch.any():
        return math.inf
    both = ~torch.isnan(reference)
    return (value[both] - reference[both]).abs().max().item() if both.any() else 0.0


def assert_no_less_accurate(name: str, ours, torchs, exact, dtype: torch.dtype, slack=None):
    """fastbp's error against ``exact`` is at most twice torch's own error in ``dtype``,
    plus ``slack`` (default: 4 units in the last place of the largest exact value).

    The criterion of every accuracy test (flash-attention's): judged against a wider
    float, relative to what torch itself achieves on the same case, never a fixed atol.
    """
    if slack is None:
        slack = 4 * torch.finfo(dtype).eps * (1 + exact.double().abs().max().item())
    error, torch_error = max_abs_error(ours, exact), max_abs_error(torchs, exact)
    bound = 2 * torch_error + slack
    assert error <= bound, (
        f"{name}: error {error:.3g} > bound {bound:.3g} (torch: {torch_error:.3g})"
    )


def run_cli(*arguments: str) -> subprocess.CompletedProcess:
    """``fastbp ARGUMENTS`` in a subprocess, as a user runs it."""
    command = [sys.executable, "-m", "fastbp.cli", *arguments]
    return subprocess.run(command, capture_output=True, text=True)
