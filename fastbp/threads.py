"""One thread policy for the thread pools that meet in a fastbp process.

A fastbp process holds up to four pools: torch's OpenMP pool (which also runs
torch's MKL), numba's pool for ``prange`` loops, and the OpenBLAS pthread
pools that numpy and scipy each bring. Each pool's idle threads spin for a
while before sleeping, so when work alternates between pools they steal the
cores from each other. Measured on 2 cores, a numba kernel whose GEMMs went
through scipy's OpenBLAS, alternating with torch ops, ran 48× slower per step
than the two alone (``benchmarks/thread_policy.py`` reproduces it).

The policy, applied once before the first kernel runs:

1. GEMMs run on torch's own BLAS: the kernels call the ``sgemm_``/``dgemm_``
   that ``libtorch_cpu`` exports (MKL on x86-64 builds), so fastbp's GEMMs and
   torch's share one pool and one thread count, ``torch.get_num_threads()``.
2. Where torch exports no BLAS, the kernels fall back to scipy's OpenBLAS.
   Every OpenBLAS pool in the process (numpy's, scipy's) is limited to one
   thread (threadpoolctl), so that none spins against torch's: plain numpy
   code that alternates with torch ops ran 1.5–2× slower without the limit.
3. numba's pool uses a thread-safe layer (``omp`` or ``tbb``; ``workqueue``
   cannot serve concurrent calls) and at most torch's thread count. The fused
   element-wise passes only wake it above ``kernels.cpu.PARALLEL_MIN_ELEMENTS``.
4. Several ranks on one machine (DistributedDataParallel) split its cores:
   each rank uses at most cores / ranks-on-this-machine threads, torch's and
   numba's alike. The ranks on this machine are ``LOCAL_WORLD_SIZE`` (torchrun
   sets it), else the world size of an initialised process group (the usual
   ``mp.spawn`` on one machine). Without it, 2 ranks on 2 cores each ran 2+2
   threads (``benchmarks/ddp_threads.py`` measures both).

5. Results do not depend on the thread count: at import, fastbp puts torch's
   MKL in its strict conditional-numerical-reproducibility mode (what
   ``MKL_CBWR=AUTO,STRICT`` does), in which a GEMM no longer splits its sum
   across threads; measured at no cost on the workloads' GEMMs. MKL accepts
   this only before its first call in the process: ``import fastbp`` before
   running torch ops (``describe()["blas_reproducible"]`` says whether it took).
   fastbp's own kernels split work by output column, so they are
   thread-count independent anyway.

``FASTBP_THREAD_POLICY=off`` skips all of it (kernels then use scipy's BLAS
with default threads): that is the "before" of the benchmark, not a mode to run in.
"""

from __future__ import annotations

import ctypes
import os
import sys

import numba
import torch
from threadpoolctl import threadpool_limits

from .kernels import cpu

_applied: dict | None = None
MKL_CBWR_AUTO, MKL_CBWR_STRICT = 2, 0x10000  # mkl_service.h


def _policy_on() -> bool:
    return os.environ.get("FASTBP_THREAD_POLICY", "on").lower() not in {"off", "0", "false"}


def _torch_cpu_library() -> str:
    suffix = {"darwin": ".dylib", "win32": ".dll"}.get(sys.platform, ".so")
    prefix = "" if sys.platform == "win32" else "lib"
    return os.path.join(os.path.dirname(torch.__file__), "lib", f"{prefix}torch_cpu{suffix}")


def _request_reproducible_blas() -> str:
    """Put torch's MKL in strict CNR mode; what happened, in words."""
    if "MKL_CBWR" in os.environ:
        return f"as set by MKL_CBWR={os.environ['MKL_CBWR']}"
    try:
        set_mode = ctypes.CDLL(_torch_cpu_library()).mkl_serv_cbwr_set
    except (OSError, AttributeError):
        return "no: torch's BLAS is not MKL"
    status = set_mode(MKL_CBWR_AUTO | MKL_CBWR_STRICT)
    if status != 0:
        return f"no: MKL ran before fastbp was imported (mkl_cbwr_set returned {status})"
    return "yes: MKL strict CNR mode"


BLAS_REPRODUCIBLE = _request_reproducible_blas() if _policy_on() else "no: policy off"


def _bind_gemm() -> str:
    addresses = cpu.gemm_address_from_library(_torch_cpu_library())
    if addresses is not None:
        cpu.bind_gemm("torch-blas", *addresses)
    provider = cpu.gemm_provider()
    # numpy's and scipy's OpenBLAS pools (torch's MKL is linked in, out of reach here)
    threadpool_limits(1, user_api="blas")
    return provider


def _configure_numba(num_threads: int) -> int:
    if numba.config.THREADING_LAYER == "default":
        numba.config.THREADING_LAYER = "threadsafe"
    numba.set_num_threads(min(num_threads, numba.config.NUMBA_NUM_THREADS))
    return numba.get_num_threads()


def cores() -> int:
    """The cores this process may run on (its affinity mask: containers, taskset)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _ranks_on_this_machine() -> int:
    local = os.environ.get("LOCAL_WORLD_SIZE", "")
    if local.isdigit() and int(local) > 0:
        return int(local)
    distributed = torch.distributed
    if distributed.is_available() and distributed.is_initialized():
        return distributed.get_world_size()
    return 1


def _thread_budget(ranks: int) -> int:
    """torch's thread count, capped at each of ``ranks``' share of the cores."""
    threads = torch.get_num_threads()
    if ranks > 1:
        threads = min(threads, max(1, cores() // ranks))
        torch.set_num_threads(threads)
    return threads


def ensure_policy() -> None:
    """Apply the policy if it has not been; cheap enough to call before every launch."""
    if _applied is None:
        apply_policy()


def apply_policy() -> dict:
    """Apply the thread policy now (idempotent) and return what is in force."""
    global _applied
    if not _policy_on():
        _applied = {"policy": "off", "gemm": cpu.gemm_provider()}
        return _applied
    ranks = _ranks_on_this_machine()
    torch_threads = _thread_budget(ranks)
    _applied = {
        "policy": "on",
        "gemm": _bind_gemm(),
        "torch_threads": torch_threads,
        "numba_threads": _configure_numba(torch_threads),
        "ranks_on_this_machine": ranks,
        "blas_reproducible": BLAS_REPRODUCIBLE,
    }
    _applied["numba_threading_layer"] = numba.threading_layer()
    return _applied


def set_num_threads(num_threads: int) -> None:
    """Use ``num_threads`` for torch (and so its BLAS) and numba together."""
    if not isinstance(num_threads, int) or num_threads < 1:
        raise ValueError(f"num_threads must be a positive int, got {num_threads!r}")
    torch.set_num_threads(num_threads)
    ensure_policy()
    if _applied["policy"] == "on":
        _applied["torch_threads"] = num_threads
        _applied["numba_threads"] = _configure_numba(num_threads)


def describe() -> dict:
    """The policy in force, applying it first (for ``fastbp info``)."""
    ensure_policy()
    return dict(_applied)
