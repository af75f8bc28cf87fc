"""Fit the polynomials of the CPU kernels' normal CDF Φ (GELU's factor), and print them.

``fastbp/kernels/cpu_jit.py`` computes Φ(z) from u = |z|/√2 in two pieces (its "Elementary
functions" note has the math); the coefficients in it are this script's output::

    python tools/fit_erfc.py

Each piece is a Chebyshev approximation (mpmath's ``chebyfit``, 40 digits) of a smooth,
bounded function, in a variable w ∈ [−1, 1] so that Horner's rule on it is well
conditioned; its coefficients are rounded to float64 once, here. The degrees are the
lowest whose float64 (or float32) evaluation stays within about an ulp of the truth,
measured by ``tests/test_cpu_math.py``. ``tests/test_cpu_math.py`` also re-runs this
fit and checks the coefficients in ``cpu_jit.py`` are its output.
"""

from __future__ import annotations

from typing import NamedTuple

import mpmath

mpmath.mp.dps = 40

# float64 splits u at U_SPLIT: erf(u)/u as a polynomial in u² below, erfcx(u) above.
U_SPLIT = 0.75
U_MAX_64 = 27.3  # erfc(u) underflows float64 beyond (Φ(z) for z < −38.6)
U_MAX_32 = 9.34  # z = −13.2: e^{−z²/2} leaves float32's normal numbers beyond


class Fit(NamedTuple):
    """A polynomial in w = (v − mid)/half, v the fit's variable; coefficients highest first."""

    mid: float
    half: float
    coefficients: tuple[float, ...]


def chebyshev(f, a: float, b: float, degree: int) -> Fit:
    mid, half = (mpmath.mpf(a) + b) / 2, (mpmath.mpf(b) - a) / 2
    poly = mpmath.chebyfit(lambda w: f(mid + half * w), [-1, 1], degree + 1)
    return Fit(float(mid), float(half), tuple(float(c) for c in poly))


def half_erf_over_u(s):
    """½·erf(u)/u at s = u²: even and smooth, 1/√π at 0."""
    if s == 0:
        return 1 / mpmath.sqrt(mpmath.pi)
    u = mpmath.sqrt(s)
    return mpmath.erf(u) / (2 * u)


def half_scaled_erfc(p: float):
    """½·erfc(u)·e^{u²}/t at t = 1/(1 + p·u): bounded on t ∈ (0, 1], p/(2√π) at t = 0."""

    def f(t):
        u = (1 / t - 1) / p
        return mpmath.erfc(u) * mpmath.exp(u * u) / (2 * t)

    return f


# (name, p of t = 1/(1 + p·u), or None for the head in s = u², u range, degree)
PIECES = (
    ("HEAD64", None, (0.0, U_SPLIT), 9),
    ("TAIL64", 0.3, (U_SPLIT, U_MAX_64), 18),
    ("TAIL32", 0.5, (0.0, U_MAX_32), 8),
)


def fits() -> dict[str, tuple[float | None, Fit]]:
    """Each piece's ``(p, Fit)``; the fit's variable is s = u² for the head, else t."""
    out = {}
    for name, p, (lo, hi), degree in PIECES:
        if p is None:
            out[name] = (None, chebyshev(half_erf_over_u, lo * lo, hi * hi, degree))
        else:
            t_lo, t_hi = 1 / (1 + mpmath.mpf(p) * hi), 1 / (1 + mpmath.mpf(p) * lo)
            out[name] = (p, chebyshev(half_scaled_erfc(p), t_lo, t_hi, degree))
    return out


if __name__ == "__main__":
    for name, (p, fit) in fits().items():
        print(f"_{name}_FIT = ({p!r}, {fit.mid!r}, {fit.half!r})  # p, mid, half")
        print(f"_{name.lower()} = _polynomial(")
        for c in fit.coefficients:
            print(f"    {c!r},")
        print(")")
