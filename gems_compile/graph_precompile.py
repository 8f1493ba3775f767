"""The graph side of precompiling (``options={"precompile": ...}``): which Triton launches a compiled
graph's first run will make, recorded on fake tensors, then compiled in worker processes.

The kernel side (record mode, :class:`~flag_gems.kernels._precompile.LaunchRecord`, the forked
workers) is ``kernels/_precompile.py``; this module reads FX graphs, which the kernel layer does not:

1. :func:`collect` runs each node that launches our kernels (a ``flag_gems`` op's Python function,
   a registry implementation, a generated pointwise launcher) on fresh fake tensors shaped like the
   node's ``meta["val"]``, under record mode and the graph's autotune policy;
2. :func:`precompile_graph` sends the distinct records to
   :func:`~flag_gems.kernels._precompile.compile_records`.

A node that cannot be recorded (symbolic sizes, data-dependent code, an op without a Python
implementation) is skipped (DEBUG log): the first run compiles its kernels itself.
"""

from __future__ import annotations

import logging
import os

import torch

from .kernels._common import interpreter_mode
from .kernels._precompile import (
    MIN_JOBS,
    TIMEOUT_S,
    LaunchRecord,
    PrecompileResult,
    compile_records,
    precompiled,
    recording_launches,
    warm_compiler,
)

logger = logging.getLogger(__name__)

__all__ = ["collect", "precompile_applies", "precompile_graph", "warm_up"]


class _Skip(Exception):
    """A node whose launches cannot be recorded (its reason)."""


def _python_impl(node):
    """The Python function that runs ``node``'s kernels, or None for a node that launches none of ours."""
    if node.op != "call_function":
        return None
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        if t.namespace != "flag_gems":
            return None
        from torch._library import custom_ops

        opdef = getattr(custom_ops, "OPDEFS", {}).get(f"flag_gems::{t._opname}")
        return getattr(opdef, "_init_fn", None)  # the custom op's function (passes.direct_calls reads it too)
    module = getattr(t, "__module__", None) or ""
    # Registry implementations (lowerings), functions of our ops after direct calls, generated launchers.
    if callable(t) and module.startswith("flag_gems."):
        return t
    return None


def _static(v) -> bool:
    return not isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool))


def _fresh(val):
    """A new fake tensor with ``val``'s dtype, device, sizes, strides and storage offset (in the
    active fake mode): the graph's own values stay untouched by what an implementation does."""
    size, stride, offset = tuple(val.shape), tuple(val.stride()), val.storage_offset()
    if not all(_static(s) for s in (*size, *stride, offset)):
        raise _Skip("symbolic sizes")
    if offset == 0:
        return torch.empty_strided(size, stride, dtype=val.dtype, device=val.device)
    extent = 1 + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else 0
    base = torch.empty(offset + extent, dtype=val.dtype, device=val.device)
    return base.as_strided(size, stride, offset)


def _arg(a):
    """A node argument for the implementation: nodes as fresh fakes (or their static values)."""
    from torch import fx

    if isinstance(a, fx.Node):
        v = a.meta.get("val")
        if isinstance(v, torch.Tensor):
            return _fresh(v)
        if isinstance(v, (int, float, bool)) and _static(v):
            return v
        raise _Skip(f"input {a.name} has no static value")
    if isinstance(a, tuple):
        return tuple(_arg(x) for x in a)
    if isinstance(a, list):
        return [_arg(x) for x in a]
    if isinstance(a, dict):
        return {k: _arg(x) for k, x in a.items()}
    if not _static(a):
        raise _Skip("symbolic argument")
    return a


def collect(gm, policy: str | None = None) -> tuple[list[LaunchRecord], dict]:
    """The launches the first run of ``gm`` will compile, recorded on fake tensors.

    Args:
        gm: a compiled graph (``fx.GraphModule``) after the backend's passes, ``meta["val"]`` on its nodes.
        policy: the autotune policy the graph runs under (``kernels/_autotune.py``), so that the
            launchers pick the configs the run will; None: the thread's.

    Returns:
        ``(records, stats)``: the records, one per distinct (kernel, device, key), without those
        this process launched already (``FastKernel``) or precompiled; ``stats``: ``nodes`` run,
        ``skipped`` nodes (see the module docstring), ``launches`` recorded before deduplication.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

    from .kernels._autotune import enter_policy, exit_policy

    stats = {"nodes": 0, "skipped": 0, "launches": 0}
    unique: dict = {}
    # A fake mode of our own: static shapes only, and nothing recorded touches the graph's ShapeEnv. The
    # launchers resolve their configs under the graph's policy, as its run will (the autotuner must answer
    # alike on fake tensors, which it does for "off" and cached keys; see tests/test_precompile.py).
    with unset_fake_temporarily(), FakeTensorMode(), torch.no_grad():
        previous = enter_policy(policy) if policy is not None else None
        try:
            for node in gm.graph.nodes:
                impl = _python_impl(node)
                if impl is None:
                    continue
                stats["nodes"] += 1
                records: list = []
                try:
                    args, kwargs = _arg(tuple(node.args)), _arg(dict(node.kwargs))
                    with recording_launches(records):
                        impl(*args, **kwargs)
                except Exception as exc:  # noqa: BLE001 - any failure: the first run compiles this node's kernels
                    stats["skipped"] += 1
                    logger.debug("precompile: node %s (%s) not recorded: %s: %s", node.name,
                                 getattr(impl, "__name__", impl), type(exc).__name__, exc)
                stats["launches"] += len(records)
                for r in records:  # those before a failure are launches the run makes too
                    try:
                        unique.setdefault((r.kernel, r.device, r.key), r)
                    except TypeError:  # an unhashable constexpr: FastKernel takes Triton's path for it too
                        logger.debug("precompile: %s: unhashable key, not recorded", r.name)
        finally:
            if policy is not None:
                exit_policy(previous)
    return [r for r in unique.values() if not precompiled(r)], stats



def _enabled() -> bool:
    """Compiled Triton (not the interpreter), a CUDA device, and ``GEMS_PRECOMPILE`` not ``0``."""
    return os.environ.get("GEMS_PRECOMPILE", "1").strip() != "0" and not interpreter_mode() and torch.cuda.is_available()


def warm_up(example_inputs) -> bool:
    """At the start of a graph's compile: when its kernels will be precompiled (a CUDA tensor among
    the inputs, :func:`_enabled`), start the process's compiler warm-up
    (:func:`~flag_gems.kernels._precompile.warm_compiler`), which then runs while the graph is traced.

    Returns:
        Whether a warm-up was started by this call.
    """
    if not _enabled():
        return False
    for t in example_inputs:
        if isinstance(t, torch.Tensor) and t.device.type == "cuda":
            return warm_compiler(t.device.index if t.device.index is not None else torch.cuda.current_device())
    return False


def precompile_applies(gm) -> bool:
    """Whether :func:`precompile_graph` has work for ``gm``: compiled Triton (not the interpreter),
    a CUDA device, ``GEMS_PRECOMPILE`` not ``0``, and a CUDA tensor among the graph's values."""
    if not _enabled():
        return False
    for node in gm.graph.nodes:
        v = node.meta.get("val")
        if isinstance(v, torch.Tensor) and v.device.type == "cuda":
            return True
    return False


def precompile_graph(gm, policy: str | None = None, *, timeout_s: float = TIMEOUT_S) -> PrecompileResult:
    """Record the launches of ``gm``'s first run and compile their kernels in worker processes.

    Args:
        gm: the compiled graph (after the backend's passes).
        policy: the autotune policy the graph runs under.
        timeout_s: the most to wait for the workers.

    Returns:
        A :class:`PrecompileResult` (its ``note()`` is the report's line).
    """
    records, stats = collect(gm, policy)
    if len(records) >= MIN_JOBS:
        result = compile_records(records, timeout_s=timeout_s)
    else:
        result = PrecompileResult(jobs=len(records))
    result.nodes, result.skipped_nodes, result.launches = stats["nodes"], stats["skipped"], stats["launches"]
    logger.info("flag_gems: %s", result.note())
    return result
