"""Aten node lowering: rewrite aten nodes to registered implementations, record every decision.

For each aten node of a (post-AOT) graph, the ``flag_gems.lowerings`` registry decides: an
entry whose ``graph`` policy is on and whose ``supports(...)`` passes on the node's fake
values is rewritten to call its implementation directly (no dispatcher, no eager wrapper);
anything else stays aten, and the report says why (the graph policy with its evidence, an
unsupported input, a declared fallback, or no lowering). The graph policy is separate from
the eager one: an entry on in ``enable()`` is lowered here only where measurements say it
is faster in a graph (``flag_gems.lowerings.registry``). Views and other data-movement-free
ops are counted under one reason so the report stays readable.

Before / after (``_softmax``'s graph policy on)::

    %s = aten._softmax.default(%x, -1, False)   ->   %s = _softmax_default(%x, -1, False)
"""

from __future__ import annotations

import torch
from torch import fx

from ..lowerings.registry import FALLBACKS, lookup
from ..report import GraphReport
from .matching import is_view as is_view_node
from .matching import val

aten = torch.ops.aten

_VIEWS = {"view", "_unsafe_view", "reshape", "t", "transpose", "permute", "expand", "slice", "select", "unsqueeze",
          "squeeze", "split", "chunk", "alias", "detach", "as_strided", "unbind", "split_with_sizes"}


def _val(a):
    """A node argument as ``supports`` sees it: fake values for nodes, inside lists too (``cat``)."""
    if isinstance(a, fx.Node):
        return val(a)
    if isinstance(a, (list, tuple)):
        return type(a)(_val(x) for x in a)
    return a


def _vals(args):
    return [_val(a) for a in args]


# The estimate behind step_estimate: what one kernel of count_kernels' static count costs the host
# (calibrated on the H200's host, benchmarks/NOTES.md session 8: a 4-layer Llama decode step
# issued in 1.6-1.9 ms for ~68 counted kernels, views and allocations included; Inductor's
# launches cost 13-17 µs each), and the device's memory and tensor-core rates a step reaches in
# practice (bf16).
HOST_US_PER_KERNEL = 20.0
DEVICE_BYTES_PER_US = 3.0e6
DEVICE_FLOPS_PER_US = 4.0e8
_GEMMS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}


def _hint(x) -> int:
    """An int, or a SymInt's example value (read without adding a guard: no recompiles)."""
    if isinstance(x, torch.SymInt):
        return int(x.node.hint or 0) if x.node.has_hint() else 0
    return int(x)


def _nbytes(v) -> int:
    if isinstance(v, torch.Tensor):
        return _hint(v.numel()) * v.element_size()
    if isinstance(v, (list, tuple)):
        return sum(_nbytes(x) for x in v)
    return 0


def host_bound(gm: fx.GraphModule) -> bool:
    """Whether ``gm``, run op by op without CUDA graphs, waits on the host rather than the device
    (:func:`step_estimate`'s host µs above its device µs)."""
    host_us, device_us = step_estimate(gm)
    return host_us > device_us


def step_estimate(gm: fx.GraphModule) -> tuple[float, float]:
    """``(host µs, device µs)`` one call of ``gm`` takes when run op by op, estimated.

    An estimate from the graph alone: the host's time is its kernels (``count_kernels``) at
    ``HOST_US_PER_KERNEL`` each; the device's is, per GEMM, the larger of its bytes at
    ``DEVICE_BYTES_PER_US`` and its flops at ``DEVICE_FLOPS_PER_US``, and for every other
    node the bytes it writes. A decode step of a Llama-shaped model is host-bound by this
    measure at batch 1-64 (the weights stream in less time than ~20 launches per layer take
    to issue); a prefill step of 2048 tokens is not (its GEMMs take milliseconds).
    """
    from .pointwise_fusion import count_kernels

    device_us = 0.0
    for n in gm.graph.nodes:
        if n.op != "call_function" or is_view_node(n):
            continue
        nbytes = _nbytes(val(n))
        if n.target in _GEMMS:
            a, b = (val(x) for x in n.args[-2:])
            nbytes += _nbytes(a) + _nbytes(b)
            flops = 2 * _hint(a.numel()) * _hint(b.shape[-1]) if isinstance(a, torch.Tensor) and isinstance(
                b, torch.Tensor) else 0
            device_us += max(nbytes / DEVICE_BYTES_PER_US, flops / DEVICE_FLOPS_PER_US)
        else:
            device_us += nbytes / DEVICE_BYTES_PER_US
    return count_kernels(gm) * HOST_US_PER_KERNEL, device_us


def lower_aten(gm: fx.GraphModule, report: GraphReport, everything: bool = False, cudagraphs: bool = True) -> int:
    """Rewrite the aten nodes of ``gm`` whose entry is on for graphs; returns how many.

    Args:
        gm: a post-AOT aten graph.
        report: where each decision is recorded.
        everything: rewrite every registered entry whose ``supports`` passes, whatever its
            graph policy (``options={"lower_aten": "all"}``, for measuring them in graphs).
        cudagraphs: the graph is replayed as CUDA graphs (the entries' ``graph`` policy: device
            time); False: it runs op by op from the host, and where that makes it host-bound
            (:func:`step_estimate`) the entries' ``graph_host`` policy decides (host time counts too).
    """
    count = 0
    if not cudagraphs and not everything:
        host_us, device_us = step_estimate(gm)
        cudagraphs = host_us <= device_us
        report.notes.append(f"aten lowering for a graph run without CUDA graphs: "
                            f"{'device' if cudagraphs else 'host'}-bound by estimate (host ~{host_us:.0f} µs, "
                            f"device ~{device_us:.0f} µs a call), so the entries' "
                            f"{'graph' if cudagraphs else 'graph_host'} policy decides")
    for node in gm.graph.nodes:
        t = node.target
        if node.op != "call_function" or not isinstance(t, torch._ops.OpOverload) or t.namespace != "aten":
            continue
        name = str(t).removeprefix("aten.")
        entry = lookup(t)
        if entry is None:
            if t in FALLBACKS:
                report.keep(name, FALLBACKS[t])
            elif t.__name__.split(".")[0] in _VIEWS or torch.Tag.view_copy in t.tags or t.is_view:
                report.keep("views", "no data movement")
            else:
                report.keep(name, "no lowering registered")
            continue
        policy = entry.graph_policy(cudagraphs)
        if not (policy.on or everything):
            report.keep(name, f"graph policy off: {policy.reason}")
            continue
        reason = entry.supports(*_vals(node.args), **dict(zip(node.kwargs, _vals(node.kwargs.values()))))
        if reason is not None:
            report.keep(name, reason)
            continue
        node.target = entry.impl
        report.lower(name, entry.kernel)
        count += 1
    if count:
        gm.recompile()
    return count
