"""The activations every backend knows: one table, read by all of them.

An entry names an activation, its parameters with torch's defaults, and what its
derivative is computed from. Each backend writes the function and its derivative
once, switching on the entry's ``code`` (its index here): ``reference.py`` in numpy
(with the derivations), ``cpu_jit.py`` in numba, ``gpu.py`` in Triton, and
``fastbp/activations.py`` in torch ops with the ``torch.nn`` module that stands for
it. Adding an activation is one entry here and one branch in each of those.

A layer's activation travels as a *spec*, a string: the name alone for torch's
defaults (``"leaky_relu"``), else the name with every parameter
(``"leaky_relu(negative_slope=0.2)"``). Specs are what the kernels, the custom ops'
schema and ``Linear.activation`` hold; ``parse`` checks one and ``canonical`` writes
one, so that equal activations have equal specs.

What backward reads
===================
``act'`` of identity, relu, sigmoid and tanh is a function of the output ``a``, so
forward keeps nothing else. The others' is not (silu and GELU are not even
one-to-one), or is computed from the input by torch itself, so forward keeps the
pre-activation ``z`` of those layers too, as torch keeps their input: one more
(batch × width) array per such layer, and no recomputation.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

# How many parameters the kernels carry per layer (beside the code).
MAX_PARAMETERS = 2


@dataclass(frozen=True)
class Activation:
    name: str
    parameters: tuple[tuple[str, float], ...] = ()  # (name, torch's default), in torch's order
    reads_input: bool = False  # backward needs z, so forward keeps it

    @property
    def code(self) -> int:
        return NAMES.index(self.name)


# The formulas and derivatives are in reference.py's docstring and the README.
TABLE: tuple[Activation, ...] = (
    Activation("identity"),
    Activation("relu"),
    Activation("sigmoid"),
    Activation("tanh"),
    Activation("leaky_relu", (("negative_slope", 0.01),), reads_input=True),
    Activation("gelu", reads_input=True),  # exact: z·Φ(z)
    Activation("gelu_tanh", reads_input=True),  # nn.GELU(approximate="tanh")
    Activation("silu", reads_input=True),
    Activation("softplus", (("beta", 1.0), ("threshold", 20.0)), reads_input=True),
    Activation("elu", (("alpha", 1.0),), reads_input=True),
)
NAMES: tuple[str, ...] = tuple(a.name for a in TABLE)
# Each entry's code, under the name the kernels' switches use: the table's order.
CODES = tuple(range(len(TABLE)))
IDENTITY, RELU, SIGMOID, TANH, LEAKY_RELU, GELU, GELU_TANH, SILU, SOFTPLUS, ELU = CODES
BY_NAME = {a.name: a for a in TABLE}
# bits that hold one code, where kernels pack several into an integer
CODE_BITS = max(1, (len(TABLE) - 1).bit_length())

_SPEC = re.compile(r"^\s*([a-z_]+)\s*(?:\((.*)\))?\s*$")


@dataclass(frozen=True)
class Parsed:
    """A checked spec: its entry, its parameter values (defaults filled in) and the
    canonical spec string."""

    activation: Activation
    values: tuple[float, ...]
    spec: str

    @property
    def code(self) -> int:
        return self.activation.code

    @property
    def row(self) -> tuple[float, ...]:
        """``(code, p₀, p₁)``: what a kernel reads for one layer (0 for unused slots)."""
        padding = (0.0,) * (MAX_PARAMETERS - len(self.values))
        return (float(self.code), *self.values, *padding)


def parse(spec, argument: str = "activation") -> Parsed:
    """``spec`` checked; a ``ValueError`` naming ``argument``, what it got and what is
    supported otherwise."""
    if isinstance(spec, Parsed):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"{argument} must be one of {supported()}, got {spec!r}")
    # Launchers parse on every call: a few µs each without this. A plain dict, not
    # functools.lru_cache, which torch.compile warns about when it traces a call.
    parsed = _PARSED.get(spec)
    if parsed is None:
        if len(_PARSED) >= PARSED_KEPT:
            _PARSED.clear()
        parsed = _PARSED[spec] = _parse_string(spec, argument)
    return parsed


_PARSED: dict[str, Parsed] = {}
PARSED_KEPT = 1024


def _parse_string(spec: str, argument: str) -> Parsed:
    match = _SPEC.match(spec)
    if match is None or match.group(1) not in BY_NAME:
        raise ValueError(f"{argument} must be one of {supported()}, got {spec!r}")
    activation = BY_NAME[match.group(1)]
    given = _keywords(argument, spec, match.group(2))
    known = dict(activation.parameters)
    unknown = set(given) - set(known)
    if unknown:
        raise ValueError(
            f"{argument} {spec!r}: {activation.name} has no parameter {sorted(unknown)[0]!r}; "
            f"its parameters are {list(known) or 'none'}"
        )
    values = tuple(given.get(name, default) for name, default in activation.parameters)
    _check_values(argument, activation, values)
    return Parsed(activation, values, canonical(activation.name, values))


def _keywords(argument: str, spec: str, text: str | None) -> dict[str, float]:
    if text is None or not text.strip():
        return {}
    given = {}
    for item in text.split(","):
        name, equals, value = item.partition("=")
        try:
            if not equals:
                raise ValueError
            if name.strip() in given:
                raise ValueError
            given[name.strip()] = float(value)
        except ValueError:
            raise ValueError(
                f"{argument} {spec!r}: parameters are written name=number, each once, "
                f"got {item.strip()!r}"
            ) from None
    return given


def _check_values(argument: str, activation: Activation, values: tuple[float, ...]) -> None:
    for (name, _), value in zip(activation.parameters, values, strict=True):
        if not math.isfinite(value):
            raise ValueError(f"{argument} {activation.name}: {name} must be finite, got {value}")
    if activation.name == "softplus" and values[0] <= 0:
        raise ValueError(f"{argument} softplus: beta must be > 0, got {values[0]}")


def canonical(name: str, values: tuple[float, ...]) -> str:
    """The spec of activation ``name`` with parameter ``values``: the name alone when
    they are torch's defaults."""
    activation = BY_NAME[name]
    defaults = tuple(default for _, default in activation.parameters)
    if tuple(values) == defaults:
        return name
    pairs = zip(activation.parameters, values, strict=True)
    return f"{name}({', '.join(f'{p}={float(v)!r}' for (p, _), v in pairs)})"


def supported() -> str:
    """The names, with their parameters, for error messages."""
    return ", ".join(
        a.name + (f"({', '.join(p for p, _ in a.parameters)})" if a.parameters else "")
        for a in TABLE
    )


def split_saved(saved, reads: list[bool], name: str = "outputs") -> list[tuple]:
    """``[(aₗ, zₗ or None)]`` per layer from what a forward saved: every layer's output
    ``a``, then the z of each layer whose activation's derivative reads it (``reads``)."""
    top = len(reads)
    if len(saved) != top + sum(reads):
        raise ValueError(
            f"{name} must hold the {top + sum(reads)} arrays forward returned (every "
            f"layer's output, then the z of {sum(reads)} layers), got {len(saved)}"
        )
    kept = iter(saved[top:])
    return [(a, next(kept) if r else None) for a, r in zip(saved[:top], reads, strict=True)]
