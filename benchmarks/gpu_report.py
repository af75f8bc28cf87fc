"""Gather the parts of ``benchmarks/run_gpu.sh`` into one results folder.

    python -m benchmarks.gpu_report --output-dir DIR --commit SHA [PART ...]

Each PART is a ``fastbp bench --output-dir`` folder of one workload. Writes
``DIR/fastbp-bench.json`` (every row, and the machine it ran on),
``DIR/fastbp-bench.png`` and ``DIR/README.md``: the GPU, the date, the commit,
the tests' summary line (``DIR/pytest.log``), the bench table and the launch-cost
table (``DIR/triton_launch.json``), each where its part ran.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fastbp.bench import format_table, machine, plot


def _merge(parts: list[Path]) -> dict:
    loaded = [json.loads((part / "bench.json").read_text()) for part in parts]
    return {"machine": machine(), "results": [row for run in loaded for row in run["results"]]}


def _tests_summary(output_dir: Path) -> str:
    log = output_dir / "pytest.log"
    if not log.exists():
        return "not run"
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    return lines[-1].strip("= ") if lines else "no output (timed out?)"


def _launch_table(output_dir: Path) -> str:
    path = output_dir / "triton_launch.json"
    if not path.exists():
        return "not run (see run.log)"
    medians = json.loads(path.read_text())["us_per_call"]
    floor = medians["torch.add (empty launch)"]
    rows = [f"| {name} | {us:.1f} | {us / floor:.1f} |" for name, us in medians.items()]
    return "\n".join(["| call | µs per call | × torch.add |", "|---|---:|---:|", *rows])


def _readme(merged: dict, output_dir: Path, commit: str, rounds: int) -> str:
    host, rows = merged["machine"], merged["results"]
    return f"""# GPU results, {host["date"][:10]}

- GPU: {host["gpu"]}; host CPU: {host["cpu"]}, {host["cpu_count"]} cores.
- Software: torch {host["torch"]}, Python {host["python"]}.
- Commit: {commit}.
- Made by `benchmarks/run_gpu.sh`; the log of every part is `run.log`.

## CUDA tests

`pytest tests/test_triton.py tests/test_ecosystem.py tests/test_accuracy.py
tests/test_train.py -k "cuda or triton"`: **{_tests_summary(output_dir)}**
(`pytest.log`).

## `fastbp bench --device cuda --rounds {rounds}`, one process per workload

`fastbp-bench.json` (per-round times in `rounds_us`) and `fastbp-bench.png`. Each
implementation is checked against torch-eager first; a workload that failed its
check or its time limit is missing here and named in `run.log`.

{format_table(rows) if rows else "no workload finished"}

The same steps under pytest-benchmark (`pytest benchmarks/test_steps.py
--benchmark-only -k "cuda and (docs or b128)"`) are in `pytest-benchmark.json`
where that part finished.

## Launch cost (`python -m benchmarks.triton_launch`)

{_launch_table(output_dir)}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="*", type=Path)
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--commit", required=True)
    parser.add_argument("--rounds", type=int, required=True)
    arguments = parser.parse_args()
    merged = _merge(arguments.parts)
    out = arguments.output_dir
    (out / "fastbp-bench.json").write_text(json.dumps(merged, indent=2))
    if merged["results"]:
        plot(merged["results"], out / "fastbp-bench.png")
    (out / "README.md").write_text(_readme(merged, out, arguments.commit, arguments.rounds))
    print(f"wrote {out / 'README.md'}")


if __name__ == "__main__":
    main()
