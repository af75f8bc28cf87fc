"""``fastbp bench``: the registry's training steps, timed side by side on this machine.

Every implementation is first checked against torch-eager (a benchmark of a
wrong computation is worse than none), then timed in interleaved rounds: each
round times every implementation once, so a machine that slows down for a
while slows all of them alike. The figure reported is the median over rounds
of the time per step, and the ratios are taken within one run.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from . import __version__, threads
from .backends import STEP_IMPLEMENTATIONS, WORKLOADS, Workload, available_steps, check_step

QUICK_WORKLOADS = ("docs-64x1000x100x10", "mnist-784x256x128x10-b128")
QUICK_SKIPS = ("torch-compile",)  # its compile alone takes longer than the quick budget


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


def baseline(name: str, device: str) -> str:
    """The registry name of baseline ``name`` ("torch-eager", "gemm-floor") on ``device``."""
    return name + "-cuda" if device == "cuda" else name


def figures(workload: Workload, seconds: float, eager=None, floor=None, training=True) -> dict:
    """What one median time per step means: throughput and the two ratios of one run
    (speedup over torch eager, time over the GEMM floor), None without the baseline."""
    return {
        "median_us": seconds * 1e6,
        "samples_per_s": workload.batch / seconds,
        "gflop_per_s": workload.flops(training) / seconds / 1e9,
        "speedup_vs_torch_eager": eager / seconds if eager else None,
        "ratio_to_gemm_floor": seconds / floor if floor else None,
    }


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _steps_per_round(run: Callable[[], object], device: str, seconds: float) -> int:
    """How many steps fill about ``seconds``, from a short calibration."""
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


def time_interleaved(
    runs: dict[str, tuple[Callable[[], object], int]],
    rounds: int,
    device: str = "cpu",
    on_round: Callable[[int], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each ``name: (run, calls per round)``, one figure per round.

    Each round times every run once, in order, so a machine that slows down
    for a while slows all of them alike; take the median over rounds.
    """
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(rounds):
        if on_round is not None:
            on_round(round_)
        for name, (run, calls) in runs.items():
            times[name].append(_time_round(run, device, calls))
    return times


def bench_workload(
    workload: Workload,
    device: str,
    names: list[str],
    rounds: int,
    round_seconds: float,
    progress: Callable[[str], None],
) -> list[dict]:
    """Check, warm up and time ``names`` on one workload; one result row each."""
    # Fresh compile caches per workload: torch.optim's step() is one function for every
    # optimizer, and each new optimizer adds a cache entry until dynamo stops compiling.
    torch._dynamo.reset()
    prepared, first_calls = {}, {}
    with watch_compiles() as watch:
        for name in names:
            watch.current = name
            progress(f"{device} {workload.name}: checking and warming up {name}")
            check_step(name, workload, device)
            start = time.perf_counter()
            step = STEP_IMPLEMENTATIONS[name].make(workload, device)
            step.run()
            _synchronize(device)
            first_call = time.perf_counter() - start
            prepared[name] = (step.run, _steps_per_round(step.run, device, round_seconds))
            first_calls[name] = first_call
        watch.current = None
        times = time_interleaved(
            prepared,
            rounds,
            device,
            lambda round_: progress(f"{device} {workload.name}: round {round_ + 1}/{rounds}"),
        )
    fell_back = watch.fell_back_names(names)
    medians = {name: statistics.median(values) for name, values in times.items()}
    eager = medians.get(baseline("torch-eager", device))
    floor = medians.get(baseline("gemm-floor", device))
    return [
        {
            "workload": workload.name,
            "device": device,
            "implementation": name,
            **figures(workload, median, eager, floor),
            "first_call_s": first_calls[name],
            "fell_back_to_eager": name in fell_back,
            "rounds_us": [t * 1e6 for t in times[name]],
        }
        for name, median in medians.items()
    ]


def _machine() -> dict:
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
    """Markdown: median time per step, samples/s and the two ratios, per workload."""
    lines = [
        "| workload | device | implementation | µs/step | samples/s "
        "| vs torch-eager | vs GEMM floor |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    fmt = lambda v, spec: "–" if v is None else format(v, spec)  # noqa: E731
    for row in rows:
        name = row["implementation"]
        if row.get("fell_back_to_eager"):
            name += " (ran eagerly: dynamo's recompile limit)"
        lines.append(
            f"| {row['workload']} | {row['device']} | {name} "
            f"| {row['median_us']:.1f} | {row['samples_per_s']:,.0f} "
            f"| {fmt(row['speedup_vs_torch_eager'], '.2f')}× faster "
            f"| {fmt(row['ratio_to_gemm_floor'], '.2f')}× |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Time per step by implementation, one panel per workload, CPU and GPU side by side."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    panels = sorted({(row["workload"], row["device"]) for row in rows})
    figure, axes = pyplot.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), squeeze=False)
    for axis, (workload, device) in zip(axes[0], panels, strict=True):
        chosen = [r for r in rows if r["workload"] == workload and r["device"] == device]
        names = [r["implementation"] for r in chosen]
        colors = ["tab:orange" if n.startswith("fastbp") else "tab:gray" for n in names]
        axis.barh(names, [r["median_us"] for r in chosen], color=colors)
        axis.invert_yaxis()
        axis.set_xlabel("µs per training step (median)")
        axis.set_title(f"{workload}\n{device}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


def run(
    workloads: list[str],
    devices: list[str],
    implementations: list[str] | None,
    rounds: int,
    round_seconds: float,
    output_dir: Path,
    progress: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> list[dict]:
    """The whole comparison: rows, printed table, ``bench.json`` and ``bench.png``."""
    threads.ensure_policy()
    rows = []
    for device in devices:
        names = [
            name
            for name in available_steps(device)
            if implementations is None or name.removesuffix("-cuda") in implementations
        ]
        if not names:
            progress(f"{device}: no implementation available on this machine, skipped")
            continue
        for workload in (w for w in workloads if device in WORKLOADS[w].devices):
            rows += bench_workload(
                WORKLOADS[workload], device, names, rounds, round_seconds, progress
            )
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "bench.json").write_text(
        json.dumps({"machine": _machine(), "results": rows}, indent=2)
    )
    if rows:
        plot(rows, output_dir / "bench.png")
    return rows
