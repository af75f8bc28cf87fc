"""Under load: concurrent calls from Python threads, memory over long runs,
and numerical extremes beside torch."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest
import torch

import fastbp
from fastbp.train import FusedTrainer


def _prepare(seed: int):
    """A seeded model and batch, built in the calling thread (torch's RNG is global);
    512 x 200 outputs wake numba's parallel passes."""
    torch.manual_seed(seed)
    return fastbp.nn.MLP([300, 200, 100, 10]), torch.randn(512, 300), torch.randint(0, 10, (512,))


def _job(kind: str, model, x, y):
    """20 calls of ``kind`` on ``model``; returns everything it computed."""
    if kind == "inference":
        with torch.no_grad():
            return [model(x) for _ in range(20)]
    if kind == "autograd":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        for _ in range(20):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    else:
        trainer = FusedTrainer(model, "cross_entropy", lr=0.05, momentum=0.9)
        for _ in range(20):
            trainer.step(x, y)
    return [p.detach().clone() for p in model.parameters()]


JOBS = [("inference", 0), ("autograd", 1), ("fused", 2), ("autograd", 3)]


def test_four_threads_at_once_compute_what_serial_calls_compute():
    serial = [_job(kind, *_prepare(seed)) for kind, seed in JOBS]
    prepared = [_prepare(seed) for _, seed in JOBS]
    concurrent, errors = [None] * len(JOBS), []
    start = threading.Barrier(len(JOBS))

    def run(index, kind):
        try:
            start.wait()
            concurrent[index] = _job(kind, *prepared[index])
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i, kind)) for i, (kind, _) in enumerate(JOBS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    assert not any(thread.is_alive() for thread in threads), "a thread hangs"
    policy = fastbp.threads.describe()  # workqueue cannot run two kernels at once
    assert policy["numba_threading_layer"] in ("omp", "tbb") or policy["serialized"]
    for (kind, _), ours, theirs in zip(JOBS, concurrent, serial, strict=True):
        for mine, reference in zip(ours, theirs, strict=True):
            assert torch.equal(mine, reference), kind


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads RSS from Linux's /proc")
@pytest.mark.parametrize("path", ["autograd", "fused"])
def test_ten_thousand_steps_keep_memory_flat(path):
    torch.manual_seed(0)
    model = fastbp.nn.MLP([64, 32, 10])
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    if path == "fused":
        trainer = FusedTrainer(model, "cross_entropy", lr=0.01, momentum=0.9)
        step = lambda: trainer.step(x, y)  # noqa: E731
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step():
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()

    rss = {}
    for number in range(1, 10_001):
        step()
        if number in (1_000, 10_000):
            rss[number] = _rss_bytes()
    growth = rss[10_000] - rss[1_000]
    mib = {number: f"{value / 2**20:.1f} MiB" for number, value in rss.items()}
    print(f"{path}: RSS {mib[1_000]} at step 1000, {mib[10_000]} at step 10000")
    # a leak of one 32x10 float tensor per step would be 12 MiB over these 9 000 steps
    assert growth < 4 * 2**20, rss


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu"])
@pytest.mark.parametrize("magnitude", [1e-30, 1e-3, 1e3, 1e30])
def test_extreme_magnitudes_behave_as_in_torch(activation, magnitude):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(7, 5, generator=generator) * magnitude
    weights = [torch.randn(6, 5, generator=generator), torch.randn(3, 6, generator=generator)]
    biases = [torch.randn(6, generator=generator), None]
    activations = [activation, activation]

    def run(backend):
        leaves = [t.clone().requires_grad_() for t in (x, *weights)]
        out = fastbp.functional.mlp(leaves[0], leaves[1:], biases, activations, backend=backend)
        out.square().sum().backward()
        return [out.detach(), *(t.grad for t in leaves)]

    for mine, reference in zip(run("numba"), run("torch"), strict=True):
        assert torch.equal(mine.isfinite(), reference.isfinite())
        torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-6, equal_nan=True)


def test_zero_size_batch_works_as_in_torch():
    model = fastbp.nn.MLP([4, 3, 2])
    x = torch.randn(0, 4, requires_grad=True)
    output = model(x)
    output.sum().backward()
    assert output.shape == (0, 2) and x.grad.shape == (0, 4)
    assert torch.equal(model.linears[0].weight.grad, torch.zeros(3, 4))
