"""``fastbp bench``: the registry's training steps and forward passes, timed side by side.

Every implementation is first checked against torch-eager (a benchmark of a
wrong computation is worse than none), then timed in interleaved rounds: each
round times every implementation once, so a machine that slows down for a
while slows all of them alike. The figure reported is the median over rounds
of the time per call, and the ratios are taken within one run.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from . import __version__, threads
from .registry import (
    REGISTRY,
    WORKLOADS,
    Workload,
    available,
    check_inference,
    check_step,
    entries,
)

TASKS = ("train", "inference", "passes")


@dataclass(frozen=True)
class Preset:
    """What a ``fastbp bench`` run covers when the command line does not narrow it.
    None for workloads or implementations: every one in the registry."""

    workloads: tuple[str, ...] | None
    implementations: tuple[str, ...] | None
    tasks: tuple[str, ...]
    rounds: int
    round_seconds: float  # each implementation's share of one round


# The answers a newcomer wants, in about two minutes on 2 cores: the drop-in and
# FusedTrainer against torch-eager (and on GPU against torch's CUDA-graph step), with
# the floors that say how far either could go. torch.compile is left to --full:
# compiling alone takes longer than the whole default run.
DEFAULT = Preset(
    workloads=(
        "docs-64x1000x100x10",
        "mnist-784x256x128x10-b128",
        "seeds-2x2x2-sigmoid-b1",
        "rl-8x64x64x2-tanh-b64",
    ),
    implementations=(
        "gemm-floor",
        "roofline-floor",
        "torch-eager",
        "drop-in-ceiling",
        "drop-in-floor",
        "torch-cudagraph",
        "fastbp",
        "fastbp-fused",
    ),
    tasks=("train", "inference"),
    rounds=7,
    round_seconds=0.05,
)
PRESETS = {
    "default": DEFAULT,
    "quick": replace(DEFAULT, workloads=DEFAULT.workloads[:2], rounds=3, round_seconds=0.02),
    "full": Preset(None, None, TASKS, rounds=15, round_seconds=0.1),
}
# The element-wise passes: each activation and its derivative on a (1024, 256) array,
# fastbp's numba kernels beside torch's own CPU ops.
PASS_SHAPE = (1024, 256)
_aten = torch.ops.aten
# Each activation's torch forward and torch's own backward kernel, δ from (g, a, z).
_TORCH_PASSES = {
    "relu": (torch.relu, lambda g, a, z: _aten.threshold_backward(g, a, 0)),
    "sigmoid": (torch.sigmoid, lambda g, a, z: _aten.sigmoid_backward(g, a)),
    "tanh": (torch.tanh, lambda g, a, z: _aten.tanh_backward(g, a)),
    "leaky_relu": (
        torch.nn.functional.leaky_relu,
        lambda g, a, z: _aten.leaky_relu_backward(g, z, 0.01, False),
    ),
    "gelu": (torch.nn.functional.gelu, lambda g, a, z: _aten.gelu_backward(g, z)),
    "gelu_tanh": (
        lambda z: torch.nn.functional.gelu(z, approximate="tanh"),
        lambda g, a, z: _aten.gelu_backward(g, z, approximate="tanh"),
    ),
    "silu": (torch.nn.functional.silu, lambda g, a, z: _aten.silu_backward(g, z)),
    "softplus": (
        torch.nn.functional.softplus,
        lambda g, a, z: _aten.softplus_backward(g, z, 1.0, 20.0),
    ),
    "elu": (torch.nn.functional.elu, lambda g, a, z: _aten.elu_backward(g, 1.0, 1, 1, False, z)),
}
PASS_ACTIVATIONS = tuple(_TORCH_PASSES)  # every activation but the identity


# Log lines torch prints while compiling the torch.compile rows, each understood and
# dropped so that the output is the table the user asked for.
_UNDERSTOOD_LOGS = {
    # inductor imports cpp_extension, which warns when it finds a CUDA toolkit (nvcc)
    # but no GPU, even when it compiles for the CPU
    "torch.utils.cpp_extension": "No CUDA runtime is found",
    # torch.optim wraps step() in a profiler range, which dynamo leaves out of the graph:
    # nothing is profiled here, so nothing is lost
    "torch._dynamo.variables.ctx_manager": "Profiler record function",
}
# Once a function has been compiled recompile_limit times, dynamo runs it eagerly: a
# torch-compile row would then time eager code under its name. Never dropped silently.
_RECOMPILE_LIMIT = ("torch._dynamo.convert_frame", "hit config.recompile_limit")


class CompileWatch(logging.Filter):
    """Drops ``_UNDERSTOOD_LOGS`` and records which implementations dynamo gave up compiling.

    ``current`` names the implementation being prepared; a hit while several are
    timed together (``current`` None) marks every compiled one.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current: str | None = None
        self.fell_back: set[str] = set()
        self.hit = False

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.name == _RECOMPILE_LIMIT[0] and _RECOMPILE_LIMIT[1] in message:
            self.hit = True
            if self.current is not None:
                self.fell_back.add(self.current)
            return False
        understood = _UNDERSTOOD_LOGS.get(record.name)
        return understood is None or understood not in message

    def fell_back_names(self, names) -> set[str]:
        """The implementations among ``names`` that ran eagerly at some point."""
        timed_hit = self.hit and not self.fell_back
        return self.fell_back | ({n for n in names if "compile" in n} if timed_hit else set())


@contextlib.contextmanager
def watch_compiles():
    """A ``CompileWatch`` on torch's compile loggers for the duration of the block."""
    watch = CompileWatch()
    loggers = [logging.getLogger(name) for name in (*_UNDERSTOOD_LOGS, _RECOMPILE_LIMIT[0])]
    for logger in loggers:
        logger.addFilter(watch)
    try:
        yield watch
    finally:
        for logger in loggers:
            logger.removeFilter(watch)


def figures(
    workload: Workload, seconds: float, eager=None, floor=None, training=True, roofline=None
) -> dict:
    """What one median time per call means: throughput and the ratios of one run
    (speedup over torch eager, time over the GEMM and roofline floors), None without
    the baseline."""
    return {
        "median_us": seconds * 1e6,
        "samples_per_s": workload.batch / seconds,
        "gflop_per_s": workload.flops(training) / seconds / 1e9,
        "speedup_vs_torch_eager": eager / seconds if eager else None,
        "ratio_to_gemm_floor": seconds / floor if floor else None,
        "ratio_to_roofline_floor": seconds / roofline if roofline else None,
    }


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _steps_per_round(run: Callable[[], object], device: str, seconds: float) -> int:
    """How many steps fill about ``seconds``, from a short calibration after one call
    (which may compile or load kernels: timed, it would make a round of one step)."""
    run()
    _synchronize(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds / 4 or count < 2:
        run()
        count += 1
    _synchronize(device)
    per_step = (time.perf_counter() - start) / count
    return max(1, int(seconds / per_step))


def _time_round(run: Callable[[], object], device: str, steps: int) -> float:
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        run()
    _synchronize(device)
    return (time.perf_counter() - start) / steps


SETTLE_SECONDS = 0.15  # longer than OpenBLAS's threads spin after their last call


def time_interleaved(
    runs: dict[str, tuple[Callable[[], object], int]],
    rounds: int,
    device: str = "cpu",
    on_round: Callable[[int], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each ``name: (run, calls per round)``, one figure per round.

    Each round times every run once, in a seeded shuffled order, so a machine that
    slows down for a while slows all of them alike; take the median over rounds.
    On CPU each run starts after a pause: a thread pool that spins after its last
    call (OpenBLAS's, for about 0.1 s) slows whatever runs next, here 2-3x for
    torch's ops and fastbp's alike right after the numpy entry.
    """
    times: dict[str, list[float]] = {name: [] for name in runs}
    order, shuffle = list(runs), random.Random(0).shuffle
    for round_ in range(rounds):
        if on_round is not None:
            on_round(round_)
        shuffle(order)
        for name in order:
            run, calls = runs[name]
            if device == "cpu":
                time.sleep(SETTLE_SECONDS)
            times[name].append(_time_round(run, device, calls))
    return times


def _prepare(name: str, workload: Workload, device: str, task: str):
    """``(the call to time, its first call in seconds, what was checked)`` for one entry."""
    entry = REGISTRY[name, device]
    start = time.perf_counter()
    if task == "train":
        step = entry.step(workload, device)
        step.run()
        _synchronize(device)
        first_call = time.perf_counter() - start
        return step.run, first_call, check_step(name, workload, device, step, done=1)
    forward = entry.inference(workload, device)
    output = forward()
    _synchronize(device)
    first_call = time.perf_counter() - start
    return forward, first_call, check_inference(name, workload, device, output)


def bench_workload(
    workload: Workload,
    device: str,
    names: list[str],
    rounds: int,
    round_seconds: float,
    bar: tqdm,
    task: str = "train",
) -> list[dict]:
    """Check, warm up and time ``names`` on one workload; one result row each.
    ``bar`` advances once per implementation prepared and once per round."""
    # Fresh compile caches per workload: torch.optim's step() is one function for every
    # optimizer, and each new optimizer adds a cache entry until dynamo stops compiling.
    torch._dynamo.reset()
    prepared, first_calls, checks = {}, {}, {}
    label = f"{device} {workload.name} {task}"
    with watch_compiles() as watch:
        for name in names:
            watch.current = name
            bar.set_description_str(f"{label}: checking {name}")
            call, first_calls[name], checks[name] = _prepare(name, workload, device, task)
            prepared[name] = (call, _steps_per_round(call, device, round_seconds))
            bar.update()
        watch.current = None
        bar.set_description_str(f"{label}: timing")
        times = time_interleaved(prepared, rounds, device, lambda _: bar.update())
    fell_back = watch.fell_back_names(names)
    medians = {name: statistics.median(values) for name, values in times.items()}
    eager, floor = medians.get("torch-eager"), medians.get("gemm-floor")
    roofline = medians.get("roofline-floor")
    return [
        {
            "workload": workload.name,
            "device": device,
            "task": task,
            "implementation": name,
            **figures(workload, median, eager, floor, task == "train", roofline),
            "first_call_s": first_calls[name],
            "checked": checks[name],
            "fell_back_to_eager": name in fell_back,
            "rounds_us": [t * 1e6 for t in times[name]],
        }
        for name, median in medians.items()
    ]


def machine() -> dict:
    """Where figures were measured: date, versions, CPU, GPU and the thread policy."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "fastbp": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "thread_policy": threads.describe(),
    }


def _cpu_name() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what ``platform`` knows:
    ratios from one machine say little about another, so name it."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return f"{line.partition(':')[2].strip()} ({platform.machine()})"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def format_table(rows: list[dict]) -> str:
    """Markdown: median time per call, samples/s and the two ratios, per workload and task."""
    lines = [
        "| workload | device | task | implementation | µs/call | samples/s "
        "| vs torch-eager | vs GEMM floor | vs roofline floor |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    fmt = lambda v, spec: "–" if v is None else format(v, spec)  # noqa: E731
    for row in rows:
        name = row["implementation"]
        if row.get("fell_back_to_eager"):
            name += " (ran eagerly: dynamo's recompile limit)"
        lines.append(
            f"| {row['workload']} | {row['device']} | {row.get('task', 'train')} | {name} "
            f"| {row['median_us']:.1f} | {row['samples_per_s']:,.0f} "
            f"| {fmt(row['speedup_vs_torch_eager'], '.2f')}× faster "
            f"| {fmt(row['ratio_to_gemm_floor'], '.2f')}× "
            f"| {fmt(row.get('ratio_to_roofline_floor'), '.2f')}× |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Time per call by implementation, one panel per workload, task and device."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    panels = sorted({(row["workload"], row.get("task", "train"), row["device"]) for row in rows})
    columns = min(4, len(panels))
    lines = (len(panels) + columns - 1) // columns
    figure, axes = pyplot.subplots(
        lines, columns, figsize=(4.5 * columns, 3.2 * lines), squeeze=False
    )
    for axis in axes.flat[len(panels) :]:
        axis.set_visible(False)
    for axis, (workload, task, device) in zip(axes.flat, panels, strict=False):
        chosen = [
            r
            for r in rows
            if (r["workload"], r.get("task", "train"), r["device"]) == (workload, task, device)
        ]
        names = [r["implementation"] for r in chosen]
        colors = ["tab:orange" if n.startswith("fastbp") else "tab:gray" for n in names]
        axis.barh(names, [r["median_us"] for r in chosen], color=colors)
        axis.invert_yaxis()
        axis.set_xlabel("µs per call (median)")
        axis.set_title(f"{workload}\n{task}, {device}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)


def _pass_calls(name: str, dtype: torch.dtype, generator) -> dict:
    """``(direction, implementation): call`` for one activation's passes on PASS_SHAPE."""
    from .kernels import cpu

    z = torch.randn(PASS_SHAPE, generator=generator, dtype=dtype) * 3
    g = torch.randn(PASS_SHAPE, generator=generator, dtype=dtype)
    forward, backward = _TORCH_PASSES[name]
    a = forward(z)
    arrays = z.numpy(), g.numpy(), a.numpy()
    return {
        ("forward", "torch-eager"): lambda: forward(z),
        ("forward", "fastbp"): lambda: threads.call(cpu.activate, arrays[0], name),
        ("backward", "torch-eager"): lambda: backward(g, a, z),
        ("backward", "fastbp"): lambda: threads.call(
            cpu.activation_grad, arrays[1], arrays[2], name, arrays[0]
        ),
    }


def bench_passes(rounds: int, round_seconds: float, bar: tqdm) -> list[dict]:
    """Every activation's forward and backward pass, fastbp's and torch's, in one run."""
    rows, generator = [], torch.Generator().manual_seed(0)
    elements = PASS_SHAPE[0] * PASS_SHAPE[1]
    for dtype in (torch.float32, torch.float64):
        bar.set_description_str(f"cpu element passes, {str(dtype)[6:]}")
        calls = {
            (name, *key): call
            for name in PASS_ACTIVATIONS
            for key, call in _pass_calls(name, dtype, generator).items()
        }
        prepared = {
            key: (run, _steps_per_round(run, "cpu", round_seconds)) for key, run in calls.items()
        }
        bar.update()
        times = time_interleaved(prepared, rounds, on_round=lambda _: bar.update())
        shape = "x".join(map(str, PASS_SHAPE))
        for (name, direction, implementation), values in times.items():
            median = statistics.median(values)
            torchs = statistics.median(times[name, direction, "torch-eager"])
            rows.append(
                {
                    "workload": f"{name} {str(dtype).removeprefix('torch.')} {shape}",
                    "device": "cpu",
                    "task": f"{direction} pass",
                    "implementation": implementation,
                    "median_us": median * 1e6,
                    "samples_per_s": elements / median,
                    "speedup_vs_torch_eager": torchs / median,
                    "ratio_to_gemm_floor": None,
                    "rounds_us": [t * 1e6 for t in values],
                }
            )
    return rows


# The bar counts implementations prepared and rounds timed: no rate, which would mix them.
BAR = "{desc} {bar:20} {n_fmt}/{total_fmt} [{elapsed}<{remaining}]"
Unit = tuple[str, str, str, list[str]]  # (device, workload, task, implementations)


def timed_units(
    workloads: list[str], devices: list[str], implementations: list[str] | None,
    tasks: tuple[str, ...],
) -> list[Unit]:  # fmt: skip
    """What a run times on this machine, in order: one unit per device, workload and task
    that has implementations to time (a device this machine lacks has none)."""
    units = []
    for device in (d for d in devices if available(d)):
        for workload in (w for w in workloads if device in WORKLOADS[w].devices):
            for task in (t for t in tasks if t != "passes"):
                names = [
                    entry.name
                    for entry in entries(device)
                    if entry.runs(WORKLOADS[workload], task)
                    and (implementations is None or entry.name in implementations)
                ]
                if names:
                    units.append((device, workload, task, names))
    return units


def _times_passes(devices, implementations, tasks) -> bool:
    wanted = implementations is None or {"torch-eager", "fastbp"} <= set(implementations)
    return "passes" in tasks and "cpu" in devices and wanted


def run(
    workloads: list[str],
    devices: list[str],
    implementations: list[str] | None,
    rounds: int,
    round_seconds: float,
    output_dir: Path,
    tasks: tuple[str, ...] = TASKS,
    show_progress: bool = True,
) -> list[dict]:
    """The whole comparison: rows, ``bench.json``, ``bench.md`` (the table) and
    ``bench.png``, with a progress bar on stderr."""
    threads.ensure_policy()
    timed = timed_units(workloads, devices, implementations, tasks)
    passes = _times_passes(devices, implementations, tasks)
    total = sum(len(names) + rounds for *_, names in timed) + (2 * (1 + rounds) if passes else 0)
    rows = []
    progress = dict(total=total, disable=not show_progress, file=sys.stderr, bar_format=BAR)
    with tqdm(**progress) as bar:
        for device, workload, task, names in timed:
            rows += bench_workload(
                WORKLOADS[workload], device, names, rounds, round_seconds, bar, task
            )
        if passes:  # the numba kernels' element passes
            rows += bench_passes(rounds, round_seconds, bar)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "bench.json").write_text(
        json.dumps({"machine": machine(), "results": rows}, indent=2)
    )
    (output_dir / "bench.md").write_text(format_table(rows) + "\n")
    if rows:
        plot(rows, output_dir / "bench.png")
    return rows


def _speedup(rows: dict, name: str, task: str, baseline: str) -> str | None:
    ours, theirs = rows.get((name, task)), rows.get((baseline, task))
    if ours is None or theirs is None:
        return None
    return f"{theirs['median_us'] / ours['median_us']:.2f}×"


def summary(rows: list[dict]) -> str:
    """One line per device and workload: the drop-in (training, inference) and
    FusedTrainer as speedups over torch-eager, and on CUDA over torch's CUDA-graph step."""
    by_unit: dict[tuple[str, str], dict] = {}
    for row in rows:
        if row.get("task") in ("train", "inference"):
            unit = by_unit.setdefault((row["device"], row["workload"]), {})
            unit[row["implementation"], row["task"]] = row
    width = max((len(workload) for _, workload in by_unit), default=0)
    lines = []
    for (device, workload), unit in by_unit.items():
        parts = []
        for label, name, task, baseline in (
            ("drop-in train", "fastbp", "train", "torch-eager"),
            ("drop-in inference", "fastbp", "inference", "torch-eager"),
            ("FusedTrainer", "fastbp-fused", "train", "torch-eager"),
            ("FusedTrainer vs torch's CUDA graph", "fastbp-fused", "train", "torch-cudagraph"),
        ):
            speedup = _speedup(unit, name, task, baseline)
            if speedup is not None:
                parts.append(f"{label} {speedup}")
        lines.append(f"{device:<4} {workload:<{width}}  " + ", ".join(parts))
    return "\n".join(lines)
