"""fastbp bench: what it prints, and that a torch.compile row never times eager code unsaid."""

import dataclasses

import pytest
import torch

from fastbp import bench
from fastbp.registry import REGISTRY, WORKLOADS, check_step

from .conftest import run_cli


def test_bench_prints_its_progress_and_table_and_nothing_else(tmp_path):
    result = run_cli(
        "bench", "--device", "cpu", "--rounds", "1", "--workloads", "docs-64x1000x100x10",
        "--implementations", "torch-eager,torch-compile", "--output-dir", str(tmp_path),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    foreign = [line for line in result.stderr.splitlines() if line and not line.startswith("cpu ")]
    assert not foreign, foreign
    assert "| docs-64x1000x100x10 | cpu | train | torch-compile |" in result.stdout


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
