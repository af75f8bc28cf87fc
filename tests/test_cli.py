"""The command line, through a subprocess as a user runs it."""

import subprocess
import sys


def _fastbp(*arguments):
    return subprocess.run(
        [sys.executable, "-m", "fastbp.cli", *arguments], capture_output=True, text=True
    )


def test_info_reports_versions_policy_and_backends():
    result = _fastbp("info")
    assert result.returncode == 0, result.stderr
    for field in ("fastbp", "torch", "numba", "numpy", "triton", "thread policy", "backends"):
        assert field in result.stdout
    assert "policy=on" in result.stdout


def test_version_and_usage_errors():
    assert _fastbp("--version").stdout.startswith("fastbp ")
    result = _fastbp("frobnicate")
    assert result.returncode == 2 and "invalid choice" in result.stderr
