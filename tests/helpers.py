"""What the tests share: seeded networks, the accuracy criterion (error against a wider
float, no worse than torch's own) in its forms, the published examples' check, fresh
processes, and the CUDA marker. (``conftest.py`` holds pytest's hooks and fixtures.)"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, NamedTuple

import numpy as np
import pytest
import torch

from fastbp import examples
from fastbp.kernels import reference
from fastbp.registry import REGISTRY

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU; none on this machine"
)


# The sm_90 compile check (test_triton.py) compiles every Triton kernel variant for an
# H100 in a process of its own: minutes of one core, so it starts at collection.
SM90_TEST = "test_every_kernel_compiles_for_an_h100"
SM90_WORKER = Path(__file__).with_name("triton_compile_worker.py")


class _Worker(NamedTuple):
    process: subprocess.Popen
    output: IO[str]  # stdout and stderr together, in a file: a pipe left unread would fill


def sm90_compile(config) -> _Worker:
    """The sm_90 compile worker of this session, started on first use, without
    TRITON_INTERPRET so that it compiles for the GPU."""
    worker = getattr(config, "_fastbp_sm90", None)
    if worker is None:
        output = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed at session finish)
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        process = subprocess.Popen(
            [sys.executable, str(SM90_WORKER)],
            stdout=output,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        worker = config._fastbp_sm90 = _Worker(process, output)
    return worker


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


def torch_gradients(x, weights, biases, activations, grad_output):
    """torch-eager's ``(output, ∂x, [∂Wₗ], [∂bₗ])``, on whatever device its tensors are."""
    return REGISTRY["torch-eager", "cpu"].gradients(x, weights, biases, activations, grad_output)


def named_results(result) -> dict:
    """``(output, ∂x, [∂Wₗ], [∂bₗ])`` as a dict by name, layers without bias left out."""
    output, grad_x, grad_weights, grad_biases = result
    names = ["output", "grad_x"] + [f"grad_weights[{i}]" for i in range(len(grad_weights))]
    names += [f"grad_biases[{i}]" for i, g in enumerate(grad_biases) if g is not None]
    return dict(
        zip(
            names,
            [output, grad_x, *grad_weights, *(g for g in grad_biases if g is not None)],
            strict=True,
        )
    )


def higher_precision(x, weights, biases, activations, grad_output):
    """The reference result, computed in a wider float than the inputs."""
    if x.dtype != torch.float64:
        up = lambda t: None if t is None else t.double()  # noqa: E731
        run = torch_gradients
    else:
        up = lambda t: None if t is None else t.numpy().astype(np.longdouble)  # noqa: E731
        run = _longdouble_reference
    return run(
        up(x), [up(w) for w in weights], [up(b) for b in biases], activations, up(grad_output)
    )


def _longdouble_reference(x, weights, biases, activations, grad_output):
    outputs = reference.mlp_forward(x, weights, biases, activations)
    grad_x, grad_weights, grad_biases = reference.mlp_backward(
        grad_output, x, weights, biases, activations, outputs
    )
    as_tensor = lambda a: None if a is None else torch.from_numpy(a.astype(np.float64))  # noqa: E731
    return (
        as_tensor(outputs[-1]),
        as_tensor(grad_x),
        [as_tensor(g) for g in grad_weights],
        [as_tensor(g) for g in grad_biases],
    )


def assert_as_accurate_as_torch(
    name, sizes, batch, activation, bias, dtype, seed=0, *, device="cpu", entry="cpu", run=None
):
    """Registry entry ``(name, entry)`` (or the runner ``run``, reported as ``name``) has
    at most twice torch's error in ``dtype`` on ``device``, plus a few units in the last
    place. ``entry`` is the entry's device: Triton's ("cuda") also runs on CPU tensors
    in its interpreter.

    The reference is computed on the CPU in a wider float from the same inputs.
    """
    x, weights, biases, grad_output = make_network(sizes, batch, bias, dtype=dtype, seed=seed)
    activations = [activation] * (len(sizes) - 2) + [activation]
    exact = named_results(higher_precision(x, weights, biases, activations, grad_output))
    on_device = lambda t: None if t is None else t.to(device)  # noqa: E731
    inputs = (
        on_device(x),
        [on_device(w) for w in weights],
        [on_device(b) for b in biases],
        activations,
        on_device(grad_output),
    )
    torchs = named_results(torch_gradients(*inputs))
    ours = named_results((run or REGISTRY[name, entry].gradients)(*inputs))
    for key, expected in exact.items():
        assert ours[key].dtype == dtype, key
        assert ours[key].shape == expected.shape, key
        assert_no_less_accurate(f"{name} {key}", ours[key], torchs[key], expected, dtype)


# Each activation as a function of z, and its derivative and the derivative's slope as
# functions of the output a (how an error in a reaches δ = g·act′): numpy, float64.
ACTIVATIONS = {
    "identity": (lambda z: z, lambda a: np.ones_like(a), lambda a: np.zeros_like(a)),
    "relu": (lambda z: np.maximum(z, 0), lambda a: (a > 0) * 1.0, lambda a: np.zeros_like(a)),
    "sigmoid": (lambda z: 1 / (1 + np.exp(-z)), lambda a: a * (1 - a), lambda a: 1 - 2 * a),
    "tanh": (np.tanh, lambda a: 1 - a * a, lambda a: -2 * a),
}


def error_scales(x, weights, biases, activations, g, eps: float) -> list[np.ndarray]:
    """Element-wise scales of the rounding error of every output and gradient, in
    units of ``eps`` and in ``_forward_and_gradients`` order: outputs, ∂x, ∂Wₗ, ∂bₗ.

    First-order error analysis on the true values: a sum's rounding contributes
    Σ|terms|, a product's its own size, and each input's error reaches the result
    through |W| and through the activation's derivative at that element (a sigmoid
    that saturates passes almost nothing on). A relu whose pre-activation lies within
    4 ulp of its scale from zero may round to either side of the kink: its δ may be g
    or 0, so its scale is |g| / eps."""
    absolute = [np.abs(w) for w in weights]
    values, scales, kinks = [x], [np.zeros_like(x)], []
    for layer, name in enumerate(activations):
        function, derivative, _ = ACTIVATIONS[name]
        bias = 0 if biases[layer] is None else biases[layer]
        pre = values[-1] @ weights[layer].T + bias
        z = (scales[-1] + np.abs(values[-1])) @ absolute[layer].T + np.abs(bias)
        values.append(function(pre))
        scales.append(np.abs(derivative(values[-1])) * z + np.abs(values[-1]))
        kinks.append((np.abs(pre) <= 4 * eps * z) if name == "relu" else 0)
    g_scale = np.zeros_like(g)
    weight_scales, bias_scales = [None] * len(weights), [None] * len(weights)
    for layer in reversed(range(len(weights))):
        _, derivative, slope = ACTIVATIONS[activations[layer]]
        a, a_scale = values[layer + 1], scales[layer + 1]
        delta = g * derivative(a)
        delta_scale = (
            g_scale * np.abs(derivative(a))
            + np.abs(g * slope(a)) * a_scale
            + 2 * np.abs(delta)
            + np.abs(g) * kinks[layer] / eps
        )
        source, source_scale = np.abs(values[layer]), scales[layer]
        weight_scales[layer] = (delta_scale + np.abs(delta)).T @ source
        weight_scales[layer] += np.abs(delta).T @ source_scale
        bias_scales[layer] = (delta_scale + np.abs(delta)).sum(axis=0)
        g_scale = (delta_scale + np.abs(delta)) @ absolute[layer]
        g = delta @ weights[layer]
    present = [s for s, b in zip(bias_scales, biases, strict=True) if b is not None]
    return [*scales[1:], g_scale, *weight_scales, *present]


def assert_matches_published(example: str, values: dict[str, float]) -> None:
    """Every quantity of ``values`` that ``example`` published matches it (at least one)."""
    published = {p.quantity: p for p in examples.PUBLISHED if p.example == example}
    compared = [quantity for quantity in values if quantity in published]
    assert compared, f"none of {list(values)} is published for {example}"
    for quantity in compared:
        expected = published[quantity]
        assert expected.rule.accepts(values[quantity], expected.value), (
            f"{example} {quantity}: got {values[quantity]!r}, published {expected.value}"
        )


def run_python(
    program: str, *, unset: tuple[str, ...] = (), **environment: str
) -> subprocess.CompletedProcess:
    """``python -c program`` in a fresh process: this one's environment with the
    variables in ``unset`` removed and ``environment`` added."""
    env = {k: v for k, v in os.environ.items() if k not in unset} | environment
    command = [sys.executable, "-c", program]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def run_cli(*arguments: str) -> subprocess.CompletedProcess:
    """``fastbp ARGUMENTS`` in a subprocess, as a user runs it."""
    command = [sys.executable, "-m", "fastbp.cli", *arguments]
    return subprocess.run(command, capture_output=True, text=True)


class Launches(NamedTuple):
    """What ``count_launches`` saw: Triton kernels by name, torch compute ops by name,
    and the ops that make the host wait on the device."""

    kernels: list[str]
    torch_ops: list[str]
    syncs: list[str]

    @property
    def total(self) -> int:
        return len(self.kernels) + len(self.torch_ops)


# aten ops whose result the host reads: on a GPU, each waits for the device.
HOST_READS = {"_local_scalar_dense", "nonzero", "is_nonzero", "equal", "allclose", "item"}


@contextlib.contextmanager
def count_launches():
    """Count the launches of the code inside: Triton kernels (compiled or interpreted)
    and torch ops that compute (not views, not allocations that write nothing), and
    the host reads among the ops (``HOST_READS``). What the interpreter does inside a
    kernel is the kernel's, not counted."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    seen = Launches([], [], [])
    inside = []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not inside:
                name = func._schema.name.removeprefix("aten::")
                if name in HOST_READS:
                    seen.syncs.append(name)
                if _computes(func):
                    seen.torch_ops.append(name)
            return func(*args, **(kwargs or {}))

    def counted(run):
        def launch(self, *args, **kwargs):
            if not kwargs.get("warmup") and not inside:
                seen.kernels.append(self.fn.__name__)
            inside.append(True)
            try:
                return run(self, *args, **kwargs)
            finally:
                inside.pop()

        return launch

    runs = {cls: cls.run for cls in (InterpretedFunction, JITFunction)}
    try:
        for cls, run in runs.items():
            cls.run = counted(run)
        with Ops():
            yield seen
    finally:
        for cls, run in runs.items():
            cls.run = run


_ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}


def _computes(func) -> bool:
    """Whether an aten op launches work: not a view (an alias it does not write), not
    an allocation that writes nothing, not a metadata query."""
    schema = func._schema
    name = schema.name.removeprefix("aten::")
    if name in _ALLOCATIONS or name in ("is_pinned", "_has_compatible_shallow_copy_type"):
        return False
    returns = schema.returns
    if returns and returns[0].alias_info is not None and not returns[0].alias_info.is_write:
        return False  # a view
    return bool(returns)


def python_calls(run: Callable[[], object]) -> list[str]:
    """The Python functions ``run()`` calls (``sys.setprofile``'s "call" events, each
    as ``file:function``), after two calls to warm any cache."""
    for _ in range(2):
        run()
    calls = []

    def profile(frame, event, arg):
        if event == "call":
            calls.append(f"{Path(frame.f_code.co_filename).name}:{frame.f_code.co_name}")

    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
    return calls[1:]  # the first is run itself
