"""What the kernel modules and fastbp's layers above them share: argument checks
with one wording each, so the same mistake raises the same message wherever it
is caught (Liger-Kernel keeps its shared helpers public in ``ops/utils.py``).

Imports nothing of fastbp: every layer may use it.
"""

from __future__ import annotations

from collections.abc import Sequence


def check_choice(name: str, value, options: tuple) -> str:
    """``value`` if it is one of ``options``; a ``ValueError`` listing them otherwise."""
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value


def check_one_per_layer(weights: Sequence, biases: Sequence, activations: Sequence) -> None:
    """A network is at least one layer, each with its weight, bias (or None) and activation."""
    if not len(weights) == len(biases) == len(activations):
        raise ValueError(
            "weights, biases and activations must have one entry per layer, got "
            f"{len(weights)}, {len(biases)} and {len(activations)}"
        )
    if len(weights) == 0:
        raise ValueError("weights must hold at least one layer, got none")


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ for launch grids: ``triton.cdiv`` is a constexpr function, whose call
    from the host costs more than the launch arithmetic it does."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The least power of 2 ≥ n (1 for n ≤ 1), as ``triton.next_power_of_2``, cheaply."""
    return 1 << (n - 1).bit_length() if n > 1 else 1
