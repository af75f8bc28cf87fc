"""The ``fastbp`` command line: ``bench``, ``mnist``, ``examples`` and ``info``."""

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
    from fastbp import plans, threads
    from fastbp.kernels import cpu_jit

    rows = [
        ("fastbp", fastbp.__version__),
        *((name, _version(name)) for name in ("torch", "numba", "numpy", "scipy", "triton")),
        ("backends", ", ".join(plans.BACKENDS)),
        ("thread policy", ", ".join(f"{k}={v}" for k, v in threads.describe().items())),
        ("process settings changed", _changes(threads.changes()) or "none"),
        ("numba cache", numba.config.CACHE_DIR or f"beside the sources ({cpu_jit.__file__})"),
        ("gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else "none"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


def _changes(changes: dict[str, tuple[str, str]]) -> str:
    return "; ".join(f"{name}: {before} -> {after}" for name, (before, after) in changes.items())


def bench(arguments: argparse.Namespace) -> int:
    """Time the registry's training steps and forward passes, CPU and GPU side by side."""
    from pathlib import Path

    from fastbp import bench as benchmarks
    from fastbp import registry

    preset = benchmarks.PRESETS[arguments.preset]
    workloads = arguments.workloads or list(preset.workloads or registry.WORKLOADS)
    known_names = sorted({name for name, _ in registry.REGISTRY})
    implementations = arguments.implementations or preset.implementations
    unknown = [w for w in workloads if w not in registry.WORKLOADS]
    unknown += [n for n in arguments.implementations or [] if n not in known_names]
    unknown += [t for t in arguments.tasks or [] if t not in benchmarks.TASKS]
    if unknown:
        raise _UsageError(
            f"unknown workload, implementation or task {unknown[0]!r}; workloads: "
            f"{', '.join(registry.WORKLOADS)}; implementations: {', '.join(known_names)}; "
            f"tasks: {', '.join(benchmarks.TASKS)}"
        )
    devices = ["cpu", "cuda"] if arguments.device == "all" else [arguments.device]
    missing = [d for d in devices if not registry.available(d)]
    if missing and arguments.device != "all":
        raise _UsageError(f"--device {arguments.device}: no such device on this machine")
    output_dir = Path(arguments.output_dir)
    rows = benchmarks.run(
        workloads,
        devices,
        None if implementations is None else list(implementations),
        rounds=arguments.rounds or preset.rounds,
        round_seconds=preset.round_seconds,
        output_dir=output_dir,
        tasks=tuple(arguments.tasks or preset.tasks),
    )
    print("Speedups over torch-eager (higher is faster); on CUDA also over torch's step")
    print("in a CUDA graph. Every implementation was first checked against torch-eager.")
    print(benchmarks.summary(rows))
    if missing:
        print(f"{', '.join(missing)}: not on this machine, not timed")
    print(
        f"\nEvery row: {output_dir / 'bench.md'} (table), {output_dir / 'bench.json'}, "
        f"{output_dir / 'bench.png'}"
    )
    return 0


def examples(arguments: argparse.Namespace) -> int:
    """Reproduce the worked examples E1-E5: published, fastbp's and torch's values."""
    from fastbp import examples as worked

    try:
        checks = worked.run(arguments.names or None)
    except ValueError as error:
        raise _UsageError(str(error)) from None
    print(worked.format_table(checks))
    return 0 if all(check.matches for check in checks) else 1


def _mnist_data(data_dir, download: bool):
    """(train_x, train_y, test_x, test_y, description); the held-out split when
    only the test files are there."""
    from fastbp.data import mnist

    try:
        test = mnist.load_mnist(data_dir, "test", download)
    except mnist.MissingFiles as error:
        raise _UsageError(_missing(error, data_dir)) from None
    except (FileNotFoundError, mnist.IDXError) as error:
        raise _UsageError(str(error)) from None
    try:
        train = mnist.load_mnist(data_dir, "train", download)
    except mnist.IDXError as error:
        raise _UsageError(str(error)) from None
    except mnist.MissingFiles as error:
        images, labels = test
        cut = len(images) * 4 // 5  # 8 000 / 2 000 for the real test set
        split = (images[:cut], labels[:cut], images[cut:], labels[cut:])
        return (
            *split,
            f"no train split in {error.root} (missing {', '.join(error.missing)}): "
            f"training on the first {cut:,} test images, evaluating on the last "
            f"{len(images) - cut:,}",
        )
    return (*train, *test, "the standard 60 000 / 10 000 split")


def _missing(error, data_dir) -> str:
    """What is missing, and the options that fix it."""
    where = "point --data-dir at a folder that holds them"
    if data_dir is not None:
        where += ", or add --download to fetch them into it"
    return (
        f"MNIST {error.split} split: missing {', '.join(error.missing)} in {error.root}; "
        f"put the files there or {where}"
    )


def _normalise(images):
    return ((images.float() / 255 - 0.1307) / 0.3081).flatten(1)


def mnist(arguments: argparse.Namespace) -> int:
    """Train a 784-H…-10 MLP on MNIST and report test accuracy and throughput."""
    import time

    import torch
    from tqdm import tqdm

    from fastbp.nn import MLP
    from fastbp.train import FusedTrainer

    if {"triton": "cpu", "numba": "cuda"}.get(arguments.backend) == arguments.device:
        raise _UsageError(
            f"--backend {arguments.backend} does not run on --device {arguments.device}: "
            "triton runs on cuda, numba on cpu, torch on either"
        )
    if arguments.device == "cuda" and not torch.cuda.is_available():
        raise _UsageError("--device cuda: no CUDA GPU on this machine")
    # A folder the user names is read, never written, unless they ask for a download.
    download = arguments.download if arguments.data_dir else not arguments.no_download
    train_x, train_y, test_x, test_y, description = _mnist_data(arguments.data_dir, download)
    print(f"MNIST: {description}", file=sys.stderr)
    device = arguments.device
    train_x, test_x = _normalise(train_x).to(device), _normalise(test_x).to(device)
    train_y, test_y = train_y.to(device), test_y.to(device)
    torch.manual_seed(arguments.seed)
    model = MLP([784, *arguments.hidden, 10], device=device)
    trainer = FusedTrainer(
        model,
        "cross_entropy",
        optimizer="sgd",
        lr=arguments.lr,
        momentum=0.9,
        backend=arguments.backend,
    )
    generator = torch.Generator().manual_seed(arguments.seed)
    # The first step compiles or loads the kernels: timed apart, so that the
    # throughput is the steady state the backends are compared on.
    seen, start, warmup = 0, time.perf_counter(), None
    for epoch in range(arguments.epochs):
        order = torch.randperm(len(train_x), generator=generator).to(device)
        batches = order.split(arguments.batch_size)
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{arguments.epochs}", unit="batch")
        for batch in bar:
            loss = trainer.step(train_x[batch], train_y[batch])
            if warmup is None:
                warmup, start = time.perf_counter() - start, time.perf_counter()
                tqdm.write(f"first step: {warmup:.2f} s (kernel compile or cache load)", sys.stderr)
                continue
            seen += len(batch)
            rate = seen / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{loss.item():.4f}", samples_per_s=f"{rate:,.0f}", refresh=False)
    elapsed = time.perf_counter() - start
    with torch.no_grad():
        accuracy = (model(test_x).argmax(dim=1) == test_y).float().mean().item()
    print(f"test accuracy {accuracy:.4f} on {len(test_x)} images")
    print(
        f"throughput {seen / max(elapsed, 1e-9):,.0f} samples/s after the first step "
        f"({warmup:.2f} s: kernel compile or cache load) ({arguments.backend}, {device})"
    )
    if arguments.save:
        _save_atomically(model.state_dict(), arguments.save)
        print(f"saved {arguments.save} (loads into MLP(...).to_torch() / nn.Sequential)")
    return 0


def _save_atomically(state, path: str) -> None:
    """Write beside ``path`` then rename: an interrupted save leaves the old file whole."""
    import os

    import torch

    temporary = f"{path}.partial"
    try:
        torch.save(state, temporary)
        os.replace(temporary, path)
    finally:  # interrupted mid-write: drop the partial file, keep the old one
        if os.path.exists(temporary):
            os.remove(temporary)


def _hidden_sizes(text: str) -> list[int]:
    try:
        sizes = [int(item) for item in text.split(",") if item]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected widths like 256,128, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected positive widths like 256,128, got {text!r}")
    return sizes


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
    presets = bench_parser.add_mutually_exclusive_group()
    presets.add_argument(
        "--quick",
        dest="preset",
        action="store_const",
        const="quick",
        help="two workloads, few rounds (under a minute)",
    )
    presets.add_argument(
        "--full",
        dest="preset",
        action="store_const",
        const="full",
        help="every workload and implementation of the registry, torch.compile and the "
        "element-wise passes included, 15 rounds (about 15 minutes on 2 cores)",
    )
    bench_parser.set_defaults(preset="default")
    bench_parser.add_argument(
        "--workloads",
        type=_comma_list,
        help="comma-separated workload names (default: four; --full: all)",
    )
    bench_parser.add_argument(
        "--implementations",
        type=_comma_list,
        help="comma-separated names (default: the floors, torch and fastbp; --full: all)",
    )
    bench_parser.add_argument(
        "--tasks",
        type=_comma_list,
        help="comma-separated: train, inference, passes (default: train, inference; --full: all)",
    )
    bench_parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    bench_parser.add_argument(
        "--rounds", type=int, help="interleaved rounds (default 7, --quick 3, --full 15)"
    )
    bench_parser.add_argument(
        "--output-dir", default=".", help="where bench.json, bench.md and bench.png go"
    )
    bench_parser.set_defaults(run=bench)
    examples_parser = commands.add_parser("examples", help=examples.__doc__)
    examples_parser.add_argument(
        "names", nargs="*", help="examples to run, e.g. E1 E3 (default: all)"
    )
    examples_parser.set_defaults(run=examples)
    mnist_parser = commands.add_parser("mnist", help=mnist.__doc__)
    mnist_parser.add_argument("--backend", choices=["numba", "triton", "torch"], default="numba")
    mnist_parser.add_argument("--epochs", type=int, default=10)
    mnist_parser.add_argument("--batch-size", type=int, default=128)
    mnist_parser.add_argument("--lr", type=float, default=0.05)
    mnist_parser.add_argument("--hidden", type=_hidden_sizes, default=[256, 128])
    mnist_parser.add_argument("--seed", type=int, default=0)
    mnist_parser.add_argument(
        "--data-dir", help="folder with the IDX files, read only (default: the cache)"
    )
    downloads = mnist_parser.add_mutually_exclusive_group()
    downloads.add_argument(
        "--download", action="store_true", help="fetch missing files into --data-dir"
    )
    downloads.add_argument(
        "--no-download", action="store_true", help="never download, not even into the cache"
    )
    mnist_parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    mnist_parser.add_argument("--save", help="write the trained state_dict here")
    mnist_parser.set_defaults(run=mnist)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    arguments = parser.parse_args(argv)
    try:
        return arguments.run(arguments)
    except _UsageError as error:
        print(f"fastbp {arguments.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: no traceback; --save files are whole or untouched
        print(f"\nfastbp {arguments.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
