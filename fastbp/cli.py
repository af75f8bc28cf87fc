"""The ``fastbp`` command line: ``fastbp info`` (more commands arrive with their issues)."""

from __future__ import annotations

import argparse
import importlib.metadata
import sys


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def info(_: argparse.Namespace) -> int:
    """Print versions, the thread policy in force, backends and the numba cache location."""
    import numba
    import torch

    import fastbp
    from fastbp import functional, threads
    from fastbp.kernels import cpu

    rows = [
        ("fastbp", fastbp.__version__),
        *((name, _version(name)) for name in ("torch", "numba", "numpy", "scipy", "triton")),
        ("backends", ", ".join(functional.BACKENDS)),
        ("thread policy", ", ".join(f"{k}={v}" for k, v in threads.describe().items())),
        ("numba cache", numba.config.CACHE_DIR or f"beside the sources ({cpu.__file__})"),
        ("gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else "none"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastbp", description="Hand-derived, accelerated backpropagation for dense MLPs."
    )
    parser.add_argument("--version", action="version", version=f"fastbp {_version('fastbp')}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help=info.__doc__.splitlines()[0]).set_defaults(run=info)
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    return arguments.run(arguments)


if __name__ == "__main__":
    sys.exit(main())
