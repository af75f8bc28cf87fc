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
