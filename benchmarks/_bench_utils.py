"""Timing, bandwidth and result-row helpers shared by the benchmark scripts.

Device time (:func:`device_time_us`): the call is warmed up on a side stream, then N
back-to-back calls are captured in one CUDA graph, N chosen so that a replay lasts at least
``min_replay_ms``; the graph is replayed several times, each replay timed by a pair of
``torch.cuda.Event`` records, and the median replay time divided by N is the time per call.
Launch overhead is gone from this figure (a replay issues the N kernels without the host),
so it is the kernels' own time. When capture fails (a contender that syncs, say) the same
N calls are timed with events without a graph, and the result says so (``method``).

Host time (:func:`host_time_us`): wall clock per call of calls issued back to back without
synchronizing, after warm-up, in a few batches (median of batches). Batches are short so
that the launch queue never fills: a full queue would make the host wait for the device
and report device time instead.

Bandwidth (:func:`copy_bandwidth`): ``dst.copy_(src)`` of a large buffer, timed like a
kernel; bytes read + bytes written over the time. It is the practical ceiling a
memory-bound kernel is compared with (``% of copy``).

Rows (:func:`run_meta`, :func:`write_rows`): long format, one measured value per row,
with the GPU, versions, git sha and date on every row, so files from different runs can be
concatenated and compared.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import statistics
import subprocess
import time
from typing import Callable

import torch

__all__ = [
    "DeviceTime",
    "copy_bandwidth",
    "device_time_us",
    "file_tag",
    "gbps",
    "host_time_us",
    "run_meta",
    "wall_time_us",
    "write_rows",
]


class DeviceTime(float):
    """Microseconds per call, with how they were measured (``method``, ``calls`` per replay)."""

    method: str
    calls: int

    def __new__(cls, us: float, method: str, calls: int):
        obj = super().__new__(cls, us)
        obj.method, obj.calls = method, calls
        return obj


def _events_ms(fn: Callable[[], object], reps: int) -> list[float]:
    """Event-timed ms of ``fn()`` for each of ``reps`` runs (``fn`` may be a graph replay): the
    autotuner's timer (imported here, so that importing this module leaves flag_gems alone)."""
    from flag_gems.kernels._autotune import _events_us

    return [us / 1e3 for us in _events_us(fn, reps)]


def _repeat(fn: Callable[[], object], n: int) -> Callable[[], None]:
    def body():
        for _ in range(n):
            fn()

    return body


def _capture(fn: Callable[[], object], n: int) -> torch.cuda.CUDAGraph:
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(n):
            fn()
    return graph


def device_time_us(
    fn: Callable[[], object],
    *,
    min_replay_ms: float = 1.0,
    replays: int = 10,
    warmup: int = 3,
    max_calls: int = 1000,
) -> DeviceTime:
    """Device time per call of ``fn`` in µs, by CUDA-graph replay (see the module docstring).

    Args:
        fn: zero-argument callable that launches the work on the current CUDA device; its
            return value is dropped. It must already be compiled/tuned or do so in warm-up.
        min_replay_ms: a replay holds enough calls to last at least this long.
        replays: timed replays; the median is taken.
        warmup: calls before capture (compiles, autotuning, allocator warm-up).
        max_calls: upper bound on the calls captured in one graph.

    Returns:
        :class:`DeviceTime` (a float of µs per call) with ``method`` ``"cuda_graph"`` or, when
        capture failed, ``"cuda_events"`` (launch overhead included), and ``calls``.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    n = 8
    try:
        graph = _capture(fn, n)
        graph.replay()
        per_call = statistics.median(_events_ms(graph.replay, 3)) / n
        want = max(1, min(max_calls, math.ceil(min_replay_ms / max(per_call, 1e-6))))
        if want > n:
            del graph
            n = want
            graph = _capture(fn, n)
            graph.replay()
        times = _events_ms(graph.replay, replays)
        del graph
        return DeviceTime(statistics.median(times) / n * 1e3, "cuda_graph", n)
    except Exception:  # not capturable: time the same calls without a graph
        torch.cuda.synchronize()
        body = _repeat(fn, n)
        body()
        times = _events_ms(body, replays)
        return DeviceTime(statistics.median(times) / n * 1e3, "cuda_events", n)


def profile_calls(fn: Callable[[], object], calls: int, *, warmup: int = 1, cuda: bool = True):
    """``torch.profiler``'s ``key_averages()`` over ``calls`` calls of ``fn`` after ``warmup`` ones
    (CPU activity, and CUDA's with ``cuda``; synchronized before and after)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(calls):
            fn()
        if cuda:
            torch.cuda.synchronize()
    return prof.key_averages()


def host_time_us(fn: Callable[[], object], *, calls: int = 200, batches: int = 5, warmup: int = 3) -> float:
    """Host (wall-clock) µs per call of calls issued back to back without synchronizing.

    Args:
        fn: zero-argument callable.
        calls: calls in all, split into ``batches`` batches; the device is synchronized
            between batches (outside the timed region), so keep a batch short enough not
            to fill the launch queue.
        batches: the median over batches is returned.
        warmup: untimed calls first.

    Returns:
        Median µs per call.
    """
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    for _ in range(warmup):
        fn()
    per_batch = max(1, calls // batches)
    samples = []
    for _ in range(batches):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(per_batch):
            fn()
        samples.append((time.perf_counter() - t0) / per_batch * 1e6)
    if cuda:
        torch.cuda.synchronize()
    return statistics.median(samples)


def wall_time_us(fn: Callable[[], object], *, iters: int = 3, warmup: int = 1) -> float:
    """Median wall-clock µs of synchronous calls (CPU runs, where there is no device clock)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(samples)


def median_call_ms(fn: Callable[[], object], iters: int, device: str) -> float:
    """Median ms of ``iters`` calls of ``fn``, each timed alone: CUDA events around the call on
    the GPU (a model forward, a graph replay), the wall clock on the CPU."""
    return median_call_times(fn, iters, device)[0]


def median_call_times(fn: Callable[[], object], iters: int, device: str) -> tuple[float, float]:
    """``(ms, host_ms)``: :func:`median_call_ms`, and the median host time to issue one call
    (wall clock from the call to its return, no synchronization: on the GPU, the time Python
    needs to launch the call's work; when it exceeds the device time, the call is launch-bound)."""
    times, host = [], []
    for _ in range(iters):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            t0 = time.perf_counter()
            fn()
            host.append((time.perf_counter() - t0) * 1e3)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            host.append(times[-1])
    return statistics.median(times), statistics.median(host)


def gbps(nbytes: int, us: float) -> float:
    """GB/s (1e9 bytes per second) for ``nbytes`` moved in ``us`` microseconds."""
    return nbytes / (us * 1e-6) / 1e9


def copy_bandwidth(device: str, nbytes: int = 1 << 30, **timing) -> tuple[float, float]:
    """Measured device-to-device copy bandwidth.

    Args:
        device: "cuda" (CUDA-graph timing) or "cpu" (wall clock; for smoke runs).
        nbytes: size of the source buffer (bf16); the copy reads and writes it once.
        timing: extra keyword arguments for :func:`device_time_us`.

    Returns:
        ``(gb_per_s, us)``: (bytes read + bytes written) / median time, and that time.
    """
    numel = nbytes // 2
    src = torch.randn(numel, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    fn = lambda: dst.copy_(src)  # noqa: E731
    us = device_time_us(fn, **timing) if device == "cuda" else wall_time_us(fn, iters=7, warmup=2)
    del src, dst
    return gbps(2 * numel * 2, us), us


def _git_sha() -> str:
    # GEMS_GIT_SHA names the commit when the tree was copied without its current .git
    # (the device machine's copy carries the checkout's history as of the session start).
    if os.environ.get("GEMS_GIT_SHA"):
        return os.environ["GEMS_GIT_SHA"]
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5, cwd=here)
        sha = out.stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                               timeout=5, cwd=here).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except Exception:
        return "unknown"


def _version(dist: str) -> str:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return "not installed"


def run_meta(device: str) -> dict:
    """Fields carried by every row: gpu, torch, triton, liger, git, date."""
    import triton

    if device == "cuda":
        gpu = torch.cuda.get_device_name()
    else:
        gpu = "cpu" + (" (Triton interpreter)" if os.environ.get("TRITON_INTERPRET") == "1" else "")
    return dict(
        gpu=gpu,
        torch=torch.__version__,
        triton=triton.__version__,
        liger=_version("liger_kernel"),
        git=_git_sha(),
        date=datetime.datetime.now().isoformat(timespec="seconds"),
    )


def file_tag(meta: dict) -> str:
    """``<GPU name>_<date>`` made safe for a file name, e.g. ``NVIDIA_H100_80GB_HBM3_2025-01-31``."""
    gpu = re.sub(r"[^A-Za-z0-9.-]+", "_", meta["gpu"].split(" (")[0]).strip("_")
    return f"{gpu}_{meta['date'][:10]}"


def write_rows(rows: list[dict], out_dir: str, stem: str, markdown: str | None = None) -> list[str]:
    """Write ``<stem>.json`` (all rows) and, when given, ``<stem>.md`` into ``out_dir``.

    Returns:
        The paths written.
    """
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, stem + ".json")]
    with open(paths[0], "w") as f:
        json.dump(rows, f, indent=1)
    if markdown is not None:
        paths.append(os.path.join(out_dir, stem + ".md"))
        with open(paths[1], "w") as f:
            f.write(markdown.rstrip() + "\n")
    return paths
