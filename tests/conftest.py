"""pytest's hooks and fixtures for the suite: Triton's interpreter without a GPU, --run-slow,
the sm_90 compile worker, and torch at its limits. Helpers are in ``helpers.py``."""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch

import fastbp

# Without a GPU, the Triton kernels run on CPU tensors in Triton's interpreter,
# which is chosen when triton is first imported: set it before anything does.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from .helpers import SM90_TEST, sm90_compile  # noqa: E402 (after TRITON_INTERPRET)


def pytest_sessionstart(session):
    # Tests that call fastbp.kernels directly run on the GEMM users get (torch's
    # BLAS), not scipy's fallback.
    fastbp.threads.ensure_policy()


def pytest_addoption(parser):
    parser.addoption(
        "--run-slow", action="store_true", help="also run long property runs (marker 'slow')"
    )


@pytest.hookimpl(trylast=True)  # after -k and -m have deselected what they deselect
def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available() and any(item.name == SM90_TEST for item in items):
        sm90_compile(config)  # started now, so that it overlaps the rest of the suite
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="long run: opt in with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def pytest_sessionfinish(session):
    worker = getattr(session.config, "_fastbp_sm90", None)
    if worker is None:
        return
    if worker.process.poll() is None:  # its test did not run
        worker.process.kill()
        worker.process.wait()
    worker.output.close()


# Special values where torch disagrees with itself, so that no test depends on which torch
# (or which CPU) it runs on; fastbp gives the limit there (README, "Special values",
# from tools/special_values.py). The one case seen: float32 GELU at +inf is NaN in
# torch's vectorized CPU loop and +inf in its scalar path (2.13.0 and 2.14.1 on an
# Intel Xeon with AVX-512, 2.14.1 on an AMD EPYC), +inf throughout in 2.13.0 on an AMD
# EPYC. torch's δ there is NaN in every version and path, and so is fastbp's.
def _gelu_at_the_limit(z: torch.Tensor) -> torch.Tensor:
    return torch.where(z == math.inf, z, torch.nn.functional.gelu(z))


@pytest.fixture
def torch_at_the_limits(monkeypatch):
    """The torch backend and ``activations.get(...).function`` give the limit where torch
    disagrees with itself (above); torch's own value everywhere else."""
    gelu = fastbp.activations.IN_TORCH["gelu"]
    monkeypatch.setitem(
        fastbp.activations.IN_TORCH, "gelu", dataclasses.replace(gelu, function=_gelu_at_the_limit)
    )
