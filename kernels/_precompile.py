"""Compile a compiled graph's Triton kernels in worker processes, before its first run.

A graph's first run compiles each of its Triton kernels at its first launch, one after the
other (a few tenths of a second each; Triton's compile holds the GIL, so threads do not help).
Inductor compiles in worker processes; so does this module, in three steps:

1. record (``flag_gems.graph_precompile.collect``, the graph side): each node of the final graph
   that may launch our kernels (a ``torch.ops.flag_gems`` op, a registry implementation, a
   generated pointwise launcher) runs its Python implementation on fake tensors laid out as its
   inputs' ``meta["val"]``, under :func:`recording_launches` (this module): each launch becomes a
   :class:`LaunchRecord` (kernel, dtype and alignment of each tensor, the other arguments,
   constexprs, launch options) instead of a compile and a launch;
2. compile (:func:`compile_records`): the records this process has not compiled yet go to
   forked worker processes, which run ``JITFunction.run(..., warmup=True)`` on mock tensors of
   the recorded dtypes and alignments, for the parent's GPU target, and so write Triton's
   on-disk cache (the parent's cache folder: a forked worker has its settings). Each worker
   then builds the kernel's launcher the same way (:func:`_build_launcher`): Triton up to 3.6
   compiles a C module per kernel signature with the host compiler at a kernel's first launch,
   0.18-0.24 s each on the H200 machine (``benchmarks/launcher_probe.py``), which a cold
   graph's first run otherwise pays one after the other;
3. the first run goes through Triton's JIT as always and finds each kernel in that cache.

What runs is unchanged: the first run's JIT keys each kernel as always; a record that was not
right only costs its worker's time. A node that cannot be recorded (symbolic sizes,
data-dependent code, an op without a Python implementation) and a job that fails or times out
are skipped (DEBUG log): the first run compiles those kernels itself.

A process's first Triton compile costs about a second more than the next ones (imports, compiler
set-up; 1.17 s against 0.04 s on the H200 machine, ``benchmarks/launcher_probe.py``), and a worker
forked from a parent that never compiled pays it again, in each worker. :func:`warm_compiler` has
the parent pay it once, in a background thread, while the backend traces the graph (the compile
spends most of that time outside the GIL); :func:`compile_records` waits for that thread before
forking, so no worker is forked in the middle of a compile.

Why fork (``os.fork``: no interpreter to start, and allowed in daemonic processes too): a forked
worker starts in milliseconds with torch, Triton and every kernel imported, the generated
pointwise kernels included (built from source in this process; the worker has the same objects,
so the same Triton cache keys). Workers are forked per graph, after recording (a kernel generated
later would be missing from an older worker), and exit when done. Nothing in a worker touches
CUDA, which a forked child of a CUDA process must not: Triton's current device, stream and target
are answered from the parent's values (:func:`_offline_driver`), and ``warmup`` compiles without
loading the kernel; the worker leaves through ``os._exit`` (no exit handlers of the parent's).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import logging
import os
import signal
import threading
import time
import warnings
from multiprocessing import connection
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import warn_once
from ._launch import FastKernel, compiled_kernel, recorded_launches

logger = logging.getLogger(__name__)

__all__ = [
    "LaunchRecord",
    "PrecompileResult",
    "TensorArg",
    "compile_records",
    "join_warm",
    "precompiled",
    "recording_launches",
    "warm_compiler",
]

TIMEOUT_S = 30.0  # the most one graph's precompile waits for its workers (one compile takes 0.2-3 s)
# Forking copies the parent's page tables: a process holding tens of GB of CPU memory forks in a good
# fraction of a second. No more workers are forked once the forks took this long (their jobs are left
# to the first run).
FORK_BUDGET_S = 1.0
MAX_WORKERS = 16
MIN_JOBS = 2  # one kernel compiles as fast at the first run as in a worker the parent waits for

# (kernel, device, key) compiled by a worker of this process: on disk, a later graph's collect skips them.
# (Triton's own in-memory cache, which the C++ runtime's launches fill, is keyed by Triton internals that
# change between versions: a launch compiled only there goes to a worker again, which finds it on disk.)
_PRECOMPILED: set = set()


class TensorArg(NamedTuple):
    """A tensor argument as Triton specializes it: dtype and 16-byte alignment."""

    dtype: torch.dtype
    aligned: bool


@dataclasses.dataclass(frozen=True, eq=False)
class LaunchRecord:
    """One recorded launch: what a worker needs to compile the kernel the launch would compile.

    Attributes:
        kernel: the :class:`~flag_gems.kernels._launch.FastKernel`.
        device: the CUDA device index of the launch's tensors.
        key: the specialization key (``FastKernel``'s, alignment from the storage offset).
        args: every parameter's value in order; tensors as :class:`TensorArg`.
        options: launch options (``num_warps``...) as sorted ``(name, value)`` pairs.
    """

    kernel: FastKernel
    device: int
    key: tuple
    args: tuple
    options: tuple

    @property
    def name(self) -> str:
        return _kernel_name(self.kernel)

    def warmup(self):
        """Compile this launch's kernel as Triton's JIT would for it (into Triton's caches),
        without launching. Needs Triton's active driver (a worker's :func:`_offline_driver`)."""
        from triton.runtime.jit import MockTensor

        args = [_mock(a, MockTensor) for a in self.args]
        return self.kernel.fn.run(*args, grid=(1,), warmup=True, **dict(self.options))


def _kernel_name(kernel) -> str:
    fn = getattr(kernel, "fn", kernel)
    return getattr(getattr(fn, "fn", fn), "__name__", repr(kernel))


def _mock(arg, mock_cls):
    """A recorded argument as ``warmup`` takes it: tensors as Triton's MockTensor (address 0:
    aligned), or one at address 8 for an unaligned tensor."""
    if not isinstance(arg, TensorArg):
        return arg
    if arg.aligned:
        return mock_cls(arg.dtype)

    class _Unaligned(mock_cls):
        @staticmethod
        def data_ptr():
            return 8

    return _Unaligned(arg.dtype)


# --------------------------------------------------------------------------- record


@contextlib.contextmanager
def recording_launches(into: list | None = None):
    """Inside, launches of our ``@jit`` kernels on this thread are recorded, not compiled or launched.

    Args:
        into: the list to append :class:`LaunchRecord` s to (a new one when None).

    Yields:
        The list of records, in launch order (duplicates kept).
    """
    records = [] if into is None else into

    def recorder(kernel, values, key):
        device = next((v.device.index for v in values if isinstance(v, torch.Tensor)), None)
        args = tuple(TensorArg(*key[i]) if isinstance(v, torch.Tensor) else v for i, v in enumerate(values))
        records.append(LaunchRecord(kernel, device or 0, key, args, key[-1]))

    with recorded_launches(recorder):
        yield records


# --------------------------------------------------------------------------- compile


@dataclasses.dataclass
class PrecompileResult:
    """What one precompile did.

    Attributes:
        jobs: records sent to workers; compiled: jobs a worker finished (``cache_hits`` of them
            were in Triton's disk cache already); failed: jobs that raised, died with their
            worker or were still running at the timeout; workers: processes forked;
        seconds: wall time of the compile step; errors: the first few failures, one line each;
        nodes, skipped_nodes, launches: from ``flag_gems.graph_precompile.collect`` (0 when it did not run).
    """

    jobs: int = 0
    compiled: int = 0
    cache_hits: int = 0
    failed: int = 0
    workers: int = 0
    seconds: float = 0.0
    errors: list = dataclasses.field(default_factory=list)
    nodes: int = 0
    skipped_nodes: int = 0
    launches: int = 0

    def note(self, kind: str = "graph") -> str:
        """One line for the graph's report."""
        if not self.workers:
            return (f"precompile ({kind} graph): {self.jobs} Triton kernel(s) to compile, left to the first run"
                    f" ({self.launches} launches recorded from {self.nodes} nodes, {self.skipped_nodes} skipped)")
        extra = [f"{self.cache_hits} already in Triton's cache"] if self.cache_hits else []
        extra += [f"{self.failed} failed or timed out"] if self.failed else []
        extra += [f"{self.skipped_nodes} of {self.nodes} nodes not recorded"] if self.skipped_nodes else []
        return (f"precompiled {self.compiled} Triton kernels ({kind} graph) in {self.workers} processes"
                + (f" ({'; '.join(extra)})" if extra else ""))


def _warn_once(key: str, msg: str) -> None:
    warn_once(("precompile", key), msg, RuntimeWarning, stacklevel=3)


class _OfflineDriver:
    """Triton's active driver in a worker of a process that has none (CPU-only tests)."""


def _offline_driver(targets: dict, state: dict) -> None:
    """Make Triton's active driver answer the current device, stream and target without CUDA.

    Patched on the driver instance (instance attributes win over its methods and over the torch
    functions it holds): the device is ``state["device"]``, the stream 0, the target the parent's.
    """
    from triton.runtime import driver

    try:
        active = driver.active
    except Exception:  # noqa: BLE001 - no GPU driver in this process
        active = _OfflineDriver()
        driver.set_active(active)
    active.get_current_device = lambda: state["device"]
    active.get_current_stream = lambda device=None: 0
    active.get_current_target = lambda: targets[state["device"]]


def _worker(jobs: list, first: int, step: int, conn, targets: dict) -> None:
    """A forked worker: compile ``jobs[first::step]``, sending ``(index, error or None, cache hit
    or None, seconds)`` per job (the jobs are the parent's objects, as they were at the fork)."""
    indices = range(first, len(jobs), step)
    try:
        state = {"device": 0}
        hits: list = []
        try:
            _offline_driver(targets, state)
            import triton

            def listen(*, cache_hit=None, **_):
                hits.append(cache_hit)

            if hasattr(getattr(triton, "knobs", None), "compilation"):  # counts cache hits (Triton 3.4+)
                triton.knobs.compilation.listener = listen
        except Exception as exc:  # noqa: BLE001 - reported per job
            for i in indices:
                conn.send((i, f"worker setup: {type(exc).__name__}: {exc}"[:300], None, 0.0))
            return
        for i in indices:
            job = jobs[i]
            state["device"] = job.device
            hits.clear()
            t0 = time.perf_counter()
            try:
                _build_launcher(job.warmup())
                conn.send((i, None, hits[-1] if hits else None, time.perf_counter() - t0))
            except Exception as exc:  # noqa: BLE001 - reported to the parent, which logs it
                conn.send((i, f"{type(exc).__name__}: {exc}"[:300], None, time.perf_counter() - t0))
    finally:
        conn.close()


def _launcher_cls():
    """Triton's launcher class for the active driver (``CudaLauncher``), or None."""
    from triton.runtime import driver

    return getattr(driver.active, "launcher_cls", None)


def _build_launcher(kernel) -> None:
    """In a worker: build ``kernel``'s launcher (a ``CompiledKernel`` from ``warmup``) as its first
    launch would, so that the module lands in Triton's cache and the parent's first launch only
    loads it. Making a launcher compiles and imports a C module and touches no CUDA state. Best
    effort: where it fails (another Triton, no compiler) the first launch builds it as always."""
    if kernel is None:
        return
    try:
        kernel = compiled_kernel(kernel)
        cls = _launcher_cls()
        if cls is not None:
            cls(kernel.src, kernel.metadata)
    except Exception:  # noqa: BLE001 - the compile succeeded; only the launcher is left to the first launch
        pass


def _target(device: int):
    """Triton's GPU target for a CUDA device (the parent asks the real driver)."""
    from triton.runtime import driver

    active = driver.active
    if device == active.get_current_device():
        return active.get_current_target()
    with torch.cuda.device(device):
        return active.get_current_target()


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _fork_worker(jobs: list, w: int, n: int, targets: dict):
    """Fork worker ``w`` of ``n``: ``(pid, the read end of its pipe)``. The child never returns."""
    recv, send = connection.Pipe(duplex=False)
    try:
        with warnings.catch_warnings():  # Python 3.12+ warns at fork() in a process with threads
            warnings.filterwarnings("ignore", message=".*fork.*", category=DeprecationWarning)
            pid = os.fork()
    except BaseException:
        recv.close()
        send.close()
        raise
    if pid == 0:  # the worker: compile, then leave without running the parent's exit handlers
        code = 1
        try:
            recv.close()
            _worker(jobs, w, n, send, targets)
            code = 0
        finally:
            os._exit(code)
    send.close()
    return pid, recv


def _reap(pid: int, kill: bool) -> None:
    """Wait for a worker (killed first when ``kill``), at most a few seconds before killing it anyway."""
    try:
        if kill:
            os.kill(pid, signal.SIGKILL)
        for _ in range(500):
            if os.waitpid(pid, os.WNOHANG)[0]:
                return
            time.sleep(0.01)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ChildProcessError, ProcessLookupError):  # reaped already (SIGCHLD ignored) or gone
        pass


# --------------------------------------------------------------------------- warming the compiler

WARM_JOIN_S = 30.0  # the most compile_records (and the process's exit) waits for the warm-up thread
_warm_lock = threading.Lock()
_warm_thread: threading.Thread | None = None  # the process's warm-up, started at most once

@triton.jit
def _warm_up_kernel(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1.0, mask=offs < n)


def _warm_compile(target) -> None:
    """Compile :func:`_warm_up_kernel` for ``target`` with ``triton.compile``. After the first process
    on a machine it is a disk-cache hit, which warms as well: what costs is the process's first
    compile's set-up, not the code generation. Runs only with compiled Triton (``warm_up`` checks),
    where the kernel is a ``JITFunction``."""
    from triton.compiler import ASTSource

    triton.compile(ASTSource(_warm_up_kernel, {"x_ptr": "*fp32", "n": "i32"}, {"BLOCK": 128}), target=target)


def _warm(target) -> None:
    t0 = time.perf_counter()
    try:
        _warm_compile(target)
    except Exception as exc:  # noqa: BLE001 - only a head start: the workers compile as before
        logger.debug("precompile: compiler warm-up failed: %s: %s", type(exc).__name__, exc)
        return
    logger.debug("precompile: compiler warmed up in %.2f s", time.perf_counter() - t0)


def warm_compiler(device: int) -> bool:
    """Start, once per process, a background thread that compiles a tiny kernel for ``device``'s
    target, so that this process has paid Triton's first-compile set-up before it forks workers.

    Args:
        device: the CUDA device index the graph's kernels will run on.

    Returns:
        Whether this call started the thread (False: started before, or no target: nothing to warm).
    """
    global _warm_thread
    with _warm_lock:
        if _warm_thread is not None:
            return False
        try:
            target = _target(device)
        except Exception as exc:  # noqa: BLE001 - no driver: nothing to warm (compile_records says why)
            logger.debug("precompile: no compiler warm-up (%s: %s)", type(exc).__name__, exc)
            _warm_thread = threading.Thread(target=lambda: None)  # a finished stand-in: never again
            return False
        _warm_thread = threading.Thread(target=_warm, args=(target,), name="flag_gems-warm-triton", daemon=True)
        _warm_thread.start()
        return True


def join_warm(timeout_s: float = WARM_JOIN_S) -> None:
    """Wait for :func:`warm_compiler`'s thread, if it runs (before forking; at the process's exit)."""
    t = _warm_thread
    if t is not None and t.is_alive():
        t.join(timeout_s)


atexit.register(join_warm)


def compile_records(records, *, target=None, timeout_s: float = TIMEOUT_S,
                    max_workers: int | None = None) -> PrecompileResult:
    """Compile ``records`` in forked worker processes into Triton's on-disk cache; wait for them.

    Args:
        records: :class:`LaunchRecord` s (anything with ``device``, ``warmup()`` and ``name``).
        target: the ``GPUTarget`` to compile for; None: each device's, from Triton's driver.
        timeout_s: the most to wait; workers still running then are killed (their jobs count as failed).
        max_workers: at most this many processes (default 16; never more than jobs or CPUs).

    Returns:
        A :class:`PrecompileResult`. Nothing raises: a failed job is counted and logged at DEBUG;
        a process that cannot fork warns once and compiles nothing.
    """
    result = PrecompileResult(jobs=len(records))
    if not records:
        return result
    t0 = time.perf_counter()
    join_warm()  # never fork in the middle of the warm-up's compile
    try:
        if not hasattr(os, "fork"):
            raise OSError("os.fork is not available on this platform")
        targets = {d: target if target is not None else _target(d) for d in sorted({r.device for r in records})}
    except Exception as exc:  # noqa: BLE001 - no fork, no driver: the first run compiles
        _warn_once("setup", f"flag_gems: Triton kernels cannot be precompiled in worker processes here "
                            f"({type(exc).__name__}: {exc}); each graph's first run compiles them")
        result.failed = len(records)
        return result
    n = max(1, min(len(records), _cpus(), max_workers or MAX_WORKERS))
    workers = []  # (pid, read end)
    jobs = list(records)
    fork_s = 0.0
    for w in range(n):
        if fork_s > FORK_BUDGET_S:
            logger.debug("precompile: %d of %d workers forked in %.2f s; the rest's jobs are left to the first run",
                         w, n, fork_s)
            break
        t_fork = time.perf_counter()
        try:
            workers.append(_fork_worker(jobs, w, n, targets))
        except Exception as exc:  # noqa: BLE001 - out of processes: its jobs are left to the first run
            logger.debug("precompile: worker %d did not start: %s", w, exc)
        fork_s += time.perf_counter() - t_fork
    if not workers:
        _warn_once("fork", "flag_gems: no precompile worker process could be started; each graph's first run "
                           "compiles its Triton kernels")
        result.failed = len(records)
        return result
    result.workers = len(workers)
    done: dict = {}
    deadline = time.monotonic() + timeout_s
    running = {recv: pid for pid, recv in workers}
    while running:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        for conn in connection.wait(list(running), timeout=left):
            try:
                i, err, hit, secs = conn.recv()
            except (EOFError, OSError):  # the worker finished (or died)
                _reap(running.pop(conn), kill=False)
                continue
            done[i] = (err, hit, secs)
            if err is None and isinstance(records[i], LaunchRecord):
                _PRECOMPILED.add((records[i].kernel, records[i].device, records[i].key))
            if err is None:
                logger.debug("precompile: %s compiled in %.2f s%s", getattr(records[i], "name", i), secs,
                             " (cache hit)" if hit else "")
            else:
                logger.debug("precompile: %s failed: %s", getattr(records[i], "name", i), err)
    if running:  # a stall the user waited for: said once, as a warning
        _warn_once("timeout", f"flag_gems: {len(running)} precompile worker process(es) still compiling after "
                              f"{timeout_s:.0f} s were killed (a first call waited that long; their kernels compile "
                              "at the first run). GEMS_PRECOMPILE=0 or options={'precompile': False} turns "
                              "precompiling off")
    for pid in running.values():  # still running at the timeout
        _reap(pid, kill=True)
    for _, recv in workers:
        recv.close()
    result.compiled = sum(1 for err, _, _ in done.values() if err is None)
    result.cache_hits = sum(1 for err, hit, _ in done.values() if err is None and hit)
    result.failed = len(records) - result.compiled
    result.errors = [f"{getattr(records[i], 'name', i)}: {err}" for i, (err, _, _) in sorted(done.items()) if err][:5]
    if len(done) < len(records):
        result.errors.append(f"{len(records) - len(done)} job(s) unfinished (worker died or timed out)")
    result.seconds = time.perf_counter() - t0
    return result


def precompiled(record: LaunchRecord) -> bool:
    """Whether this process compiled ``record``'s kernel already: launched it, or a worker compiled it."""
    k = record.kernel
    return ((record.device, record.key) in k._compiled or (record.device, record.key) in k._uncached
            or (k, record.device, record.key) in _PRECOMPILED)
