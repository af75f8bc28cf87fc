"""The thread policy governs fastbp's own calls and changes nothing else in the process."""

from __future__ import annotations

import ctypes
import json
import os
import re
import subprocess
import sys

import numba
import pytest
import torch

import fastbp
from fastbp import threads
from fastbp.kernels import cpu_jit
from fastbp.train import FusedTrainer

from .helpers import run_python

# A user's program: numpy work, then fastbp's forward, backward and a FusedTrainer step,
# then the same numpy work. Prints what the process's settings were before and after.
USER_PROGRAM = """
import json, statistics, time
import numpy as np
from threadpoolctl import threadpool_info

a = np.random.default_rng(0).standard_normal((1000, 1000)).astype(np.float32)

def matmul_seconds():
    samples = []
    for _ in range(7):
        start = time.perf_counter()
        a @ a
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)

def settings(pool_started):
    import numba, torch
    pools = {info["filepath"]: info["num_threads"] for info in threadpool_info()}
    threads = torch.get_num_threads()
    # numba.get_num_threads() starts numba's pool where nothing has, and under its
    # OpenMP layer that sets the shared OpenMP count (1 -> 2 with OMP_NUM_THREADS=1):
    # numba's doing, so before fastbp read only the count the pool will start with.
    numba_threads = numba.get_num_threads() if pool_started else numba.config.NUMBA_NUM_THREADS
    return {"pools": pools, "torch": threads, "numba": numba_threads,
            "layer": numba.config.THREADING_LAYER}

before_seconds = matmul_seconds()
import torch, fastbp, fastbp.train
before = settings(pool_started=False)
model = fastbp.nn.MLP([64, 32, 10])
x, y = torch.randn(16, 64), torch.randint(0, 10, (16,))
torch.nn.functional.cross_entropy(model(x), y).backward()
fastbp.train.FusedTrainer(model, "cross_entropy", lr=0.1).step(x, y)
after = settings(pool_started=True)
after_seconds = matmul_seconds()
print(json.dumps({"before": before, "after": after, "ratio": after_seconds / before_seconds,
                  "changes": fastbp.threads.changes(), "policy": fastbp.threads.describe()}))
"""


def _run(program: str, **environment: str) -> dict:
    result = run_python(program, **environment)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("gemm", ["torch", "scipy"])
def test_fastbp_leaves_the_processs_thread_settings_as_it_found_them(gemm, record_property):
    run = _run(USER_PROGRAM, FASTBP_GEMM=gemm)
    before, after = run["before"], run["after"]
    # pools loaded later (scipy's, torch's OpenMP) are new, not changed
    assert {path: after["pools"][path] for path in before["pools"]} == before["pools"]
    assert (after["torch"], after["numba"], after["layer"]) == (
        before["torch"],
        before["numba"],
        before["layer"],
    )
    assert run["changes"] == {}
    assert run["policy"]["gemm"] == ("torch-blas" if gemm == "torch" else "scipy-openblas")
    # the user's numpy matmul after fastbp's calls against before them: reported, not judged
    record_property("numpy_matmul_after_over_before", round(run["ratio"], 2))
    print(f"numpy matmul after fastbp / before ({gemm} GEMMs): {run['ratio']:.2f}")


def test_each_call_runs_at_torchs_thread_count_and_restores_numbas():
    seen = []

    def kernel():
        seen.append(numba.get_num_threads())
        return "done"

    previous, torch_threads = numba.get_num_threads(), torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert threads.call(kernel) == "done"
        torch.set_num_threads(max(1, min(2, numba.config.NUMBA_NUM_THREADS)))
        numba.set_num_threads(1)
        threads.call(kernel)
        after = numba.get_num_threads()
    finally:
        torch.set_num_threads(torch_threads)
        numba.set_num_threads(previous)
    assert seen == [1, max(1, min(2, numba.config.NUMBA_NUM_THREADS))]
    assert after == 1


def _some_pass_splits(widths, activation, batch) -> bool:
    """Whether a forward or backward of a one-hidden-layer net splits an element-wise
    pass, by the rules ``cpu_jit`` states: δ from PARALLEL_MIN_ELEMENTS, an activation
    from PARALLEL_MIN_ELEMENTS (cheap) or _COSTLY, or after a GEMM on the BLAS's threads
    (above HELD_GEMM_PRODUCTS) from PARALLEL_MIN_AFTER_BLAS."""
    inputs, hidden, _ = widths
    cheap = cpu_jit._CODES["activation"][activation] in cpu_jit.CHEAP_CODES
    elements = batch * hidden
    if elements >= cpu_jit.PARALLEL_MIN_ELEMENTS or activation == "identity":
        return elements >= cpu_jit.PARALLEL_MIN_ELEMENTS
    if not cheap and elements >= cpu_jit.PARALLEL_MIN_ELEMENTS_COSTLY:
        return True
    on_blas_threads = batch * inputs * hidden >= cpu_jit.HELD_GEMM_PRODUCTS[1]
    return on_blas_threads and elements >= cpu_jit.PARALLEL_MIN_AFTER_BLAS[0 if cheap else 1]


@pytest.mark.parametrize("inputs", [3, 784])
@pytest.mark.parametrize(
    "activation", ["identity", "relu", "leaky_relu", "sigmoid", "tanh", "gelu"]
)
def test_a_call_reaches_numbas_pool_wherever_one_of_its_passes_splits(activation, inputs):
    """The policy sets numba's thread count only for calls that reach its pool
    (``Network.parallel``): every pass that splits must count, those of activations
    that cost more than a compare and those after a GEMM on the BLAS's threads too."""
    import numpy as np

    from fastbp.kernels import cpu

    widths = (inputs, 256, 2)
    network = cpu.Network(
        [np.ones((256, inputs)), np.ones((2, 256))], [None, None], [activation, "identity"]
    )
    for batch in [1, 2, 3, 15, 16, 17, 63, 64, 65, 127, 128, 255, 256, 682, 683, 1024]:
        assert network.parallel(batch) == _some_pass_splits(widths, activation, batch), batch


def test_a_failing_call_still_restores_numbas_thread_count():
    previous = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        with pytest.raises(ValueError, match="on purpose"):
            threads.call(lambda: (_ for _ in ()).throw(ValueError("on purpose")))
        assert numba.get_num_threads() == 1
    finally:
        numba.set_num_threads(previous)


def test_reproducible_blas_is_opt_in_and_listed_as_a_change():
    program = (
        "import json, fastbp\n"
        "untouched = fastbp.threads.changes()\n"
        "fastbp.threads.use_reproducible_blas()\n"
        "print(json.dumps([untouched, fastbp.threads.changes()]))\n"
    )
    result = run_python(program)
    if "needs torch's BLAS to be MKL" in result.stderr:
        pytest.skip("torch's BLAS is not MKL on this machine")
    assert result.returncode == 0, result.stderr[-3000:]
    untouched, changed = json.loads(result.stdout)
    assert untouched == {}
    ((name, (before, after)),) = changed.items()
    assert "reproducibility" in name and "strict" in after and "strict" not in before


def test_reproducible_blas_refuses_once_mkl_has_run():
    program = (
        "import torch, fastbp\n"
        "torch.randn(64, 64) @ torch.randn(64, 64)\n"
        "fastbp.threads.use_reproducible_blas()\n"
    )
    result = run_python(program)
    if "needs torch's BLAS to be MKL" in result.stderr:
        pytest.skip("torch's BLAS is not MKL on this machine")
    assert result.returncode != 0
    assert "already run in this process" in result.stderr


def test_an_unknown_gemm_choice_is_refused():
    program = "import torch, fastbp\nfastbp.nn.MLP([2, 2])(torch.ones(1, 2))\n"
    result = run_python(program, FASTBP_GEMM="blis")
    assert result.returncode != 0
    assert "FASTBP_GEMM must be one of ('torch', 'scipy'), got 'blis'" in result.stderr


def test_ranks_sharing_too_few_cores_get_a_warning():
    program = (
        "import warnings, torch, fastbp\n"
        "torch.set_num_threads(2)\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    fastbp.nn.MLP([2, 2])(torch.ones(1, 2))\n"
        "print(*[str(w.message) for w in caught], sep='\\n')\n"
    )
    ranks = 2 * threads.cores()  # so that 2 threads each are more than the cores
    result = run_python(program, LOCAL_WORLD_SIZE=str(ranks))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{ranks} ranks on this machine each run 2 threads" in result.stdout
    assert "OMP_NUM_THREADS=1" in result.stdout


def test_info_lists_the_settings_fastbp_changed():
    assert fastbp.threads.describe()["policy"] == "on"
    result = subprocess.run(
        [sys.executable, "-m", "fastbp.cli", "info"], capture_output=True, text=True, check=True
    )
    assert re.search(r"process settings changed +none", result.stdout), result.stdout


def test_scipys_openblas_runs_one_thread_inside_a_call_and_its_count_outside():
    program = """
import json, fastbp
from threadpoolctl import threadpool_info
policy = fastbp.threads.describe()
held = set(policy["openblas_held_in_calls"])
counts = lambda: {i["filepath"]: i["num_threads"] for i in threadpool_info()
                  if i["filepath"].rsplit("/", 1)[-1] in held}
outside = counts()
inside = fastbp.threads.call(counts, parallel=False)
print(json.dumps([policy["gemm"], outside, inside, counts()]))
"""
    gemm, outside, inside, after = _run(program, FASTBP_GEMM="scipy")
    assert gemm == "scipy-openblas"
    assert outside and set(inside.values()) == {1}
    assert after == outside


def test_starting_numbas_pool_leaves_torchs_thread_count_alone():
    # numba's omp layer sets the OpenMP thread count as its pool starts, and torch
    # reads its count from OpenMP: a user's 1 thread became all of them
    program = (
        "import json, torch, fastbp\n"
        "torch.set_num_threads(1)\n"
        "model = fastbp.nn.MLP([8, 4])\n"
        "before = torch.get_num_threads()\n"
        "model(torch.ones(3, 8)).sum().backward()\n"
        "print(json.dumps([before, torch.get_num_threads()]))\n"
    )
    assert _run(program) == [1, 1]


def test_kernel_tasks_give_the_calling_thread_its_mkl_count_back():
    """Each member-parallel task, each task of a GEMM a training step splits, and each
    small GEMM holds its thread's MKL count at one and gives it back after (a step
    that splits holds the calling thread's throughout): the calling thread keeps the
    thread-local count it had."""
    threads.ensure_policy()
    address = cpu_jit.blas_threads_address()
    if address == 0:
        pytest.skip("torch's BLAS exports no MKL_Set_Num_Threads_Local: it is not MKL here")
    set_local = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)(address)
    model = fastbp.nn.MLPEnsemble(5, [8, 16, 2])
    x, y = torch.randn(64, 8), torch.randn(64, 2)
    before = set_local(3)
    try:
        model(x).sum().backward()
        FusedTrainer(model, "mse", lr=0.1).step(x, y)
        small = fastbp.nn.MLP([8, 64, 64, 2], activation="tanh")  # every GEMM small
        small(x).sum().backward()
        FusedTrainer(small, "mse", lr=0.1).step(x, y)
        network = fastbp.nn.MLP([300, 257, 3])
        trainer = FusedTrainer(network, "mse", optimizer="adam")
        trainer.step(torch.randn(64, 300), torch.randn(64, 3))
    finally:
        held = set_local(before)
    assert trainer._kernel[1].network.splits(64)
    assert held == 3


STEP_IN_BLOCKS = """
import json, numba, torch, fastbp
from fastbp.train import FusedTrainer
torch.manual_seed(0)
model = fastbp.nn.MLP([784, 256, 128, 10], "gelu")
x, y = torch.randn(1024, 784), torch.randint(0, 10, (1024,))
trainer = FusedTrainer(model, "cross_entropy", lr=0.01, momentum=0.9)
losses = [float(trainer.step(x, y)) for _ in range(2)]
print(json.dumps({"layer": numba.threading_layer(), "tasks": trainer._kernel[1]._tasks(1024),
                  "losses": losses}))
"""


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 cores: one task a core")
@pytest.mark.parametrize("layer", ["workqueue", None])
def test_a_step_in_blocks_of_rows_runs_under_every_threading_layer(layer):
    """Each task's blocks run their passes on its own thread: a parallel pass inside a
    task would nest parallel regions, which the workqueue layer aborts on (None: the
    layer numba picks)."""
    chosen = {} if layer is None else {"NUMBA_THREADING_LAYER": layer}
    unset = ("NUMBA_THREADING_LAYER", "NUMBA_NUM_THREADS")  # numba's pool: a thread a core
    run = _run(STEP_IN_BLOCKS, unset=unset, OMP_NUM_THREADS="2", **chosen)
    assert run["tasks"] == 2
    assert layer in (None, run["layer"])
    assert run["losses"][1] < run["losses"][0]
