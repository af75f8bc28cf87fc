"""fastbp bench: what it prints, that a torch.compile row never times eager code unsaid,
and the GPU batch's script and report."""

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

from benchmarks import gpu_report, interleaved
from fastbp import bench, registry
from fastbp.registry import REGISTRY, WORKLOADS, check_step

from .helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]


def test_bench_prints_a_progress_bar_and_a_summary_and_nothing_else(tmp_path):
    result = run_cli(
        "bench",
        "--device",
        "cpu",
        "--rounds",
        "1",
        "--workloads",
        "docs-64x1000x100x10",
        "--implementations",
        "torch-eager,torch-compile,fastbp",
        "--output-dir",
        str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    # tqdm redraws one line with carriage returns; nothing else may reach stderr
    bar = re.compile(r"(cpu docs-64x1000x100x10 .*|[^a-z]*)\d+/\d+ \[[\d:]+<[\d:?]+\]")
    parts = [part for line in result.stderr.splitlines() for part in line.split("\r")]
    foreign = [part for part in parts if part.strip() and not bar.fullmatch(part.strip())]
    assert not foreign, foreign
    lines = result.stdout.splitlines()
    summary = [line for line in lines if line.startswith("cpu  docs-64x1000x100x10")]
    assert len(summary) == 1 and "drop-in train" in summary[0], result.stdout
    assert "drop-in inference" in summary[0] and "FusedTrainer" not in summary[0]
    assert len(lines) <= 8, result.stdout
    table = (tmp_path / "bench.md").read_text()
    assert "| docs-64x1000x100x10 | cpu | train | torch-compile |" in table


def test_the_summary_gives_each_workload_its_speedups():
    row = lambda device, name, task, us: {  # noqa: E731
        "device": device, "workload": "w", "task": task, "implementation": name, "median_us": us
    }  # fmt: skip
    rows = [
        row("cpu", "torch-eager", "train", 100.0), row("cpu", "fastbp", "train", 80.0),
        row("cpu", "fastbp-fused", "train", 25.0), row("cuda", "torch-eager", "train", 90.0),
        row("cuda", "torch-cudagraph", "train", 30.0), row("cuda", "fastbp-fused", "train", 10.0),
    ]  # fmt: skip
    assert bench.summary(rows).splitlines() == [
        "cpu  w  drop-in train 1.25×, FusedTrainer 4.00×",
        "cuda w  FusedTrainer 9.00×, FusedTrainer vs torch's CUDA graph 3.00×",
    ]


def test_the_default_run_names_only_what_the_registry_has():
    for preset in bench.PRESETS.values():
        assert set(preset.workloads or ()) <= set(WORKLOADS)
        names = {name for name, _ in REGISTRY}
        assert set(preset.implementations or ()) <= names
        assert set(preset.tasks) <= set(bench.TASKS)


def test_a_compiled_row_that_ran_eagerly_is_marked():
    def scaled(x, k):
        return x * k

    torch._dynamo.reset()
    compiled = torch.compile(scaled, dynamic=False)
    with torch._dynamo.config.patch(recompile_limit=1), bench.watch_compiles() as watch:
        watch.current = "torch-compile"
        for k in range(3):  # a new int specialises anew: the second one is over the limit
            compiled(torch.ones(2), k)
    assert watch.fell_back_names(["torch-eager", "torch-compile"]) == {"torch-compile"}
    row = {"workload": "w", "device": "cpu", "implementation": "torch-compile", "median_us": 1.0,
           "samples_per_s": 1.0, "speedup_vs_torch_eager": 1.0, "ratio_to_gemm_floor": None,
           "fell_back_to_eager": True}  # fmt: skip
    assert "torch-compile (ran eagerly: dynamo's recompile limit)" in bench.format_table([row])


def test_check_step_catches_an_update_off_by_15_percent():
    workload = WORKLOADS["docs-64x1000x100x10"]
    wrong = dataclasses.replace(workload, lr=workload.lr * 1.15)
    step = REGISTRY["torch-eager", "cpu"].step(wrong, "cpu")
    with pytest.raises(AssertionError, match="update is off"):
        check_step("fastbp", workload, "cpu", step)
    assert "within 1%" in check_step("fastbp", workload, "cpu")


@pytest.mark.parametrize("entry", ["drop-in-ceiling", "drop-in-floor"])
@pytest.mark.parametrize(
    "workload", ["seeds-2x2x2-sigmoid-b1", "mnist-adam-b128", "ensemble-10x(23-64-64-1)-b64"]
)
def test_the_drop_in_bounds_run_torch_eagers_loop_around_a_replayed_model(entry, workload):
    """Their first update is torch's (an ensemble's: the baddbmm ensemble's, whose
    parameters they hold): the same loss, backward and optimizer work, with the
    model's own forward and backward replaced by their results."""
    workload = WORKLOADS[workload]
    bound = REGISTRY[entry, "cpu"].step(workload, "cpu")
    torchs = REGISTRY["torch-baddbmm" if workload.ensemble else "torch-eager", "cpu"]
    reference = torchs.step(workload, "cpu")
    assert not bound.trains
    for step in (bound, reference):
        step.run()
    for ours, theirs in zip(bound.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("workload", ["mnist-784x256x128x10-b64", "ensemble-10x(23-64-64-1)-b64"])
def test_the_drop_in_floor_runs_the_gemm_floors_gemms_on_the_models_weights(workload):
    """Each step runs the floor's forward GEMMs, then its backward GEMMs, once, on the
    model's own weights as the optimizer left them."""
    calls, seen = [], []
    forward, backward = registry._FloorGemms.forward, registry._FloorGemms.backward

    def forward_seen(gemms):
        calls.append("forward")
        seen.append([w.clone() for w in gemms.weights])
        forward(gemms)

    def backward_seen(gemms):
        calls.append("backward")
        backward(gemms)

    with (
        mock.patch.object(registry._FloorGemms, "forward", forward_seen),
        mock.patch.object(registry._FloorGemms, "backward", backward_seen),
    ):
        step = REGISTRY["drop-in-floor", "cpu"].step(WORKLOADS[workload], "cpu")
        for _ in range(2):
            step.run()
    assert calls == ["forward", "backward"] * 2
    assert not torch.equal(seen[0][0], seen[1][0])  # the optimizer's update, read
    gemms = step.model.gemms
    weights = [p for p in step.model.parameters() if p.dim() == gemms.weights[0].dim()]
    assert [w.data_ptr() for w in gemms.weights] == [w.data_ptr() for w in weights]
    floor = registry._FloorGemms(WORKLOADS[workload], "cpu", seen[1])
    floor.forward()
    floor.backward()
    for ours, floors in zip(gemms.grads, floor.grads, strict=True):
        torch.testing.assert_close(ours, floors, rtol=0, atol=0)


def test_the_interleaved_script_times_each_implementation_at_each_batch(capsys):
    interleaved.main(["--workloads", "seeds-2x2x2-sigmoid-b1", "--batches", "3,5",
                      "--implementations", "gemm-floor,fastbp-fused", "--rounds", "1",
                      "--calls", "1"])  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        f"seeds-2x2x2-sigmoid-b1 at batch {batch}" for batch in (3, 5)
    ]
    for line in lines:
        assert re.search(r"gemm-floor [\d.]+ µs \(1\.000\), fastbp-fused [\d.]+ µs", line)
    for name, words in [("fastbp-typo", "unknown implementation fastbp-typo"),
                        ("fastbp-layers", "unknown implementation fastbp-layers"),  # no step
                        ("torch-vmap", "for seeds-2x2x2-sigmoid-b1 torch-vmap")]:  # fmt: skip
        with pytest.raises(SystemExit, match=words):
            interleaved.main(["--workloads", "seeds-2x2x2-sigmoid-b1", "--implementations",
                              name])  # fmt: skip


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="a CUDA GPU is present: the script would run the batch"
)
def test_gpu_batch_stops_at_once_without_a_gpu(tmp_path):
    out = tmp_path / "results"
    script = ROOT / "benchmarks" / "run_gpu.sh"
    result = subprocess.run(
        ["bash", str(script), str(out)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result.stderr
    assert "needs a CUDA GPU" in result.stderr
    assert not out.exists()


def test_gpu_report_gathers_the_parts(tmp_path, monkeypatch):
    # One workload's bench.json, as `fastbp bench --output-dir part` writes it.
    part = tmp_path / "part"
    bench.run(
        ["docs-64x1000x100x10"],
        ["cpu"],
        ["torch-eager"],
        rounds=1,
        round_seconds=0.01,
        output_dir=part,
        tasks=("inference",),
        show_progress=False,
    )
    out = tmp_path / "out"
    out.mkdir()
    (out / "pytest.log").write_text("...\n===== 3 passed, 1 skipped in 2.0s =====\n")
    monkeypatch.setattr(
        sys,
        "argv",
        ["gpu_report", "--output-dir", str(out), "--commit", "abc1234", "--rounds", "1", str(part)],
    )
    gpu_report.main()
    readme = (out / "README.md").read_text()
    assert "Commit: abc1234." in readme
    assert "**3 passed, 1 skipped in 2.0s**" in readme
    assert "| docs-64x1000x100x10 | cpu | inference | torch-eager |" in readme
    assert "not run (see run.log)" in readme  # no launch-cost part
    merged = json.loads((out / "fastbp-bench.json").read_text())
    assert [row["implementation"] for row in merged["results"]] == ["torch-eager"]
