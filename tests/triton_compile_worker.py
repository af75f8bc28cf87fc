"""Compile every Triton kernel for an H100 (sm_90) without a GPU, through the real launchers.

Run by test_triton.py in a process of its own: it swaps Triton's active driver
for one that only names the target, and makes each launch compile and return.
Every dtype goes through the fused and the layered path, on networks whose layers
take every activation, at batches that take each block-size rule. Then it checks
that each kernel was compiled for every dtype and activation it can be launched
with, and that ``gpu.py``'s kernels and the launched ones are the same set.

Prints a table row and a machine-readable line (``SM90 {json}``) per compiled
variant: registers, spill bytes (from ptxas's own log; a fresh Triton cache makes it
compile everything), shared memory, and whether a default path takes it. Exits 0,
or raises when a variant on a default path spills: the fused kernels where
``fused=None`` takes them (``gpu.fused_by_default``), and every layered kernel but
float64's, which is there for gradcheck, not speed.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import os
import re
import shutil
import tempfile
import warnings
from collections import defaultdict

# A fresh cache, so that ptxas logs every kernel; set before triton reads it, removed
# when the worker leaves.
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastbp-sm90-")
atexit.register(shutil.rmtree, os.environ["TRITON_CACHE_DIR"], ignore_errors=True)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from fastbp.kernels import activation_table  # noqa: E402

H100 = GPUTarget("cuda", 90, 32)
H100_MULTIPROCESSORS = 132
H100_SHARED_MEMORY = 227 * 1024  # per block, opt-in maximum
FUSED = {"_mlp_forward_kernel": False, "_mlp_backward_kernel": True}  # name: backward

DTYPES = [
    (torch.float32, False),
    (torch.float32, True),  # TF32
    (torch.float16, False),
    (torch.bfloat16, False),
    (torch.float64, False),
]
# (widths, batch, the paths it takes): every activation in every network; the
# fused one at H = 128 and at a batch of one row block and of many; a wide layer
# for the layered path.
NETWORKS = [
    ((784, 128, 64, 32, 10), 64, (True, False)),
    ((1000, 100, 10), 4096, (True,)),
    ((1000, 256, 128, 10), 4096, (False,)),
]
ACTIVATION_ORDERS = [
    ["identity", "relu", "sigmoid", "tanh"],
    ["tanh", "sigmoid"],
    ["sigmoid", "relu", "tanh"],
]
# The activations with parameters or a derivative that reads z run on the layered
# kernels only: one network takes each, compiled for CUDA cores (float32), tensor
# cores (bfloat16) and float64 (its own erf and exp), which keeps the check's time.
READS_Z = ["leaky_relu(negative_slope=0.2)", "gelu", "gelu_tanh", "silu", "softplus", "elu"]
READS_Z_NETWORK = ((96, 64, 48, 40, 32, 24, 16), 64, (False,))
READS_Z_DTYPES = ["float32", "bfloat16", "float64"]


class TargetOnlyDriver:
    """What JITFunction.run asks of a driver before it launches."""

    def get_current_target(self):
        return H100

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def is_active(self):
        return True


def _activations_of(kwargs) -> set[int]:
    """The activation codes a launch compiles for: ACT, or ACTS's ACT_BITS per layer."""
    if "ACT" in kwargs:
        return {kwargs["ACT"]}
    if "ACTS" in kwargs:
        bits = kwargs["ACT_BITS"]
        return {
            (kwargs["ACTS"] >> (bits * layer)) & ((1 << bits) - 1) for layer in range(kwargs["L"])
        }
    return set()


def _resources(log: str) -> tuple[int, int]:
    """(registers, spill bytes stored + loaded) from a ``ptxas -v`` log."""
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert registers and spills, f"no resource usage in ptxas's log:\n{log}"
    return int(registers.group(1)), int(spills.group(1)) + int(spills.group(2))


def main() -> None:
    driver.set_active(TargetOnlyDriver())
    triton.knobs.nvidia.dump_ptxas_log = True  # ptxas -v's log, printed by each compile
    launched = defaultdict(lambda: defaultdict(set))  # kernel -> dtype -> activation codes
    resources = {}
    current = {}

    def compile_only(kernel, grid):
        def launch(*args, **kwargs):
            log = io.StringIO()
            with contextlib.redirect_stdout(log):
                binary = kernel.run(*args, grid=grid, warmup=True, **kwargs)
            name, dtype = kernel.fn.__name__, current["dtype"]
            shared = binary.metadata.shared
            assert shared <= H100_SHARED_MEMORY, f"{name}: {shared} B shared memory"
            launched[name][dtype] |= _activations_of(kwargs)
            if log.getvalue():  # a variant compiled now (not one already compiled)
                # float64 is there for gradcheck, not speed: on no default path
                fused_default = name in FUSED and current["default"][FUSED[name]]
                default = fused_default or (name not in FUSED and dtype != "float64")
                registers, spills = _resources(log.getvalue())
                resources[name, dtype, binary.hash[:8]] = (registers, spills, shared, default)

        return launch

    JITFunction.__getitem__ = compile_only

    from fastbp.kernels import gpu, gpu_step

    warnings.simplefilter("ignore", gpu.SpillWarning)  # the report below says it, per variant

    # CPU tensors stand in for CUDA ones: plan as for an H100, never launch.
    gpu.interpreted = lambda device: False
    gpu.check_device = lambda x: None
    gpu.multiprocessors = lambda device: H100_MULTIPROCESSORS
    for dtype, tf32 in DTYPES:
        current["dtype"] = str(dtype).removeprefix("torch.") + ("+tf32" if tf32 else "")
        networks = list(zip(NETWORKS, ACTIVATION_ORDERS, strict=True))
        if current["dtype"] in READS_Z_DTYPES:
            networks.append((READS_Z_NETWORK, READS_Z))
        for (widths, batch, paths), names in networks:
            x = torch.randn(batch, widths[0], dtype=dtype)
            pairs = zip(widths, widths[1:], strict=False)
            weights = [torch.randn(o, i, dtype=dtype) for i, o in pairs]
            biases = [torch.randn(o, dtype=dtype) for o in widths[1:]]
            activations = (names * len(weights))[: len(weights)]
            current["default"] = {
                backward: gpu.fused_by_default(weights, dtype, tf32, backward)
                for backward in (False, True)
            }
            for fused in paths:
                outputs = gpu.mlp_forward(x, weights, biases, activations, tf32=tf32, fused=fused)
                gpu.mlp_backward(
                    outputs[len(weights) - 1],
                    x,
                    weights,
                    biases,
                    activations,
                    outputs,
                    tf32=tf32,
                    fused=fused,
                )
            if widths == NETWORKS[0][0]:  # one network: the step's kernels take any
                _compile_training_steps(gpu_step, x, weights, biases, activations, tf32)
    _check_coverage((gpu, gpu_step), launched)
    _report(resources)


# (loss, optimizer) of the training steps compiled: every loss and every rule.
STEPS = [("mse", "sgd"), ("cross_entropy", "adam"), ("bce_with_logits", "adamw")]


def _compile_training_steps(gpu_step, x, weights, biases, activations, tf32) -> None:
    """The Triton training step's own kernels (loss gradient, update) for each loss and
    rule, on CPU tensors standing in for the device's."""
    slots = [p for w, b in zip(weights, biases, strict=True) for p in (w, b)]
    for loss, rule in STEPS:
        steps = tuple(torch.zeros(()) for _ in slots)
        state = gpu_step.OptimizerState(
            rule,
            tuple(map(torch.zeros_like, slots)),
            tuple(map(torch.zeros_like, slots)),
            steps,
            torch.zeros(len(slots), gpu_step.HYPER_COLUMNS, dtype=torch.float64),
            torch.zeros(2, dtype=torch.int64),
        )
        classes = weights[-1].shape[0]
        if loss == "cross_entropy":
            y = torch.zeros(x.shape[0], dtype=torch.int64)
        else:
            y = torch.zeros(x.shape[0], classes, dtype=x.dtype)
        gpu_step.train_step(x, y, weights, biases, activations, state, loss, True, tf32=tf32)


def _check_coverage(modules, launched) -> None:
    gpu = modules[0]
    defined = {
        name
        for module in modules
        for name, value in vars(module).items()
        if isinstance(value, JITFunction) and name.endswith("_kernel")
    }
    assert set(launched) == defined, (
        f"kernels in gpu.py and gpu_step.py never launched: "
        f"{sorted(defined - set(launched))}; "
        f"launched but defined in neither: {sorted(set(launched) - defined)}"
    )
    dtypes = {str(d).removeprefix("torch.") + ("+tf32" if t else "") for d, t in DTYPES}
    every = set(range(len(activation_table.TABLE)))
    for name, by_dtype in launched.items():
        assert set(by_dtype) == dtypes, f"{name} compiled for {sorted(by_dtype)} only"
        for dtype, codes in by_dtype.items():
            if not codes:  # a kernel without an activation
                continue
            wanted = set(gpu.FUSED_ACTIVATIONS)
            if name not in FUSED and dtype in READS_Z_DTYPES:
                wanted = every
            assert codes == wanted, f"{name} {dtype}: activations {codes}, not {wanted}"


# Spills a default path is known to have with one Triton, and the most it may: the
# check fails above them. Triton 3.9's ptxas (torch 2.13.0's) keeps an 8-byte stack
# frame in the float32 backward, ∂W and ∂x in one launch, with any register cap
# tried (128, 168, 255) and 4, 8 or 16 warps: 8-48 bytes per thread. 3.8's (torch
# 2.14.1's) spills nothing there at 128. An open finding (README, Registers and spills).
TRITON = ".".join(triton.__version__.split(".")[:2])
KNOWN_SPILLS = {("3.9", "_layer_backward_kernel", "float32"): 64}


def _report(resources) -> None:
    spilled = []
    print(
        "| kernel | dtype | variant | registers | spill bytes | shared bytes | default path |\n"
        "|---|---|---|---:|---:|---:|---|"
    )
    for (name, dtype, variant), (registers, spills, shared, default) in sorted(resources.items()):
        print(
            f"| {name} | {dtype} | {variant} | {registers} | {spills} | {shared} "
            f"| {'yes' if default else 'no'} |"
        )
        if default and spills > KNOWN_SPILLS.get((TRITON, name, dtype), 0):
            spilled.append(f"{name} {dtype} ({variant}): {spills} bytes")
    for (name, dtype, variant), (registers, spills, shared, default) in sorted(resources.items()):
        allowed = KNOWN_SPILLS.get((TRITON, name, dtype), 0) if default else None
        line = dict(kernel=name, dtype=dtype, variant=variant, registers=registers,
                    spill_bytes=spills, shared_bytes=shared, default_path=default,
                    allowed_spill_bytes=allowed)  # fmt: skip
        print("SM90", json.dumps(line))
    kernels = sorted({name for name, _, _ in resources})
    print(f"compiled {len(resources)} variants of {len(kernels)} kernels: {kernels}")
    assert not spilled, "kernels on a default path spill: " + "; ".join(spilled)


if __name__ == "__main__":
    main()
