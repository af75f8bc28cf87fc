r"""exp, sigmoid and tanh for the numba kernels, written so that LLVM vectorizes them.

numba compiles ``np.exp`` and ``np.tanh`` to one libm call per element (no SVML
with the llvmlite wheels), and a loop that calls a function is not vectorized:
a tanh pass ran 5x slower than torch's. These are the same functions in plain
arithmetic, float32 in float32 and float64 in float64, with no call and no branch.

exp
===
Write x = n·ln 2 + r with n an integer and |r| ≤ ln 2 / 2; then eˣ = 2ⁿ · eʳ.

1. n = round(x / ln 2). Adding 1.5·2ᵖ (p = 23 for float32, 52 for float64) rounds
   to an integer, and the integer sits in the low bits of the sum's bit pattern;
   no float→int conversion, which AVX2 lacks for float64.
2. r = x − n·ln 2, with ln 2 split in a short head (exact in n·head) and a tail
   (Cody and Waite): r keeps every bit it has.
3. eʳ by a polynomial on [−ln 2/2, ln 2/2]: Cephes' minimax one for float32,
   Taylor to degree 13 for float64 (truncation below 2⁻⁶⁰).
4. 2ⁿ as bits: the exponent field holds n + bias. It is applied as two factors
   2^⌊n/2⌋ · 2^(n − ⌊n/2⌋), each a normal number, so results that are subnormal,
   overflow to inf or underflow to 0 come out of the multiplication itself, as
   IEEE rounds them. x is clamped first so that n fits; NaN passes every step.

sigmoid and tanh
================
σ(z) = 1 / (1 + e⁻ᶻ): e⁻ᶻ = inf gives 0 and e⁻ᶻ = 0 gives 1, as torch computes them.

tanh z = sign(z) · (1 − 2 / (e^{2|z|} + 1)) loses relative accuracy for small |z|,
where 1 − … cancels; there tanh z = z + z³·P(z²) (Cephes: a polynomial for
float32, a rational function for float64) for |z| < 0.625. Both are computed and
one is selected, which keeps the loop free of branches. Errors against float64
(or longdouble) over the whole range are measured in ``tests/test_cpu_math.py``.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload


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
        kind = args[0].type
        signature_ = ir.FunctionType(kind, [kind] * 3)
        function = builder.module.declare_intrinsic("llvm.fma", [kind], signature_)
        return builder.call(function, args)

    return a(a, b, c), codegen


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
SMALL_TANH = f8(0.625)  # below this |z|, tanh by its series (float32 results)
SMALL_TANH64 = f8(0.3)  # float64: below it the series' own error stays far under an ulp


@njit(inline="always")
def _exp64_parts(x):
    """eˣ as an unevaluated sum hi + lo, |lo| ≤ ulp(hi)/2: what rounding hi would lose."""
    x = _LO if x < _LO else x  # NaN fails both tests and stays NaN
    x = _HI if x > _HI else x
    k = x * _LOG2E + _SHIFT
    n = k - _SHIFT
    head = fma(n, -_LN2_HI, x)  # exact: n·ln2_hi has few bits
    r = fma(n, -_LN2_LO, head)
    r_tail = fma(n, -_LN2_LO, head - r)  # what rounding r lost
    p = fma(fma(fma(fma(_C13, r, _C12), r, _C11), r, _C10), r, _C9)
    p = fma(fma(fma(fma(fma(p, r, _C8), r, _C7), r, _C6), r, _C5), r, _C4)
    p = fma(fma(p, r, _C3), r, _C2)
    one_r = f8(1.0) + r  # eʳ = (1 + r) + (r_tail + p·r²), the small part kept apart
    small = ((f8(1.0) - one_r) + r) + fma(p, r * r, r_tail)
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
def _exp32(x):
    x = _LO_F if x < _LO_F else x
    x = _HI_F if x > _HI_F else x
    k = x * _LOG2E_F + _SHIFT_F
    n = k - _SHIFT_F
    head = fma(n, -_LN2_HI_F, x)
    r = fma(n, -_LN2_LO_F, head)
    r_tail = fma(n, -_LN2_LO_F, head - r)
    p = fma(fma(fma(fma(fma(_E0, r, _E1), r, _E2), r, _E3), r, _E4), r, _E5)
    one_r = f4(1.0) + r
    e = one_r + (((f4(1.0) - one_r) + r) + fma(p, r * r, r_tail))
    whole = np.int64(_as_bits(k)) - _SHIFT_BITS_F
    half = whole >> 1
    first = _as_float(np.int32((half + 127) << 23))
    return e * first * _as_float(np.int32((whole - half + 127) << 23))


@njit(inline="always")
def _sigmoid32(z):
    return f4(1.0) / (f4(1.0) + _exp32(-z))


@njit(inline="always")
def _sigmoid64(z):
    return f8(1.0) / (f8(1.0) + _exp64(-z))


@njit(inline="always")
def _exp_for_float32(x):
    """eˣ to about 2⁻³⁰ in float64 (degree 8): enough for a float32 result rounded once."""
    x = _LO if x < _LO else x
    x = _HI if x > _HI else x
    k = x * _LOG2E + _SHIFT
    n = k - _SHIFT
    r = fma(n, -_LN2_LO, fma(n, -_LN2_HI, x))
    p = fma(fma(fma(fma(fma(fma(_C8, r, _C7), r, _C6), r, _C5), r, _C4), r, _C3), r, _C2)
    whole = _as_bits(k) - _SHIFT_BITS
    half = whole >> 1
    first = _as_float((half + 1023) << 52)
    return (fma(p, r * r, r) + f8(1.0)) * first * _as_float((whole - half + 1023) << 52)


@njit(inline="always")
def _tanh_with(z, exp_):
    """tanh z: z + z·s·P(s)/Q(s) (s = z²) for |z| < 0.625, else sign(z)·(1 − 2/(e^{2|z|} + 1)),
    with one division: the two quotients' terms are selected before it, not after."""
    magnitude = abs(z)
    s = z * z
    small = magnitude < SMALL_TANH
    numerator = z * s * ((_P0 * s + _P1) * s + _P2) if small else f8(2.0)
    denominator = (((s + _Q0) * s + _Q1) * s + _Q2) if small else exp_(f8(2.0) * magnitude) + 1
    quotient = numerator / denominator
    large = f8(1.0) - quotient
    return z + quotient if small else (-large if z < 0 else large)


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
    return z + quotient if small else (-large if z < 0 else large)


@njit(inline="always")
def _tanh32(z):
    # In float64, rounded once: in float32, 1 − 2/(e+1) gave 1.3 ulp against torch's 0.5,
    # and this float64 pass is as fast as torch's float32 tanh.
    return f4(_tanh_with(f8(z), _exp_for_float32))


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


exp = _by_float_type("exp", _exp32, _exp64)
relu = _by_float_type("relu", _relu32, _relu64)
sigmoid = _by_float_type("sigmoid", _sigmoid32, _sigmoid64)
tanh = _by_float_type("tanh", _tanh32, _tanh64)
