"""One thread policy for the thread pools that meet in fastbp's calls, and nothing beyond them.

A process running fastbp holds up to four pools: torch's OpenMP pool (which also
runs torch's MKL), numba's pool for ``prange`` loops, and the OpenBLAS pools
that numpy and scipy each bring. Under numba's omp threading layer its pool is
torch's: numba's ``omppool`` binds ``GOMP_parallel`` and the ``omp_*`` calls to the
libgomp that torch loaded into the global scope (``LD_DEBUG=bindings`` shows it; a
thread listing shows one libgomp worker), though the pool's nesting levels are then
numba's (it enables nested regions). Each pool's idle threads spin for a while
before sleeping, so when work alternates between pools they steal the cores
from each other. Measured on 2 cores, a numba kernel whose GEMMs went through
scipy's OpenBLAS, alternating with torch ops, ran 48× slower per step than the
two alone (``python -m benchmarks.thread_policy`` reproduces it).

The policy governs fastbp's own calls (``call``) and changes no setting of the
process, so the user's numpy, scipy and torch code runs as it would without fastbp:

1. GEMMs run on torch's own BLAS: the kernels call the ``sgemm_``/``dgemm_``
   that ``libtorch_cpu`` exports (MKL on x86-64 builds), so fastbp's GEMMs and
   torch's share one pool and one thread count, ``torch.get_num_threads()``. A
   training step, which runs whole in one call, holds MKL at one thread instead
   and splits its large GEMMs among numba's threads (``cpu_jit._gemm_split``):
   a step kernel that alternated MKL's threaded GEMMs with numba's parallel
   passes lost most of what MKL's second thread gains (see ``cpu_jit``). In any
   kernel, small GEMMs run on one MKL thread (``cpu_jit._gemm_small_held``).
2. Where torch exports no BLAS (or ``FASTBP_GEMM=scipy`` asks for it), the
   kernels call scipy's OpenBLAS, whose pools are held at one thread during
   each fastbp call and given back their count after it: a multi-threaded
   OpenBLAS GEMM leaves threads spinning against torch's next op.
3. numba's pool runs fastbp's element-wise passes with torch's thread count,
   set for the calling thread during each call and restored after it (numba
   keeps one count per thread; setting and restoring costs about 1 µs).
4. The threading layer is numba's choice (``NUMBA_THREADING_LAYER``, default
   tbb, else omp, else workqueue). ``workqueue`` cannot run two parallel
   kernels at once, so under it fastbp runs one kernel call at a time.
5. The thread count is the user's, as in torch: ``OMP_NUM_THREADS`` or
   ``torch.set_num_threads``. Several ranks on one machine (DDP) each need
   cores / ranks threads; torchrun sets ``OMP_NUM_THREADS=1`` for that, and
   fastbp warns (once) when the ranks' threads add up to more than the cores.
6. Bit-identical results across thread counts are opt-in, as torch's
   ``use_deterministic_algorithms``: ``use_reproducible_blas()`` (or the
   user's ``MKL_CBWR=AUTO,STRICT``) puts torch's MKL in strict conditional
   numerical reproducibility, in which a GEMM never splits its sum across
   threads. fastbp's element-wise kernels split work by output column, so they
   are thread-count independent anyway, but for two choices made only outside
   this mode: a training step splits its GEMMs among as many tasks as threads
   (``cpu.Network.splits``), and an ensemble whose members do not divide evenly
   among the threads runs each member in blocks of rows, as many as the thread
   count asks, summing a step's ∂W over them (``cpu.Ensemble.row_blocks``); in
   this mode GEMMs and members run whole.

``changes()`` lists every process-wide setting fastbp changed (only those the
user asked for); ``describe()`` what is in force (``fastbp info`` prints both).
``FASTBP_THREAD_POLICY=off`` runs the kernels on scipy's OpenBLAS with every
pool left alone: the "before" of the benchmark, not a mode to run in.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import warnings

import numba
import torch
from threadpoolctl import ThreadpoolController

from .kernels import cpu_jit
from .kernels.utils import check_choice

GEMMS = ("torch", "scipy")  # FASTBP_GEMM's values
MKL_CBWR_AUTO, MKL_CBWR_STRICT, MKL_CBWR_ALL = 2, 0x10000, -1  # mkl_service.h
THREAD_SAFE_LAYERS = ("tbb", "omp")

_policy: _Policy | None = None
_changes: dict[str, tuple[str, str]] = {}


def cores() -> int:
    """The cores this process may run on (its affinity mask: containers, taskset)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _policy_on() -> bool:
    return os.environ.get("FASTBP_THREAD_POLICY", "on").lower() not in {"off", "0", "false"}


def _requested_gemm() -> str:
    gemm = os.environ.get("FASTBP_GEMM", "torch").lower()
    return check_choice("FASTBP_GEMM", gemm, GEMMS)


def _torch_cpu_library() -> str:
    suffix = {"darwin": ".dylib", "win32": ".dll"}.get(sys.platform, ".so")
    prefix = "" if sys.platform == "win32" else "lib"
    return os.path.join(os.path.dirname(torch.__file__), "lib", f"{prefix}torch_cpu{suffix}")


def _bind_gemm(requested: str) -> str:
    """Bind the kernels' GEMM to torch's BLAS where it exports one; the provider."""
    addresses = cpu_jit.gemm_address_from_library(_torch_cpu_library())
    if requested == "torch" and addresses is not None:
        cpu_jit.bind_gemm("torch-blas", *addresses)
    return cpu_jit.gemm_provider()


def _start_numba_pool() -> str:
    """Start numba's pool without touching torch's thread count; the threading layer.

    numba's omp layer sets the OpenMP thread count of the calling thread to all its
    threads as its pool starts, and torch reads its own count from OpenMP: a user's
    ``torch.set_num_threads(1)`` became 2 at fastbp's first call until this restored it.
    """
    torch_threads = torch.get_num_threads()
    layer = cpu_jit.start_thread_pool()
    if torch.get_num_threads() != torch_threads:
        torch.set_num_threads(torch_threads)
    return layer


def _ranks_on_this_machine() -> int:
    local = os.environ.get("LOCAL_WORLD_SIZE", "")
    if local.isdigit() and int(local) > 0:
        return int(local)
    distributed = torch.distributed
    if distributed.is_available() and distributed.is_initialized():
        return distributed.get_world_size()
    return 1


def _warn_if_oversubscribed(ranks: int) -> None:
    threads = torch.get_num_threads()
    if ranks > 1 and ranks * threads > cores():
        warnings.warn(
            f"{ranks} ranks on this machine each run {threads} threads on {cores()} cores: "
            f"they slow each other down. Set OMP_NUM_THREADS={max(1, cores() // ranks)} "
            "(torchrun sets 1) or call torch.set_num_threads in each rank; fastbp follows "
            "torch's thread count",
            RuntimeWarning,
            stacklevel=2,
        )


class _Policy:
    """What ``call`` does around each kernel call, settled once per process."""

    def __init__(self) -> None:
        self.on = _policy_on()
        self.gemm = _bind_gemm(_requested_gemm()) if self.on else cpu_jit.gemm_provider()
        self.layer = _start_numba_pool()
        self.get_threads, self.set_threads = cpu_jit.thread_count_functions()
        self.most_threads = numba.config.NUMBA_NUM_THREADS
        # workqueue aborts the process on two concurrent parallel launches
        self.lock = None if self.layer in THREAD_SAFE_LAYERS else threading.Lock()
        self.openblas = self._openblas() if self.on and self.gemm != "torch-blas" else []
        self.ranks = _ranks_on_this_machine()
        if self.on:
            _warn_if_oversubscribed(self.ranks)

    @staticmethod
    def _openblas() -> list:
        """The pools of the BLAS that serves the kernels' GEMMs: scipy's own (a wheel
        bundles it beside the package), else every non-MKL BLAS loaded (a shared one)."""
        import scipy

        blas = [lib for lib in ThreadpoolController().lib_controllers if lib.user_api == "blas"]
        blas = [lib for lib in blas if lib.internal_api != "mkl"]
        scipys = [lib for lib in blas if lib.filepath.startswith(os.path.dirname(scipy.__file__))]
        return scipys or blas

    def run(self, kernel, args, parallel: bool):
        if not self.on or not (parallel or self.openblas):
            return kernel(*args)
        threads = min(torch.get_num_threads(), self.most_threads)
        previous = self.get_threads()
        if previous != threads:
            self.set_threads(threads)
        held = self._hold_openblas() if self.openblas else ()
        try:
            if self.lock is None:
                return kernel(*args)
            with self.lock:
                return kernel(*args)
        finally:
            for lib, count in held:
                lib.set_num_threads(count)
            if previous != threads:
                self.set_threads(previous)

    def _hold_openblas(self) -> list:
        """Hold the GEMMs' OpenBLAS pools at 1 thread; ``(pool, its count)`` to restore."""
        held = [(lib, lib.num_threads) for lib in self.openblas]
        for lib, count in held:
            if count != 1:
                lib.set_num_threads(1)
        return held


def ensure_policy() -> _Policy:
    """Settle the policy if it has not been (binds the GEMM, starts numba's pool)."""
    global _policy
    if _policy is None:
        _policy = _Policy()
    return _policy


def call(kernel, *args, parallel: bool = True):
    """``kernel(*args)``, a CPU kernel call of fastbp's, under the policy: numba at
    torch's thread count, OpenBLAS held at one thread where it serves the GEMMs, one
    call at a time under numba's workqueue layer; every count restored after.

    ``parallel=False`` says the call never reaches numba's pool
    (``cpu.Network.parallel``): numba's count then does not matter and is left as is,
    which saves about 1.5 µs."""
    return (_policy or ensure_policy()).run(kernel, args, parallel)


def _mkl_service(name: str):
    try:
        return getattr(ctypes.CDLL(_torch_cpu_library()), name)
    except (OSError, AttributeError):
        return None


def _cbwr_mode() -> str:
    get_mode = _mkl_service("mkl_serv_cbwr_get")
    if get_mode is None:
        return "no MKL in torch"
    mode = get_mode(MKL_CBWR_ALL)
    strict = " strict" if mode & MKL_CBWR_STRICT else ""
    return f"{mode & ~MKL_CBWR_STRICT:#x}{strict}"


def reproducible() -> bool:
    """Whether torch's MKL is in strict conditional numerical reproducibility
    (``use_reproducible_blas`` or ``MKL_CBWR=...,STRICT``): then fastbp also keeps its
    own results out of the thread count's reach (a step's split GEMMs, an ensemble's
    blocks of rows)."""
    get_mode = _mkl_service("mkl_serv_cbwr_get")
    return get_mode is not None and bool(get_mode(MKL_CBWR_ALL) & MKL_CBWR_STRICT)


def use_reproducible_blas() -> None:
    """Put torch's MKL in strict conditional numerical reproducibility (what
    ``MKL_CBWR=AUTO,STRICT`` does): results then do not depend on the thread count,
    for fastbp and for torch's own CPU matmuls alike, in the whole process.

    MKL accepts this only before its first call in the process: call it right after
    ``import fastbp``, before any torch op. Raises ``RuntimeError`` when it cannot
    take effect (torch's BLAS is not MKL, or MKL has already run).
    """
    set_mode = _mkl_service("mkl_serv_cbwr_set")
    if set_mode is None:
        raise RuntimeError("use_reproducible_blas needs torch's BLAS to be MKL; it is not here")
    before = _cbwr_mode()
    status = set_mode(MKL_CBWR_AUTO | MKL_CBWR_STRICT)
    if status != 0:
        raise RuntimeError(
            f"MKL refused strict reproducibility (mkl_cbwr_set returned {status}): it has "
            "already run in this process. Call use_reproducible_blas() before any torch "
            "op, or start Python with MKL_CBWR=AUTO,STRICT"
        )
    _changes["MKL conditional numerical reproducibility"] = (before, _cbwr_mode())


def changes() -> dict[str, tuple[str, str]]:
    """Every process-wide setting fastbp has changed: ``{name: (before, after)}``. Only
    ``use_reproducible_blas`` changes one, when the user calls it."""
    return dict(_changes)


def describe() -> dict:
    """The policy in force, settling it first (for ``fastbp info`` and benchmark records)."""
    policy = ensure_policy()
    if not policy.on:
        return {"policy": "off", "gemm": policy.gemm}
    cbwr = os.environ.get("MKL_CBWR")
    return {
        "policy": "on",
        "gemm": policy.gemm,
        "threads": min(torch.get_num_threads(), policy.most_threads),
        "numba_threading_layer": policy.layer,
        "serialized": policy.lock is not None,
        "openblas_held_in_calls": [os.path.basename(lib.filepath) for lib in policy.openblas],
        "ranks_on_this_machine": policy.ranks,
        "mkl_reproducibility": f"MKL_CBWR={cbwr}" if cbwr else _cbwr_mode(),
    }
