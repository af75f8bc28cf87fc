"""Print what the installed torch gives for every activation at the special values.

    python tools/special_values.py > torch-2.14.1.txt

One line per (activation, dtype, value): torch's act(z) and its autograd δ for g = 1,
at z = ±0, ±inf, NaN and ±huge (±1e30 in float32, ±1e300 in float64). Each value is
placed both at the head of a 64-element tensor (torch's vectorized loop) and alone
(its scalar path), and the line says where the two differ. Run it under two torch
versions and diff the outputs: the README's "Special values" table records the cases
where versions disagree, and ``tests/helpers.py`` names them.
"""

from __future__ import annotations

import math

import torch

from fastbp import activations

VALUES = {"+0": 0.0, "-0": -0.0, "+inf": math.inf, "-inf": -math.inf, "nan": math.nan}
HUGE = {torch.float32: 1e30, torch.float64: 1e300}


def _evaluate(spec: str, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = z.clone().requires_grad_()
    a = activations.get(spec).function(leaf)
    (delta,) = torch.autograd.grad(a, leaf, torch.ones_like(a))
    return a.detach(), delta


def _at(spec: str, value: float, dtype: torch.dtype) -> str:
    """``act δ`` at ``value``, vectorized and alone ("v / s" where they differ)."""
    vector = torch.full((64,), 1.0, dtype=dtype)
    vector[0] = value
    results = []
    for z in (vector, torch.tensor([value], dtype=dtype)):
        a, delta = _evaluate(spec, z)
        results.append((a[0].item(), delta[0].item()))
    (a_v, d_v), (a_s, d_s) = results
    show = lambda v, s: repr(v) if repr(v) == repr(s) else f"{v!r} / {s!r}"  # noqa: E731
    return f"act {show(a_v, a_s)}  δ {show(d_v, d_s)}"


def main() -> None:
    print(f"torch {torch.__version__}")
    for spec in activations.table.NAMES:
        for dtype in (torch.float32, torch.float64):
            values = VALUES | {"+huge": HUGE[dtype], "-huge": -HUGE[dtype]}
            for label, value in values.items():
                print(f"{spec:<10} {str(dtype)[6:]:<8} {label:<6} {_at(spec, value, dtype)}")


if __name__ == "__main__":
    main()
