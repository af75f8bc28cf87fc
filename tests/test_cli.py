"""The command line, through a subprocess as a user runs it."""

import json

import pytest
import torch

from .helpers import run_cli


def test_info_reports_versions_policy_and_backends():
    result = run_cli("info")
    assert result.returncode == 0, result.stderr
    for field in ("fastbp", "torch", "numba", "numpy", "triton", "thread policy", "backends"):
        assert field in result.stdout
    assert "policy=on" in result.stdout


def test_version_and_usage_errors():
    assert run_cli("--version").stdout.startswith("fastbp ")
    result = run_cli("frobnicate")
    assert result.returncode == 2 and "invalid choice" in result.stderr


def test_bench_writes_summary_table_json_and_plot(tmp_path):
    result = run_cli(
        "bench",
        "--quick",
        "--device",
        "cpu",
        "--rounds",
        "1",
        "--workloads",
        "docs-64x1000x100x10",
        "--implementations",
        "gemm-floor,torch-eager,fastbp-fused",
        "--output-dir",
        str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    assert "cpu  docs-64x1000x100x10  FusedTrainer" in result.stdout
    table = (tmp_path / "bench.md").read_text()
    assert "| docs-64x1000x100x10 | cpu | train | fastbp-fused |" in table
    report = json.loads((tmp_path / "bench.json").read_text())
    rows = {(row["task"], row["implementation"]): row for row in report["results"]}
    trained = {"gemm-floor", "torch-eager", "fastbp-fused"}
    assert set(rows) == {("train", n) for n in trained} | {("inference", "torch-eager")}
    assert rows["train", "torch-eager"]["speedup_vs_torch_eager"] == 1.0
    assert all(row["median_us"] > 0 and row["checked"] for row in rows.values())
    assert (tmp_path / "bench.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present: nothing to refuse")
def test_bench_refuses_a_device_the_machine_lacks():
    result = run_cli("bench", "--device", "cuda")
    assert result.returncode == 2
    assert "--device cuda: no such device on this machine" in result.stderr


def test_bench_names_an_unknown_workload():
    result = run_cli("bench", "--workloads", "imagenet")
    assert result.returncode == 2
    assert "unknown workload, implementation or task 'imagenet'" in result.stderr
    assert "Traceback" not in result.stderr
