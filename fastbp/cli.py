"""The ``fastbp`` command line: ``fastbp bench`` and ``fastbp info``."""

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


def bench(arguments: argparse.Namespace) -> int:
    """Time every training step of the registry on this machine, CPU and GPU side by side."""
    from pathlib import Path

    from fastbp import backends
    from fastbp import bench as benchmarks

    quick = arguments.quick
    workloads = arguments.workloads or list(
        benchmarks.QUICK_WORKLOADS if quick else backends.WORKLOADS
    )
    unknown = [w for w in workloads if w not in backends.WORKLOADS]
    known_names = {n.removesuffix("-cuda") for n in backends.STEP_IMPLEMENTATIONS}
    implementations = arguments.implementations
    if implementations is None and quick:
        implementations = sorted(known_names - set(benchmarks.QUICK_SKIPS))
    unknown += [n for n in implementations or [] if n not in known_names]
    if unknown:
        raise _UsageError(
            f"unknown workload or implementation {unknown[0]!r}; workloads: "
            f"{', '.join(backends.WORKLOADS)}; implementations: {', '.join(sorted(known_names))}"
        )
    devices = ["cpu", "cuda"] if arguments.device == "all" else [arguments.device]
    rows = benchmarks.run(
        workloads,
        devices,
        implementations,
        rounds=arguments.rounds or (5 if quick else 15),
        round_seconds=0.02 if quick else 0.1,
        output_dir=Path(arguments.output_dir),
    )
    print(benchmarks.format_table(rows))
    print(f"\nwrote {Path(arguments.output_dir) / 'bench.json'} and bench.png")
    return 0


class _UsageError(Exception):
    """A mistake in the command line: one line on stderr, exit status 2."""


def _comma_list(text: str) -> list[str]:
    return [item for item in text.split(",") if item]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastbp", description="Hand-derived, accelerated backpropagation for dense MLPs."
    )
    parser.add_argument("--version", action="version", version=f"fastbp {_version('fastbp')}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help=info.__doc__.splitlines()[0]).set_defaults(run=info)
    bench_parser = commands.add_parser("bench", help=bench.__doc__)
    bench_parser.add_argument(
        "--quick", action="store_true", help="two workloads, no torch.compile, few rounds (<60 s)"
    )
    bench_parser.add_argument(
        "--workloads", type=_comma_list, help="comma-separated workload names (default: all)"
    )
    bench_parser.add_argument(
        "--implementations", type=_comma_list, help="comma-separated names (default: all)"
    )
    bench_parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    bench_parser.add_argument("--rounds", type=int, help="interleaved rounds (default 15, quick 5)")
    bench_parser.add_argument("--output-dir", default=".", help="where bench.json/png go")
    bench_parser.set_defaults(run=bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    arguments = parser.parse_args(argv)
    try:
        return arguments.run(arguments)
    except _UsageError as error:
        print(f"fastbp {arguments.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
