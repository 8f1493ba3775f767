"""Launch-config autotuning with a persistent, per-device cache shared by processes.

Each tunable kernel family is a :class:`Tunable`: a key function's fields (shape buckets,
dtypes, layout flags), the hand-written heuristic (:attr:`Tunable.default`, the first
candidate and the answer whenever tuning is not allowed), a candidate list, and a bench
factory that builds inputs for a key and launches the family's own launcher. A launcher
asks for its config with one dict lookup::

    cfg = ACT_AND_MUL.chosen.get((dev, key))          # hit: the tuple of config values
    if cfg is None:
        cfg = ACT_AND_MUL.resolve(key, dev, {"n_rows": n_rows})   # once per key and process

:meth:`Tunable.resolve` (cold path, once per key per process) looks in this order:

1. the user cache, ``$GEMS_CACHE_DIR`` (default ``~/.cache/flag_gems``), one JSON file per
   (kernel, key, device name, Triton version, kernel source hash), written atomically
   (a temporary file and ``os.replace``), so any number of processes read and write it at
   once without locks; an unreadable, corrupt or stale file is ignored (DEBUG log) and
   tuned again;
2. the shipped table for this device kind (``kernels/tuned/<device>.json``, committed from
   a tuning run on that GPU; entries whose source hash no longer matches are ignored);
3. tuning, when the policy allows it (below); else the heuristic.

When tuning happens (``GEMS_AUTOTUNE``, one setting):

* ``on`` (default): on the first sight of a key in a process, if neither cache has it,
  outside CUDA-graph capture, on a GPU; bounded by ``GEMS_AUTOTUNE_BUDGET_S`` seconds per
  key (default 5; candidates run in priority order, the heuristic first). The tuning
  synchronizes the device and allocates the key's inputs once. Serving frameworks that run
  warm-up passes before capturing graphs (vLLM) therefore tune in the warm-up; during
  capture a missing key gets the heuristic (never a sync), without being remembered.
* ``cache``: never tune at run time; the caches, else the heuristic. Tuning happens only in
  ``python -m flag_gems.pretune`` and ``flag_gems.warmup(...)``. No latency spike ever.
* ``off``: the heuristics only (no cache reads): the reproducible baseline.

Unset, the policy is ``on`` except between :func:`enter_policy` and :func:`exit_policy`: the compile backend runs its
graphs in one (``options={"autotune": ...}``, default ``cache``; ``on`` with max-autotune).

Under Triton's interpreter, tuning happens only when asked for (pretune, warmup, tests).
A candidate must beat the heuristic by ``GEMS_AUTOTUNE_MARGIN`` (default 0.02) to replace it,
so noise does not churn configs. Families with a native contender (GEMM vs cuBLAS) also
measure it, and the config's ``NATIVE`` field says whether native was faster.

The benchmark function is injectable (:func:`use_timer`): the default times a CUDA graph of
back-to-back launches (wall clock on the CPU); tests pass a deterministic fake.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import inspect
import json
import logging
import math
import os
import re
import statistics
import threading
import time
from collections.abc import Callable

import torch
import triton

from ._common import warn_once

logger = logging.getLogger(__name__)

__all__ = [
    "TUNABLES",
    "Tunable",
    "TuneResult",
    "cache_dir",
    "clear_memory",
    "config_for",
    "device_name",
    "export_entries",
    "max_shared_memory",
    "mode",
    "near_first",
    "on_change",
    "pow2_bucket",
    "register",
    "row_candidates",
    "use_timer",
]

FORMAT = 1  # cache file format; a file of another format is ignored
_TRUE = ("1", "on", "true", "yes", "first")
_FALSE = ("0", "off", "false", "no", "none")
_CACHE_ONLY = ("cache", "lookup", "pretuned", "pretune")
_SHIPPED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned")
_LOCK = threading.RLock()  # one resolve/tune at a time per process (tuning is re-entrant: bench -> launcher)


# ------------------------------------------------------------------------------------ settings


_scope = threading.local()
POLICIES = ("on", "cache", "off")


def _fake_tracing() -> bool:
    """Whether a FakeTensorMode or make_fx's proxy mode is active (a launcher traced on fake
    tensors, e.g. a graph pass calling it under AOT autograd): no config can be timed there."""
    keys = getattr(torch._C, "_TorchDispatchModeKey", None)
    if keys is None:
        return False
    return any(torch._C._get_dispatch_mode(getattr(keys, k)) is not None for k in ("FAKE", "PROXY") if hasattr(keys, k))


def enter_policy(policy: str) -> str | None:
    """Make ``policy`` (one of ``POLICIES``) this thread's policy unless ``GEMS_AUTOTUNE`` is set
    (the environment wins); returns the previous one, for :func:`exit_policy`. The compile backend
    runs each compiled graph between the two (``options={"autotune": ...}``; default ``"cache"``,
    ``"on"`` with max-autotune), so that a graph's first call does not wait for tuning, as with
    Inductor without max-autotune. A plain pair rather than a context manager: it is on every
    compiled call's path."""
    previous = getattr(_scope, "policy", None)
    _scope.policy = policy
    return previous


def exit_policy(previous: str | None) -> None:
    _scope.policy = previous


def mode() -> str:
    """The tuning policy: ``GEMS_AUTOTUNE`` when set, else this thread's :func:`enter_policy`'s,
    else ``"on"``: one of ``"on"``, ``"cache"`` or ``"off"`` (module docstring)."""
    raw = os.environ.get("GEMS_AUTOTUNE")
    if raw is None:
        scoped = getattr(_scope, "policy", None)
        if scoped is not None:
            return scoped
        raw = "on"
    raw = raw.strip().lower()
    if raw in _TRUE or raw == "":
        return "on"
    if raw in _FALSE:
        return "off"
    if raw in _CACHE_ONLY:
        return "cache"
    _warn_once(("mode", raw), f"GEMS_AUTOTUNE={raw!r} is not one of on, cache, off: using 'on'")
    return "on"


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError:
        _warn_once((name, raw), f"{name}={raw!r} is not a number: using {default}")
        return default


def cache_dir() -> str:
    """Root of the user cache: ``$GEMS_CACHE_DIR``, else ``$XDG_CACHE_HOME/flag_gems``, else ``~/.cache/flag_gems``."""
    root = os.environ.get("GEMS_CACHE_DIR")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "flag_gems")
    return root


def _warn_once(what, message: str) -> None:
    warn_once(("autotune", what), message, UserWarning, stacklevel=3)


# ------------------------------------------------------------------------------------ devices


_DEVICE_NAMES: dict = {}


def device_name(dev: int) -> str:
    """Name of the device index ``dev`` (``torch.cuda.get_device_name``), ``"cpu"`` for -1."""
    name = _DEVICE_NAMES.get(dev)
    if name is None:
        name = torch.cuda.get_device_name(dev) if dev >= 0 else "cpu"
        _DEVICE_NAMES[dev] = name
    return name


def device_slug(name: str) -> str:
    """A device name as a file name: ``"NVIDIA H200"`` -> ``"NVIDIA_H200"``."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", name).strip("_") or "unknown"


def current_device() -> int:
    """The current CUDA device index, -1 without CUDA (the interpreter)."""
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return torch.cuda.current_device()
    return -1


def torch_device(dev: int) -> torch.device:
    return torch.device("cuda", dev) if dev >= 0 else torch.device("cpu")


_SMEM: dict = {}


def max_shared_memory(dev: int) -> int | None:
    """Bytes of shared memory one program may use on CUDA device ``dev``: the opt-in per-block limit
    that Triton checks before a launch (``OutOfResources`` above it; 232448 on H100 and H200). None
    (no limit) for the interpreter (-1) and without CUDA. Candidate lists drop configs whose estimate
    exceeds it."""
    limit = _SMEM.get(dev)
    if limit is None and (dev < 0 or not torch.cuda.is_available()):
        return None
    if limit is None:
        props = torch.cuda.get_device_properties(dev)
        limit = getattr(props, "shared_memory_per_block_optin", 0)
        if not limit:  # an older torch: ask Triton's driver
            from triton.runtime import driver

            limit = driver.active.utils.get_device_properties(dev)["max_shared_mem"]
        _SMEM[dev] = limit = int(limit)
    return limit


def _device_guard(dev: int):
    """Makes ``dev`` the current CUDA device for a tuning run (nothing for the CPU)."""
    if dev >= 0 and torch.cuda.is_available():
        return torch.cuda.device(dev)
    return contextlib.nullcontext()


def capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (False on CPU-only builds)."""
    try:
        return bool(torch.cuda.is_current_stream_capturing())
    except (RuntimeError, AssertionError, AttributeError):  # CPU-only torch: no CUDA runtime
        return False


def _interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ------------------------------------------------------------------------------------ timing


def _wall_time_us(run: Callable[[], None]) -> float:
    run()  # compile
    samples = []
    for _ in range(3):
        t0 = time.perf_counter()
        run()
        samples.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(samples)


def _events_us(fn: Callable[[], None], reps: int) -> list[float]:
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)]


def per_call_us(make_replay: Callable[[int], Callable[[], None]], time_us: Callable[[Callable[[], None], int], list],
                n: int, *, replay_us: float = 400.0, replays: int = 5, max_calls: int = 1000) -> float:
    """µs per call from replays of graphs of back-to-back calls.

    Args:
        make_replay: ``k -> replay``, a callable that runs a graph of ``k`` calls.
        time_us: ``(fn, reps) -> [µs of each of reps runs of fn]``.
        n: the first guess of the calls per graph.

    A replay costs a fixed amount whatever it holds (its launch, which the device waits for
    after the start event) plus its calls; the difference of the ``2n``- and ``n``-call replays
    over ``n`` cancels the fixed part. ``n`` grows from the guess so that a replay lasts about
    ``replay_us`` (at most ``max_calls`` calls). The two graphs are replayed in alternation and
    the median of the paired differences taken, so that a drift of the clocks during the
    measurement does not land on one graph only. A difference at or below zero (noise on calls
    far shorter than the fixed part) gives the longer replay's mean, an upper bound.
    """
    once = make_replay(n)
    first = statistics.median(time_us(once, 2)) / n
    grown = max(n, min(max_calls, math.ceil(replay_us / max(first, 0.5))))
    if grown != n:
        n, once = grown, None
        once = make_replay(n)
    twice = make_replay(2 * n)
    diffs, longer = [], []
    for _ in range(replays):
        a = statistics.median(time_us(once, 1))
        b = statistics.median(time_us(twice, 1))
        diffs.append(b - a)
        longer.append(b)
    diff = statistics.median(diffs) / n
    return diff if diff > 0.0 else statistics.median(longer) / (2 * n)


def _graph_replay(run: Callable[[], None], n: int) -> Callable[[], None]:
    """A callable replaying a CUDA graph of ``n`` back-to-back calls of ``run`` (replayed once)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(n):
            run()
    graph.replay()
    return graph.replay


def cuda_time_us(run: Callable[[], None], *, replay_us: float = 400.0, replays: int = 5) -> float:
    """Device µs per call of ``run``, launch overhead excluded.

    Calls of over 2 ms are timed one by one with events; shorter ones by :func:`per_call_us`
    over CUDA graphs of back-to-back calls. Dividing one graph's replay time by its calls, as
    this timer did before, spread the replay's fixed cost over ``n`` calls with ``n`` sized from
    a host-bound first call (a Python launcher issues one in 10-60 µs): on the H200 that read
    1.1-4x the device time of 1-2 µs kernels, enough to rank the candidates of a small-token
    key by noise (``benchmarks/tuner_timing_check.py``). Falls back to event timing of ``n``
    calls (launch overhead included) when capture fails.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()  # compile, allocate
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    est = statistics.median(_events_us(run, 2))
    if est > 2000.0:
        return statistics.median(_events_us(run, 3))
    n = max(1, min(200, math.ceil(replay_us / max(est, 1.0))))
    try:
        return per_call_us(lambda k: _graph_replay(run, k), _events_us, n, replay_us=replay_us, replays=replays)
    except Exception as exc:  # noqa: BLE001 - a launch that cannot be captured is timed without a graph
        logger.debug("autotune: graph capture failed (%s); timing with events", exc)
        torch.cuda.synchronize()

        def body():
            for _ in range(n):
                run()

        return statistics.median(_events_us(body, replays)) / n


def default_timer(run: Callable[[], None], config: dict | None) -> float:
    """µs per call of ``run`` (``config`` is what runs; the default timer does not need it)."""
    if torch.cuda.is_available() and not _interpreter():
        return cuda_time_us(run)
    return _wall_time_us(run)


_TIMER: list = [default_timer]


@contextlib.contextmanager
def use_timer(timer: Callable[[Callable[[], None], dict | None], float]):
    """Benchmark with ``timer(run, config) -> µs`` inside the block (tests: a deterministic fake).

    ``config`` is the candidate's config dict, or None for a native contender.
    """
    _TIMER.append(timer)
    try:
        yield timer
    finally:
        _TIMER.remove(timer)


# ------------------------------------------------------------------------------------ keys, hashing


def _jsonable(v):
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    raise TypeError(f"autotune key element {v!r} of type {type(v).__name__} cannot be stored")


def key_from_json(values) -> tuple:
    """A key as stored (:func:`key_text`'s list, dtypes by name) back as a key tuple."""
    return tuple(getattr(torch, k) if isinstance(k, str) and isinstance(getattr(torch, k, None), torch.dtype) else k
                 for k in values)


def key_text(key: tuple) -> str:
    """A key as the JSON text stored in cache files (dtypes by name)."""
    return json.dumps(_jsonable(key), separators=(",", ":"))


def pow2_bucket(n: int, cap: int) -> int:
    """``n`` rounded up to a power of two, at most ``cap`` (1 for n <= 1): the usual token-count bucket."""
    return min(1 << max(n - 1, 0).bit_length(), cap)


def near_first(default: dict, candidates: list) -> list:
    """``candidates`` ordered by their distance to ``default`` (sum of |log2| ratios of the numeric
    fields, other fields 1 when different): under a time budget the likeliest ones run first."""

    def dist(c):
        d = 0.0
        for k, v in c.items():
            w = default.get(k)
            if isinstance(v, bool) or isinstance(w, bool) or not isinstance(v, int) or not isinstance(w, int):
                d += 0.0 if v == w else 1.0
            elif v != w:
                d += abs(math.log2(max(v, 1)) - math.log2(max(w, 1)))
        return d

    return sorted(candidates, key=dist)


def row_candidates(default: dict, n_cols: int, max_fused: int, dev: int) -> list:
    """Candidates for the one-row-per-program kernels (``{"BLOCK_N", "num_warps"}``): the heuristic's
    block (the whole row when it fits in ``max_fused``, which the one-pass kernels need) or, for
    longer rows, 4096-16384-element chunks; 1-32 warps at 1-64 elements per thread. The
    interpreter gets one variant."""
    if dev < 0:
        return [dict(default, num_warps=2 if default["num_warps"] == 1 else 1)]
    blocks = [default["BLOCK_N"]] if n_cols <= max_fused else [b for b in (4096, 8192, 16384) if b <= max_fused]
    out = [{"BLOCK_N": b, "num_warps": w} for b in blocks for w in (1, 2, 4, 8, 16, 32) if 1 <= b // (32 * w) <= 64]
    return near_first(default, out)


def tile_candidates(default: dict, block_ns, block_ms, rows: int, tile: tuple[int, int]) -> list:
    """Candidates for the row-block kernels (``{"BLOCK_M", "BLOCK_N", "num_warps"}``): every
    ``BLOCK_N`` of ``block_ns`` and ``BLOCK_M`` of ``block_ms`` (at most ``rows``) whose tile
    ``BLOCK_M * BLOCK_N`` lies in ``tile`` (inclusive), at 1-16 warps of 4-64 elements per thread;
    nearest ``default`` first."""
    lo, hi = tile
    out = [{"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w}
           for bn in block_ns for bm in block_ms if bm <= rows and lo <= bm * bn <= hi
           for w in (1, 2, 4, 8, 16) if 4 <= bm * bn // (32 * w) <= 64]
    return near_first(default, out)


def _unwrap(obj):
    """The Python function under FastKernel / JITFunction / InterpretedFunction wrappers."""
    for _ in range(4):
        inner = getattr(obj, "fn", None)
        if inner is None or inner is obj:
            break
        obj = inner
    return obj


def source_text(obj) -> str:
    """Source text of a function, kernel or class (a stable fallback when there is no source file)."""
    target = _unwrap(obj)
    try:
        return inspect.getsource(target)
    except (OSError, TypeError):
        code = getattr(target, "__code__", None)
        return repr(code.co_code) if code is not None else repr(target)


# ------------------------------------------------------------------------------------ records


@dataclasses.dataclass
class TuneResult:
    """What :meth:`Tunable.tune` did for one key.

    Attributes:
        kernel, key: what was tuned.
        config: the chosen config (dict).
        origin: ``"tuned"``, ``"cache"`` (user cache), ``"shipped"``, ``"default"`` (heuristic).
        best_us, default_us, baseline_us: measured µs per call (None when not measured).
        seconds: wall time spent tuning.
        tried: candidates measured (including failed ones).
        trials: ``[(config, µs or None, error or None), ...]``.
        path: the cache file, when one was written or read.
    """

    kernel: str
    key: tuple
    config: dict
    origin: str
    best_us: float | None = None
    default_us: float | None = None
    baseline_us: float | None = None
    seconds: float = 0.0
    tried: int = 0
    trials: list = dataclasses.field(default_factory=list)
    path: str | None = None


class _Forced:
    """Read view of a Tunable's table that answers ``config`` to the owning thread (tuning)."""

    __slots__ = ("base", "config", "owner")

    def __init__(self, base: dict, config: tuple):
        self.base, self.config, self.owner = base, config, threading.get_ident()

    def get(self, k, default=None):
        if threading.get_ident() == self.owner:
            return self.config
        return self.base.get(k, default)


TUNABLES: dict = {}


class Tunable:
    """One kernel family's launch config: heuristic, candidates, bench, table of choices.

    Args:
        name: the family's name (``"act_and_mul"``); cache files and :func:`config_for` use it.
        fields: names of the config values, in the order launchers unpack them.
        key_fields: names of the key's elements (documentation, :func:`config_for`).
        default: ``(key, dev) -> dict``, the heuristic.
        candidates: ``(key, dev) -> list[dict]``, in priority order (the heuristic need not be in it).
        make_bench: ``(key, dev, dims) -> run``: allocates inputs for ``key`` on device ``dev``
            (sizes ``dims`` of the real call when given, else the key's representative sizes)
            and returns ``run()`` launching the family's launcher once.
        sources: kernels and functions whose source text goes into the source hash.
        baseline: ``(key, dev, dims) -> run`` of a native contender, or None; when given, the
            config's ``NATIVE`` field (in ``fields``) says whether it was faster.
        version: bump when the meaning of configs changes without a source change.
        nearest_bucket: the key's first element is a power-of-two size bucket whose configs stay
            sound at nearby sizes (row and token counts of row-wise kernels, not GEMM's M): under
            the ``cache`` policy a key in no cache takes the shipped config of the nearest bucket
            that is otherwise the same key (as vLLM picks the nearest batch size's MoE config),
            instead of the heuristic.
    """

    def __init__(self, name: str, *, fields, key_fields, default, candidates, make_bench, sources=(),
                 baseline=None, version: str = "1", nearest_bucket: bool = False):
        self.name = name
        self.nearest_bucket = nearest_bucket
        self.fields = tuple(fields)
        self.key_fields = tuple(key_fields)
        self.default = default
        self.candidates = candidates
        self.make_bench = make_bench
        self.sources = tuple(sources)
        self.baseline = baseline
        self.version = version
        self._table: dict = {}  # (dev, key) -> tuple of config values
        self.chosen = self._table  # what launchers read (a _Forced view while tuning)
        self._origin: dict = {}  # (dev, key) -> TuneResult (how the entry was decided)
        self._hash: str | None = None

    def __repr__(self):
        return f"Tunable({self.name!r}, fields={self.fields}, key={self.key_fields})"

    # -- hashing and conversion

    @property
    def source_hash(self) -> str:
        """sha1 over the kernels' and the config functions' source text (and ``version``)."""
        if self._hash is None:
            h = hashlib.sha1()
            h.update(f"{self.name}\0{self.version}\0{self.fields}\0{self.key_fields}\0".encode())
            for obj in (*self.sources, self.default, self.candidates):
                h.update(source_text(obj).encode())
                h.update(b"\0")
            self._hash = h.hexdigest()[:16]
        return self._hash

    def as_tuple(self, config: dict) -> tuple:
        return tuple(config[f] for f in self.fields)

    def as_dict(self, values) -> dict:
        return dict(zip(self.fields, values))

    def _valid(self, config, key, dev) -> bool:
        """A stored config is usable: the same fields, and the heuristic or one of the candidates."""
        if not isinstance(config, dict) or set(config) != set(self.fields):
            return False
        plain = {k: v for k, v in config.items() if k != "NATIVE"}
        options = [self.default(key, dev)] + list(self.candidates(key, dev))
        return any({k: v for k, v in c.items() if k != "NATIVE"} == plain for c in options)

    def _with_native(self, config: dict, native: bool) -> dict:
        config = dict(config)
        if "NATIVE" in self.fields:
            config["NATIVE"] = int(native)
        return config

    # -- the lookup

    def lookup(self, key: tuple, dev: int, dims: dict | None = None) -> tuple:
        """The config tuple for ``key`` on device ``dev`` (the launchers' call)."""
        cfg = self.chosen.get((dev, key))
        if cfg is None:
            cfg = self.resolve(key, dev, dims)
        return cfg

    def resolve(self, key: tuple, dev: int, dims: dict | None = None, *, tune: bool = True) -> tuple:
        """Decide the config of a key not yet in the table (module docstring: caches, then policy;
        ``tune=False``: never tune, whatever the policy)."""
        with _LOCK:
            hit = self._table.get((dev, key))
            if hit is not None:
                return hit
            policy = mode()
            if policy == "off":
                return self._remember(key, dev, TuneResult(self.name, key, self._default(key, dev), "default"))
            known = self._known(key, dev)
            if known is not None:
                return self._remember(key, dev, known)
            if policy == "cache":  # never tunes: the same answer inside a capture, a trace or on fake tensors
                near = self._nearest_shipped(key, dev)
                return self._remember(key, dev, near or TuneResult(self.name, key, self._default(key, dev), "default"))
            if capturing():  # never tune (or sync) inside a graph capture; decide again afterwards
                logger.debug("autotune %s %s: inside CUDA-graph capture, heuristic config", self.name, key)
                return self.as_tuple(self._default(key, dev))
            from ._launch import launches_traced

            if launches_traced():  # a trace into Inductor's graph: the caches above, else the heuristic
                logger.debug("autotune %s %s: launch traced into a graph, heuristic config", self.name, key)
                return self.as_tuple(self._default(key, dev))
            if _fake_tracing():  # fake tensors have no memory to time on; decide again at a real call
                logger.debug("autotune %s %s: under a fake-tensor trace, heuristic config", self.name, key)
                return self.as_tuple(self._default(key, dev))
            if tune and policy == "on" and dev >= 0 and not _interpreter():
                budget = _env_float("GEMS_AUTOTUNE_BUDGET_S", 5.0)
                try:
                    result = self._tune(key, dev, dims, budget)
                except Exception as exc:  # noqa: BLE001 - a failed tuning never fails the user's call
                    _warn_once(("tune", self.name), f"flag_gems autotune {self.name}: tuning {key_text(key)} failed "
                               f"({type(exc).__name__}: {exc}); the heuristic config runs")
                    result = TuneResult(self.name, key, self._default(key, dev), "default")
                return self._remember(key, dev, result)
            return self._remember(key, dev, TuneResult(self.name, key, self._default(key, dev), "default"))

    def _default(self, key, dev) -> dict:
        return self._with_native(self.default(key, dev), False)

    def _remember(self, key, dev, result: TuneResult) -> tuple:
        values = self.as_tuple(result.config)
        old = self._table.get((dev, key))
        self._table[(dev, key)] = values
        self._origin[(dev, key)] = result
        if old is not None and old != values:
            _changed()
        return values

    def _known(self, key, dev) -> TuneResult | None:
        """The user cache's entry, else the shipped table's, for this key (None when neither has one)."""
        from . import _tune_cache as cache

        name = device_name(dev)
        rec = cache.load(self, key, name)
        if rec is not None and self._valid(rec.get("config"), key, dev):
            return TuneResult(self.name, key, rec["config"], "cache", rec.get("best_us"), rec.get("default_us"),
                              rec.get("baseline_us"), path=rec.get("_path"))
        if rec is not None:
            logger.debug("autotune %s %s: cached config %r is not valid here; ignored", self.name, key, rec.get("config"))
        rec = cache.shipped(self, key, name)
        if rec is not None and self._valid(rec.get("config"), key, dev):
            return TuneResult(self.name, key, rec["config"], "shipped", rec.get("best_us"), rec.get("default_us"),
                              rec.get("baseline_us"))
        return None

    def _nearest_shipped(self, key, dev) -> TuneResult | None:
        """The shipped entry whose key differs from ``key`` only in the first element (the size
        bucket), the nearest such bucket in powers of two (the larger on a tie), when its config is
        valid for ``key``; None otherwise or when the family does not allow it (``nearest_bucket``)."""
        if not self.nearest_bucket or not key or not isinstance(key[0], int) or key[0] < 1:
            return None
        from . import _tune_cache as cache

        rest = _jsonable(key[1:])
        best = None
        for (kernel, _), rec in cache.read_shipped(device_name(dev)).items():
            k = rec.get("key")
            if (kernel != self.name or rec.get("source") != self.source_hash or not isinstance(k, list) or not k
                    or not isinstance(k[0], int) or k[0] < 1 or k[1:] != rest):
                continue
            rank = (abs(math.log2(k[0]) - math.log2(key[0])), -k[0])
            if (best is None or rank < best[0]) and self._valid(rec.get("config"), key, dev):
                best = (rank, rec)
        if best is None:
            return None
        rec = best[1]
        logger.debug("autotune %s %s: the shipped config of bucket %s", self.name, key, rec["key"][0])
        return TuneResult(self.name, key, rec["config"], "shipped nearest", rec.get("best_us"), rec.get("default_us"),
                          rec.get("baseline_us"))

    def origin(self, key: tuple, dev: int) -> TuneResult | None:
        """How the table's entry for ``key`` was decided (None when not resolved in this process)."""
        return self._origin.get((dev, key))

    # -- tuning

    @contextlib.contextmanager
    def forcing(self, config: dict):
        """Launchers of this family use ``config`` (on this thread) inside the block."""
        view = _Forced(self._table, self.as_tuple(self._with_native(config, False)))
        prev, self.chosen = self.chosen, view
        try:
            yield
        finally:
            self.chosen = prev

    def tune(self, key: tuple, dev: int, dims: dict | None = None, *, budget_s: float | None = None,
             force: bool = False) -> TuneResult:
        """Tune ``key`` now (pretune, warmup, sweep): the caches' entry unless ``force``, else measure.

        Args:
            key: the family's key.
            dev: device index (-1: the CPU interpreter).
            dims: sizes of a real call (else the key's representative sizes).
            budget_s: stop trying candidates once this many seconds are spent (None: all).
            force: measure even when a cache has the key.

        Returns:
            A :class:`TuneResult`; the choice is also in the table and (when measured) the user cache.
        """
        with _LOCK:
            if not force:
                known = self._known(key, dev)
                if known is not None:
                    self._remember(key, dev, known)
                    return known
            if capturing():
                raise RuntimeError(f"autotune {self.name}: cannot tune inside CUDA-graph capture")
            result = self._tune(key, dev, dims, budget_s)
            self._remember(key, dev, result)
            return result

    def _tune(self, key, dev, dims, budget_s) -> TuneResult:
        from . import _tune_cache as cache

        t0 = time.perf_counter()
        timer = _TIMER[-1]
        default = self._default(key, dev)
        seen, order = set(), []
        for c in [default] + [self._with_native(c, False) for c in self.candidates(key, dev)]:
            t = self.as_tuple(c)
            if t not in seen:
                seen.add(t)
                order.append(c)
        trials, best, default_us = [], None, None
        guard = _device_guard(dev)
        try:
            with guard:
                run = self.make_bench(key, dev, dims)
                for cfg in order:
                    if trials and budget_s is not None and time.perf_counter() - t0 > budget_s:
                        break
                    try:
                        with self.forcing(cfg):
                            us = float(timer(run, cfg))
                    except Exception as exc:  # noqa: BLE001 - a candidate that does not compile or run is skipped
                        if _is_oom(exc):
                            raise
                        error = f"{type(exc).__name__}: {str(exc)[:200]}"
                        trials.append((cfg, None, error))
                        _warn_once(("candidate", self.name, self.as_tuple(cfg)),
                                   f"flag_gems autotune {self.name}: config {cfg} failed on {device_name(dev)} "
                                   f"({error.splitlines()[0]}); skipped, never chosen")
                        continue
                    trials.append((cfg, us, None))
                    if cfg is default:
                        default_us = us
                    if best is None or us < best[1]:
                        best = (cfg, us)
                baseline_us = None
                if self.baseline is not None and best is not None:
                    try:
                        baseline_us = float(timer(self.baseline(key, dev, dims), None))
                    except Exception as exc:  # noqa: BLE001
                        if _is_oom(exc):
                            raise
                        logger.debug("autotune %s %s: native contender failed: %s", self.name, key, exc)
                del run
        except Exception as exc:  # noqa: BLE001
            if not _is_oom(exc):
                raise
            _warn_once(("oom", self.name), f"flag_gems autotune {self.name}: out of memory while tuning {key} "
                       "(its inputs are allocated once more); using the heuristic config. Run "
                       "`python -m flag_gems.pretune` before serving to tune ahead of time.")
            if dev >= 0 and torch.cuda.is_available():
                torch.cuda.empty_cache()
            return TuneResult(self.name, key, default, "default", seconds=time.perf_counter() - t0, trials=trials)
        seconds = time.perf_counter() - t0
        if best is None:  # every candidate failed: the heuristic, not remembered on disk
            logger.warning("autotune %s %s: no candidate ran; heuristic config", self.name, key)
            return TuneResult(self.name, key, default, "default", seconds=seconds, tried=len(trials), trials=trials)
        margin = _env_float("GEMS_AUTOTUNE_MARGIN", 0.02)
        chosen, chosen_us = best
        if default_us is not None and chosen is not default and chosen_us > default_us * (1.0 - margin):
            chosen, chosen_us = default, default_us  # within the margin: keep the heuristic
        native = baseline_us is not None and baseline_us < chosen_us
        config = self._with_native(chosen, native)
        result = TuneResult(self.name, key, config, "tuned", chosen_us, default_us, baseline_us, seconds,
                            len(trials), trials)
        result.path = cache.store(self, key, device_name(dev), result)
        logger.info("autotune %s %s on %s: %s %.2f us (heuristic %s us%s) in %.2f s, %d candidates", self.name,
                    key_text(key), device_name(dev), config, chosen_us,
                    "-" if default_us is None else f"{default_us:.2f}",
                    "" if baseline_us is None else f", native {baseline_us:.2f} us", seconds, len(trials))
        return result

    def warm(self, key: tuple, dev: int, dims: dict | None = None) -> None:
        """Launch the family once with the key's chosen config (compiles it: no compile in a served request)."""
        values = self.lookup(key, dev, dims)
        guard = _device_guard(dev)
        with guard:
            run = self.make_bench(key, dev, dims)
            with self.forcing(self.as_dict(values)):
                run()
            if dev >= 0 and torch.cuda.is_available():
                torch.cuda.synchronize()


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "CUDA out of memory" in str(exc)


def register(tunable: Tunable) -> Tunable:
    """Add a family to :data:`TUNABLES` (by name; a second family of one name is an error).

    Raises:
        ValueError: the name is taken.
    """
    if tunable.name in TUNABLES:
        raise ValueError(f"autotune: a tunable named {tunable.name!r} is already registered")
    TUNABLES[tunable.name] = tunable
    return tunable


def config_for(kernel_name: str, key, device: int | None = None) -> dict:
    """The launch config flag_gems uses for ``key`` of kernel family ``kernel_name``.

    This is the launchers' own lookup (caches, then the tuning policy), for launchers written
    elsewhere (the C++ wrappers): call it once per key and keep the answer.

    Args:
        kernel_name: a name in :data:`TUNABLES` (``"act_and_mul"``, ``"rope"``, ``"matmul"``, ...).
        key: the family's key as a tuple (or list) in the order of ``TUNABLES[name].key_fields``;
            dtypes as ``torch.dtype`` or their names (``"bfloat16"``).
        device: CUDA device index; the current one by default (-1: the CPU interpreter).

    Returns:
        ``{field: value}`` in the order of ``TUNABLES[name].fields``.

    Raises:
        KeyError: no family of that name.
        ValueError: a key of the wrong length.
    """
    tunable = TUNABLES.get(kernel_name)
    if tunable is None:
        raise KeyError(f"config_for: no tunable kernel {kernel_name!r}; known: {', '.join(sorted(TUNABLES))}")
    key = key_from_json(key)
    if len(key) != len(tunable.key_fields):
        raise ValueError(f"config_for({kernel_name!r}): expected a key of {len(tunable.key_fields)} values "
                         f"{tunable.key_fields}, got {len(key)}")
    dev = current_device() if device is None else device
    return tunable.as_dict(tunable.lookup(key, dev))


def clear_memory() -> None:
    """Forget every in-process choice (the next call of each key reads the caches again)."""
    with _LOCK:
        for t in TUNABLES.values():
            t._table.clear()
            t._origin.clear()
        _changed()


_LISTENERS: list = []


def on_change(fn: Callable[[], None]) -> None:
    """Call ``fn()`` whenever a remembered choice may have changed (:func:`clear_memory`, a key
    tuned again with another result): launchers that keep copies of the choices (the C++
    runtime's table, ``flag_gems.c_runtime``) forget them."""
    _LISTENERS.append(fn)


def _changed() -> None:
    for fn in _LISTENERS:
        fn()


def export_entries(dev: int | None = None) -> list:
    """The user cache's records for device ``dev`` that the current kernels and Triton would read, as
    entries of a shipped table (``kernels/tuned/<device>.json``), sorted by kernel and key."""
    from . import _tune_cache as cache

    dev = current_device() if dev is None else dev
    return cache.export(device_name(dev))


def now_iso() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def triton_version() -> str:
    return triton.__version__
