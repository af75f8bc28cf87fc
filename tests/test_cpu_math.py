"""The numba kernels' own exp, sigmoid and tanh (``kernels/cpu.py``), written so
that LLVM vectorizes them: error over the whole input range against a wider float,
no worse than torch's own functions, and torch's results for every special value."""

import numba
import numpy as np
import pytest
import torch

from fastbp.kernels import cpu

DTYPES = [np.float32, np.float64]
TORCH = {"exp": torch.exp, "sigmoid": torch.sigmoid, "tanh": torch.tanh}
# NaN, ±inf, ±0, and inputs whose result overflows to inf or underflows to 0
SPECIAL = [np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-30, -1e-30, 5e-324, 89.0, 710.0, -105.0,
           -750.0, 1e6, -1e6, 20.0, -20.0]  # fmt: skip


@numba.njit(error_model="numpy")
def _exp(x, out):
    for i in range(x.shape[0]):
        out[i] = cpu.exp(x[i])


def _ours(name: str, x: np.ndarray) -> np.ndarray:
    if name == "exp":
        out = np.empty_like(x)
        _exp(x, out)
        return out
    return cpu.activate(x, name)


def _truth(name: str, x: np.ndarray) -> np.ndarray:
    wide = x.astype(np.longdouble)
    with np.errstate(over="ignore"):
        return {"exp": np.exp, "sigmoid": lambda v: 1 / (1 + np.exp(-v)), "tanh": np.tanh}[name](
            wide
        )


def _sweep(dtype) -> np.ndarray:
    limit = 120.0 if dtype == np.float32 else 760.0
    dense = np.linspace(-limit, limit, 1_000_001)
    small = np.geomspace(1e-30, 2.0, 200_001)
    return np.concatenate([dense, np.linspace(-2, 2, 400_001), small, -small]).astype(dtype)


def _ulps(value: np.ndarray, truth: np.ndarray, dtype) -> float:
    """Largest error in units of the last place of the correctly rounded result, over
    the results that are normal numbers in ``dtype``."""
    with np.errstate(over="ignore"):  # truths beyond dtype's range round to inf: left out
        rounded = truth.astype(dtype)
    normal = np.isfinite(rounded) & (np.abs(rounded) >= np.finfo(dtype).tiny)
    spacing = np.spacing(np.abs(rounded[normal])).astype(np.longdouble)
    return float(np.max(np.abs(value[normal].astype(np.longdouble) - truth[normal]) / spacing))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("name", ["sigmoid", "tanh"])
def test_activation_error_is_no_worse_than_torchs(name, dtype):
    x = _sweep(dtype)
    truth = _truth(name, x)
    ours = _ulps(_ours(name, x), truth, dtype)
    torchs = _ulps(TORCH[name](torch.from_numpy(x)).numpy(), truth, dtype)
    assert ours <= torchs + 0.01, (ours, torchs)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_exp_is_within_one_ulp(dtype):
    x = _sweep(dtype)
    assert _ulps(_ours("exp", x), _truth("exp", x), dtype) <= 1.0


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("name", ["exp", "sigmoid", "tanh"])
def test_special_values_give_torchs_results(name, dtype):
    """NaN, ±inf, ±0, overflow, underflow and the branch points, bit for bit as torch."""
    x = np.array(SPECIAL + [-v for v in SPECIAL], dtype)
    ours, torchs = _ours(name, x), TORCH[name](torch.from_numpy(x)).numpy()
    same = (ours == torchs) & (np.signbit(ours) == np.signbit(torchs))
    same |= np.isnan(ours) & np.isnan(torchs)
    assert same.all(), list(zip(x[~same], ours[~same], torchs[~same], strict=True))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("name", ["relu", "sigmoid", "tanh"])
def test_derivatives_match_torchs_backward(name, dtype):
    """δ = g ⊙ act'(z) from the saved output, as torch's threshold/sigmoid/tanh_backward."""
    rng = np.random.default_rng(0)
    z = rng.standard_normal((300, 257)).astype(dtype) * 4  # 77 100: the parallel path too
    g = rng.standard_normal(z.shape).astype(dtype)
    a = _ours(name, z)
    ours = cpu.activation_grad(g, a, name)
    gt, at = torch.from_numpy(g), torch.from_numpy(a)
    backward = {
        "relu": lambda: torch.ops.aten.threshold_backward(gt, at, 0),
        "sigmoid": lambda: torch.ops.aten.sigmoid_backward(gt, at),
        "tanh": lambda: torch.ops.aten.tanh_backward(gt, at),
    }[name]()
    eps = np.finfo(dtype).eps
    np.testing.assert_allclose(ours, backward.numpy(), rtol=4 * eps, atol=4 * eps)


@numba.njit(error_model="numpy")
def _sigmoid_then_tanh(x, out):
    for i in range(x.shape[0]):
        out[i] = cpu.tanh(cpu.sigmoid(x[i]))


def test_the_functions_compile_to_vector_code_without_libm_calls():
    """A call in a loop is what kept numba's own exp and tanh scalar."""
    for dtype in DTYPES:
        x = np.ones(64, dtype)
        _sigmoid_then_tanh(x, np.empty_like(x))
    for assembly in _sigmoid_then_tanh.inspect_asm().values():
        assert not any(name in assembly for name in ("tanhf", "expf", "tanh@", "exp@")), "libm"
        assert "ymm" in assembly or "zmm" in assembly, "no vector registers"
