r"""CPU kernels: the reference's forward and backward, jitted with numba and fused.

The math is the one written out in ``reference.py``; this file only changes how
it is computed. Per layer, with W in ``nn.Linear``'s (out, in) layout::

    forward     z = x Wᵀ + b        one GEMM into rows that hold b (beta = 1: one
                                    rounding, as torch's addmm)
                a = act(z)          one pass, out of place: z is kept where backward
                                    reads it, else it lives in a scratch buffer
    backward    δ = g ⊙ act'(·)     one pass into a δ buffer that also sums
                                    ∂L/∂b = Σ_batch δ; act' reads a (identity, relu,
                                    sigmoid, tanh) or z (the other six)
                ∂L/∂W = δᵀ x        one GEMM
                ∂L/∂x = δ W         one GEMM, skipped when x needs no gradient

A whole network runs every layer in one call: ``mlp_forward`` keeps each layer's
output, and z where the derivative reads it (backward's only saved state);
``mlp_backward`` writes ``∂L/∂aₗ₋₁ = δₗ Wₗ`` into a second workspace, which layer
l−1's pass reads to write its own δ.

GEMMs go to a Fortran BLAS ``?gemm`` chosen by ``bind_gemm``, because numba's
own ``np.dot`` is ~1.8× slower on these shapes and, through scipy's OpenBLAS,
brings a thread pool that fights torch's. Its address is an argument of every
kernel, never a constant or a linked symbol, so a ``cache=True`` kernel compiled
in a process that used one BLAS runs safely in a process that uses another.
Every kernel here compiles on first use, never at import.

Every jitted function of the CPU kernels lives in this one file: numba's on-disk
cache keys a kernel on its own file's timestamp, so a helper inlined from another
module could change without the cached kernels noticing. Their launchers, which
check what numba would not (shapes: it does not check bounds), are ``cpu.py``.

Elementary functions
====================
numba compiles ``np.exp`` and ``np.tanh`` to one libm call per element (no SVML
with the llvmlite wheels), and a loop that calls a function is not vectorized: a
tanh pass ran 5x slower than torch's. ``exp``, ``sigmoid`` and ``tanh`` below are
the same functions in plain arithmetic, with no call and no branch:

- eˣ: write x = n·ln 2 + r with n an integer and |r| ≤ ln 2/2, so eˣ = 2ⁿ·eʳ.
  n = round(x/ln 2) by adding 1.5·2ᵖ (p = 23, or 52), which leaves n in the low bits
  of the sum's pattern (AVX2 has no float64→int conversion); r = x − n·ln 2 with
  ln 2 split in a head exact in n·head and a tail (Cody and Waite), keeping what
  rounding r loses; eʳ = (1 + r) + (r_tail + r²·P(r)), the small part added last so
  that it rounds once, with Sleef's float32 polynomial or Taylor to degree 13 for
  float64; 2ⁿ from bit patterns, as two normal factors applied one after the other,
  so that subnormal, overflowing and underflowing results round once, as IEEE's.
  x is clamped first so that n fits; NaN passes every step.
- σ(z) = 1/(1 + e⁻ᶻ), as torch computes it: e⁻ᶻ = inf gives 0, e⁻ᶻ = 0 gives 1.
  float32 takes e⁻ᶻ within 2 ulp, not 1: σ's largest error is torch's 2.33 ulp either way.
- tanh z, float64: sign(z)(1 − 2/(e^{2|z|} + 1)), which cancels for small |z|; there
  z + z³·P(z²)/Q(z²) (Cephes). The quotient and the sums are carried in two-double
  arithmetic; both branches are computed and one selected, in one division.
  float32: m/(m + 2) with m = e^{2z} − 1 from exp's steps (as eˣ − 1 below), in
  float64 and rounded once; m keeps its relative accuracy near 0, so one formula
  serves the whole range.
- eˣ − 1 (ELU, x ≤ 0): 2ⁿ·(eʳ − 1) + (2ⁿ − 1), with eʳ − 1 = r + (r_tail + r²·P(r))
  from exp's steps: each term is exact or small, so 1 never cancels against eˣ.
- log(1 + t) (softplus' log1p(e^{−|y|}), 0 ≤ t ≤ 1): 1 + t = 2ᵏ·m, m ∈ (√½, √2], and
  log m = 2·atanh(f/(2 + f)), f = m − 1, by atanh's Taylor series.
- Φ(z) (GELU): ½erfc(|z|/√2) as e^{−z²/2}·t·T(t), t = 1/(1 + p·u), with T a Chebyshev
  fit of a smooth bounded function (``tools/fit_erfc.py``); float64 takes ½ − ½erf(u)
  by its own fit below u = 0.75.

The activations with parameters or a derivative that reads z are written once for
both float types and computed in z's type, as torch computes them. Errors over the
whole input range, against a wider float and beside torch's own, are measured in
``tests/test_cpu_math.py``: exp within 1 ulp, expm1 1, log1p 1.5, Φ 6 (float32)
and 8 (float64), sigmoid and tanh no worse than torch's.
"""

from __future__ import annotations

import ctypes
import functools
import warnings

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.core.errors import NumbaIRAssumptionWarning
from numba.extending import get_cython_function_address, intrinsic, overload
from numba.np.ufunc import parallel as _numba_parallel

from .activation_table import NAMES
from .reference import LOSSES, OPTIMIZERS, REDUCTIONS

# The codes the cached kernels switch on, as literals of this file: numba's on-disk
# cache keys a kernel on this file alone, so codes imported from another module could
# change under kernels compiled with the old ones. check_codes holds them to the tables.
# Activations, as a layer's row (code, p₀, p₁) of an activations array carries them:
IDENTITY, RELU, SIGMOID, TANH, LEAKY_RELU, GELU, GELU_TANH, SILU, SOFTPLUS, ELU = range(10)
# Not an activation of the table: a training step's GELU row (_keeping_slopes).
GELU_KEEPING_SLOPE = 10
MSE, CROSS_ENTROPY, BCE_WITH_LOGITS = range(3)  # reference.LOSSES
# The step of a loss written in torch: TrainStep.forward ran, targets holds ∂L/∂ŷ.
GIVEN_GRADIENT = 3
MEAN, SUM = range(2)  # reference.REDUCTIONS
SGD, ADAM, ADAMW = range(3)  # reference.OPTIMIZERS
_CODES = {
    "activation": {"identity": IDENTITY, "relu": RELU, "sigmoid": SIGMOID, "tanh": TANH,
                   "leaky_relu": LEAKY_RELU, "gelu": GELU, "gelu_tanh": GELU_TANH,
                   "silu": SILU, "softplus": SOFTPLUS, "elu": ELU},
    "loss": {"mse": MSE, "cross_entropy": CROSS_ENTROPY, "bce_with_logits": BCE_WITH_LOGITS},
    "reduction": {"mean": MEAN, "sum": SUM},
    "optimizer": {"sgd": SGD, "adam": ADAM, "adamw": ADAMW},
}  # fmt: skip


def check_codes(tables: dict[str, tuple[str, ...]]) -> None:
    """Each kind's literal codes above are the positions of its names in ``tables``
    (kind: the table's names, in order); an ``AssertionError`` naming the kind if not."""
    for kind, names in tables.items():
        positions = {name: index for index, name in enumerate(names)}
        if _CODES[kind] != positions:
            raise AssertionError(
                f"fastbp/kernels/cpu_jit.py's {kind} codes {_CODES[kind]} are not the table's "
                f"order {names}: cached kernels would run the wrong {kind}; update the literals"
            )
    if GELU_KEEPING_SLOPE in _CODES["activation"].values():
        raise AssertionError(
            f"fastbp/kernels/cpu_jit.py's GELU_KEEPING_SLOPE ({GELU_KEEPING_SLOPE}) is a table "
            "activation's code: give it one above the table's"
        )


check_codes({"activation": NAMES, "loss": LOSSES, "reduction": REDUCTIONS, "optimizer": OPTIMIZERS})

DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
# A layer without bias gets an empty bias array: one shared per dtype, as it holds nothing.
_NO_BIAS = {dtype: np.empty(0, dtype) for dtype in DTYPES}

# Below this many elements a fused pass is cheaper than waking numba's thread pool;
# above it, the pass runs in blocks of about PARALLEL_BLOCK_ELEMENTS, one per task.
PARALLEL_MIN_ELEMENTS = 1 << 16
PARALLEL_BLOCK_ELEMENTS = 1 << 14
# An activation that costs more than a compare (σ, tanh, GELU, …: 0.45-0.66 ns an
# element on an AVX-512 Xeon, against relu's 0.09) pays for the wake-up from half as
# many: after a GEMM, σ's pass over 32 768 elements took 17.4 µs on one thread and 12.2
# on two (tanh 24.0 and 15.0), where relu's took 3.9 and 3.1.
PARALLEL_MIN_ELEMENTS_COSTLY = 1 << 15
CHEAP_CODES = (IDENTITY, RELU, LEAKY_RELU)  # the activations that cost about a compare
# After a GEMM that MKL ran on its own threads, each thread left its share of z in its
# core's cache, and a pass on one thread pulls the other shares across: after such a
# GEMM of 64×784×256, σ's pass over its 16 384 elements took 14.0 µs on one thread and
# 5.4 on two, relu's 4.3 and 2.7 (σ 3.7 and 3.0 at 4096 elements, relu 1.6 and 2.1).
# There the pass splits from these many elements, cheap and costly activations alike.
PARALLEL_MIN_AFTER_BLAS = (1 << 14, 1 << 12)


def kernel(function=None, **options):
    """``njit`` as every kernel takes it, as ``@kernel`` or ``@kernel(parallel=True)``.

    Cached on disk, and numpy's error model: a float division by zero gives inf or
    NaN as in numpy and torch instead of raising, which also lets LLVM vectorize the
    loops that divide (sigmoid, tanh). Compiling is quiet: see ``_quietly``.
    """

    def build(function):
        dispatcher = njit(cache=True, error_model="numpy", **options)(function)
        dispatcher.compile = _quietly(dispatcher.compile)
        return dispatcher

    return build if function is None else build(function)


def _quietly(compile):
    """``compile`` without numba's NumbaIRAssumptionWarning. That pedantic check of
    numba's own IR misfires when our inline="always" overloads (``_by_float_type``)
    inline functions that were themselves inlined, and asks the user to file a numba
    bug report: it is numba's to fix and nothing the user can act on. Every other
    warning passes; the filter lasts only while a kernel compiles (once per
    signature, then the disk cache)."""

    @functools.wraps(compile)
    def quiet(signature):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NumbaIRAssumptionWarning)
            return compile(signature)

    return quiet


# ---------------------------------------------------------------------------
# Elementary functions that LLVM vectorizes (see the module docstring)
# ---------------------------------------------------------------------------
@intrinsic
def _as_float(typingctx, bits):
    """The float whose bit pattern is ``bits`` (int32 → float32, int64 → float64)."""
    float_type = {types.int32: types.float32, types.int64: types.float64}.get(bits)
    if float_type is None:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(float_type))

    return float_type(bits), codegen


@intrinsic
def _as_bits(typingctx, value):
    """The bit pattern of ``value`` (float32 → int32, float64 → int64)."""
    int_type = {types.float32: types.int32, types.float64: types.int64}.get(value)
    if int_type is None:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(int_type.bitwidth))

    return int_type(value), codegen


@intrinsic
def fma(typingctx, a, b, c):
    """a·b + c rounded once (LLVM's fma: one instruction on x86-64 CPUs with FMA3)."""
    if not (a == b == c and a in (types.float32, types.float64)):
        return None

    def codegen(context, builder, signature, args):
        return builder.call(_llvm_fma(builder, args[0].type), args)

    return a(a, b, c), codegen


def _llvm_fma(builder, kind):
    """LLVM's fma for the float type ``kind``, declared in the module being built."""
    return builder.module.declare_intrinsic("llvm.fma", [kind], ir.FunctionType(kind, [kind] * 3))


def _polynomial(*coefficients: float):
    """Σ cᵢ·wⁱ by Horner's rule, coefficients highest first, as a numba function of w
    (float32 or float64) that emits one fma per coefficient, in straight-line code: a
    loop over a tuple of coefficients kept numba from vectorizing the loop around it."""

    @intrinsic
    def evaluate(typingctx, w):
        if w not in (types.float32, types.float64):
            return None

        def codegen(context, builder, signature, args):
            kind = args[0].type
            fma_ = _llvm_fma(builder, kind)
            cast = np.float32 if w == types.float32 else np.float64
            result = ir.Constant(kind, float(cast(coefficients[0])))
            for c in coefficients[1:]:
                result = builder.call(fma_, [result, args[0], ir.Constant(kind, float(cast(c)))])
            return result

        return w(w), codegen

    evaluate.coefficients = coefficients  # what tests/test_cpu_math.py checks against its fit
    return evaluate


f4, f8 = np.float32, np.float64

_LOG2E = f8(1.4426950408889634)
_SHIFT = f8(6755399441055744.0)  # 1.5·2⁵²: adding it rounds to an integer, n
_SHIFT_BITS = 0x4338000000000000  # its bit pattern: the sum's bits are these plus n
_LN2_HI, _LN2_LO = f8(6.93145751953125e-1), f8(1.42860682030941723212e-6)  # Cephes' split
_LO, _HI = f8(-746.0), f8(710.0)  # eˣ rounds to 0 below, to inf above, in float64
# 1/k! for k = 2…13: eʳ's Taylor polynomial, truncated below 2⁻⁶⁰ for |r| ≤ ln 2/2
_C = [f8(1.0 / float(np.prod(np.arange(1, k + 1, dtype=np.float64)))) for k in range(14)]
_C2, _C3, _C4, _C5, _C6, _C7, _C8, _C9, _C10, _C11, _C12, _C13 = _C[2:]
# float32: the same steps in single precision (Sleef's expf polynomial and split of ln 2)
_LOG2E_F, _SHIFT_F, _SHIFT_BITS_F = f4(1.44269504088896341), f4(12582912.0), 0x4B400000
_LN2_HI_F, _LN2_LO_F = f4(0.693145751953125), f4(1.428606765330187045e-06)  # Sleef's split
_LO_F, _HI_F = f4(-104.0), f4(89.0)
_E0, _E1, _E2 = f4(1.98527617612853646e-4), f4(1.39304355252534151e-3), f4(8.33336077630519867e-3)
_E3, _E4, _E5 = f4(4.16664853692054749e-2), f4(1.66666671633720398e-1), f4(0.5)
# Cephes tanh: z + z³·P(z²)/Q(z²) for |z| < 0.625
_P0, _P1, _P2 = (
    f8(-9.64399179425052238628e-1),
    f8(-9.92877231001918586564e1),
    f8(-1.61468768441708447952e3),
)
_Q0, _Q1, _Q2 = (
    f8(1.12811678491632931402e2),
    f8(2.23548839060100448583e3),
    f8(4.84406305325125486048e3),
)
_TANH_LIMIT_FOR_FLOAT32 = f8(10.0)  # float32's tanh rounds to ±1 beyond 9.02
SMALL_TANH64 = f8(0.3)  # float64: below it the series' own error stays far under an ulp


@njit(inline="always")
def _reduce64(x):
    """x = n·ln 2 + r + r_tail, |r| ≤ ln 2/2: returns (k, r, r_tail), n in k's low bits."""
    k = x * _LOG2E + _SHIFT
    n = k - _SHIFT
    head = fma(n, -_LN2_HI, x)  # exact: n·ln2_hi has few bits
    r = fma(n, -_LN2_LO, head)
    return k, r, fma(n, -_LN2_LO, head - r)  # r_tail: what rounding r lost


@njit(inline="always")
def _exp_poly64(r):
    """p with eʳ = 1 + r + r²·p: Taylor's 1/k! for k = 2…13."""
    p = fma(fma(fma(fma(_C13, r, _C12), r, _C11), r, _C10), r, _C9)
    p = fma(fma(fma(fma(fma(p, r, _C8), r, _C7), r, _C6), r, _C5), r, _C4)
    return fma(fma(p, r, _C3), r, _C2)


@njit(inline="always")
def _exp64_parts(x):
    """eˣ as an unevaluated sum hi + lo, |lo| ≤ ulp(hi)/2: what rounding hi would lose."""
    x = _LO if x < _LO else x  # NaN fails both tests and stays NaN
    x = _HI if x > _HI else x
    k, r, r_tail = _reduce64(x)
    one_r = f8(1.0) + r  # eʳ = (1 + r) + (r_tail + p·r²), the small part kept apart
    small = ((f8(1.0) - one_r) + r) + fma(_exp_poly64(r), r * r, r_tail)
    hi = one_r + small
    lo = (one_r - hi) + small
    whole = _as_bits(k) - _SHIFT_BITS  # n, as an integer
    half = whole >> 1  # 2ⁿ as two normal factors, applied one after the other: results
    first = _as_float((half + 1023) << 52)  # near overflow or in the subnormals round once
    second = _as_float((whole - half + 1023) << 52)
    return hi * first * second, lo * first * second


@njit(inline="always")
def _exp64(x):
    return _exp64_parts(x)[0]


@njit(inline="always")
def _reduce32(x):
    k = x * _LOG2E_F + _SHIFT_F
    n = k - _SHIFT_F
    head = fma(n, -_LN2_HI_F, x)
    r = fma(n, -_LN2_LO_F, head)
    return k, r, fma(n, -_LN2_LO_F, head - r)


@njit(inline="always")
def _exp_poly32(r):
    return fma(fma(fma(fma(fma(_E0, r, _E1), r, _E2), r, _E3), r, _E4), r, _E5)


@njit(inline="always")
def _exp32(x):
    x = _LO_F if x < _LO_F else x
    x = _HI_F if x > _HI_F else x
    k, r, r_tail = _reduce32(x)
    one_r = f4(1.0) + r
    return _times_pow2_32(one_r + (((f4(1.0) - one_r) + r) + fma(_exp_poly32(r), r * r, r_tail)), k)


@njit(inline="always")
def _exp32_within_2ulp(x):
    """``_exp32`` without r_tail and its rounding step, a fifth faster; overflow,
    underflow and NaN as ``_exp32``'s."""
    x = _LO_F if x < _LO_F else x
    x = _HI_F if x > _HI_F else x
    k, r, _ = _reduce32(x)
    return _times_pow2_32(fma(_exp_poly32(r), r * r, r) + f4(1.0), k)


@njit(inline="always")
def _times_pow2_32(e, k):
    """e·2ⁿ for the n in k's low bits, as two normal factors applied one after the
    other: a result that overflows or falls in the subnormals rounds once."""
    whole = np.int64(_as_bits(k)) - _SHIFT_BITS_F
    half = whole >> 1
    first = _as_float(np.int32((half + 127) << 23))
    return e * first * _as_float(np.int32((whole - half + 127) << 23))


@njit(inline="always")
def _pow2_normal64(k):
    """2ⁿ for the n in k's low bits (``_reduce64``), where 2ⁿ is a normal float64."""
    return _as_float((_as_bits(k) - _SHIFT_BITS + 1023) << 52)


@njit(inline="always")
def _pow2_normal32(k):
    """2ⁿ for the n in k's low bits (``_reduce32``), where 2ⁿ is a normal float32."""
    return _as_float(np.int32((np.int64(_as_bits(k)) - _SHIFT_BITS_F + 127) << 23))


@njit(inline="always")
def _exp32_normal(x):
    """eˣ for −87.3 ≤ x ≤ 88, where it is a normal float32: ``_exp32`` without r_tail and
    with one scale factor, within 2 ulp instead of 1 and a third faster inside Φ."""
    k, r, _ = _reduce32(x)
    return (fma(_exp_poly32(r), r * r, r) + f4(1.0)) * _pow2_normal32(k)


@njit(inline="always")
def _sigmoid32(z):
    return f4(1.0) / (f4(1.0) + _exp32_within_2ulp(-z))


@njit(inline="always")
def _sigmoid64(z):
    return f8(1.0) / (f8(1.0) + _exp64(-z))


@njit(inline="always")
def _tanh64(z):
    """tanh z, nearly always correctly rounded: by the series below SMALL_TANH64, else
    1 − 2/(e^{2|z|} + 1) carried in two-double arithmetic (the sum and the quotient
    keep what they round away), so that 1 − … loses nothing to cancellation."""
    magnitude = abs(z)
    s = z * z
    small = magnitude < SMALL_TANH64
    clamped = f8(20.0) if magnitude > f8(20.0) else magnitude  # tanh rounds to 1 above 19.1
    t_hi, t_lo = _exp64_parts(f8(2.0) * clamped)
    d_hi = t_hi + f8(1.0)
    d_lo = (t_hi - (d_hi - f8(1.0))) + t_lo
    # one division for both branches: their terms are selected before it
    numerator = z * s * ((_P0 * s + _P1) * s + _P2) if small else f8(2.0)
    quotient = numerator / ((((s + _Q0) * s + _Q1) * s + _Q2) if small else d_hi)
    q_lo = (fma(-quotient, d_hi, f8(2.0)) - quotient * d_lo) * (quotient * f8(0.5))
    one_minus = f8(1.0) - quotient
    large = one_minus + (((f8(1.0) - one_minus) - quotient) - q_lo)
    result = z + quotient if small else (-large if z < 0 else large)
    return z if z == 0 else result  # tanh(−0) = −0: z + q would round it to +0


@njit(inline="always")
def _expm1_for_float32(u):
    """eᵘ − 1 for |u| ≤ 20, to about 2⁻³⁴ in float64 (Taylor to degree 9): enough for a
    float32 result rounded once. 2ⁿ·(eʳ − 1) + (2ⁿ − 1) loses at most 2 bits where the
    terms' signs differ (worst at n = 1, r < 0), and nothing near u = 0 (n = 0, r = u)."""
    k = u * _LOG2E + _SHIFT
    n = k - _SHIFT
    r = fma(n, -_LN2_LO, fma(n, -_LN2_HI, u))  # _reduce64's r; float32 needs no tail
    p = fma(fma(fma(fma(_C9, r, _C8), r, _C7), r, _C6), r, _C5)
    p = fma(fma(fma(p, r, _C4), r, _C3), r, _C2)
    scale = _pow2_normal64(k)  # n ∈ [−29, 29]
    return fma(scale, fma(p, r * r, r), scale - f8(1.0))


@njit(inline="always")
def _tanh32(z):
    # tanh z = m/(m + 2), m = e^{2z} − 1, in float64 and rounded once: one formula over
    # the whole range, where float32 alone gave 1.3 ulp against torch's 0.57.
    clamped = _clamped(f8(z), _TANH_LIMIT_FOR_FLOAT32)
    m = _expm1_for_float32(clamped + clamped)
    return z if z == 0 else f4(m / (m + f8(2.0)))  # tanh(−0) = −0, where m/(m + 2) gives +0


def _by_float_type(name: str, single, double):
    """A numba-callable ``name`` that runs ``single`` on float32 and ``double`` on float64."""

    def stub(x):
        raise NotImplementedError(f"{name} runs inside numba kernels only")

    @overload(stub, inline="always")
    def _(x):
        if x == types.float32:
            return lambda x: single(x)
        if x == types.float64:
            return lambda x: double(x)
        return None

    stub.__name__ = stub.__qualname__ = name
    return stub


@njit(inline="always")
def _relu32(z):
    return f4(0.0) if z < f4(0.0) else z  # NaN < 0 is False: NaN stays NaN, as in torch


@njit(inline="always")
def _relu64(z):
    return f8(0.0) if z < f8(0.0) else z


# expm1, log1p and the normal CDF, on the domains the activations use them on
_EXPM1_LO, _EXPM1_LO_F = f8(-60.0), f4(-20.0)  # eˣ − 1 rounds to −1 below
_SQRT2, _SQRT2_F = f8(1.4142135623730951), f4(1.4142135623730951)
# 2/(2j + 1) for j = 1…10: atanh's Taylor series, 2·atanh s = 2s + s·R(s²)
_ATANH = [2.0 / (2 * j + 1) for j in range(10, 0, -1)]  # highest first
_atanh_series = _polynomial(*_ATANH)
_atanh_series_f = _polynomial(*_ATANH[-5:])  # float32: past s¹⁰ the terms are below 2⁻³⁰


@njit(inline="always")
def _clamped(z, limit):
    return -limit if z < -limit else (limit if z > limit else z)  # NaN stays NaN


@njit(inline="always")
def _expm1_nonpositive64(x):
    """eˣ − 1 for x ≤ 0 (ELU's side; x > 0 gives 0): 2ⁿ·(eʳ − 1) + (2ⁿ − 1), whose
    terms are exact or small, so 1 never cancels against eˣ."""
    x = _EXPM1_LO if x < _EXPM1_LO else x
    x = f8(0.0) if x > 0 else x
    k, r, r_tail = _reduce64(x)
    em1 = r + fma(_exp_poly64(r), r * r, r_tail)
    scale = _pow2_normal64(k)  # n ∈ [−87, 0]
    return x if x == 0 else fma(scale, em1, scale - f8(1.0))  # keeps −0


@njit(inline="always")
def _expm1_nonpositive32(x):
    x = _EXPM1_LO_F if x < _EXPM1_LO_F else x
    x = f4(0.0) if x > 0 else x
    k, r, r_tail = _reduce32(x)
    em1 = r + fma(_exp_poly32(r), r * r, r_tail)
    scale = _pow2_normal32(k)  # n ∈ [−29, 0]
    return x if x == 0 else fma(scale, em1, scale - f4(1.0))


@njit(inline="always")
def _log1p_unit(t, one, sqrt2, ln2_hi, ln2_lo, atanh):
    """log(1 + t) for 0 ≤ t ≤ 1 (softplus' log1p(e^{−|y|})), in t's float type.

    Write 1 + t = u + lost (u rounded, ``lost`` exact as t ≤ 1) and u = 2ᵏ·m with
    m ∈ (√½, √2], k ∈ {0, 1}: log(1 + t) = k·ln 2 + log m + lost/u. With f = m − 1
    (exact) and s = f/(2 + f), log m = 2·atanh s = 2s + s·R, R = 2s²(1/3 + s²/5 + …);
    as 2s = f − s·f = f − (f²/2 − s·f²/2), log m = f − (f²/2 − s·(f²/2 + R)): the
    exact f carries the result, the rounded s only its corrections (|s| ≤ 0.172).
    """
    half, two = one / (one + one), one + one
    u = one + t
    lost = t - (u - one)
    big = u > sqrt2
    m = u * half if big else u
    k = one if big else one - one
    f = m - one
    s = f / (two + f)
    s2 = s * s
    series = atanh(s2)
    half_f2 = f * f * half
    log_m = f - (half_f2 - s * (half_f2 + s2 * series))
    return k * ln2_hi + (log_m + fma(k, ln2_lo, lost / u))


@njit(inline="always")
def _log1p_unit64(t):
    return _log1p_unit(t, f8(1.0), _SQRT2, _LN2_HI, _LN2_LO, _atanh_series)


@njit(inline="always")
def _log1p_unit32(t):
    return _log1p_unit(t, f4(1.0), _SQRT2_F, _LN2_HI_F, _LN2_LO_F, _atanh_series_f)


# The normal CDF Φ(z) = ½erfc(u) at u = −z/√2, GELU's factor, from u = |z|/√2 and the
# Gaussian e^{−z²/2} (= e^{−u²}), with z²/2 split exactly into hi + lo by an fma: rounded,
# it would cost up to z²/2 ulps of relative error, 800 at z = −38. Then ½erfc(u) is
#   float64, u < 0.75:  ½ − u·H(u²), H(s) ≈ ½erf(√s)/√s;
#   float64, u ≥ 0.75:  e^{−u²}·t·T(t), t = 1/(1 + 0.3u), T(t) ≈ ½erfc(u)·e^{u²}/t;
#   float32, all u:     e^{−u²}·t·T₃₂(t), t = 1/(1 + 0.5u);
# and Φ(z) = ½erfc(u) for z < 0, 1 − ½erfc(u) otherwise. H, T and T₃₂ are Chebyshev
# fits of smooth bounded functions, Horner's rule in w ∈ [−1, 1]: tools/fit_erfc.py
# prints them (the lines below are its output). Beyond |z| = 40 (float32: 13.2) Φ is
# 0 or 1 and e^{−z²/2} is 0.
_HEAD64_FIT = (None, 0.28125, 0.28125)  # p, mid, half
_head64 = _polynomial(
    -6.998439217632526e-13,
    2.510917356507444e-11,
    -8.1089663366621e-10,
    2.339275279205247e-08,
    -5.932842108990011e-07,
    1.2995822601729941e-05,
    -0.0002404362390157745,
    0.0036572426172873707,
    -0.04480188355454995,
    0.5154764078006321,
)
_TAIL64_FIT = (0.3, 0.4625702293975262, 0.35375630121471874)  # p, mid, half
_tail64 = _polynomial(
    -9.862923822468838e-12,
    -6.185196106957755e-11,
    1.578484248409587e-10,
    1.0521236807455705e-09,
    -1.621154927892524e-09,
    -1.482711822144328e-08,
    7.746001318439493e-09,
    2.159952457020355e-07,
    2.6242186688225267e-07,
    -2.78796030925765e-06,
    -1.2631099167485563e-05,
    3.7049020401763413e-06,
    0.00027467961726168415,
    0.0016340629812346096,
    0.0062259268145617415,
    0.018198423804350015,
    0.04353771504212399,
    0.08796704947873607,
    0.15267269637062164,
)
_TAIL32_FIT = (0.5, 0.5881834215167548, 0.41181657848324515)  # p, mid, half
_tail32 = _polynomial(
    -2.4485508592779877e-05,
    6.7849975822596564e-06,
    0.00027397723954212654,
    -0.00027822063383985937,
    -0.002951811408683432,
    0.00274137464999259,
    0.0499333258011983,
    0.1623874810531041,
    0.2879115543689592,
)


def _variable(fit: tuple, cast) -> tuple:
    """A fit's (p, mid, 1/half) in its kernels' float type: w = (v − mid)/half, with
    v = u² (the head) or t = 1/(1 + p·u) (the tails)."""
    p, mid, half = fit
    return cast(p or 0.0), cast(mid), cast(1 / half)


_, _HEAD64_MID, _HEAD64_SCALE = _variable(_HEAD64_FIT, f8)
_TAIL64_P, _TAIL64_MID, _TAIL64_SCALE = _variable(_TAIL64_FIT, f8)
_TAIL32_P, _TAIL32_MID, _TAIL32_SCALE = _variable(_TAIL32_FIT, f4)
_U_SPLIT, _Z_MAX, _Z_MAX_F = f8(0.75), f8(40.0), f4(13.2)  # U_SPLIT as in tools/fit_erfc.py
_SQRT1_2, _SQRT1_2_F = f8(0.7071067811865476), f4(0.7071067811865476)
_INV_SQRT_2PI, _SQRT_2_OVER_PI, _GELU_CUBIC = 0.3989422804014327, 0.7978845608028654, 0.044715


@njit(inline="always")
def _gaussian(z, half, one, exp_):
    """e^{−z²/2}, with z²/2 = hi + lo exactly: e^{−hi}·(1 − lo), |lo| ≤ ulp(hi)/2."""
    h = z * half
    hi = h * z
    return exp_(-hi) * (one - fma(h, z, -hi))


@njit(inline="always")
def _normal_cdf64(z):
    """(Φ(z), e^{−z²/2})."""
    z = _clamped(z, _Z_MAX)
    gaussian = _gaussian(z, f8(0.5), f8(1.0), _exp64)
    u = abs(z) * _SQRT1_2
    half_erf = u * _head64((u * u - _HEAD64_MID) * _HEAD64_SCALE)
    t = f8(1.0) / fma(_TAIL64_P, u, f8(1.0))
    tail = gaussian * (t * _tail64((t - _TAIL64_MID) * _TAIL64_SCALE))
    half_erfc = f8(0.5) - half_erf if u < _U_SPLIT else tail
    return (half_erfc if z < 0 else f8(1.0) - half_erfc), gaussian


@njit(inline="always")
def _normal_cdf32(z):
    # Beyond 13.2, e^{−z²/2} is below float32's normal numbers: 0, which also drops what
    # ±inf and large |z| make of the steps before (NaN, overflowed integers).
    beyond = abs(z) > _Z_MAX_F
    gaussian = f4(0.0) if beyond else _gaussian(z, f4(0.5), f4(1.0), _exp32_normal)
    t = f4(1.0) / fma(_TAIL32_P, abs(z) * _SQRT1_2_F, f4(1.0))
    half_erfc = gaussian * (t * _tail32((t - _TAIL32_MID) * _TAIL32_SCALE))  # no subnormal step
    return (half_erfc if z < 0 else f4(1.0) - half_erfc), gaussian


exp = _by_float_type("exp", _exp32, _exp64)
relu = _by_float_type("relu", _relu32, _relu64)
sigmoid = _by_float_type("sigmoid", _sigmoid32, _sigmoid64)
tanh = _by_float_type("tanh", _tanh32, _tanh64)
expm1_nonpositive = _by_float_type("expm1_nonpositive", _expm1_nonpositive32, _expm1_nonpositive64)
log1p_unit = _by_float_type("log1p_unit", _log1p_unit32, _log1p_unit64)
normal_cdf = _by_float_type("normal_cdf", _normal_cdf32, _normal_cdf64)


def _in_type_of(z, value):
    raise NotImplementedError("_in_type_of runs inside numba kernels only")


@overload(_in_type_of, inline="always")
def _(z, value):
    """``value`` in z's float type, as torch casts an activation's parameters."""
    if z == types.float32:
        return lambda z, value: np.float32(value)
    if z == types.float64:
        return lambda z, value: np.float64(value)
    return None


# The activations whose derivative reads z, as act(z, p₀, p₁) and act'(z, p₀, p₁), each
# written once for both float types and computed in z's type as torch computes it, so
# that each pass is one tight loop.
@njit(inline="always")
def _leaky_relu(z, p0, p1):
    return z if z > 0 else z * _in_type_of(z, p0)


@njit(inline="always")
def _leaky_relu_slope(z, p0, p1):
    return _in_type_of(z, 1.0) if z > 0 else _in_type_of(z, p0)


@njit(inline="always")
def _elu(z, p0, p1):
    return z if z > 0 else _in_type_of(z, p0) * expm1_nonpositive(z)


@njit(inline="always")
def _elu_slope(z, p0, p1):  # NaN z: NaN, as torch's vector loop
    return _in_type_of(z, 1.0) if z > 0 else _in_type_of(z, p0) * exp(z)


@njit(inline="always")
def _softplus(z, p0, p1):
    """log(1 + e^{βz})/β as max(βz, 0) + log1p(e^{−|βz|}), whose log1p takes [0, 1] only."""
    beta = _in_type_of(z, p0)
    y = z * beta
    zero = _in_type_of(z, 0.0)
    soft = ((y if y > zero else zero) + log1p_unit(exp(-abs(y)))) / beta
    return z if y > _in_type_of(z, p1) else soft


@njit(inline="always")
def _softplus_slope(z, p0, p1):
    y = z * _in_type_of(z, p0)
    return _in_type_of(z, 1.0) if y > _in_type_of(z, p1) else sigmoid(y)


@njit(inline="always")
def _silu(z, p0, p1):
    return z / (_in_type_of(z, 1.0) + exp(-z))


@njit(inline="always")
def _silu_slope(z, p0, p1):
    s = sigmoid(z)
    one = _in_type_of(z, 1.0)
    return s * (one + z * (one - s))


@njit(inline="always")
def _gelu(z, p0, p1):
    cdf, _ = normal_cdf(z)
    return z * cdf


@njit(inline="always")
def _gelu_slope(z, p0, p1):
    """Φ(z) + z·φ(z), φ(z) = e^{−z²/2}/√(2π): at ±inf NaN, as torch's inf·0."""
    cdf, gaussian = normal_cdf(z)
    return cdf + z * gaussian * _in_type_of(z, _INV_SQRT_2PI)


# In a training step, GELU's forward also writes its slope over z in the layer's z slot
# (GELU_KEEPING_SLOPE, _keeping_slopes), from the Φ(z) and e^{−z²/2} that it computes
# anyway; the backward's δ is then g times what the slot holds. Computed apart, the slope
# takes a second Φ(z): on one thread, over MNIST b128's two hidden layers in float32,
# the forward pass took 31 µs and the backward's 35; with the slope kept, 35 and 5.
@njit(inline="always")
def _gelu_keeping_slope(z, out):
    """out = GELU(z), and z ← GELU'(z): each as _gelu and _gelu_slope round it."""
    for k in range(z.shape[0]):
        v = z[k]
        cdf, gaussian = normal_cdf(v)
        out[k] = v * cdf
        z[k] = cdf + v * gaussian * _in_type_of(v, _INV_SQRT_2PI)


@njit(inline="always")
def _kept_slope(slope, p0, p1):
    return slope


@njit(inline="always")
def _gelu_tanh_t(z):
    """tanh(√(2/π)(z + 0.044715 z³)): the tanh GELU approximation's factor."""
    return tanh(_in_type_of(z, _SQRT_2_OVER_PI) * (z + _in_type_of(z, _GELU_CUBIC) * z * z * z))


@njit(inline="always")
def _gelu_tanh(z, p0, p1):
    half, one = _in_type_of(z, 0.5), _in_type_of(z, 1.0)
    return half * z * (one + _gelu_tanh_t(z))


@njit(inline="always")
def _gelu_tanh_slope(z, p0, p1):
    half, one = _in_type_of(z, 0.5), _in_type_of(z, 1.0)
    t = _gelu_tanh_t(z)
    cubic = _in_type_of(z, 3.0 * _GELU_CUBIC)
    inner = _in_type_of(z, _SQRT_2_OVER_PI) * (one + cubic * z * z)
    return half * (one + t) + half * z * (one - t * t) * inner


# ---------------------------------------------------------------------------
# GEMM: a Fortran BLAS ?gemm, called through an address passed at run time.
# ---------------------------------------------------------------------------
# (provider, sgemm address, dgemm address, its thread-local thread count setter or 0)
_gemm_binding: tuple[str, int, int, int] | None = None
_pool_started = False  # numba's thread pool, once started, stays for the process


def bind_gemm(provider: str, sgemm_address: int, dgemm_address: int, threads_address=0) -> None:
    """Route every kernel GEMM to the Fortran ``sgemm``/``dgemm`` at these addresses;
    ``threads_address``, where nonzero, is the BLAS's ``int f(int)`` that sets the
    calling thread's own thread count and returns the one before (MKL's
    ``MKL_Set_Num_Threads_Local``; 0 stands for the global count).

    The address travels into each kernel call as an argument, so rebinding takes
    effect on the next call and cached kernels never depend on the provider.
    """
    global _gemm_binding
    _gemm_binding = (provider, sgemm_address, dgemm_address, threads_address)


def gemm_provider() -> str:
    """The BLAS the kernels call; binds scipy's (always present) if none was chosen."""
    if _gemm_binding is None:
        bind_gemm(
            "scipy-openblas",
            get_cython_function_address("scipy.linalg.cython_blas", "sgemm"),
            get_cython_function_address("scipy.linalg.cython_blas", "dgemm"),
        )
    return _gemm_binding[0]  # type: ignore[index]


def start_thread_pool() -> str:
    """Start numba's thread pool (once per process); the threading layer it chose.

    A cached kernel that calls a ``parallel=True`` one segfaults if the pool was
    never started (numba/numba#8578): only compiling, not loading from the cache,
    starts it. ``get_num_threads`` starts it. Under numba's omp layer, starting it
    sets the calling thread's OpenMP thread count, which torch reads as its own:
    ``fastbp.threads`` starts it and gives torch its count back.
    """
    global _pool_started
    if not _pool_started:
        numba.get_num_threads()
        _pool_started = True
    return numba.threading_layer()


def thread_count_functions():
    """``(get, set)`` of numba's thread count for the calling thread, once its pool
    has started: the threading layer's own C functions where numba exposes them
    (0.3 µs a call), else its public API (2 µs, with checks)."""
    get, set_ = (
        getattr(_numba_parallel, "_get_num_threads", None),
        getattr(_numba_parallel, "_set_num_threads", None),
    )
    if callable(get) and callable(set_):
        return get, set_
    return numba.get_num_threads, numba.set_num_threads


def _prepare_launch(dtype: np.dtype) -> int:
    """The ``gemm`` address every kernel takes, after making the kernels safe to run."""
    if not _pool_started:
        start_thread_pool()
    if _gemm_binding is None:
        gemm_provider()
    _, sgemm_address, dgemm_address, _ = _gemm_binding  # type: ignore[misc]
    return sgemm_address if dtype == np.float32 else dgemm_address


def blas_threads_address() -> int:
    """The ``blas_threads`` argument of the kernels: the bound BLAS's thread-local thread
    count setter, or 0 where it has none. Member-parallel tasks and split GEMMs hold
    their thread's BLAS at one thread with it (see the Ensembles section and
    ``_gemm_split``), and small GEMMs are held there (``_gemm_small_held``)."""
    if _gemm_binding is None:
        gemm_provider()
    return _gemm_binding[3]  # type: ignore[index]


def gemm_address_from_library(path: str) -> tuple[int, int, int] | None:
    """Addresses of ``sgemm_``/``dgemm_`` exported by a shared library, and of its
    ``MKL_Set_Num_Threads_Local`` (0 where it exports none); None without the two."""
    try:
        library = ctypes.CDLL(path)
        addresses = (
            ctypes.cast(library.sgemm_, ctypes.c_void_p).value,
            ctypes.cast(library.dgemm_, ctypes.c_void_p).value,
        )
    except (OSError, AttributeError):
        return None
    setter = getattr(library, "MKL_Set_Num_Threads_Local", None)
    return (*addresses, 0 if setter is None else ctypes.cast(setter, ctypes.c_void_p).value)


@intrinsic
def _call_int_function(typingctx, address, value):
    """``f(value)`` for the C function ``int f(int)`` at ``address``."""
    if not (isinstance(address, types.Integer) and isinstance(value, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        function_type = ir.FunctionType(ir.IntType(32), [ir.IntType(32)])
        argument = context.cast(builder, args[1], signature.args[1], types.int32)
        return builder.call(builder.inttoptr(args[0], function_type.as_pointer()), [argument])

    return types.int32(address, value), codegen


@intrinsic
def _call_fortran_gemm(
    typingctx, address, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc
):
    """Call the ``?gemm`` at ``address``; every Fortran argument is a pointer."""
    if not isinstance(address, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        function_type = ir.FunctionType(ir.VoidType(), [cgutils.voidptr_t] * 13)
        builder.call(builder.inttoptr(args[0], function_type.as_pointer()), args[1:])
        return context.get_dummy_value()

    return types.void(address, *[types.voidptr] * 13), codegen


@intrinsic
def _data_pointer(typingctx, array):
    """Address of an array's first element, as the ``void*`` BLAS expects."""

    def codegen(context, builder, signature, args):
        view = context.make_array(signature.args[0])(context, builder, args[0])
        return builder.bitcast(view.data, cgutils.voidptr_t)

    return types.voidptr(array), codegen


@intrinsic
def _by_reference(typingctx, value):
    """Pointer to a stack copy of a scalar: Fortran takes every argument by reference."""

    def codegen(context, builder, signature, args):
        slot = cgutils.alloca_once_value(builder, args[0])
        return builder.bitcast(slot, cgutils.voidptr_t)

    return types.voidptr(value), codegen


@njit(inline="always")
def _leading(matrix):
    """A row-major matrix's leading dimension: its row stride, in elements, and no less
    than its width (≥ 1), which BLAS requires. The stride of a matrix of one row or none
    can be anything (numpy gives an empty one 0, torch a 1-row one any), and is unused."""
    return max(matrix.strides[0] // matrix.itemsize, matrix.shape[1], 1)


@kernel
def _gemm(gemm, transpose_a, transpose_b, alpha, a, b, beta, c):
    """Row-major ``c ← alpha·op(a)·op(b) + beta·c`` on arrays whose rows are contiguous
    (C-contiguous ones, or column blocks of them: each row's stride is its leading
    dimension), by ``gemm``.

    A row-major matrix is the column-major view of its transpose, so this asks
    column-major BLAS for ``cᵀ = op(b)ᵀ op(a)ᵀ``: the operands swap, the flags don't.
    """
    m, n = c.shape
    k = a.shape[0] if transpose_a else a.shape[1]
    if m == 0 or n == 0:
        return
    flag_a = np.uint8(84 if transpose_a else 78)  # 'T' or 'N'
    flag_b = np.uint8(84 if transpose_b else 78)
    dims = (
        _by_reference(np.int32(n)),
        _by_reference(np.int32(m)),
        _by_reference(np.int32(k)),
    )
    lda = _by_reference(np.int32(_leading(a)))
    ldb = _by_reference(np.int32(_leading(b)))
    ldc = _by_reference(np.int32(_leading(c)))
    flags = (_by_reference(flag_b), _by_reference(flag_a))
    pa, pb, pc = _data_pointer(a), _data_pointer(b), _data_pointer(c)
    if c.itemsize == 4:  # float32; the launchers admit only float32 and float64
        scale, shift = _by_reference(np.float32(alpha)), _by_reference(np.float32(beta))
    else:
        scale, shift = _by_reference(np.float64(alpha)), _by_reference(np.float64(beta))
    _call_fortran_gemm(gemm, *flags, *dims, scale, pb, ldb, pa, lda, shift, pc, ldc)


# GEMMs split among numba's threads. A step kernel that alternated MKL's threaded GEMMs
# with numba's parallel passes lost most of what MKL's second thread gains (the MNIST
# b64 step kernel: 410 µs, against 275 with both on numba's parallel regions), though
# both run on torch's libgomp (numba's omp layer binds its OpenMP calls to it; where the
# hand-over loses the time was not pinned down). So a training
# step holds its BLAS at one thread and splits each GEMM of SPLIT_MIN_PRODUCT or more
# multiply-adds among ``tasks`` tasks on numba's threads instead: blocks of c's longer
# side, so that each task reads the smaller operand whole. Blocks that follow the thread
# count may round differently from one GEMM (BLAS need not round a row alike in GEMMs of
# different shapes), so the launchers split only where results may follow it.
SPLIT_MIN_PRODUCT = 1 << 20


@njit(inline="always")
def _one_blas_thread(blas_threads):
    """Hold the calling thread's BLAS at one thread: the count it had (0: the global
    one), for ``_blas_threads_back``. ``blas_threads``: the setter's address, 0: none."""
    if blas_threads == 0:
        return np.int32(0)
    return _call_int_function(blas_threads, 1)


@njit(inline="always")
def _blas_threads_back(blas_threads, held):
    if blas_threads != 0:
        _call_int_function(blas_threads, held)


# Small GEMMs on one BLAS thread. Inside a kernel, MKL's second thread costs a small
# GEMM more than it gives: the 8-64-64-2 tanh net's backward kernel (64·64·64 at most)
# took 23.9 µs with MKL's two threads and 13.6 with one, its forward 24.7 and 21.9,
# while MNIST's and the docs net's (2²¹ and more) ran 30-50% slower on one. Below
# HELD_GEMM_PRODUCTS[0] the hold, two calls into MKL, is left out: on the seeds' 2-2-2
# net, all of whose GEMMs are that small, a step holding them ran 6.26-6.50× torch-eager
# where one without ran 6.79-7.00× (one A/B run).
HELD_GEMM_PRODUCTS = (1 << 15, 1 << 19)


@njit(inline="always")
def _gemm_small_held(gemm, transpose_a, transpose_b, alpha, a, b, beta, c, blas_threads):
    """``_gemm``, on one BLAS thread where its multiply-adds are in HELD_GEMM_PRODUCTS'
    range and ``blas_threads`` (the setter's address, 0: none) can hold it there."""
    depth = a.shape[0] if transpose_a else a.shape[1]
    product = c.shape[0] * c.shape[1] * depth
    low, high = HELD_GEMM_PRODUCTS
    if blas_threads != 0 and low <= product < high:
        held = _one_blas_thread(blas_threads)
        _gemm(gemm, transpose_a, transpose_b, alpha, a, b, beta, c)
        _blas_threads_back(blas_threads, held)
    else:
        _gemm(gemm, transpose_a, transpose_b, alpha, a, b, beta, c)


@njit(inline="always")
def _block(size, blocks, c):
    """The bounds of block c of range(size) cut into ``blocks`` near-equal blocks."""
    return c * size // blocks, (c + 1) * size // blocks


@kernel(parallel=True)
def _gemm_parallel(gemm, transpose_a, transpose_b, alpha, a, b, beta, c, tasks, blas_threads):
    """``_gemm`` in ``tasks`` blocks of c's longer side, a task each on numba's threads,
    each task's BLAS held at one thread: a block of c's rows takes op(a)'s rows, one of
    its columns op(b)'s columns."""
    m, n = c.shape
    for t in prange(tasks):
        held = _one_blas_thread(blas_threads)
        if m >= n:
            lo, hi = _block(m, tasks, np.int64(t))
            if transpose_a:
                _gemm(gemm, True, transpose_b, alpha, a[:, lo:hi], b, beta, c[lo:hi])
            else:
                _gemm(gemm, False, transpose_b, alpha, a[lo:hi], b, beta, c[lo:hi])
        else:
            lo, hi = _block(n, tasks, np.int64(t))
            if transpose_b:
                _gemm(gemm, transpose_a, True, alpha, a, b[lo:hi], beta, c[:, lo:hi])
            else:
                _gemm(gemm, transpose_a, False, alpha, a, b[:, lo:hi], beta, c[:, lo:hi])
        _blas_threads_back(blas_threads, held)


@njit(inline="always")
def _splits(rows, columns, depth, tasks):
    """Whether a GEMM of this size runs split among ``tasks`` tasks."""
    return tasks > 1 and rows * columns * depth >= SPLIT_MIN_PRODUCT


@kernel
def _gemm_split(gemm, transpose_a, transpose_b, alpha, a, b, beta, c, tasks, blas_threads):
    """``_gemm``, split among ``tasks`` tasks where it is large enough (see above), on
    one BLAS thread where it is small (``_gemm_small_held``)."""
    depth = a.shape[0] if transpose_a else a.shape[1]
    if _splits(c.shape[0], c.shape[1], depth, tasks):
        _gemm_parallel(gemm, transpose_a, transpose_b, alpha, a, b, beta, c, tasks, blas_threads)
    else:
        _gemm_small_held(gemm, transpose_a, transpose_b, alpha, a, b, beta, c, blas_threads)


# ---------------------------------------------------------------------------
# Fused element-wise passes, each from one array into another
# ---------------------------------------------------------------------------
# In place, LLVM turns relu's "store z back where z ≥ 0" into masked stores, which
# AMD's CPUs microcode: an in-place relu ran 4x slower than this out-of-place one.
@njit(inline="always")
def _map(source, target, function):
    for k in range(source.shape[0]):
        target[k] = function(source[k])


@njit(inline="always")
def _map_with(source, target, function, p0, p1):
    for k in range(source.shape[0]):
        target[k] = function(source[k], p0, p1)


@kernel
def _activate_serial(z, activation, out):
    # One loop per activation: with the choice inside one loop, LLVM kept every branch.
    code, p0, p1 = int(activation[0]), activation[1], activation[2]
    if code == RELU:
        _map(z, out, relu)
    elif code == SIGMOID:
        _map(z, out, sigmoid)
    elif code == TANH:
        _map(z, out, tanh)
    elif code == LEAKY_RELU:
        _map_with(z, out, _leaky_relu, p0, p1)
    elif code == ELU:
        _map_with(z, out, _elu, p0, p1)
    elif code == SOFTPLUS:
        _map_with(z, out, _softplus, p0, p1)
    elif code == SILU:
        _map_with(z, out, _silu, p0, p1)
    elif code == GELU:
        _map_with(z, out, _gelu, p0, p1)
    elif code == GELU_TANH:
        _map_with(z, out, _gelu_tanh, p0, p1)
    elif code == GELU_KEEPING_SLOPE:
        _gelu_keeping_slope(z, out)
    else:
        out[:] = z


@kernel(parallel=True)
def _activate_parallel(z, activation, out, size):
    # Blocks of ``size`` elements, each a call of the serial kernel on contiguous slices:
    # inlined into the parallel loop with index bounds instead, the loops are not vectorized.
    for c in prange((z.shape[0] + size - 1) // size):
        lo, hi = c * size, (c + 1) * size
        _activate_serial(z[lo:hi], activation, out[lo:hi])


@kernel
def _activate(z, activation, out):
    """``out = act(z)``, element by element, for C-contiguous arrays of one shape;
    ``activation`` is a layer's row (code, p₀, p₁)."""
    source, target = z.reshape(z.size), out.reshape(out.size)
    cheap = _cheap(activation)
    if source.shape[0] >= (PARALLEL_MIN_ELEMENTS if cheap else PARALLEL_MIN_ELEMENTS_COSTLY):
        _activate_parallel(source, activation, target, PARALLEL_BLOCK_ELEMENTS)
    else:
        _activate_serial(source, activation, target)


@njit(inline="always")
def _cheap(activation):
    """Whether an activation's passes cost about a compare an element."""
    return int(activation[0]) in CHEAP_CODES


@njit(inline="always")
def _delta_from_a(g, a, code, zero, one):
    """g ⊙ act'(z) of RELU, SIGMOID, TANH and IDENTITY, from the saved output a."""
    if code == RELU:
        return zero if a <= zero else g  # a select, as torch's threshold_backward
    if code == SIGMOID:
        return g * (one - a) * a
    if code == TANH:
        return g * fma(-a, a, one)  # 1 − a² rounded once, as torch's tanh_backward
    return g


@kernel
def _delta_rows_from_a(g, a, code, delta, column_sums):
    """``_delta_rows`` of the activations whose derivative reads a."""
    zero, one = a.dtype.type(0), a.dtype.type(1)
    wants_bias = column_sums.shape[0] > 0
    for i in range(g.shape[0]):
        for j in range(g.shape[1]):
            d = _delta_from_a(g[i, j], a[i, j], code, zero, one)
            delta[i, j] = d
            if wants_bias:
                column_sums[j] += d


@njit(inline="always")
def _delta_loop_from_z(g, z, p0, p1, delta, column_sums, slope):
    """δ = g · slope(z, p₀, p₁), in g's float type as torch's backward kernels; then the
    column sums, in a loop of their own: LLVM does not split a loop this long on the
    ``if`` of the sums, and with the ``if`` inside, it did not vectorize it (3x slower)."""
    size = g.size  # flat: 12% faster than the (i, j) loop
    g_, z_, delta_ = g.reshape(size), z.reshape(size), delta.reshape(size)
    for k in range(size):
        delta_[k] = g_[k] * slope(z_[k], p0, p1)
    if column_sums.shape[0] > 0:
        for i in range(g.shape[0]):
            for j in range(g.shape[1]):
                column_sums[j] += delta[i, j]


@kernel
def _delta_rows(g, a, z, activation, delta, column_sums):
    """δ for these rows; adds Σ_rows δ into the float64 ``column_sums`` unless it is empty.
    ``z`` is the pre-activation where the derivative reads it, else a again. One loop
    per activation, as in ``_activate_serial``."""
    code, p0, p1 = int(activation[0]), activation[1], activation[2]
    if code in (IDENTITY, RELU, SIGMOID, TANH):
        _delta_rows_from_a(g, a, code, delta, column_sums)
    elif code == LEAKY_RELU:
        _delta_loop_from_z(g, z, p0, p1, delta, column_sums, _leaky_relu_slope)
    elif code == ELU:
        _delta_loop_from_z(g, z, p0, p1, delta, column_sums, _elu_slope)
    elif code == SOFTPLUS:
        _delta_loop_from_z(g, z, p0, p1, delta, column_sums, _softplus_slope)
    elif code == SILU:
        _delta_loop_from_z(g, z, p0, p1, delta, column_sums, _silu_slope)
    elif code == GELU:
        _delta_loop_from_z(g, z, p0, p1, delta, column_sums, _gelu_slope)
    elif code == GELU_KEEPING_SLOPE:
        _delta_loop_from_z(g, z, p0, p1, delta, column_sums, _kept_slope)
    else:  # GELU_TANH
        _delta_loop_from_z(g, z, p0, p1, delta, column_sums, _gelu_tanh_slope)


@kernel(parallel=True)
def _delta_parallel(g, a, z, activation, delta, partials, rows):
    # Row blocks, each a call of the serial kernel on contiguous slices; partials[c]
    # holds block c's bias sums.
    for c in prange((g.shape[0] + rows - 1) // rows):
        lo, hi = c * rows, (c + 1) * rows
        _delta_rows(g[lo:hi], a[lo:hi], z[lo:hi], activation, delta[lo:hi], partials[c])


@kernel
def _delta_and_bias_grad(g, a, z, activation, delta, grad_bias):
    """``δ = g ⊙ act'(z)`` into ``delta`` (never g's memory) and, when ``grad_bias`` is
    non-empty, ``Σ_batch δ``; ``z`` is a again unless the derivative reads z.

    The sums run in float64, in row blocks fixed by the shape alone, so the
    result does not depend on the thread count.
    """
    rows = max(g.shape[0], 1)  # one block, on the calling thread
    if g.size >= PARALLEL_MIN_ELEMENTS:
        rows = max(1, PARALLEL_BLOCK_ELEMENTS // g.shape[1])
    _delta_in_blocks(g, a, z, activation, delta, grad_bias, rows)


@kernel
def _delta_in_blocks(g, a, z, activation, delta, grad_bias, rows):
    """``_delta_and_bias_grad`` in blocks of ``rows`` rows, on numba's threads where
    there are several; ∂b sums the blocks' float64 sums in block order."""
    width = grad_bias.shape[0]
    blocks = (g.shape[0] + rows - 1) // rows
    if blocks > 1:
        partials = np.zeros((blocks, width))
        _delta_parallel(g, a, z, activation, delta, partials, rows)
    else:
        partials = np.zeros((1, width))
        _delta_rows(g, a, z, activation, delta, partials[0])
    for j in range(width):
        grad_bias[j] = partials[:, j].sum()


# In a training step that splits its GEMMs among tasks, every GEMM is in numba's
# parallel regions already (see _gemm_split), so a parallel pass costs its threads'
# wake-up alone: the passes of an activation that costs more than a compare split among
# the tasks from STEP_PARALLEL_MIN_ELEMENTS (on one thread, GELU's forward and backward
# passes of MNIST b128's hidden layers took 58 µs, relu's 1). Blocks that follow the
# task count change how ∂b sums its rows, as the GEMMs' blocks may change their
# rounding.
STEP_PARALLEL_MIN_ELEMENTS = 1 << 13


@njit(inline="always")
def _step_parallel(activation, size, tasks):
    """Whether a step's pass of ``size`` elements splits among its ``tasks`` tasks."""
    return tasks > 1 and size >= STEP_PARALLEL_MIN_ELEMENTS and not _cheap(activation)


@kernel
def _activate_in(z, activation, out, tasks):
    """``_activate`` in a step of ``tasks`` tasks: a block a task where it is worth it;
    with 0, on the calling thread alone (``_chain_block``: a task's own rows)."""
    if tasks == 0:
        _activate_serial(z.reshape(z.size), activation, out.reshape(out.size))
    elif _step_parallel(activation, z.size, tasks):
        source, target = z.reshape(z.size), out.reshape(out.size)
        _activate_parallel(source, activation, target, -(-source.shape[0] // tasks))
    else:
        _activate(z, activation, out)


@njit(inline="always")
def _on_blas_threads(product):
    """Whether a GEMM of ``product`` multiply-adds, run whole (``_gemm_small_held``),
    runs on the BLAS's own threads: it is above the range held at one."""
    return product >= HELD_GEMM_PRODUCTS[1]


@kernel
def _activate_after_blas(z, activation, out):
    """``_activate`` where z was written by the BLAS's threads: split among numba's
    threads from ``PARALLEL_MIN_AFTER_BLAS`` elements."""
    source, target = z.reshape(z.size), out.reshape(out.size)
    cheap_least, costly_least = PARALLEL_MIN_AFTER_BLAS
    if source.shape[0] >= (cheap_least if _cheap(activation) else costly_least):
        # 16 blocks, of 1024 elements at least: numba gives each thread a contiguous run
        # of them, as MKL gave each its share of z (asking the thread count here would
        # keep numba from caching every kernel that calls this one)
        block = max(1 << 10, -(-source.shape[0] // 16))
        _activate_parallel(source, activation, target, block)
    else:
        _activate_serial(source, activation, target)


@kernel
def _delta_and_bias_grad_in(g, a, z, activation, delta, grad_bias, tasks):
    """``_delta_and_bias_grad`` in a step of ``tasks`` tasks: a block of rows a task
    where it is worth it."""
    if _step_parallel(activation, g.size, tasks):
        _delta_in_blocks(g, a, z, activation, delta, grad_bias, -(-g.shape[0] // tasks))
    else:
        _delta_and_bias_grad(g, a, z, activation, delta, grad_bias)


# ---------------------------------------------------------------------------
# Layer and network kernels
# ---------------------------------------------------------------------------
@njit(inline="always")
def _rows(space, rows, width):
    """The first rows·width elements of a flat workspace, as a (rows, width) matrix."""
    return space[: rows * width].reshape((rows, width))


@njit(inline="always")
def _bias_rows(z, bias, lo, hi):
    """Rows lo to hi of z ← bias, element by element: numba's row assignment
    (``z[i] = bias``) is not vectorized, and took 62 µs over 1024×256 where this takes
    17 (AVX-512 Xeon)."""
    for i in range(lo, hi):
        for j in range(bias.shape[0]):
            z[i, j] = bias[j]


@kernel(parallel=True)
def _bias_rows_parallel(z, bias, rows):
    for c in prange((z.shape[0] + rows - 1) // rows):
        _bias_rows(z, bias, c * rows, min((c + 1) * rows, z.shape[0]))


@kernel
def _fill_with_bias(z, bias, tasks):
    """Every row of z ← bias, for the GEMM to add its sum to; split among numba's
    threads from PARALLEL_MIN_ELEMENTS, as a cheap activation's pass (after a GEMM,
    1024×256 took 42 µs on one thread and 29 on two; 256×256, 8.0 and 7.5), except in
    a task of a parallel region (``tasks`` 0)."""
    if tasks != 0 and z.size >= PARALLEL_MIN_ELEMENTS:
        _bias_rows_parallel(z, bias, max(1, PARALLEL_BLOCK_ELEMENTS // z.shape[1]))
    else:
        _bias_rows(z, bias, 0, z.shape[0])


@kernel
def _layer_forward(gemm, x, weight, bias, activation, out, kept, scratch, tasks, blas_threads):
    """``out = act(x Wᵀ + b)``; z goes into ``kept`` where it has rows (backward reads
    it), else through ``scratch`` unless act is the identity. The GEMM is
    ``_gemm_split``'s (``tasks``, ``blas_threads``)."""
    code = int(activation[0])
    if code == IDENTITY:
        z = out
    elif kept.shape[0] > 0:
        z = kept
    else:
        z = _rows(scratch, out.shape[0], out.shape[1])
    # z = x Wᵀ + b as torch's addmm computes it: the GEMM adds its sum to rows holding b,
    # one rounding (an add after the GEMM would be a second, which sums over K=1 amplify).
    has_bias = bias.shape[0] > 0
    if has_bias:
        _fill_with_bias(z, bias, tasks)
    beta = 1.0 if has_bias else 0.0
    _gemm_split(gemm, False, True, 1.0, x, weight, beta, z, tasks, blas_threads)
    if code == IDENTITY:
        return
    if tasks == 1 and _on_blas_threads(x.shape[0] * weight.size):
        _activate_after_blas(z, activation, out)
    else:
        _activate_in(z, activation, out, tasks)


@njit(inline="always")
def _keeping_slopes(activations):
    """A training step's activation rows: GELU's become GELU_KEEPING_SLOPE's, whose
    forward writes the slope over z (which GELU's layers keep) for the backward to read.
    Forward and backward must both take these rows, or neither."""
    rows = activations.copy()
    for layer in range(rows.shape[0]):
        if rows[layer, 0] == GELU:
            rows[layer, 0] = GELU_KEEPING_SLOPE
    return rows


@njit(inline="always")
def _kept_or(outputs, layer, a):
    """Layer ``layer``'s kept z from ``outputs`` (every a, then every layer's z slot),
    or ``a`` where its slot is empty (its derivative reads a only)."""
    kept = outputs[len(outputs) // 2 + layer]
    return kept if kept.shape[0] > 0 else a


@kernel
def _mlp_forward(gemm, x, weights, biases, activations, outputs, scratch, tasks, blas_threads):
    """``outputs`` holds every layer's a, then every layer's z slot (empty where the
    derivative reads a only); a training step splits its GEMMs (``_gemm_split``), and
    ``tasks`` 0 runs every pass on the calling thread (``_activate_in``)."""
    top = len(weights)
    for layer in range(top):
        source = x if layer == 0 else outputs[layer - 1]
        _layer_forward(
            gemm,
            source,
            weights[layer],
            biases[layer],
            activations[layer],
            outputs[layer],
            outputs[top + layer],
            scratch,
            tasks,
            blas_threads,
        )


@kernel
def _mlp_backward(
    gemm,          # address of the BLAS ?gemm (bind_gemm)
    g,             # ∂L/∂a of the last layer, (N, out)
    x,             # the network's input, (N, in)
    weights,       # one (out, in) matrix per layer
    activations,   # (L, 3): each layer's activation row (code, p₀, p₁)
    outputs,       # every layer's output a, then its z slot, as forward saved them
    grad_weights,  # out: ∂L/∂W per layer
    grad_biases,   # out: ∂L/∂b per layer; empty for a layer without bias
    grad_x,        # out: ∂L/∂x; zero rows when x needs no gradient
    delta_space,   # workspace of N·(widest layer) elements: δ of the current layer
    upstream_space,  # the same size: ∂L/∂a of the layer below, written by ∂x = δ W
    blas_threads,  # the BLAS's thread-local count setter, or 0 (_gemm_small_held)
):  # fmt: skip
    # the training step's backward (_gradients) as one task, then ∂L/∂x = δ₁ W₁ from the
    # first layer's δ, which it leaves in delta_space
    _gradients(gemm, x, weights, activations, outputs, delta_space, upstream_space, g,
               grad_weights, grad_biases, 1, blas_threads)  # fmt: skip
    if grad_x.shape[0] > 0:
        delta = _rows(delta_space, x.shape[0], weights[0].shape[0])
        _gemm_small_held(gemm, False, False, 1.0, delta, weights[0], 0.0, grad_x, blas_threads)


# ---------------------------------------------------------------------------
# The training step: forward, loss gradient, backward and update in one call
# ---------------------------------------------------------------------------
# A parameter's row of the ``hyper`` array every update reads.
LR, MOMENTUM, WEIGHT_DECAY, BETA1, BETA2, EPS = range(6)


@kernel
def _loss_and_grad(output, targets, labels, loss, scale, g):
    """Write ``scale·∂L/∂ŷ`` into g and return ``scale·L``, summed in float64."""
    zero = output.dtype.type(0)
    total = 0.0
    for i in range(output.shape[0]):
        row = output[i]
        if loss == CROSS_ENTROPY:
            top = row[0]
            for j in range(1, row.shape[0]):
                top = max(top, row[j])
            norm = zero
            for j in range(row.shape[0]):
                g[i, j] = exp(row[j] - top)
                norm += g[i, j]
            total += np.log(norm) + top - row[labels[i]]
            for j in range(row.shape[0]):
                g[i, j] = g[i, j] / norm * scale
            g[i, labels[i]] -= scale
            continue
        for j in range(row.shape[0]):
            z, y = row[j], targets[i, j]
            if loss == MSE:
                total += (z - y) * (z - y)
                g[i, j] = 2 * (z - y) * scale
            else:  # BCE with logits, in the overflow-free form
                total += max(z, zero) - z * y + np.log1p(exp(-abs(z)))
                g[i, j] = (sigmoid(z) - y) * scale
    return total * scale


@kernel
def _update_serial(param, grad, state_a, state_b, rule, hyper, step, fresh, scale):
    """``torch.optim``'s update of a flat ``param`` (``reference.SGD``/``Adam``/``AdamW``)
    from ``scale·grad``, in the parameter's dtype as torch computes it.

    ``hyper`` is the parameter's row (LR, MOMENTUM, …); ``state_a``/``state_b`` the
    momentum buffer, or Adam's m and v; ``step`` Adam's count after this step;
    ``fresh`` is true where SGD's momentum buffer starts (torch sets buf = d). One
    loop per rule, so that each stays a tight, vectorized loop.
    """
    real = param.dtype.type
    lr, momentum, decay = real(hyper[LR]), real(hyper[MOMENTUM]), real(hyper[WEIGHT_DECAY])
    factor = real(scale)  # clip_grad_norm_'s coefficient, multiplied in as torch does
    if rule == SGD:
        for k in range(param.shape[0]):
            d = grad[k] * factor if scale != 1.0 else grad[k]
            if decay != 0:  # 0·inf would be NaN
                d += decay * param[k]
            if momentum != 0:
                d = d if fresh else momentum * state_a[k] + d
                state_a[k] = d
            param[k] -= lr * d
        return
    # Coefficients formed in float64 and rounded once, as torch.optim forms them
    # in Python: 1 − float32(β₂) is 8 ulp away from float32(1 − β₂) for β₂ = 0.99.
    beta2, eps = real(hyper[BETA2]), real(hyper[EPS])
    weight1, weight2 = real(1 - hyper[BETA1]), real(1 - hyper[BETA2])
    step_size = real(hyper[LR] / (1 - hyper[BETA1] ** step))
    correction = real(np.sqrt(1 - hyper[BETA2] ** step))
    shrink = real(1 - hyper[LR] * hyper[WEIGHT_DECAY])  # AdamW's decoupled decay
    coupled = decay if rule == ADAM else real(0)
    for k in range(param.shape[0]):
        if rule == ADAMW and decay != 0:
            param[k] *= shrink
        d = grad[k] * factor if scale != 1.0 else grad[k]
        if coupled != 0:
            d += coupled * param[k]
        state_a[k] += weight1 * (d - state_a[k])
        state_b[k] = beta2 * state_b[k] + weight2 * d * d
        param[k] -= step_size * state_a[k] / (np.sqrt(state_b[k]) / correction + eps)


@kernel(parallel=True)
def _update_parallel(param, grad, state_a, state_b, rule, hyper, step, fresh, scale):
    # Slices, each updated by a call of the serial kernel: inlined into the
    # parallel loop with index bounds instead, the loops ran 4x slower (not vectorized).
    size = PARALLEL_BLOCK_ELEMENTS
    for c in prange((param.shape[0] + size - 1) // size):
        lo, hi = c * size, (c + 1) * size
        _update_serial(
            param[lo:hi],
            grad[lo:hi],
            state_a[lo:hi],
            state_b[lo:hi],
            rule,
            hyper,
            step,
            fresh,
            scale,
        )


@kernel
def _update(param, grad, state_a, state_b, rule, hyper, step, fresh, scale):
    """Update a flat parameter in place; the state arrays are empty when unused."""
    if param.shape[0] >= PARALLEL_MIN_ELEMENTS:
        _update_parallel(param, grad, state_a, state_b, rule, hyper, step, fresh, scale)
    else:
        _update_serial(param, grad, state_a, state_b, rule, hyper, step, fresh, scale)


@njit(inline="always")
def _folds(rule, hyper):
    """Whether the rule is plain SGD, whose whole update folds into the ∂W GEMM."""
    return rule == SGD and hyper[MOMENTUM] == 0 and hyper[WEIGHT_DECAY] == 0


@kernel
def _update_weight(gemm, delta, source, weight, grad, state_a, state_b, rule, hyper, step, fresh,
                   tasks, blas_threads):  # fmt: skip
    """Apply ``∂W = δᵀ x`` to W with as few passes over W as the rule allows.

    Plain SGD without weight decay folds the whole update into the GEMM,
    ``W ← W − lr·δᵀx`` (beta 1), so ∂W is never written out. Every other rule writes
    ∂W (beta 0) and moves W in one pass: MKL ran a GEMM that also scales C by any other
    beta at half speed (MNIST's first ∂W: 139 µs with SGD's momentum as beta, 71 with
    beta 0 or 1), so momentum and decay are the pass's. Where the GEMM splits among
    tasks, each task moves its own block of W's rows right after its GEMM wrote their
    ∂W, while they are in its cache.
    """
    if _splits(weight.shape[0], weight.shape[1], delta.shape[0], tasks):
        _update_weight_parallel(gemm, delta, source, weight, grad, state_a, state_b, rule, hyper,
                                step, fresh, tasks, blas_threads)  # fmt: skip
    elif _folds(rule, hyper):
        _gemm_small_held(gemm, True, False, -hyper[LR], delta, source, 1.0, weight, blas_threads)
    else:
        _gemm_small_held(gemm, True, False, 1.0, delta, source, 0.0, grad, blas_threads)
        flat_weight, flat_grad = weight.reshape(weight.size), grad.reshape(grad.size)
        _update(flat_weight, flat_grad, state_a, state_b, rule, hyper, step, fresh, 1.0)


@kernel(parallel=True)
def _update_weight_parallel(gemm, delta, source, weight, grad, state_a, state_b, rule, hyper,
                            step, fresh, tasks, blas_threads):  # fmt: skip
    # Task t: rows lo:hi of W, whose ∂W = δ[:, lo:hi]ᵀ x, and their flat elements.
    width = weight.shape[1]
    flat_weight, flat_grad = weight.reshape(weight.size), grad.reshape(grad.size)
    for t in prange(tasks):
        held = _one_blas_thread(blas_threads)
        lo, hi = _block(weight.shape[0], tasks, np.int64(t))
        if _folds(rule, hyper):
            _gemm(gemm, True, False, -hyper[LR], delta[:, lo:hi], source, 1.0, weight[lo:hi])
        else:
            _gemm(gemm, True, False, 1.0, delta[:, lo:hi], source, 0.0, grad[lo:hi])
            first, last = lo * width, hi * width  # an unused state is empty: its slice too
            _update_serial(flat_weight[first:last], flat_grad[first:last],
                           state_a[first:last], state_b[first:last], rule, hyper, step, fresh,
                           1.0)  # fmt: skip
        _blas_threads_back(blas_threads, held)


@kernel
def _first_bad_label(labels, classes):
    for i in range(labels.shape[0]):
        if labels[i] < 0 or labels[i] >= classes:
            return i
    return -1


@kernel
def _gradients(gemm, x, weights, activations, outputs, delta_space, upstream_space, upstream,
               grad_weights, grad_biases, tasks, blas_threads):  # fmt: skip
    """Every layer's ∂W and ∂b from the loss gradient held in ``upstream``, the GEMMs
    ``_gemm_split``'s."""
    batch = x.shape[0]
    for layer in range(len(weights) - 1, -1, -1):
        delta = _rows(delta_space, batch, weights[layer].shape[0])
        activation, a = activations[layer], outputs[layer]
        z = _kept_or(outputs, layer, a)
        _delta_and_bias_grad_in(upstream, a, z, activation, delta, grad_biases[layer], tasks)
        source = x if layer == 0 else outputs[layer - 1]
        _gemm_split(gemm, True, False, 1.0, delta, source, 0.0, grad_weights[layer], tasks,
                    blas_threads)  # fmt: skip
        if layer > 0:
            upstream = _rows(upstream_space, batch, weights[layer].shape[1])
            _gemm_split(gemm, False, False, 1.0, delta, weights[layer], 0.0, upstream, tasks,
                        blas_threads)  # fmt: skip


@kernel
def _squares(grad):
    """Σ grad², in float64."""
    flat = grad.reshape(grad.size)
    total = 0.0
    for k in range(flat.shape[0]):
        total += float(flat[k]) * float(flat[k])
    return total


@kernel
def _clip_coefficient(grad_weights, grad_biases, max_norm):
    """``clip_grad_norm_``'s factor: min(1, max_norm / (‖every gradient‖₂ + 1e-6))."""
    total = 0.0
    for layer in range(len(grad_weights)):
        total += _squares(grad_weights[layer]) + _squares(grad_biases[layer])
    return min(1.0, max_norm / (np.sqrt(total) + 1e-6))


@kernel
def _train_step(
    gemm,            # address of the BLAS ?gemm (bind_gemm)
    x,               # the batch, (N, in)
    targets,         # (N, out) targets of MSE and BCE, or ∂L/∂ŷ (GIVEN_GRADIENT); (0, 0) for CE
    labels,          # (N,) int64 classes of cross-entropy; empty otherwise
    weights,         # one (out, in) matrix per layer, updated in place
    biases,          # one (out,) vector per layer (empty: no bias), updated in place
    activations,     # (L, 3): each layer's activation row (code, p₀, p₁)
    outputs,         # workspace: every layer's output, then its z slot (_mlp_forward's)
    delta_space,     # workspace of N·(every layer's width, summed) elements: each
                     # layer's δ (_layer_delta); N·(widest layer) suffices without blocks
                     # of rows (_in_row_blocks)
    upstream_space,  # workspace of N·(widest layer) elements
    grad_weights,    # workspaces: ∂W per layer (Adam's and clipping's)
    grad_biases,     # workspaces: ∂b per layer (empty: no bias)
    first_param,     # (L,) index of layer l's weight among the parameters (its bias: +1)
    states,          # two flat arrays per parameter: momentum buffer, or Adam's m and v
    steps,           # one 1-element array per parameter: Adam's count, incremented here
    hyper,           # (parameters, 6): each parameter's LR, MOMENTUM, … row
    fresh,           # (parameters,): 1 where SGD's momentum buffer starts this step
    loss,            # MSE, CROSS_ENTROPY, BCE_WITH_LOGITS or GIVEN_GRADIENT
    scale,           # 1/terms for a mean, else 1
    rule,            # SGD, ADAM or ADAMW
    max_norm,        # clip_grad_norm_'s max_norm; 0: no clipping
    tasks,           # the tasks a large GEMM splits among (1: none, BLAS's own threads)
    blas_threads,    # the BLAS's thread-local count setter, or 0 (_one_blas_thread,
                     # _gemm_small_held)
):  # fmt: skip
    """One step on every layer; returns ``(loss before the update, -1)``, or, without
    touching anything, ``(NaN, i)`` when label i is not a class and ``(NaN, -2 - p)``
    when parameter p's state arrays are not the size its rule reads. With
    GIVEN_GRADIENT the forward has run already (``outputs`` holds it) and the loss,
    computed by the caller, is returned as 0. With more than one task, the BLAS runs on
    one thread throughout, every thread's its own, and the large GEMMs split among the
    tasks on numba's threads (see ``_gemm_split``)."""
    top = len(weights) - 1
    bad = _refusal(weights, biases, first_param, states, hyper, rule, labels, weights[top].shape[0])
    if bad != -1:
        return np.nan, bad
    _count_steps(biases, first_param, steps, rule)
    held = _one_blas_thread(blas_threads if tasks > 1 else 0)
    value = _network_step(gemm, x, targets, labels, weights, biases, activations, outputs,
                          delta_space, upstream_space, grad_weights, grad_biases, first_param,
                          states, steps, hyper, fresh, loss, scale, rule, max_norm, tasks,
                          blas_threads)  # fmt: skip
    _blas_threads_back(blas_threads if tasks > 1 else 0, held)
    return value, -1


@kernel
def _refusal(weights, biases, first_param, states, hyper, rule, labels, classes):
    """-1 if a step may run; else ``-2 - p`` where parameter p's state arrays are not the
    size its rule reads, or the index of the first label outside [0, classes)."""
    for layer in range(len(weights)):
        p = first_param[layer]
        for q, size in ((p, weights[layer].size), (p + 1, biases[layer].size)):
            if size == 0:
                continue
            used = 2 if rule != SGD else int(hyper[q, MOMENTUM] != 0)
            if (used > 0 and states[2 * q].size != size) or (
                used > 1 and states[2 * q + 1].size != size
            ):
                return -2 - q
    if labels.size > 0:
        return _first_bad_label(labels.reshape(labels.size), classes)
    return -1


@kernel
def _count_steps(biases, first_param, steps, rule):
    """Advance Adam's step count of every parameter, once per step."""
    if rule == SGD:
        return
    for layer in range(len(biases)):
        p = first_param[layer]
        steps[p][0] += 1
        if biases[layer].size > 0:
            steps[p + 1][0] += 1


@kernel
def _network_step(gemm, x, targets, labels, weights, biases, activations, outputs, delta_space,
                  upstream_space, grad_weights, grad_biases, first_param, states, steps, hyper,
                  fresh, loss, scale, rule, max_norm, tasks, blas_threads):  # fmt: skip
    """``_train_step`` once its checks have passed and its step counts moved: the
    forward, the loss gradient, the backward and every update; returns the loss."""
    if loss != GIVEN_GRADIENT:  # a forward of its own: it may keep slopes for its backward
        activations = _keeping_slopes(activations)
    if _in_row_blocks(x.shape[0], weights, delta_space, max_norm, tasks):
        return _step_in_row_blocks(gemm, x, targets, labels, weights, biases, activations,
                                   outputs, delta_space, upstream_space, grad_weights,
                                   grad_biases, first_param, states, steps, hyper, fresh, loss,
                                   scale, rule, tasks, blas_threads)  # fmt: skip
    top = len(weights) - 1
    batch = x.shape[0]
    if loss == GIVEN_GRADIENT:
        upstream, value = targets, 0.0
    else:
        _mlp_forward(gemm, x, weights, biases, activations, outputs, delta_space, tasks,
                     blas_threads)  # fmt: skip
        upstream = _rows(upstream_space, batch, weights[top].shape[0])
        value = _loss_and_grad(outputs[top], targets, labels, loss, scale, upstream)
    if max_norm > 0:  # clipping needs every gradient before any update
        _gradients(
            gemm,
            x,
            weights,
            activations,
            outputs,
            delta_space,
            upstream_space,
            upstream,
            grad_weights,
            grad_biases,
            tasks,
            blas_threads,
        )
        coefficient = _clip_coefficient(grad_weights, grad_biases, max_norm)
        for layer in range(top + 1):
            p = first_param[layer]
            grad = grad_weights[layer]
            _update(
                weights[layer].reshape(weights[layer].size),
                grad.reshape(grad.size),
                states[2 * p],
                states[2 * p + 1],
                rule,
                hyper[p],
                steps[p][0],
                fresh[p],
                coefficient,
            )
            if biases[layer].shape[0] > 0:
                q = p + 1
                _update(
                    biases[layer],
                    grad_biases[layer],
                    states[2 * q],
                    states[2 * q + 1],
                    rule,
                    hyper[q],
                    steps[q][0],
                    fresh[q],
                    coefficient,
                )
        return value
    for layer in range(top, -1, -1):
        source = x if layer == 0 else outputs[layer - 1]
        delta = _rows(delta_space, batch, weights[layer].shape[0])
        activation, a = activations[layer], outputs[layer]
        z = _kept_or(outputs, layer, a)
        _delta_and_bias_grad_in(upstream, a, z, activation, delta, grad_biases[layer], tasks)
        if layer > 0:  # ∂L/∂aₗ₋₁ = δ Wₗ, taken before Wₗ moves
            upstream = _rows(upstream_space, batch, weights[layer].shape[1])
            _gemm_split(gemm, False, False, 1.0, delta, weights[layer], 0.0, upstream, tasks,
                        blas_threads)  # fmt: skip
        _update_layer(gemm, delta, source, weights, biases, grad_weights, grad_biases,
                      first_param, states, steps, hyper, fresh, rule, layer, tasks,
                      blas_threads)  # fmt: skip
    return value


@njit(inline="always")
def _update_layer(gemm, delta, source, weights, biases, grad_weights, grad_biases, first_param,
                  states, steps, hyper, fresh, rule, layer, tasks, blas_threads):  # fmt: skip
    """Layer ``layer``'s updates in a step without clipping: W's from its δ and the
    layer's input (``_update_weight``), b's from the ∂b already in ``grad_biases``."""
    p = first_param[layer]
    _update_weight(gemm, delta, source, weights[layer], grad_weights[layer], states[2 * p],
                   states[2 * p + 1], rule, hyper[p], steps[p][0], fresh[p], tasks,
                   blas_threads)  # fmt: skip
    if biases[layer].shape[0] > 0:
        q = p + 1
        _update(biases[layer], grad_biases[layer], states[2 * q], states[2 * q + 1], rule,
                hyper[q], steps[q][0], fresh[q], 1.0)  # fmt: skip


# ---------------------------------------------------------------------------
# A large batch in blocks of rows
# ---------------------------------------------------------------------------
# Through the forward, the loss and the backward's chain of δ's, each row of the batch
# is computed from its own row alone; only ∂W = δᵀx and ∂b = Σ δ sum over rows. At a
# large batch the passes between the GEMMs (activation, loss, δ) stream megabytes
# through memory: MNIST b1024's first hidden layer holds 1 MiB, and a relu δ pass over
# it (two such arrays read, a third written) took 84 µs on one thread, where 16 blocks
# of 64 rows, each already in cache, took 2.6 µs each. So a step of ROW_BLOCK_MIN_BATCH
# rows or more runs that chain in blocks of at most ROW_BLOCK_ROWS rows, each task its
# own blocks one after another: each pass reads a block that the GEMM before it has
# just written in that core's cache. On MNIST's 784-256-128-10 net (SGD with momentum,
# 2 cores) the step went from 1.12-1.18× the roofline floor to 1.06-1.10× at 256 and
# 512 rows, and gained 0-3% at 1024 and 2048 (GELU: 4-9% at every batch, with its
# slope kept); at 64 and 128 rows it went to 1.18-1.31× (from 1.02-1.16×), as each
# task's GEMMs read all of W where the whole batch's split W between the tasks: hence
# the minimum (benchmarks/results/2026-12-06-cpu-row-blocks). Every layer's δ is kept
# (``delta_space`` holds one N × width matrix per layer, ``_layer_delta``), each block
# sums its own ∂b rows in float64, and the ∂W GEMMs with their updates run after the
# chain, split by W's rows as in ``_update_weight``. The blocks follow the task count,
# so how ∂b sums its rows does too, as the split GEMMs' rounding may.
ROW_BLOCK_MIN_BATCH = 256
ROW_BLOCK_ROWS = 256


def _rows_of(arrays, lo, hi):
    raise NotImplementedError("_rows_of runs inside numba kernels only")


@overload(_rows_of, inline="always")
def _(arrays, lo, hi):
    """``(arrays[0][lo:hi], …)``: rows lo:hi of each array (an empty z slot stays empty)."""
    items = ", ".join(f"arrays[{i}][lo:hi]" for i in range(len(arrays)))
    return _compiled_lambda(f"lambda arrays, lo, hi: ({items},)")


@njit(inline="always")
def _offset(weights, layer):
    """The widths of the layers below ``layer``, summed: where its columns start in a
    workspace that holds every layer's."""
    offset = 0
    for below in range(layer):
        offset += weights[below].shape[0]
    return offset


@njit(inline="always")
def _total_width(weights):
    return _offset(weights, len(weights))


@njit(inline="always")
def _widest(weights):
    widest = 0
    for layer in range(len(weights)):
        widest = max(widest, weights[layer].shape[0])
    return widest


@njit(inline="always")
def _layer_delta(delta_space, batch, weights, layer):
    """Layer ``layer``'s δ, (N, width), in a workspace that holds every layer's."""
    start, width = batch * _offset(weights, layer), weights[layer].shape[0]
    return delta_space[start : start + batch * width].reshape((batch, width))


@njit(inline="always")
def _block_space(space, lo, hi, width, widest):
    """Rows lo:hi's own (hi − lo, width) matrix in a flat workspace of N·widest
    elements: blocks of rows never overlap, whatever widths they take."""
    start = lo * widest
    return space[start : start + (hi - lo) * width].reshape((hi - lo, width))


@njit(inline="always")
def _in_row_blocks(batch, weights, delta_space, max_norm, tasks):
    """Whether a step runs its chain in blocks of rows: a large batch, several tasks,
    no clipping (which needs every ∂W before any update), and a ``delta_space`` that
    holds every layer's δ."""
    return (
        tasks > 1
        and max_norm == 0
        and batch >= max(ROW_BLOCK_MIN_BATCH, tasks)
        and delta_space.size >= batch * _total_width(weights)
    )


@njit(inline="always")
def _chain_block(gemm, x, targets, labels, weights, biases, activations, outputs, delta_space,
                 upstream_space, loss, scale, sums, lo, hi):  # fmt: skip
    """Rows lo:hi through the forward (unless the loss is GIVEN_GRADIENT), the loss
    gradient and every layer's δ, into ``_layer_delta``'s rows; each layer's Σ rows δ
    goes into its columns of ``sums`` (``_offset``'s). Returns the rows' loss."""
    top, batch, widest = len(weights) - 1, x.shape[0], _widest(weights)
    rows = _rows_of(outputs, lo, hi)
    if loss == GIVEN_GRADIENT:
        upstream, value = targets[lo:hi], 0.0
    else:
        # Every pass on this task's thread (tasks 0): a parallel pass inside a task would
        # nest a parallel region, which numba's workqueue layer aborts on.
        scratch = upstream_space[lo * widest : hi * widest]  # free until the loss gradient
        _mlp_forward(gemm, x[lo:hi], weights, biases, activations, rows, scratch, 0, 0)
        upstream = _block_space(upstream_space, lo, hi, weights[top].shape[0], widest)
        value = _loss_and_grad(rows[top], targets[lo:hi], labels[lo:hi], loss, scale, upstream)
    for layer in range(top, -1, -1):
        delta = _layer_delta(delta_space, batch, weights, layer)[lo:hi]
        a = rows[layer]
        start = _offset(weights, layer)
        end = start + biases[layer].shape[0]  # start: no bias, no sums
        _delta_rows(upstream, a, _kept_or(rows, layer, a), activations[layer], delta,
                    sums[start:end])  # fmt: skip
        if layer > 0:  # ∂L/∂aₗ₋₁ = δ Wₗ, over the ∂L/∂aₗ this block no longer reads
            upstream = _block_space(upstream_space, lo, hi, weights[layer].shape[1], widest)
            _gemm(gemm, False, False, 1.0, delta, weights[layer], 0.0, upstream)
    return value


@kernel(parallel=True)
def _chains_in_blocks(gemm, x, targets, labels, weights, biases, activations, outputs,
                      delta_space, upstream_space, loss, scale, sums, losses, tasks,
                      blas_threads):  # fmt: skip
    # Task t: blocks first:last of the sums' rows, a block of x's rows each, in turn.
    blocks = sums.shape[0]
    for t in prange(tasks):
        held = _one_blas_thread(blas_threads)
        first, last = _block(blocks, tasks, np.int64(t))
        for c in range(first, last):
            lo, hi = _block(x.shape[0], blocks, c)
            losses[c] = _chain_block(gemm, x, targets, labels, weights, biases, activations,
                                     outputs, delta_space, upstream_space, loss, scale, sums[c],
                                     lo, hi)  # fmt: skip
        _blas_threads_back(blas_threads, held)


@kernel
def _step_in_row_blocks(gemm, x, targets, labels, weights, biases, activations, outputs,
                        delta_space, upstream_space, grad_weights, grad_biases, first_param,
                        states, steps, hyper, fresh, loss, scale, rule, tasks,
                        blas_threads):  # fmt: skip
    """``_network_step`` where ``_in_row_blocks``: the chain in blocks of rows
    (``_chains_in_blocks``), then every layer's ∂W and ∂b and their updates."""
    batch = x.shape[0]
    blocks = tasks * -(-batch // (tasks * ROW_BLOCK_ROWS))  # whole blocks a task
    sums = np.zeros((blocks, _total_width(weights)))
    losses = np.zeros(blocks)
    _chains_in_blocks(gemm, x, targets, labels, weights, biases, activations, outputs,
                      delta_space, upstream_space, loss, scale, sums, losses, tasks,
                      blas_threads)  # fmt: skip
    for layer in range(len(weights) - 1, -1, -1):
        grad_bias, start = grad_biases[layer], _offset(weights, layer)
        for j in range(grad_bias.shape[0]):  # the blocks' sums, in block order
            grad_bias[j] = sums[:, start + j].sum()
        _update_layer(gemm, _layer_delta(delta_space, batch, weights, layer),
                      x if layer == 0 else outputs[layer - 1], weights, biases, grad_weights,
                      grad_biases, first_param, states, steps, hyper, fresh, rule, layer, tasks,
                      blas_threads)  # fmt: skip
    return losses.sum()


# ---------------------------------------------------------------------------
# Ensembles: K members of one shape, their parameters stacked
# ---------------------------------------------------------------------------
# Member m of an ensemble is the network of every stacked array's slice [m]: Wₗ[m]
# (out, in) of a (K, out, in) stack, bₗ[m], its outputs aₗ[m] (N, out) of (K, N, out).
# Each member's math is the network's above, unchanged; one call runs every member,
# so that K networks cost one dispatch instead of K (or K per layer). The members
# are independent, so ``*_parallel`` runs them on numba's threads, each member's GEMMs
# and passes on one, as torch's bmm runs its batch; the serial kernels are for a
# threading layer that cannot nest parallel regions (workqueue aborts). numba enables
# nested parallel regions, so MKL inside a task may start a team of its own (under
# tbb, on another pool); each task holds its thread's MKL count at one while it runs
# (``_one_blas_thread``): without that, the REDQ step ran 7% slower in one A/B run.
# Workspaces are stacked per task for the parallel kernels and a single slice, reused
# task after task, for the serial ones: ``_own_or_shared`` takes either. Every member's
# result lands in its own slice (an input shared by every member gets its ∂L/∂x per
# member, summed by the launcher in member order), so with whole members fastbp's own
# sums do not depend on the thread count (BLAS's may:
# fastbp.threads.use_reproducible_blas() fixes MKL's); blocks of rows (below), which the
# launchers choose by it, do. A prange index is cast to int64 before use: it is
# unsigned, and min() of it and a signed integer types as a float, which cannot index.
NESTING_LAYERS = ("tbb", "omp")  # numba's threading layers that nest parallel regions


def _member(arrays, m):
    raise NotImplementedError("_member runs inside numba kernels only")


@overload(_member, inline="always")
def _(arrays, m):
    """``(arrays[0][m], arrays[1][m], …)``: member m's slice of each stacked array, a
    tuple the network kernels take as one network's."""
    items = ", ".join(f"arrays[{i}][m]" for i in range(len(arrays)))
    return _compiled_lambda(f"lambda arrays, m: ({items},)")


def _part(arrays, m, members):
    raise NotImplementedError("_part runs inside numba kernels only")


@overload(_part, inline="always")
def _(arrays, m, members):
    """Member m's part of each flat array of ``arrays`` (an empty one stays empty)."""
    slices = [
        f"arrays[{i}][m * (arrays[{i}].size // members):(m + 1) * (arrays[{i}].size // members)]"
        for i in range(len(arrays))
    ]
    return _compiled_lambda(f"lambda arrays, m, members: ({', '.join(slices)},)")


def _compiled_lambda(source: str):
    """The function a lambda's source defines: an overload's implementation for a tuple
    of one length (numba builds no tuple of a length it does not know)."""
    return eval(source)  # noqa: S307 - source built above from integers only


@njit(inline="always")
def _own_or_shared(stack, m):
    """Member m's slice of ``stack``, or its one slice where it holds one (an input
    every member shares, or a workspace the members use one after another)."""
    return stack[min(m, stack.shape[0] - 1)]


# Blocks of rows. Where the members do not divide evenly among the threads (5 on 2
# leave one thread idle for a third of the call), the forward, the backward and the
# training step run each member in blocks of its rows, as many as make members ×
# blocks divide: task t runs member t // blocks on block t % blocks. With one block,
# a task is a member.
def _member_rows(arrays, m, lo, hi):
    raise NotImplementedError("_member_rows runs inside numba kernels only")


@overload(_member_rows, inline="always")
def _(arrays, m, lo, hi):
    """``(arrays[0][m, lo:hi], …)``: rows lo:hi of member m's slice of each stack (an
    empty z slot stays empty)."""
    items = ", ".join(f"arrays[{i}][m, lo:hi]" for i in range(len(arrays)))
    return _compiled_lambda(f"lambda arrays, m, lo, hi: ({items},)")


@njit(inline="always")
def _forward_block(gemm, x, weights, biases, activations, outputs, scratch, blocks, t, tasks):
    """Task t's forward: member t // blocks on block t % blocks of its rows; ``tasks`` 0
    inside a parallel region (every pass on the task's thread), 1 outside it."""
    m = t // blocks
    lo, hi = _block(outputs[0].shape[1], blocks, t % blocks)
    _mlp_forward(
        gemm,
        _own_or_shared(x, m)[lo:hi],
        _member(weights, m),
        _member(biases, m),
        activations,
        _member_rows(outputs, m, lo, hi),
        _own_or_shared(scratch, t),
        tasks,
        0,
    )


@kernel
def _ensemble_forward(gemm, x, weights, biases, activations, outputs, scratch, blocks):
    """``_mlp_forward`` of every member, its rows in ``blocks`` blocks (rows are
    independent through a forward): x (K or 1, N, in), weights (K, out, in), biases
    (K, out) or (K, 0), outputs every layer's (K, N, out), then its z slot; scratch
    (1, ⌈N/blocks⌉·widest)."""
    for t in range(weights[0].shape[0] * blocks):
        _forward_block(gemm, x, weights, biases, activations, outputs, scratch, blocks, t, 1)


@kernel(parallel=True)
def _ensemble_forward_parallel(gemm, x, weights, biases, activations, outputs, scratch,
                               blocks, blas_threads):  # fmt: skip
    """``_ensemble_forward`` with its tasks on numba's threads; scratch (K·blocks,
    ⌈N/blocks⌉·widest)."""
    for c in prange(weights[0].shape[0] * blocks):
        held = _one_blas_thread(blas_threads)
        _forward_block(gemm, x, weights, biases, activations, outputs, scratch, blocks,
                       np.int64(c), 0)  # fmt: skip
        _blas_threads_back(blas_threads, held)


@njit(inline="always")
def _backward_block(gemm, g, x, weights, activations, outputs, partial_weights, partial_biases,
                    grad_x, delta_space, upstream_space, blocks, t):  # fmt: skip
    """Task t's backward: member t // blocks on block t % blocks of its rows, its ∂W and
    ∂b into slice t of the partial stacks, its rows of ∂L/∂x into grad_x."""
    m = t // blocks
    lo, hi = _block(outputs[0].shape[1], blocks, t % blocks)
    _mlp_backward(
        gemm,
        g[m, lo:hi],
        _own_or_shared(x, m)[lo:hi],
        _member(weights, m),
        activations,
        _member_rows(outputs, m, lo, hi),
        _member(partial_weights, t),
        _member(partial_biases, t),
        grad_x[m, lo:hi],
        _own_or_shared(delta_space, t),
        _own_or_shared(upstream_space, t),
        0,  # the task holds its BLAS at one thread already, or runs alone (serial)
    )


@njit(inline="always")
def _add_blocks(total, partials, first, blocks, lo, hi, start):
    """``total += Σ partials[first + b]``'s elements lo:hi, for b from ``start``, in
    block order."""
    for b in range(start, blocks):
        part = partials[first + b].reshape(partials[first + b].size)[lo:hi]
        for k in range(total.shape[0]):
            total[k] += part[k]


@njit(inline="always")
def _sum_into(target, partials, first, blocks, c):
    """Block c of ``target``'s elements: the sum of ``partials[first + b]``'s."""
    flat = target.reshape(target.size)
    lo, hi = _block(flat.shape[0], blocks, c)
    total = flat[lo:hi]
    total[:] = partials[first].reshape(flat.shape[0])[lo:hi]
    _add_blocks(total, partials, first, blocks, lo, hi, 1)


@njit(inline="always")
def _sum_blocks(grad_weights, grad_biases, partial_weights, partial_biases, blocks, t):
    """Task t's sum: block t % blocks of every ∂W and ∂b element of member t // blocks,
    from its blocks' partials, in block order."""
    m, c = t // blocks, t % blocks
    for layer in range(len(grad_weights)):
        _sum_into(grad_weights[layer][m], partial_weights[layer], m * blocks, blocks, c)
        _sum_into(grad_biases[layer][m], partial_biases[layer], m * blocks, blocks, c)


@kernel
def _ensemble_backward(
    gemm,             # address of the BLAS ?gemm (bind_gemm)
    g,                # ∂L/∂a of the last layer, (K, N, out)
    x,                # the input, (K, N, in), or (1, N, in) shared by every member
    weights,          # one (K, out, in) stack per layer
    activations,      # (L, 3): each layer's activation row (code, p₀, p₁)
    outputs,          # every layer's (K, N, out) output, then its z slot, as forward saved
    grad_weights,     # out: ∂L/∂W per layer, (K, out, in)
    grad_biases,      # out: ∂L/∂b per layer, (K, out); (K, 0) for a layer without bias
    grad_x,           # out: each member's ∂L/∂x, (K, N, in); (K, 0, in): not needed
    delta_space,      # workspaces, (K·blocks or 1, ⌈N/blocks⌉·widest): δ, and ∂L/∂a of
    upstream_space,   # the layer below
    partial_weights,  # with blocks > 1: each task's ∂W and ∂b, (K·blocks, …) stacks;
    partial_biases,   # with 1 block, grad_weights and grad_biases themselves
    blocks,           # the blocks of rows each member runs in
):  # fmt: skip
    """Every member's backward, its rows in ``blocks`` blocks whose ∂W and ∂b are summed
    after, in block order."""
    tasks = weights[0].shape[0] * blocks
    for t in range(tasks):
        _backward_block(gemm, g, x, weights, activations, outputs, partial_weights,
                        partial_biases, grad_x, delta_space, upstream_space, blocks, t)  # fmt: skip
    if blocks > 1:
        for t in range(tasks):
            _sum_blocks(grad_weights, grad_biases, partial_weights, partial_biases, blocks, t)


@kernel(parallel=True)
def _ensemble_backward_parallel(gemm, g, x, weights, activations, outputs, grad_weights,
                                grad_biases, grad_x, delta_space, upstream_space,
                                partial_weights, partial_biases, blocks,
                                blas_threads):  # fmt: skip
    """``_ensemble_backward`` with the tasks of each loop on numba's threads."""
    tasks = weights[0].shape[0] * blocks
    for c in prange(tasks):
        held = _one_blas_thread(blas_threads)
        _backward_block(gemm, g, x, weights, activations, outputs, partial_weights,
                        partial_biases, grad_x, delta_space, upstream_space, blocks,
                        np.int64(c))  # fmt: skip
        _blas_threads_back(blas_threads, held)
    if blocks > 1:
        for c in prange(tasks):
            _sum_blocks(grad_weights, grad_biases, partial_weights, partial_biases, blocks,
                        np.int64(c))  # fmt: skip


@njit(inline="always")
def _step_member(gemm, x, targets, labels, weights, biases, activations, outputs, delta_space,
                 upstream_space, grad_weights, grad_biases, first_param, states, steps, hyper,
                 fresh, loss, scale, rule, losses, m):  # fmt: skip
    spaces = min(m, delta_space.shape[0] - 1)  # the member's workspaces, or the one set
    losses[m] = _network_step(
        gemm,
        _own_or_shared(x, m),
        _own_or_shared(targets, m),
        _own_or_shared(labels, m),
        _member(weights, m),
        _member(biases, m),
        activations,
        _member(outputs, m),
        delta_space[spaces],
        upstream_space[spaces],
        _member(grad_weights, spaces),
        _member(grad_biases, spaces),
        first_param,
        _part(states, m, weights[0].shape[0]),
        steps,
        hyper,
        fresh,
        loss,
        scale,
        rule,
        0.0,
        1,
        0,
    )


@kernel
def _ensemble_train_step(
    gemm,            # address of the BLAS ?gemm (bind_gemm)
    x,               # the batch, (K, N, in), or (1, N, in) shared by every member
    targets,         # (K or 1, N, out) as _train_step's per member; (1, 0, 0) for CE
    labels,          # (K or 1, N) int64 classes of cross-entropy; (1, 0) otherwise
    weights,         # one (K, out, in) stack per layer, updated in place
    biases,          # one (K, out) stack per layer ((K, 0): no bias), updated in place
    activations,     # (L, 3): each layer's activation row (code, p₀, p₁)
    outputs,         # workspace: every layer's (K, N, out) output, then its z slot
    delta_space,     # workspaces, (K or 1, N·widest) each
    upstream_space,
    grad_weights,    # workspaces: ∂W per layer, (K or 1, out, in)
    grad_biases,     # workspaces: ∂b per layer, (K or 1, out) ((·, 0): no bias)
    first_param,     # (L,) index of layer l's weight among the parameters (its bias: +1)
    states,          # two flat arrays per stacked parameter, each of K equal parts
    steps,           # one 1-element array per parameter: Adam's count, shared by members
    hyper,           # (parameters, 6): each parameter's LR, MOMENTUM, … row
    fresh,           # (parameters,): 1 where SGD's momentum buffer starts this step
    loss,            # MSE, CROSS_ENTROPY, BCE_WITH_LOGITS or GIVEN_GRADIENT
    scale,           # 1/terms of one member's mean, else 1
    rule,            # SGD, ADAM or ADAMW
    parallel,        # the members on numba's threads (workspaces stacked per member)
    blas_threads,    # with parallel: the BLAS's thread-local count setter, or 0
):  # fmt: skip
    """``_train_step`` of every member, whose losses add: returns ``(Σₘ Lₘ, -1)``, or,
    touching nothing, the codes ``_train_step`` returns."""
    members, top = weights[0].shape[0], len(weights) - 1
    bad = _refusal(weights, biases, first_param, states, hyper, rule, labels, weights[top].shape[1])
    if bad != -1:
        return np.nan, bad
    _count_steps(biases, first_param, steps, rule)
    losses = np.zeros(members)
    if parallel:
        _members_step_parallel(
            gemm,
            x,
            targets,
            labels,
            weights,
            biases,
            activations,
            outputs,
            delta_space,
            upstream_space,
            grad_weights,
            grad_biases,
            first_param,
            states,
            steps,
            hyper,
            fresh,
            loss,
            scale,
            rule,
            losses,
            blas_threads,
        )
    else:
        for m in range(members):
            _step_member(
                gemm,
                x,
                targets,
                labels,
                weights,
                biases,
                activations,
                outputs,
                delta_space,
                upstream_space,
                grad_weights,
                grad_biases,
                first_param,
                states,
                steps,
                hyper,
                fresh,
                loss,
                scale,
                rule,
                losses,
                m,
            )
    return losses.sum(), -1


@kernel(parallel=True)
def _members_step_parallel(gemm, x, targets, labels, weights, biases, activations, outputs,
                           delta_space, upstream_space, grad_weights, grad_biases, first_param,
                           states, steps, hyper, fresh, loss, scale, rule, losses,
                           blas_threads):  # fmt: skip
    for c in prange(weights[0].shape[0]):
        held = _one_blas_thread(blas_threads)
        _step_member(
            gemm,
            x,
            targets,
            labels,
            weights,
            biases,
            activations,
            outputs,
            delta_space,
            upstream_space,
            grad_weights,
            grad_biases,
            first_param,
            states,
            steps,
            hyper,
            fresh,
            loss,
            scale,
            rule,
            losses,
            np.int64(c),
        )
        _blas_threads_back(blas_threads, held)


# A step in blocks of rows: task t = m·blocks + c runs member m's forward, loss
# gradient and backward on block c of its rows, into gradients of its own (rows are
# independent through all three; only ∂W and ∂b sum over them). A second loop then
# sums each member's gradients over its blocks, in block order, and updates it, task t
# taking block c of every parameter's elements.
@njit(inline="always")
def _block_gradients(gemm, x, targets, labels, weights, biases, activations, outputs,
                     delta_space, upstream_space, grad_weights, grad_biases, loss, scale,
                     blocks, losses, t, tasks):  # fmt: skip
    """Task t's forward, loss gradient and backward: member t // blocks on block
    t % blocks of its rows; its loss term in ``losses[t]``, its gradients in slice t of
    the gradient stacks. ``tasks`` as ``_forward_block``'s."""
    m, top = t // blocks, len(weights) - 1
    lo, hi = _block(outputs[0].shape[1], blocks, t % blocks)
    own_outputs = _member_rows(outputs, m, lo, hi)
    delta, upstream_space_ = _own_or_shared(delta_space, t), _own_or_shared(upstream_space, t)
    if loss == GIVEN_GRADIENT:
        upstream, value = _own_or_shared(targets, m)[lo:hi], 0.0
    else:
        _forward_block(gemm, x, weights, biases, activations, outputs, delta_space, blocks, t,
                       tasks)  # fmt: skip
        upstream = _rows(upstream_space_, hi - lo, weights[top].shape[1])
        value = _loss_and_grad(own_outputs[top], _own_or_shared(targets, m)[lo:hi],
                               _own_or_shared(labels, m)[lo:hi], loss, scale, upstream)  # fmt: skip
    _gradients(gemm, _own_or_shared(x, m)[lo:hi], _member(weights, m), activations, own_outputs,
               delta, upstream_space_, upstream, _member(grad_weights, t),
               _member(grad_biases, t), 1, 0)  # fmt: skip
    losses[t] = value


@njit(inline="always")
def _sum_and_update(param, partials, first, blocks, c, state_a, state_b, rule, hyper, step,
                    fresh):  # fmt: skip
    """Block c of ``param``'s elements moved by the sum of ``partials[first + b]``, its
    gradient from each block b of rows, summed in block order into the first."""
    flat = param.reshape(param.size)
    lo, hi = _block(flat.shape[0], blocks, c)
    total = partials[first].reshape(flat.shape[0])[lo:hi]
    _add_blocks(total, partials, first, blocks, lo, hi, 1)
    _update_serial(flat[lo:hi], total, state_a[lo:hi], state_b[lo:hi], rule, hyper, step, fresh,
                   1.0)  # fmt: skip


@njit(inline="always")
def _block_update(weights, biases, grad_weights, grad_biases, first_param, states, steps, hyper,
                  fresh, rule, blocks, t):  # fmt: skip
    """Task t's update: block t % blocks of every parameter of member t // blocks."""
    m, c = t // blocks, t % blocks
    own = _part(states, m, weights[0].shape[0])
    for layer in range(len(weights)):
        p = first_param[layer]
        _sum_and_update(weights[layer][m], grad_weights[layer], m * blocks, blocks, c, own[2 * p],
                        own[2 * p + 1], rule, hyper[p], steps[p][0], fresh[p])  # fmt: skip
        if biases[layer].shape[1] > 0:
            q = p + 1
            _sum_and_update(biases[layer][m], grad_biases[layer], m * blocks, blocks, c,
                            own[2 * q], own[2 * q + 1], rule, hyper[q], steps[q][0],
                            fresh[q])  # fmt: skip


@kernel
def _ensemble_step_in_blocks(gemm, x, targets, labels, weights, biases, activations, outputs,
                             delta_space, upstream_space, grad_weights, grad_biases, first_param,
                             states, steps, hyper, fresh, loss, scale, rule, parallel,
                             blas_threads, blocks):  # fmt: skip
    """``_ensemble_train_step`` with each member's rows in ``blocks`` blocks: its arguments,
    but for the workspaces and gradients, stacked per task (K·blocks); its returns."""
    members, top = weights[0].shape[0], len(weights) - 1
    bad = _refusal(weights, biases, first_param, states, hyper, rule, labels, weights[top].shape[1])
    if bad != -1:
        return np.nan, bad
    _count_steps(biases, first_param, steps, rule)
    losses = np.zeros(members * blocks)
    if parallel:
        _blocks_step_parallel(gemm, x, targets, labels, weights, biases, activations, outputs,
                              delta_space, upstream_space, grad_weights, grad_biases, first_param,
                              states, steps, hyper, fresh, loss, scale, rule, blocks,
                              losses, blas_threads)  # fmt: skip
    else:
        _blocks_step(gemm, x, targets, labels, weights, biases, activations, outputs, delta_space,
                     upstream_space, grad_weights, grad_biases, first_param, states, steps, hyper,
                     fresh, loss, scale, rule, blocks, losses)  # fmt: skip
    return losses.sum(), -1


@kernel
def _blocks_step(gemm, x, targets, labels, weights, biases, activations, outputs, delta_space,
                 upstream_space, grad_weights, grad_biases, first_param, states, steps, hyper,
                 fresh, loss, scale, rule, blocks, losses):  # fmt: skip
    """Every member's step in blocks of rows, one task after another."""
    for t in range(losses.shape[0]):
        _block_gradients(gemm, x, targets, labels, weights, biases, activations, outputs,
                         delta_space, upstream_space, grad_weights, grad_biases, loss, scale,
                         blocks, losses, t, 1)  # fmt: skip
    for t in range(losses.shape[0]):
        _block_update(weights, biases, grad_weights, grad_biases, first_param, states, steps,
                      hyper, fresh, rule, blocks, t)  # fmt: skip


@kernel(parallel=True)
def _blocks_step_parallel(gemm, x, targets, labels, weights, biases, activations, outputs,
                          delta_space, upstream_space, grad_weights, grad_biases, first_param,
                          states, steps, hyper, fresh, loss, scale, rule, blocks, losses,
                          blas_threads):  # fmt: skip
    """``_blocks_step`` with the tasks of each loop on numba's threads."""
    for c in prange(losses.shape[0]):
        held = _one_blas_thread(blas_threads)
        _block_gradients(gemm, x, targets, labels, weights, biases, activations, outputs,
                         delta_space, upstream_space, grad_weights, grad_biases, loss, scale,
                         blocks, losses, np.int64(c), 0)  # fmt: skip
        _blas_threads_back(blas_threads, held)
    for c in prange(losses.shape[0]):
        _block_update(weights, biases, grad_weights, grad_biases, first_param, states, steps,
                      hyper, fresh, rule, blocks, np.int64(c))  # fmt: skip
