"""The numba kernels' own exp, sigmoid and tanh, and expm1, log1p and the normal CDF
(``fastbp/kernels/cpu_jit.py``), written so that LLVM vectorizes them: error over the whole input
range against a wider float (no worse than torch's own functions, or within the ulps
their comments state), torch's results for every special value, and the normal CDF's
coefficients reproduced by the fit that made them (``tools/fit_erfc.py``)."""

import importlib.util
import re
from pathlib import Path

import mpmath
import numba
import numpy as np
import pytest
import torch

from fastbp.kernels import cpu, cpu_jit

DTYPES = [np.float32, np.float64]
TORCH = {"exp": torch.exp, "sigmoid": torch.sigmoid, "tanh": torch.tanh}
# NaN, ±inf, ±0, and inputs whose result overflows to inf or underflows to 0
SPECIAL = [np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-30, -1e-30, 5e-324, 89.0, 710.0, -105.0,
           -750.0, 1e6, -1e6, 20.0, -20.0]  # fmt: skip


@numba.njit(error_model="numpy")
def _exp(x, out):
    for i in range(x.shape[0]):
        out[i] = cpu_jit.exp(x[i])


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
        out[i] = cpu_jit.tanh(cpu_jit.sigmoid(x[i]))


def test_the_functions_compile_to_vector_code_without_libm_calls():
    """A call in a loop is what kept numba's own exp and tanh scalar."""
    for dtype in DTYPES:
        x = np.ones(64, dtype)
        _sigmoid_then_tanh(x, np.empty_like(x))
    for assembly in _sigmoid_then_tanh.inspect_asm().values():
        assert not any(name in assembly for name in ("tanhf", "expf", "tanh@", "exp@")), "libm"
        assert "ymm" in assembly or "zmm" in assembly, "no vector registers"


@numba.njit(error_model="numpy")
def _helpers(x, out, which):
    for i in range(x.shape[0]):
        if which == 0:
            out[i] = cpu_jit.expm1_nonpositive(x[i])
        elif which == 1:
            out[i] = cpu_jit.log1p_unit(x[i])
        else:
            out[i] = cpu_jit.normal_cdf(x[i])[0]


def _normal_cdf_truth(x: np.ndarray) -> np.ndarray:
    with mpmath.workdps(30):
        return np.array([np.longdouble(mpmath.nstr(mpmath.ncdf(float(v)), 25)) for v in x])


# (helper, its domain as a sample, the truth in a wider float); ulps allowed per dtype
HELPERS = {
    "expm1": (
        0,
        lambda dtype: (
            -np.concatenate([np.linspace(0, 80, 200_001), np.geomspace(1e-30, 2, 50_001)])
        ),
        lambda x: np.expm1(x.astype(np.longdouble)),
        {np.float32: 1.0, np.float64: 1.0},
    ),
    "log1p": (
        1,
        lambda dtype: np.concatenate([np.linspace(0, 1, 200_001), np.geomspace(1e-30, 1, 50_001)]),
        lambda x: np.log1p(x.astype(np.longdouble)),
        {np.float32: 1.5, np.float64: 1.5},
    ),
    # float32 from its normal range's end, −13.2; a sample, as mpmath is slow
    "normal_cdf": (
        2,
        lambda dtype: np.concatenate(
            [
                np.linspace(-40 if dtype == np.float64 else -13.2, 9, 6001),
                np.geomspace(1e-12, 3, 1001),
                -np.geomspace(1e-12, 3, 1001),
            ]
        ),
        _normal_cdf_truth,
        {np.float32: 6.0, np.float64: 8.0},
    ),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("name", list(HELPERS))
def test_expm1_log1p_and_the_normal_cdf_are_within_their_stated_ulps(name, dtype):
    which, sample, truth, allowed = HELPERS[name]
    x = sample(dtype).astype(dtype)
    out = np.empty_like(x)
    _helpers(x, out, which)
    assert _ulps(out, truth(x), dtype) <= allowed[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_the_helpers_special_values(dtype):
    cases = {  # which: [(x, expected)]
        0: [(-np.inf, -1.0), (-0.0, -0.0), (0.0, 0.0), (-1e-30, -1e-30), (np.nan, np.nan)],
        1: [(0.0, 0.0), (1.0, np.log(2.0)), (np.nan, np.nan)],
        2: [(-np.inf, 0.0), (np.inf, 1.0), (0.0, 0.5), (-50.0, 0.0), (50.0, 1.0), (np.nan, np.nan)],
    }
    for which, pairs in cases.items():
        x = np.array([p[0] for p in pairs], dtype)
        expected = np.array([p[1] for p in pairs], dtype)
        out = np.empty_like(x)
        _helpers(x, out, which)
        same = (out == expected) & (np.signbit(out) == np.signbit(expected))
        same |= np.isnan(out) & np.isnan(expected)
        assert same.all(), (which, x[~same], out[~same])


def test_the_normal_cdfs_coefficients_are_the_fits_output():
    """``fastbp/kernels/cpu_jit.py`` holds what ``tools/fit_erfc.py`` prints (to an ulp of the
    largest coefficient, in case another mpmath rounds its 40 digits differently)."""
    path = Path(__file__).parents[1] / "tools" / "fit_erfc.py"
    spec = importlib.util.spec_from_file_location("fit_erfc", path)
    fit_erfc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fit_erfc)
    for name, (p, fit) in fit_erfc.fits().items():
        np.testing.assert_allclose(getattr(cpu_jit, f"_{name}_FIT")[1:], fit[:2], rtol=1e-15)
        assert getattr(cpu_jit, f"_{name}_FIT")[0] == p, name
        ours = np.array(getattr(cpu_jit, f"_{name.lower()}").coefficients)
        np.testing.assert_allclose(ours, fit.coefficients, rtol=0, atol=np.spacing(abs(ours).max()))


@numba.njit(error_model="numpy")
def _every_helper(x, out):
    for i in range(x.shape[0]):
        cdf, gaussian = cpu_jit.normal_cdf(x[i])
        out[i] = cpu_jit.expm1_nonpositive(x[i]) + cpu_jit.log1p_unit(gaussian) + cdf


def test_the_helpers_compile_to_vector_code_without_libm_calls():
    """libm's erf, expm1 and log1p kept the GELU, ELU and softplus passes scalar."""
    for dtype in DTYPES:
        x = np.ones(64, dtype)
        _every_helper(x, np.empty_like(x))
    for assembly in _every_helper.inspect_asm().values():
        assert not re.findall(r"\b(erff?|expm1f?|log1pf?|expf?)\b", assembly), "libm"
        assert "ymm" in assembly or "zmm" in assembly, "no vector registers"
